"""Fetching a shard while it downloads: frames unpack as their bytes land; a dropped read is
retried or resumed; a failure never leaves a cache entry; the error says what was wrong."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest

from tests import faultfs
from tests.faultfs import Fault
from tlaunch.storage import ArchiveError, StorageUnavailable, fetch, pack, read_manifest, resolve
from tlaunch.storage.archive import compress, sources
from tlaunch.storage.archive import fetch as fetch_module
from tlaunch.storage.archive import unpack as unpack_module
from tlaunch.storage.archive.format import MANIFEST_NAME, SHARDS_DIR, content_id

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 << 10  # one ranged read


@pytest.fixture(autouse=True)
def _small_pieces(monkeypatch):
    """Frames and ranged reads of 64 KiB, so a shard of a few hundred KB takes many of each."""
    monkeypatch.setattr(compress, "FRAME_SIZE", 64 << 10)
    monkeypatch.setattr(compress, "SMALL_FILE", 4096)
    monkeypatch.setattr(fetch_module, "DOWNLOAD_CHUNK", CHUNK)
    faultfs.clear()
    yield
    faultfs.clear()


@pytest.fixture
def tree(tmp_path) -> str:
    root = tmp_path / "data"
    root.mkdir()
    rng = __import__("random").Random(7)
    for i in range(12):
        body = rng.randbytes(40_000) if i % 2 else b"text %d " % i * 6000
        (root / f"f{i:02d}.bin").write_bytes(body)
    (root / "z_large.bin").write_bytes(rng.randbytes(300_000))  # spans several frames
    return str(root)


def tree_bytes(root: str) -> dict[str, bytes]:
    return {name: open(os.path.join(root, name), "rb").read() for name in sorted(os.listdir(root))}


def cache_state(cache: str, archive_id: str) -> tuple[bool, bool, list[str]]:
    """(entry folder there, completion record there, unpack temp dirs left)."""
    names = os.listdir(cache) if os.path.isdir(cache) else []
    return (
        archive_id in names,
        f"{archive_id}.json" in names,
        [n for n in names if ".unpack-" in n],
    )


def test_frames_unpack_while_the_shard_downloads(tree, tmp_path, monkeypatch):
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    pack(tree, url, progress=False)
    (shard,) = read_manifest(url).shards
    assert shard.size > 4 * CHUNK and len(shard.frames) > 4
    unpacked = threading.Event()
    real_frame, real_read = unpack_module._extract_frame, fetch_module.read_range

    def frame(*args):
        real_frame(*args)
        unpacked.set()

    def read(fs, path, start, end):
        if end == shard.size:  # the last read waits until a frame has been unpacked
            assert unpacked.wait(30), "no frame was unpacked before the last bytes arrived"
        return real_read(fs, path, start, end)

    monkeypatch.setattr(unpack_module, "_extract_frame", frame)
    monkeypatch.setattr(fetch_module, "read_range", read)

    path = fetch(url, cache_dir=cache, progress=False)

    assert tree_bytes(path) == tree_bytes(tree)


SMALL = {f"z_small/{i:03d}.txt": b"line %d of some text\n" % i * 120 for i in range(60)}


@pytest.fixture
def mixed(tmp_path) -> str:
    """Two large files, first in path order (as `annotations/` before `train/`), then 60
    small ones."""
    root = tmp_path / "mixed"
    (root / "z_small").mkdir(parents=True)
    rng = random.Random(3)
    for i in range(2):
        (root / f"a_big{i}.bin").write_bytes(rng.randbytes(sources.SMALL_FILE + 300_000))
    for name, body in SMALL.items():
        (root / name).write_bytes(body)
    return str(root)


def serve_last_read_when(monkeypatch, shard_size: int, ready) -> list[bool]:
    """Ranged reads as usual, but the one that ends the shard waits (at most 20 s) for
    ``ready()``; returns [whether it was ready then]."""
    real_read, seen = fetch_module.read_range, []

    def read(fs, path, start, end):
        if end == shard_size:
            deadline = time.monotonic() + 20
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(ready())
        return real_read(fs, path, start, end)

    monkeypatch.setattr(fetch_module, "read_range", read)
    return seen


def test_small_files_unpack_while_the_large_ones_download(mixed, tmp_path, monkeypatch):
    # The small files, most of an unpack's work, must not wait for the shard's last byte.
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    pack(mixed, url, progress=False)
    (shard,) = read_manifest(url).shards

    def small_files_unpacked() -> bool:
        (tmp,) = [os.path.join(cache, n) for n in os.listdir(cache) if ".unpack-" in n]
        return all(
            os.path.isfile(p := os.path.join(tmp, name)) and os.path.getsize(p) == len(body)
            for name, body in SMALL.items()
        )

    seen = serve_last_read_when(monkeypatch, shard.size, small_files_unpacked)

    path = fetch(url, cache_dir=cache, progress=False)

    assert shard.size > 30 * CHUNK  # the large files take most of the reads
    assert seen == [True]
    assert tree_bytes(os.path.join(path, "z_small")) == tree_bytes(os.path.join(mixed, "z_small"))


def test_a_file_split_across_frames_is_hashed_as_its_pieces_land(mixed, tmp_path, monkeypatch):
    # Hashing a large file from its start only after its last frame would leave all of it
    # to hash after the last byte; what is hashed must follow the frames as they land.
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    pack(mixed, url, progress=False)
    manifest = read_manifest(url)
    (shard,) = manifest.shards
    last = manifest.files[-1]
    assert last.path == "a_big1.bin" and last.size > 10 * CHUNK  # split: frames of CHUNK
    hashed: list[tuple[str, int, int]] = []
    real_hash = unpack_module._hash_range

    def hash_range(path, start, end, digest):
        real_hash(path, start, end, digest)
        hashed.append((os.path.basename(path), start, end))

    monkeypatch.setattr(unpack_module, "_hash_range", hash_range)
    seen = serve_last_read_when(
        monkeypatch, shard.size, lambda: any(h[0] == last.path for h in hashed)
    )

    path = fetch(url, cache_dir=cache, progress=False)

    assert seen == [True]
    pieces = [(start, end) for name, start, end in hashed if name == last.path]
    assert pieces[0][0] == 0 and pieces[-1][1] == last.size  # the whole file, once, in order
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
    assert (
        open(os.path.join(path, last.path), "rb").read()
        == open(os.path.join(mixed, last.path), "rb").read()
    )


def test_a_split_file_whose_piece_changes_on_disk_is_refused(mixed, tmp_path, monkeypatch):
    # The digest of a split file is of what is on disk, read back: a piece altered after it
    # was written (here: by the hashing seam, as a flaky disk would) fails the file.
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    report = pack(mixed, url, progress=False)
    real_hash = unpack_module._hash_range

    def hash_range(path, start, end, digest):
        if start == 0 and path.endswith("a_big0.bin"):
            with open(path, "r+b") as f:
                f.write(b"X")
        real_hash(path, start, end, digest)

    monkeypatch.setattr(unpack_module, "_hash_range", hash_range)

    with pytest.raises(ArchiveError, match="'a_big0.bin' does not match the manifest's blake3"):
        fetch(url, cache_dir=cache, progress=False)

    assert cache_state(cache, report.id) == (False, False, [])


def test_a_reset_on_the_third_read_is_retried(tree, tmp_path):
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    report = pack(tree, url, progress=False)
    two_pass = Fault("cat_file", "*/shards/*", error=None, times=2)
    reset = Fault("cat_file", "*/shards/*", ConnectionResetError, times=1)

    with faultfs.faults(two_pass, reset):
        path = fetch(url, cache_dir=cache, progress=False)

    assert len(reset.calls) == 1  # the third read, reset once, then retried
    assert tree_bytes(path) == tree_bytes(tree)
    assert cache_state(cache, report.id) == (True, True, [])


class RecordingBar:
    def __init__(self) -> None:
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_both_progress_bars_count_every_byte_once_across_a_retry(tree, tmp_path, monkeypatch):
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    pack(tree, url, progress=False)
    manifest = read_manifest(url)
    bars = [RecordingBar(), RecordingBar()]  # download, unpack
    monkeypatch.setattr(fetch_module._FetchJob, "_bars", lambda self, progress: bars)
    two_pass = Fault("cat_file", "*/shards/*", error=None, times=2)
    reset = Fault("cat_file", "*/shards/*", ConnectionResetError, times=1)

    with faultfs.faults(two_pass, reset):
        fetch(url, cache_dir=cache, progress=False)

    assert sum(bars[0].updates) == manifest.compressed_size
    assert sum(bars[1].updates) == manifest.total_size


def test_a_download_that_keeps_failing_leaves_no_entry_and_a_rerun_resumes(tree, tmp_path):
    url, cache = "faulty://s/ds.tlar", str(tmp_path / "cache")
    report = pack(tree, url, progress=False)
    (shard,) = read_manifest(url).shards
    two_pass = Fault("cat_file", "*/shards/*", error=None, times=2)
    reset = Fault("cat_file", "*/shards/*", ConnectionResetError, times=None)

    with faultfs.faults(two_pass, reset), pytest.raises(StorageUnavailable) as err:
        fetch(url, cache_dir=cache, progress=False)

    assert "run the same command again to resume" in str(err.value)
    assert "\n" not in str(err.value)
    # Frames of the first two reads may have unpacked: none of it counts as cached.
    assert cache_state(cache, report.id) == (False, False, [])
    part = os.path.join(cache, f".{report.id}.shards", shard.name + ".part")
    assert os.path.getsize(part) == 2 * CHUNK  # what arrived, in order: a rerun resumes there

    with faultfs.faults(Fault("cat_file", "*/shards/*", error=None, times=None)) as (seen,):
        path = fetch(url, cache_dir=cache, progress=False)

    assert len(seen.calls) == -(-(shard.size - 2 * CHUNK) // CHUNK)  # only the rest
    assert tree_bytes(path) == tree_bytes(tree)
    assert cache_state(cache, report.id) == (True, True, [])


def test_a_file_that_fails_its_digest_in_a_late_frame_is_named_and_nothing_is_cached(
    tree, tmp_path, memory_url
):
    url, cache = memory_url + "/ds.tlar", str(tmp_path / "cache")
    pack(tree, url, progress=False)
    loc = resolve(url)
    doc = json.loads(loc.fs.cat_file(loc.join(MANIFEST_NAME)))
    # The manifest is consistent with itself (its id recomputed) but wrong about the last
    # file, which sits in the shard's last frames: the shard itself is what was packed.
    doc["files"][-1]["blake3"] = "0" * 64
    manifest = read_manifest(url)
    files = [f.__class__(f.path, f.size, f.mode, f.digest) for f in manifest.files]
    files[-1] = files[-1].__class__(files[-1].path, files[-1].size, files[-1].mode, "0" * 64)
    doc["id"] = content_id(manifest.dirs, files)
    loc.fs.pipe_file(loc.join(MANIFEST_NAME), json.dumps(doc).encode())

    with pytest.raises(ArchiveError) as err:
        fetch(url, cache_dir=cache, progress=False)

    message = str(err.value)
    assert "'z_large.bin' does not match the manifest's blake3 digest" in message
    assert "\n" not in message
    assert cache_state(cache, doc["id"]) == (False, False, [])


def test_a_shard_damaged_in_the_store_is_told_from_a_bad_file(tree, tmp_path, memory_url):
    url, cache = memory_url + "/ds.tlar", str(tmp_path / "cache")
    report = pack(tree, url, progress=False)
    (shard,) = read_manifest(url).shards
    loc = resolve(url)
    path = loc.join(SHARDS_DIR, shard.name)
    data = bytearray(loc.fs.cat_file(path))
    data[shard.size // 3] ^= 0xFF  # an early frame: it fails long before the shard is here
    loc.fs.pipe_file(path, bytes(data))

    with pytest.raises(ArchiveError, match="does not match its checksum as downloaded") as err:
        fetch(url, cache_dir=cache, progress=False)

    assert shard.name in str(err.value) and "pack it again" in str(err.value)
    assert cache_state(cache, report.id) == (False, False, [])


def test_a_shard_whose_download_ends_before_its_unpack_starts(
    tree, tmp_path, memory_url, monkeypatch
):
    # The download thread may finish (and the shard be checked) before the thread that
    # unpacks it gets to open the file: the file must still be there, and be checked once.
    url, cache = memory_url + "/ds.tlar", str(tmp_path / "cache")
    pack(tree, url, progress=False)
    downloaded = threading.Event()
    real_download, real_unpack = fetch_module._FetchJob._download, fetch_module.unpack_shard

    def download(self, *args):
        try:
            return real_download(self, *args)
        finally:
            downloaded.set()

    def unpack(*args, **kwargs):
        assert downloaded.wait(30), "the download did not end"
        return real_unpack(*args, **kwargs)

    monkeypatch.setattr(fetch_module._FetchJob, "_download", download)
    monkeypatch.setattr(fetch_module, "unpack_shard", unpack)

    path = fetch(url, cache_dir=cache, progress=False)

    assert tree_bytes(path) == tree_bytes(tree)
