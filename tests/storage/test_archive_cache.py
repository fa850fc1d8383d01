"""The data cache: an entry counts only once whole and durable, is checked on every hit, and
no archive can fill it with bytes its manifest does not vouch for."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tarfile

import pytest

from tlaunch.storage import ArchiveError, StorageError, fetch, pack, read_manifest
from tlaunch.storage.archive import compress
from tlaunch.storage.archive.format import DIGEST, MANIFEST_NAME, SHARDS_DIR, hasher, zstd

FRAME = 64 << 10
BIG = "big/corpus.bin"  # spans many frames: its digest is checked after every frame is out


@pytest.fixture
def tree(tmp_path, monkeypatch) -> str:
    """Small files and one file spread over many 64 KiB frames."""
    monkeypatch.setattr(compress, "FRAME_SIZE", FRAME)
    monkeypatch.setattr(compress, "SMALL_FILE", 4096)
    rng = random.Random(3)
    root = tmp_path / "data"
    (root / "small").mkdir(parents=True)
    (root / "big").mkdir()
    for i in range(40):
        (root / "small" / f"f{i:02d}.txt").write_bytes(rng.randbytes(rng.randint(0, 3000)))
    (root / BIG).write_bytes(rng.randbytes(5 * FRAME + 1234))
    return str(root)


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


def contents(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- a damaged entry is found on a hit, removed and fetched again ---------------------------


def grow(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"tail")


DAMAGE = {"truncated": lambda path: os.truncate(path, 10), "deleted": os.unlink, "grown": grow}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("victim", ["small/f07.txt", BIG])
def test_a_damaged_cached_file_is_fetched_again_with_one_warning(
    damage, victim, tmp_path, tree, cache, caplog
):
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, progress=False)
    path = fetch(url, cache_dir=cache, progress=False)
    DAMAGE[damage](os.path.join(path, victim))

    with caplog.at_level(logging.WARNING):
        again = fetch(url, cache_dir=cache, progress=False)

    assert again == path
    assert contents(again) == contents(tree)
    (warning,) = warnings_of(caplog)
    assert "damaged" in warning and victim in warning and "\n" not in warning
    assert [n for n in os.listdir(cache) if ".damaged-" in n or ".unpack-" in n] == []


def test_an_entry_without_its_completion_record_is_fetched_again(tmp_path, tree, cache, caplog):
    # What a crash between the rename into place and the record leaves (or an older tlaunch).
    url = str(tmp_path / "ds.tlar")
    report = pack(tree, url, progress=False)
    path = fetch(url, cache_dir=cache, progress=False)
    records = [n for n in os.listdir(cache) if n.startswith(report.id + ".")]
    assert records, "no completion record beside the entry"
    for name in records:
        if not name.endswith(".lock"):
            os.unlink(os.path.join(cache, name))

    with caplog.at_level(logging.WARNING):
        assert fetch(url, cache_dir=cache, progress=False) == path

    assert contents(path) == contents(tree)
    (warning,) = warnings_of(caplog)
    assert "no record that it was completed" in warning


def test_a_damaged_copy_is_not_used_when_the_store_is_unreachable(tmp_path, tree, cache, caplog):
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, progress=False)
    path = fetch(url, cache_dir=cache, progress=False)
    os.truncate(os.path.join(path, "small", "f03.txt"), 1)
    os.unlink(os.path.join(url, MANIFEST_NAME))  # the store is gone

    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="no tlaunch data"):
        fetch(url, cache_dir=cache, progress=False)

    assert any("damaged" in w for w in warnings_of(caplog))


def test_a_hit_does_not_read_the_data(tmp_path, tree, cache, monkeypatch):
    # The check on a hit is a stat per file: a hit on a large dataset must stay instant.
    url = str(tmp_path / "ds.tlar")
    pack(tree, url, progress=False)
    path = fetch(url, cache_dir=cache, progress=False)
    real_open = open

    def no_data_reads(file, *args, **kwargs):
        assert not str(file).startswith(path + os.sep), f"a cache hit read {file}"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_data_reads)
    assert fetch(url, cache_dir=cache, progress=False) == path


# -- per-file digests: an archive cannot put other bytes under an id --------------------------


def rewrite_shard(url: str, index: int, change: dict[str, bytes]) -> None:
    """Replace the bytes of files in shard ``index`` (same sizes), frame by frame, and make the
    manifest's shard entry (digest, size, frame table) match the new bytes -- but not the
    file entries, so the archive keeps the id of the content it no longer holds."""
    manifest_path = os.path.join(url, MANIFEST_NAME)
    with open(manifest_path) as f:
        doc = json.load(f)
    entry = doc["shards"][index]
    shard_path = os.path.join(url, SHARDS_DIR, entry["key"] + ".tar.zst")
    with open(shard_path, "rb") as f:
        data = f.read()
    sizes = [frame[0] for frame in entry["frames"]] or [len(data)]
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(zstd.decompress(data[pos : pos + size]))
        pos += size
    stream = bytearray(b"".join(pieces))
    with tarfile.open(fileobj=io.BytesIO(bytes(stream))) as tar:
        for member in tar.getmembers():
            if member.name in change:
                new = change[member.name]
                assert len(new) == member.size
                stream[member.offset_data : member.offset_data + member.size] = new
    frames, pos = [], 0
    for piece in pieces:
        frames.append(zstd.compress(bytes(stream[pos : pos + len(piece)])))
        pos += len(piece)
    shard = b"".join(frames)
    with open(shard_path, "wb") as f:
        f.write(shard)
    entry.update({DIGEST: hasher(shard).hexdigest(), "size": len(shard)})
    if entry["frames"]:
        entry["frames"] = [
            [len(fr), *old[1:]] for fr, old in zip(frames, entry["frames"], strict=True)
        ]
    with open(manifest_path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("victim", ["small/f11.txt", BIG])
def test_an_archive_claiming_another_archives_id_cannot_poison_the_cache(
    victim, tmp_path, tree, cache
):
    good = str(tmp_path / "good.tlar")
    report = pack(tree, good, progress=False)
    hostile = str(tmp_path / "hostile.tlar")
    shutil.copytree(good, hostile)
    size = os.path.getsize(os.path.join(tree, victim))
    rewrite_shard(hostile, 0, {victim: b"X" * size})
    assert read_manifest(hostile).id == report.id  # it claims the good archive's id

    with pytest.raises(ArchiveError) as err:
        fetch(hostile, cache_dir=cache, progress=False)

    message = str(err.value)
    assert victim in message and "digest" in message and "\n" not in message
    assert not os.path.exists(os.path.join(cache, report.id))
    assert [n for n in os.listdir(cache) if ".unpack-" in n] == []
    assert contents(fetch(good, cache_dir=cache, progress=False)) == contents(tree)


# -- durability: the entry's bytes are on disk before its name and record are -------------------


def test_the_entry_is_synced_before_it_is_renamed_into_place_and_recorded(
    tmp_path, tree, cache, monkeypatch
):
    from tlaunch.storage.archive import cache as cache_module

    url = str(tmp_path / "ds.tlar")
    report = pack(tree, url, progress=False)
    events: list[str] = []
    real_sync, real_rename, real_fsync_dir = (
        cache_module.sync_tree, os.rename, cache_module.fsync_dir,
    )  # fmt: skip
    monkeypatch.setattr(cache_module, "sync_tree", lambda p: events.append("sync") or real_sync(p))
    monkeypatch.setattr(
        cache_module, "fsync_dir", lambda p: events.append("fsync-dir") or real_fsync_dir(p)
    )

    def rename(src, dst, *a, **kw):
        if os.path.basename(str(dst)) == report.id:
            events.append("rename")
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    real_write = cache_module.write_atomic

    def write_record(path, data, **kw):
        if os.path.basename(path).startswith(report.id):
            events.append("record")
        return real_write(path, data, **kw)

    monkeypatch.setattr(cache_module, "write_atomic", write_record)
    fetch(url, cache_dir=cache, progress=False)

    assert events[:4] == ["sync", "rename", "fsync-dir", "record"], events
