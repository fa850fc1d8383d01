"""``tlaunch data pack|fetch|ls``: exit codes and one-line messages, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tlaunch.storage import read_manifest
from tlaunch.storage.archive.cli import main, parse_size
from tlaunch.storage.archive.format import MANIFEST_NAME, SHARDS_DIR


@pytest.fixture
def folder(tmp_path) -> str:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for i in range(20):
        (root / "sub" / f"f{i}.txt").write_text(f"line {i}\n" * (i * 50))
    (root / "blob.bin").write_bytes(os.urandom(300_000))
    return str(root)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    assert err.startswith("tlaunch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_pack_ls_fetch(capsys, tmp_path, folder):
    url, cache, dest = str(tmp_path / "ds.tlar"), str(tmp_path / "cache"), str(tmp_path / "here")

    code, out, _ = run(capsys, "pack", folder, url, "-q", "--shard-size", "1MB", "--level", "5")
    assert code == 0 and out.startswith("packed 21 files") and "uploaded 1 of 1 shards" in out

    code, out, _ = run(capsys, "pack", folder, url, "-q", "--level", "5")
    assert code == 0 and out.startswith(f"nothing to upload: {url} already holds 21 files")

    code, out, _ = run(capsys, "ls", url, "--cache-dir", cache)
    assert (
        code == 0
        and "files       21\n" in out
        and "zstd level 5" in out
        and "cached      no" in out
    )

    code, out, _ = run(capsys, "fetch", url, dest, "--cache-dir", cache, "-q")
    assert code == 0 and out == f"{dest}\n"
    assert Path(dest, "sub", "f3.txt").read_text() == "line 3\n" * 150

    code, out, _ = run(capsys, "ls", url, "--cache-dir", cache)
    assert "cached      yes: " + os.path.join(cache, read_manifest(url).id) in out


def test_progress_goes_to_stderr(capsys, tmp_path, folder):
    code, out, err = run(capsys, "pack", folder, str(tmp_path / "ds.tlar"))
    assert code == 0 and "pack" in err and "B/s" in err and "B/s" not in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required"),
        (["unpack", "x"], "invalid choice"),
        (["pack", "only-dir"], "required"),
        (["pack", "d", "u", "--shard-size", "lots"], "'lots' is not a size"),
        (["pack", "d", "u", "--shard-size", "10kB"], "too small for a shard"),
        (["pack", "d", "u", "--level", "99"], "'99' is not a zstd level"),
        (["fetch", "u", "--threads", "0"], "'0' is not a thread count"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "pack", "--help")
    assert code == 0 and "--shard-size SIZE" in out


def test_fetch_of_a_missing_archive_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "fetch", str(tmp_path / "nope"), "--cache-dir", str(tmp_path / "c"))
    assert code == 1
    assert_one_error_line(err, "no tlaunch data archive at", "tlaunch data pack DIR")


def test_pack_of_a_missing_folder_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "pack", str(tmp_path / "nope"), str(tmp_path / "ds.tlar"), "-q")
    assert code == 1
    assert_one_error_line(err, "is not a directory")


def test_a_corrupted_shard_is_one_line(capsys, tmp_path, folder):
    url = str(tmp_path / "ds.tlar")
    assert run(capsys, "pack", folder, url, "-q")[0] == 0
    shard = Path(url, SHARDS_DIR, read_manifest(url).shards[0].name)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))

    code, _, err = run(capsys, "fetch", url, "--cache-dir", str(tmp_path / "c"), "-q")
    assert code == 1
    assert_one_error_line(err, "does not match its checksum", "pack it again")


def test_an_archive_of_the_old_format_is_one_line(capsys, tmp_path, folder):
    # Format 1 held SHA-256 digests: fetching one says to pack it again, in one line.
    url = str(tmp_path / "ds.tlar")
    assert run(capsys, "pack", folder, url, "-q")[0] == 0
    manifest = Path(url, MANIFEST_NAME)
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "format": "tlaunch-data/1"}))

    code, _, err = run(capsys, "fetch", url, "--cache-dir", str(tmp_path / "c"), "-q")
    assert code == 1
    assert_one_error_line(err, "not a tlaunch-data/2 archive", "'tlaunch-data/1'", "pack it again")


def test_a_hostile_manifest_is_one_line(capsys, tmp_path, folder):
    url = str(tmp_path / "ds.tlar")
    assert run(capsys, "pack", folder, url, "-q")[0] == 0
    manifest = Path(url, MANIFEST_NAME)
    doc = json.loads(manifest.read_text())
    doc["files"][0]["path"] = "../../escape"
    manifest.write_text(json.dumps(doc))

    code, _, err = run(capsys, "fetch", url, "--cache-dir", str(tmp_path / "c"), "-q")
    assert code == 1
    assert_one_error_line(err, "lists '../../escape', which leaves the destination")


def test_destination_in_use_is_one_line(capsys, tmp_path, folder):
    url = str(tmp_path / "ds.tlar")
    assert run(capsys, "pack", folder, url, "-q")[0] == 0
    code, _, err = run(capsys, "fetch", url, folder, "--cache-dir", str(tmp_path / "c"), "-q")
    assert code == 1
    assert_one_error_line(err, "already exists")


def test_sizes_parse_in_both_bases():
    assert parse_size("1GB") == 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size("4194304") == 4 * 2**20
