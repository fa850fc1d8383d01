"""--sync-dir's FolderMirror on every store: settle, upload, mirror deletions safely, restore."""

from __future__ import annotations

import os
import shutil

import pytest

from tlaunch.storage import FolderMirror, resolve


def remote_files(url: str) -> dict[str, bytes]:
    loc = resolve(url)
    loc.fs.invalidate_cache()
    root = loc.path.rstrip("/")
    if not loc.fs.exists(root):
        return {}
    return {p[len(root) :].lstrip("/"): loc.fs.cat_file(p) for p in loc.fs.find(root)}


def write(folder, rel: str, data: bytes) -> None:
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def mirror(any_store_url, tmp_path) -> FolderMirror:
    return FolderMirror(str(tmp_path / "ckpts"), any_store_url + "/run1")


def test_a_file_is_uploaded_once_it_has_settled(mirror):
    write(mirror.local, "step-1/model.bin", b"weights one")
    assert mirror.sync() == (0, 0)  # first seen: it may still be being written
    assert remote_files(mirror.url) == {}
    assert mirror.sync() == (1, 0)
    assert remote_files(mirror.url) == {"step-1/model.bin": b"weights one"}
    assert mirror.sync() == (0, 0)  # unchanged: not uploaded again


def test_a_deletion_waits_until_the_successor_is_uploaded(mirror):
    write(mirror.local, "step-1/model.bin", b"weights one")
    mirror.sync(final=True)
    # Rotation as Accelerate's total_limit does it: the old one goes before the new is written.
    shutil.rmtree(os.path.join(mirror.local, "step-1"))
    write(mirror.local, "step-2/model.bin", b"weights two")

    assert mirror.sync() == (0, 0)  # step-2 not settled yet, so step-1 stays at the URL
    assert remote_files(mirror.url) == {"step-1/model.bin": b"weights one"}
    assert mirror.sync() == (1, 1)
    assert remote_files(mirror.url) == {"step-2/model.bin": b"weights two"}


def test_the_final_flush_uploads_and_deletes_everything_outstanding(mirror):
    write(mirror.local, "a.txt", b"a")
    write(mirror.local, "b.txt", b"b")
    mirror.sync(final=True)
    os.remove(os.path.join(mirror.local, "a.txt"))
    write(mirror.local, "c.txt", b"c")
    assert mirror.sync(final=True) == (1, 1)
    assert remote_files(mirror.url) == {"b.txt": b"b", "c.txt": b"c"}


def test_a_missing_folder_deletes_nothing(mirror):
    write(mirror.local, "a.txt", b"a")
    mirror.sync(final=True)
    shutil.rmtree(mirror.local)
    assert mirror.sync(final=True) == (0, 0)
    assert remote_files(mirror.url) == {"a.txt": b"a"}


def test_restore_brings_the_url_back_and_uploads_what_only_this_machine_has(mirror, tmp_path):
    write(mirror.local, "step-1/model.bin", b"weights one")
    mirror.sync(final=True)

    fresh = FolderMirror(str(tmp_path / "machine2" / "ckpts"), mirror.url)
    write(fresh.local, "notes.txt", b"written before the restore")
    assert fresh.restore() == 1
    with open(os.path.join(fresh.local, "step-1", "model.bin"), "rb") as f:
        assert f.read() == b"weights one"
    assert fresh.sync(final=True) == (1, 0)  # notes.txt was never at the URL
    assert remote_files(mirror.url) == {
        "step-1/model.bin": b"weights one",
        "notes.txt": b"written before the restore",
    }


# -- restore takes only keys that name a file inside LOCAL -------------------------------------


HOSTILE_KEYS = {
    "parent": "../../../../x",  # S3 and GCS accept such keys
    "absolute": "/abs.txt",  # run1//abs.txt
    "nul": "a/\0b",
    "through a link": "link/y.txt",  # LOCAL/link -> a folder outside LOCAL
}


@pytest.mark.parametrize("case", sorted(HOSTILE_KEYS))
def test_restore_refuses_a_key_that_leaves_the_folder(case, memory_url, tmp_path, caplog):
    url = memory_url + "/run1"
    loc = resolve(url)
    loc.fs.pipe_file(loc.path + "/good.txt", b"kept")
    loc.fs.pipe_file(loc.path + "/" + HOSTILE_KEYS[case], b"evil")
    local = tmp_path / "w1" / "w2" / "w3" / "w4" / "ckpts"
    outside = tmp_path / "outside"
    outside.mkdir()
    local.mkdir(parents=True)
    (local / "link").symlink_to(outside)

    with caplog.at_level("WARNING"):
        assert FolderMirror(str(local), url).restore() == 1

    assert (local / "good.txt").read_bytes() == b"kept"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "good.txt"]
    assert written == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "skipping" in warning and "\n" not in warning
