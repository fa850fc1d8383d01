"""Data archives: round trips on every store, content addressing, the cache, resume, damage."""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from tlaunch.storage import ArchiveError, StorageError, fetch, info, pack, read_manifest, resolve
from tlaunch.storage.archive import compress, sources
from tlaunch.storage.archive import fetch as fetch_module
from tlaunch.storage.archive import pack as pack_module
from tlaunch.storage.archive import unpack as unpack_module
from tlaunch.storage.archive.format import MANIFEST_NAME, SHARDS_DIR, ustar_header, zstd
from tlaunch.storage.localfs import AtomicFile

MB = 1 << 20
REAL_READ_RANGE = fetch_module.read_range
LONG_NAME = "deep/" + "n" * 120 + ".txt"  # past ustar's 100 bytes: goes through a PAX header


@pytest.fixture
def tree(tmp_path) -> str:
    """Many small files, a few large ones, several modes, empty and unicode-named entries."""
    root = tmp_path / "data"
    rng = random.Random(0)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 8))) for _ in range(200)]
    for i in range(240):
        d = root / f"part{i % 6}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(0, 5000)
        body = b" ".join(rng.choices(words, k=n // 5)) if i % 3 else rng.randbytes(n)
        (d / f"item{i:04d}.bin").write_bytes(body)
    (root / "big_text.bin").write_bytes(b" ".join(rng.choices(words, k=700_000)))
    (root / "big_random.bin").write_bytes(rng.randbytes(3 * MB + 123))
    (root / "zeros.bin").write_bytes(bytes(2 * MB))
    (root / "empty" / "nested").mkdir(parents=True)
    (root / "données").mkdir()
    (root / "données" / "été.txt").write_text("unicode names survive\n")
    (root / "deep").mkdir()
    (root / LONG_NAME).write_text("a long name\n")
    for name, mode in [("part0/item0000.bin", 0o755), ("part1/item0001.bin", 0o600),
                       ("part2/item0002.bin", 0o640), ("big_random.bin", 0o750)]:  # fmt: skip
        os.chmod(root / name, mode)
    return str(root)


def snapshot(root: str) -> dict[str, tuple]:
    """Every entry under ``root``: directories, and files with their bytes and mode."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = ("dir",)
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.normpath(os.path.join(rel, f))] = (
                    fh.read(),
                    stat.S_IMODE(os.lstat(path).st_mode),
                )
    return out


def cache_leftovers(cache: str) -> list[str]:
    return [n for n in os.listdir(cache) if ".unpack-" in n] if os.path.isdir(cache) else []


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


# -- round trips ----------------------------------------------------------------------------


def test_round_trip_keeps_bytes_and_modes_on_every_store(any_store_url, tree, cache):
    url = any_store_url + "/ds.tlar"
    report = pack(tree, url, shard_size=MB, progress=False)
    assert report.shards > 3 and report.shards_written == report.shards

    path = fetch(url, cache_dir=cache, progress=False)

    assert snapshot(path) == snapshot(tree)
    assert path == os.path.join(cache, report.id)
    assert cache_leftovers(cache) == []
    assert not os.path.exists(os.path.join(cache, f".{report.id}.shards"))  # downloads cleaned


def test_one_shard_with_worker_threads_round_trips(memory_url, tree, cache):
    url = memory_url + "/one.tlar"
    report = pack(tree, url, threads=2, progress=False)  # default 1GB shards: one shard
    assert report.shards == 1
    assert snapshot(fetch(url, cache_dir=cache, threads=2, progress=False)) == snapshot(tree)


def test_shards_are_plain_tar_zst(tmp_path, tree, small_frames):
    # Anyone can read a shard with `zstd -d | tar x`, frames and all; tarfile stands in for tar.
    url = str(tmp_path / "plain.tlar")
    pack(tree, url, progress=False)
    manifest = read_manifest(url)
    assert len(manifest.shards[0].frames) > 1
    shard = os.path.join(url, SHARDS_DIR, manifest.shards[0].name)

    with zstd.open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        names = [m.name for m in tar]
    assert names == [f.path for f in manifest.files]


def test_digests_are_blake3_of_the_bytes(tmp_path, tree, small_frames):
    # What `b3sum FILE` prints: a user can check a file or a shard without tlaunch.
    from blake3 import blake3

    url = str(tmp_path / "d.tlar")
    pack(tree, url, progress=False)
    manifest = read_manifest(url)
    for entry in manifest.files:  # whole files, also those split across frames
        with open(os.path.join(tree, entry.path), "rb") as f:
            assert entry.digest == blake3(f.read()).hexdigest(), entry.path
    (shard,) = manifest.shards
    with open(os.path.join(url, SHARDS_DIR, shard.name), "rb") as f:
        assert shard.digest == blake3(f.read()).hexdigest()


def test_a_format_1_archive_is_refused_with_what_to_do(tmp_path, tree, cache):
    import json

    url = str(tmp_path / "old.tlar")
    pack(tree, url, progress=False)
    path = os.path.join(url, MANIFEST_NAME)
    with open(path) as f:
        doc = json.load(f)
    doc["format"] = "tlaunch-data/1"
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(ArchiveError, match=r"format 'tlaunch-data/1'.*pack it again"):
        fetch(url, cache_dir=cache, progress=False)
    assert not os.path.exists(os.path.join(cache, doc["id"]))


# -- frames ---------------------------------------------------------------------------------

FRAME = 64 << 10


@pytest.fixture
def small_frames(monkeypatch) -> int:
    """Frames of 64 KiB, so the test tree's large files span many of them."""
    monkeypatch.setattr(compress, "FRAME_SIZE", FRAME)
    monkeypatch.setattr(compress, "SMALL_FILE", 4096)  # files read whole: < 1/16 of a frame
    return FRAME


def test_frames_are_independent_and_split_large_files_at_block_multiples(
    tmp_path, tree, small_frames
):
    url = str(tmp_path / "framed.tlar")
    pack(tree, url, threads=3, progress=False)
    manifest = read_manifest(url)
    (shard,) = manifest.shards
    files = manifest.shard_files(shard)
    starts = [(f.file, f.offset) for f in shard.frames]
    assert len(starts) > 100 and starts[0] == (0, 0)
    assert any(offset for _, offset in starts)  # large files span frames
    assert all(offset % 512 == 0 and offset < files[j].size for j, offset in starts)
    with open(os.path.join(url, SHARDS_DIR, shard.name), "rb") as f:
        data = f.read()
    assert sum(f.size for f in shard.frames) == len(data) == shard.size
    pos, tar_bytes = 0, 0
    for frame in shard.frames:  # each one decompresses on its own, at the offset the table says
        out = zstd.decompress(data[pos : pos + frame.size])
        assert 0 < len(out) <= FRAME + 11264  # a full frame, plus the tar end in the last
        pos += frame.size
        tar_bytes += len(out)
    assert tar_bytes == shard.tar_size


def test_frames_unpack_in_any_order(tmp_path, tree, cache, small_frames, monkeypatch):
    # One thread taking the frames last to first: a frame that continues a file comes
    # before the one that holds its header, and every file still ends up whole.
    url = str(tmp_path / "framed.tlar")
    pack(tree, url, progress=False)
    real = unpack_module.frame_tasks
    monkeypatch.setattr(unpack_module, "frame_tasks", lambda shard: real(shard)[::-1])
    assert snapshot(fetch(url, cache_dir=cache, threads=1, progress=False)) == snapshot(tree)


@pytest.mark.parametrize("threads", [1, 4])
def test_files_at_every_frame_boundary_round_trip(tmp_path, cache, small_frames, threads):
    # Sizes around the frame size, with headers of one block (short names) and of three (PAX).
    root = tmp_path / "edges"
    root.mkdir()
    rng = random.Random(1)
    sizes = [0, 1, 511, 512, FRAME - 1024, FRAME - 512, FRAME - 1, FRAME, FRAME + 1,
             2 * FRAME - 512, 2 * FRAME, 3 * FRAME + 700, 5]  # fmt: skip
    for i, size in enumerate(sizes):
        (root / f"f{i:02d}").write_bytes(rng.randbytes(size))
        (root / ("L" * 110 + f"{i:02d}")).write_bytes(rng.randbytes(size))
    url = str(tmp_path / "edges.tlar")
    pack(str(root), url, threads=threads, progress=False)
    frames = read_manifest(url).shards[0].frames
    assert len(frames) > len(sizes) and sum(1 for f in frames if f.offset) > 10
    assert snapshot(fetch(url, cache_dir=cache, threads=threads, progress=False)) == snapshot(
        str(root)
    )


class RecordingBar:
    def __init__(self) -> None:
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_unpack_progress_counts_every_byte_once(tmp_path, tree, cache, small_frames, monkeypatch):
    url = str(tmp_path / "framed.tlar")
    pack(tree, url, progress=False)
    bar = RecordingBar()
    monkeypatch.setattr(fetch_module._FetchJob, "_bars", lambda self, progress: [bar])
    fetch(url, cache_dir=cache, threads=2, progress=False)
    assert sum(bar.updates) == read_manifest(url).total_size


def test_empty_folder_round_trips(tmp_path, cache):
    (tmp_path / "src" / "only" / "dirs").mkdir(parents=True)
    url = str(tmp_path / "empty.tlar")
    assert pack(str(tmp_path / "src"), url, progress=False).shards == 0
    assert snapshot(fetch(url, cache_dir=cache, progress=False)) == snapshot(str(tmp_path / "src"))


# -- content addressing ---------------------------------------------------------------------


def spy_writes(monkeypatch) -> list[str]:
    """Record every shard and manifest the packer writes, on any store."""
    written: list[str] = []
    for cls in (AtomicFile, pack_module.StoreSink):
        original = cls.__init__

        def init(self, *args, _original=original, **kwargs):
            written.append(args[-1])
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    original_manifest = pack_module._write_manifest
    monkeypatch.setattr(
        pack_module,
        "_write_manifest",
        lambda loc, m: (written.append(MANIFEST_NAME), original_manifest(loc, m)),
    )
    return written


def listing(url: str) -> dict[str, int]:
    loc = resolve(url)
    loc.fs.invalidate_cache()
    return {p: loc.fs.info(p)["size"] for p in loc.fs.find(loc.path)}


def test_packing_an_unchanged_folder_writes_nothing(any_store_url, tree, monkeypatch):
    url = any_store_url + "/ds.tlar"
    first = pack(tree, url, shard_size=MB, progress=False)
    before = listing(url)
    written = spy_writes(monkeypatch)

    again = pack(tree, url, shard_size=MB, progress=False)

    assert written == []
    assert listing(url) == before
    assert again.unchanged and again.id == first.id and again.bytes_written == 0


def test_a_changed_file_rewrites_only_its_shard(memory_url, tree, cache, monkeypatch):
    url = memory_url + "/ds.tlar"
    first = pack(tree, url, shard_size=MB, progress=False)
    with open(os.path.join(tree, "part3", "item0099.bin"), "ab") as f:
        f.write(b"one more line\n")
    written = spy_writes(monkeypatch)

    second = pack(tree, url, shard_size=MB, progress=False)

    assert [os.path.basename(w) for w in written][-1] == MANIFEST_NAME
    assert second.shards_written == 1 == len(written) - 1
    assert second.id != first.id
    # the replaced shard is gone from the store; the archive still round-trips
    keys = {s.name for s in read_manifest(url).shards}
    stored = {os.path.basename(p) for p in listing(url) if f"/{SHARDS_DIR}/" in p}
    assert stored == keys
    assert snapshot(fetch(url, cache_dir=cache, progress=False)) == snapshot(tree)


def test_a_failed_write_leaves_the_previous_archive_whole(any_store_url, tree, cache, monkeypatch):
    url = any_store_url + "/ds.tlar"
    pack(tree, url, shard_size=MB, progress=False)
    before, packed = listing(url), snapshot(tree)
    with open(os.path.join(tree, "big_text.bin"), "ab") as f:
        f.write(b"one more line\n")
    sink = AtomicFile if "://" not in url else pack_module.StoreSink
    real_write, writes = sink.write, []

    def full_disk_on_the_second_write(self, data):
        writes.append(len(data))
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    with monkeypatch.context() as m:
        m.setattr(sink, "write", full_disk_on_the_second_write)  # on the frame-writing thread
        with pytest.raises(StorageError, match="No space left on device") as err:
            pack(tree, url, shard_size=MB, progress=False)

    assert "\n" not in str(err.value)
    assert listing(url) == before  # no partial shard, no temp file, the old manifest
    assert snapshot(fetch(url, cache_dir=cache, progress=False)) == packed


def test_a_shard_holds_its_small_files_first_each_class_in_path_order(memory_url, tree):
    # The tree's large files sort first ("big_*"); a fetch should meet the small ones early.
    url = memory_url + "/ds.tlar"
    pack(tree, url, progress=False)
    manifest = read_manifest(url)
    paths = [f.path for f in manifest.files]
    small = [f.path for f in manifest.files if f.size <= sources.SMALL_FILE]
    large = [f.path for f in manifest.files if f.size > sources.SMALL_FILE]

    assert len(manifest.shards) == 1 and len(large) == 3 and len(small) > 200
    assert paths == sorted(small) + sorted(large)
    assert sorted(paths) == [s.path for s in sources.scan(tree)[1]]


def test_the_archive_id_ignores_the_order_so_path_ordered_archives_keep_their_cache(
    memory_url, tree, cache, monkeypatch
):
    # Archives packed before small files went first hold their files in path order: they
    # have the same id, so a machine that fetched one has the other without downloading.
    old_url, new_url = memory_url + "/old.tlar", memory_url + "/new.tlar"
    with monkeypatch.context() as m:
        m.setattr(sources, "unpack_order", lambda group: group)
        old = pack(tree, old_url, progress=False)
    new = pack(tree, new_url, progress=False)
    old_files = [f.path for f in read_manifest(old_url).files]
    new_files = [f.path for f in read_manifest(new_url).files]
    assert old_files == sorted(old_files) and new_files != old_files  # two orders

    assert new.id == old.id
    first = fetch(old_url, cache_dir=cache, progress=False)
    monkeypatch.setattr(fetch_module, "read_range", pytest.fail)
    assert fetch(new_url, cache_dir=cache, progress=False) == first
    assert snapshot(first) == snapshot(tree)


def test_shard_cuts_depend_on_paths_so_an_insert_moves_few():
    rng = random.Random(0)
    sizes = {f"f{i:05d}": rng.randint(1000, 80_000) for i in range(3000)}

    def plan(names):
        files = [sources.Source(n, n, sizes[n], 0o644, 0) for n in names]
        return {tuple(names[s]) for s in sources.plan_shards(files, MB)}

    names = sorted(sizes)
    before = plan(names)
    sizes["f01234x"] = 30_000
    after = plan(sorted(sizes))
    assert len(before) > 100 and len(before - after) <= 2


# -- cache, resume, damage ------------------------------------------------------------------


def test_second_fetch_reuses_the_cache_without_downloading(
    memory_url, tree, cache, monkeypatch, caplog
):
    url = memory_url + "/ds.tlar"
    pack(tree, url, shard_size=MB, progress=False)
    first = fetch(url, cache_dir=cache, progress=False)
    loc = resolve(url)
    loc.fs.rm(loc.join(SHARDS_DIR), recursive=True)  # nothing left to download
    monkeypatch.setattr(fetch_module, "read_range", pytest.fail)

    assert fetch(url, cache_dir=cache, progress=False) == first

    loc.fs.rm(loc.join(MANIFEST_NAME))  # the store is gone: this machine still has the data
    assert fetch(url, cache_dir=cache, progress=False) == first
    assert "using the copy this machine fetched before" in caplog.text
    assert snapshot(first) == snapshot(tree)


class Interrupt(RuntimeError):
    pass


def counting_reads(monkeypatch, fail_after: int | None = None) -> list[tuple[int, int]]:
    """Serve ranged reads normally, recording them; optionally fail after N of them."""
    calls: list[tuple[int, int]] = []
    real = REAL_READ_RANGE

    def read(fs, path, start, end):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupt("network dropped")
        calls.append((start, end))
        return real(fs, path, start, end)

    monkeypatch.setattr(fetch_module, "read_range", read)
    return calls


def test_interrupted_fetch_resumes_with_only_the_rest(memory_url, tree, cache, monkeypatch):
    url = memory_url + "/ds.tlar"
    report = pack(tree, url, progress=False)  # one shard, so one download to cut
    (shard,) = read_manifest(url).shards
    monkeypatch.setattr(fetch_module, "DOWNLOAD_CHUNK", 64 * 1024)
    counting_reads(monkeypatch, fail_after=5)

    with pytest.raises(StorageError, match="run the same command again to resume"):
        fetch(url, cache_dir=cache, progress=False)

    part = os.path.join(cache, f".{report.id}.shards", shard.name + ".part")
    assert os.path.getsize(part) == 5 * 64 * 1024
    assert not os.path.exists(os.path.join(cache, report.id)) and cache_leftovers(cache) == []

    calls = counting_reads(monkeypatch)
    path = fetch(url, cache_dir=cache, progress=False)

    assert calls[0][0] == 5 * 64 * 1024
    assert sum(end - start for start, end in calls) == shard.size - 5 * 64 * 1024
    assert snapshot(path) == snapshot(tree)


def test_a_damaged_partial_download_is_fetched_again(memory_url, tree, cache, monkeypatch):
    url = memory_url + "/ds.tlar"
    report = pack(tree, url, progress=False)
    (shard,) = read_manifest(url).shards
    downloads = os.path.join(cache, f".{report.id}.shards")
    os.makedirs(downloads)
    with open(os.path.join(downloads, shard.name + ".part"), "wb") as f:
        f.write(b"not the shard's bytes" * 100)
    calls = counting_reads(monkeypatch)

    path = fetch(url, cache_dir=cache, progress=False)

    assert snapshot(path) == snapshot(tree)
    assert calls[-1][1] == shard.size and any(start == 0 for start, _ in calls)


def flip_byte(url: str, shard_name: str) -> None:
    loc = resolve(url)
    path = loc.join(SHARDS_DIR, shard_name)
    data = bytearray(loc.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    loc.fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_corrupted_shard_is_refused(where, tmp_path, memory_url, tree, cache):
    url = (str(tmp_path / "store") if where == "local" else memory_url) + "/ds.tlar"
    report = pack(tree, url, shard_size=MB, progress=False)
    shard = read_manifest(url).shards[2]
    flip_byte(url, shard.name)

    with pytest.raises(ArchiveError, match="does not match its checksum") as err:
        fetch(url, cache_dir=cache, progress=False)

    assert shard.name in str(err.value) and "\n" not in str(err.value)
    assert "damaged; pack it again" in str(err.value)
    assert not os.path.exists(os.path.join(cache, report.id)) and cache_leftovers(cache) == []


def test_a_missing_shard_is_reported(memory_url, tree, cache):
    url = memory_url + "/ds.tlar"
    pack(tree, url, shard_size=MB, progress=False)
    loc = resolve(url)
    loc.fs.rm(loc.join(SHARDS_DIR, read_manifest(url).shards[1].name))
    with pytest.raises(ArchiveError, match="is missing; pack the archive again"):
        fetch(url, cache_dir=cache, progress=False)


def test_the_damaged_shard_is_reported_not_a_shard_it_stopped(tmp_path, tree, cache, monkeypatch):
    # Shard 1 is damaged; shard 0 stops when the failure sets the abort flag and ends first,
    # while shard 1 is still hashing: the error must still name the damage, not "Aborted".
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, shard_size=MB, progress=False)
    first, damaged = read_manifest(url).shards[:2]
    flip_byte(url, damaged.name)
    stopped = threading.Event()
    real_unpack, real_hash = fetch_module.unpack_shard, unpack_module._hash

    def unpack(path, shard, files, dest, where, on_bytes, pool, abort, verify=True):
        if shard.name == first.name:
            assert abort.wait(30), "the damaged shard never set the abort flag"
            stopped.set()
            raise unpack_module.Aborted
        return real_unpack(path, shard, files, dest, where, on_bytes, pool, abort, verify)

    def hash_shard(fd, size):
        if damaged.name in os.readlink(f"/proc/self/fd/{fd}"):
            assert stopped.wait(30), "shard 0 did not stop"
        return real_hash(fd, size)

    monkeypatch.setattr(fetch_module, "unpack_shard", unpack)
    monkeypatch.setattr(unpack_module, "_hash", hash_shard)
    with pytest.raises(ArchiveError, match=f"{damaged.name} does not match its checksum"):
        fetch(url, cache_dir=cache, progress=False)


def test_concurrent_fetches_unpack_once(tmp_path, tree, cache, monkeypatch):
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, shard_size=MB, progress=False)
    fills = []
    real = fetch_module._fetch_into_cache

    def slow_fill(*args, **kwargs):
        fills.append(1)
        time.sleep(0.3)  # long enough that the other caller must wait on the lock
        return real(*args, **kwargs)

    monkeypatch.setattr(fetch_module, "_fetch_into_cache", slow_fill)
    results: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(fetch(url, cache_dir=cache, progress=False))
        except BaseException as e:  # surfaced by the assert below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1 and fills == [1]


@pytest.mark.timeout(120)
def test_concurrent_fetches_across_processes(tmp_path, tree, cache):
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, shard_size=MB, progress=False)
    code = (
        "import sys; from tlaunch.storage import fetch; "
        "print(fetch(sys.argv[1], cache_dir=sys.argv[2], progress=False))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, url, cache], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert snapshot(outs[0][0].strip()) == snapshot(tree)
    assert cache_leftovers(cache) == []


# -- destinations, info, packing refusals -------------------------------------------------------


def test_dest_becomes_a_link_to_the_cache(tmp_path, tree, cache):
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, progress=False)
    dest = str(tmp_path / "work" / "data")

    assert fetch(url, dest, cache_dir=cache, progress=False) == dest
    assert os.path.islink(dest) and os.readlink(dest).startswith(cache)
    assert fetch(url, dest, cache_dir=cache, progress=False) == dest  # again: fine
    assert snapshot(dest) == snapshot(tree)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    with pytest.raises(ArchiveError, match="already exists"):
        fetch(url, str(occupied), cache_dir=cache, progress=False)
    assert (occupied / "mine.txt").read_text() == "keep me"


def test_info_describes_the_archive_and_the_cache(tmp_path, tree, cache):
    url = str(tmp_path / "ds.tlar")
    report = pack(tree, url, shard_size=MB, progress=False)
    before = info(url, cache_dir=cache)
    assert (before.files, before.shards, before.cached) == (report.files, report.shards, None)
    assert before.total_size == report.total_size and before.ratio > 1
    fetch(url, cache_dir=cache, progress=False)
    assert info(url, cache_dir=cache).cached == os.path.join(cache, report.id)


def test_symlinked_files_are_stored_as_files(tmp_path, cache):
    (tmp_path / "outside.txt").write_text("real bytes")
    src = tmp_path / "src"
    src.mkdir()
    (src / "link.txt").symlink_to(tmp_path / "outside.txt")
    url = str(tmp_path / "ds.tlar")
    pack(str(src), url, progress=False)
    out = fetch(url, cache_dir=cache, progress=False)
    assert not os.path.islink(os.path.join(out, "link.txt"))
    with open(os.path.join(out, "link.txt")) as f:
        assert f.read() == "real bytes"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda src, tmp: (src / "d").symlink_to(tmp), "is a symlink to a directory"),
        (lambda src, tmp: (src / "x").symlink_to(tmp / "missing"), "is a broken symlink"),
        (lambda src, tmp: os.mkfifo(src / "pipe"), "is not a regular file"),
    ],
)
def test_pack_refuses_what_it_cannot_store(tmp_path, setup, message):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine")
    setup(src, tmp_path)
    with pytest.raises(ArchiveError, match=message):
        pack(str(src), str(tmp_path / "ds.tlar"), progress=False)


def test_pack_refuses_a_location_holding_other_files(tmp_path, tree):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not an archive")
    with pytest.raises(ArchiveError, match="already holds other files"):
        pack(tree, str(tmp_path / "busy"), progress=False)
    with pytest.raises(ArchiveError, match="inside the folder being packed"):
        pack(tree, os.path.join(tree, "out.tlar"), progress=False)


@pytest.mark.parametrize(("store", "step"), [("local", "scan"), ("memory", "hash_files")])
def test_a_file_changing_while_packing_is_refused(
    store, step, tmp_path, memory_url, tree, monkeypatch
):
    # local: one pass, the file changes after it was listed; memory: two passes (the object
    # name is needed before the upload), the file changes after it was hashed.
    url = (str(tmp_path / "store") if store == "local" else memory_url) + "/ds.tlar"
    real = getattr(sources, step)

    def then_touch(*args):
        result = real(*args)
        with open(os.path.join(tree, "zeros.bin"), "ab") as f:
            f.write(b"late write")
        return result

    monkeypatch.setattr(sources, step, then_touch)
    with pytest.raises(ArchiveError, match="changed while packing"):
        pack(tree, url, progress=False)
    assert not resolve(url).fs.exists(resolve(url).join(MANIFEST_NAME))


def test_ustar_headers_match_tarfile():
    for name, size, mode in [
        ("a", 0, 0o644),
        ("dir/file.bin", 12345, 0o755),
        ("x" * 100, 1, 0o600),
    ]:
        info_ = tarfile.TarInfo(name)
        info_.size, info_.mode, info_.mtime, info_.uname, info_.gname = size, mode, 0, "", ""
        assert ustar_header(name, size, mode) == info_.tobuf(format=tarfile.USTAR_FORMAT)
    # Past ustar's limits the header is PAX: tarfile must read the full name back.
    stream = ustar_header(LONG_NAME, 5, 0o644) + b"hello".ljust(512, b"\0") + bytes(1024)
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, tar.extractfile(member).read()) == (LONG_NAME, b"hello")


def test_manifest_json_round_trips_awkward_names():
    # The manifest writes file rows itself; names json must escape come back unchanged.
    from tlaunch.storage.archive.format import (
        FileEntry,
        Frame,
        Manifest,
        ShardEntry,
        content_id,
        parse_manifest,
    )

    names = ['quote"d', "back\\slash", "new\nline\ttab", "été/日本", "ctl\x01\x7f", "{a}, {b}"]
    files = tuple(FileEntry(n, i, 0o644, f"{i:064x}") for i, n in enumerate(sorted(names)))
    shard = ShardEntry("a" * 64, "b" * 64, 5, 9, 0, len(files), (Frame(5, 0, 0),))
    manifest = Manifest(content_id(["été"], files), 3, ("été",), files, (shard,))
    assert parse_manifest(manifest.to_json(), "here") == manifest
