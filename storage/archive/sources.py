"""The files to pack: list a folder, cut the list into shards, hash files in parallel.

What is planned here is checked again while it is read: a file whose size or mtime changed
since it was listed fails the pack (:func:`check_unchanged`) rather than being archived half
old, half new.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tlaunch.storage.archive.format import (
    BLOCK,
    ArchiveError,
    data_mode,
    hasher,
    path_limit_reason,
    shown,
)

SMALL_FILE = 1 << 20  # files up to this size are read whole and batched with their neighbours
READ_CHUNK = 4 << 20  # read size for large files
_HASH_BATCH = 8 << 20  # bytes of small files one hashing task takes, to amortize task overhead


@dataclass(frozen=True, slots=True)
class Source:
    """A file to pack, with the stat it was planned from (to notice changes while packing)."""

    path: str  # relative, "/"-separated
    abspath: str
    size: int
    mode: int
    mtime_ns: int


def scan(src: str) -> tuple[list[str], list[Source]]:
    """All directories and regular files under ``src``, sorted by path.

    Symlinks to files are stored as the file they point to (like ``tar -h``): datasets
    downloaded by hub caches are made of such links. Symlinks to directories and special
    files are refused rather than skipped, so nothing is silently missing from the archive.
    """
    root = os.path.abspath(src)
    if not os.path.isdir(root):
        raise ArchiveError(f"{src} is not a directory; `data pack` takes the folder to archive")
    dirs: list[str] = []
    files: list[Source] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(root, rel)) as entries:
            for entry in entries:
                path = f"{rel}/{entry.name}" if rel else entry.name
                _check_name(path, src)
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(path)
                    pending.append(path)
                    continue
                st = _stat_target(entry, path, src)
                files.append(
                    Source(path, entry.path, st.st_size, data_mode(st.st_mode), st.st_mtime_ns)
                )
    dirs.sort()
    files.sort(key=lambda s: s.path)
    return dirs, files


def _check_name(path: str, src: str) -> None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ArchiveError(
            f"{os.path.join(src, path)!r} has a name that is not valid UTF-8; rename it"
        ) from None
    reason = path_limit_reason(path)  # what fetch would refuse in the manifest
    if reason:
        raise ArchiveError(
            f"{shown(os.path.join(src, path))} {reason}; pack a folder nearer to it, or "
            "shorten its path"
        )


def _stat_target(entry: os.DirEntry, path: str, src: str) -> os.stat_result:
    where = os.path.join(src, path)
    try:
        st = entry.stat(follow_symlinks=True)
    except FileNotFoundError:
        raise ArchiveError(f"{where} is a broken symlink; remove it or fix its target") from None
    if stat.S_ISDIR(st.st_mode):
        raise ArchiveError(
            f"{where} is a symlink to a directory, which pack does not follow; "
            "copy that directory in or remove the link"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(
            f"{where} is not a regular file (mode {stat.filemode(st.st_mode)}); move it out of {src}"
        )
    return st


def tar_bytes(size: int) -> int:
    """A member's bytes in the tar stream with a one-block header (longer names take more)."""
    return BLOCK + size + (-size % BLOCK)


def plan_shards(files: list[Source], shard_size: int) -> list[slice]:
    """Cut the sorted file list into runs of at most about ``shard_size`` bytes.

    Content-defined, like rsync's or restic's chunking but at file granularity: past half of
    ``shard_size``, a shard ends after a file whose path hash has its top ``bits`` bits
    zero, with ``bits`` chosen from the mean file size so that a cut comes ~a quarter shard
    later; ``shard_size`` itself forces a cut (about 1 time in 8). Cut points depend on
    paths, not on running offsets, so adding or changing a file changes the shards near it
    and the rest keep their keys: they are neither compressed nor uploaded again.
    """
    if not files:
        return []
    record = sum(BLOCK + f.size for f in files) / len(files)
    bits = max(0, round(math.log2(max(1.0, shard_size / 4 / record))))
    cuts: list[slice] = []
    first = acc = 0
    for i, f in enumerate(files):
        acc += tar_bytes(f.size)
        if acc >= shard_size or (acc >= shard_size // 2 and _is_cut_point(f.path, bits)):
            cuts.append(slice(first, i + 1))
            first, acc = i + 1, 0
    if first < len(files):
        cuts.append(slice(first, len(files)))
    return cuts


def unpack_order(group: list[Source]) -> list[Source]:
    """One shard's files in the order they go into it: small files first, then the large,
    each in path order.

    A fetch unpacks each frame as soon as its bytes arrive, so what it still does after the
    last byte is unpack the last frames and whatever backlog is left. Small files cost the
    most per byte to unpack (creating, checking and closing one costs about what writing
    50 KB does) and, when they are text, the least to download. In path order a folder of
    many small files often comes after the large ones (``annotations/`` before ``train/``),
    and then its whole unpack follows the download. First, it runs while the large files
    download: Johnson's rule for a two-stage pipeline, where the items whose second stage is
    the slower one go first. Within each class path order keeps similar files together for
    the compressor.
    """
    return sorted(group, key=lambda s: s.size > SMALL_FILE)  # stable: path order within each


def _is_cut_point(path: str, bits: int) -> bool:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") >> (64 - bits) == 0


def open_source(src: Source) -> int:
    try:
        return os.open(src.abspath, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:  # only the open: errors writing the archive must not be blamed here
        raise ArchiveError(
            f"cannot read {src.abspath}: {e.strerror}; fix its permissions"
        ) from None


def read_into(fd: int, room: memoryview) -> int:
    """Fill ``room`` from ``fd``; fewer bytes only at the end of the file."""
    got = 0
    while got < len(room) and (n := os.readv(fd, [room[got:]])):
        got += n
    return got


def check_unchanged(fd: int, src: Source, got: int) -> None:
    """After reading: the file still has the size and mtime it was listed with."""
    st = os.fstat(fd)
    if got != src.size or st.st_size != src.size or st.st_mtime_ns != src.mtime_ns:
        raise ArchiveError(
            f"{src.abspath} changed while packing; pack again once nothing writes to the folder"
        )


def _hash_file(src: Source, buf: bytearray) -> str:
    digest = hasher()
    view = memoryview(buf)
    fd = open_source(src)
    try:
        seen = 0
        while seen < src.size and (n := read_into(fd, view[: min(len(buf), src.size - seen)])):
            digest.update(view[:n])  # blake3 releases the GIL on large updates
            seen += n
        check_unchanged(fd, src, seen)
    finally:
        os.close(fd)
    return digest.hexdigest()


def hash_files(files: list[Source], threads: int) -> list[str]:
    """The digest of every file, in parallel threads; small files go in batches."""
    batches: list[list[int]] = [[]]
    acc = 0
    for i, f in enumerate(files):
        if acc >= _HASH_BATCH or (f.size > SMALL_FILE and batches[-1]):
            batches.append([])
            acc = 0
        batches[-1].append(i)
        acc += f.size
    digests = [""] * len(files)

    def run(batch: list[int]) -> None:
        buf = bytearray(READ_CHUNK)
        for i in batch:
            digests[i] = _hash_file(files[i], buf)

    with ThreadPoolExecutor(max(1, min(threads, len(batches)))) as pool:
        for _ in pool.map(run, batches):
            pass
    return digests
