"""Packing a folder: list it, cut it into shards, hash and compress what the store lacks.

A shard is named by a hash of its files' contents. A shard that may already be in the
store (the previous manifest has a shard of the same paths, sizes and modes) is hashed
first and compressed only if its content changed: packing an unchanged folder reads it
once and writes nothing. Any other shard is hashed while it is compressed, in one pass,
when the store lets it be named afterwards (a rename, on local disks and the Drive mount).
Object stores need the name before the upload starts, so there the hash pass comes first
and the second read is served by the page cache (a shard is about --shard-size, 1 GB
by default).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from tlaunch.storage.archive_format import (
    BLOCK,
    ArchiveError,
    FileEntry,
    data_mode,
    tar_end,
    tar_padding,
    ustar_header,
    zstd,
)

_SMALL = 1 << 20  # files up to this size are read whole and batched with their neighbours
_FEED = 4 << 20  # bytes per compressor call: large enough that per-call overhead vanishes
_CHUNK = 4 << 20  # read size for large files
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
        acc += BLOCK + f.size + (-f.size % BLOCK)
        if acc >= shard_size or (acc >= shard_size // 2 and _is_cut_point(f.path, bits)):
            cuts.append(slice(first, i + 1))
            first, acc = i + 1, 0
    if first < len(files):
        cuts.append(slice(first, len(files)))
    return cuts


def _is_cut_point(path: str, bits: int) -> bool:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") >> (64 - bits) == 0


@contextmanager
def _open_unchanged(src: Source) -> Iterator[BinaryIO]:
    try:
        f = open(src.abspath, "rb", buffering=0)  # noqa: SIM115 -- closed by the with below
    except OSError as e:  # only the open: errors writing the archive must not be blamed here
        raise ArchiveError(
            f"cannot read {src.abspath}: {e.strerror}; fix its permissions"
        ) from None
    with f:
        st = os.fstat(f.fileno())
        if st.st_size != src.size or st.st_mtime_ns != src.mtime_ns:
            raise _changed(src)
        yield f


def _changed(src: Source) -> ArchiveError:
    return ArchiveError(
        f"{src.abspath} changed while packing; pack again once nothing writes to the folder"
    )


def _sha256_file(src: Source, buf: bytearray) -> str:
    digest = hashlib.sha256()
    seen = 0
    with _open_unchanged(src) as f:
        if src.size <= _SMALL:
            data = f.read()
            digest.update(data)
            seen = len(data)
        else:
            view = memoryview(buf)
            while n := f.readinto(buf):
                digest.update(view[:n])  # hashlib releases the GIL on large updates
                seen += n
    if seen != src.size:
        raise _changed(src)
    return digest.hexdigest()


def hash_files(files: list[Source], threads: int) -> list[str]:
    """sha256 of every file, in parallel threads; small files go in batches."""
    batches: list[list[int]] = [[]]
    acc = 0
    for i, f in enumerate(files):
        if acc >= _HASH_BATCH or (f.size > _SMALL and batches[-1]):
            batches.append([])
            acc = 0
        batches[-1].append(i)
        acc += f.size
    digests = [""] * len(files)

    def run(batch: list[int]) -> None:
        buf = bytearray(_CHUNK)
        for i in batch:
            digests[i] = _sha256_file(files[i], buf)

    with ThreadPoolExecutor(max(1, min(threads, len(batches)))) as pool:
        for _ in pool.map(run, batches):
            pass
    return digests


def write_shard(
    files: list[Source],
    level: int,
    threads: int,
    sink: Any,
    on_bytes: Callable[[int], None],
    digests: list[str] | None = None,
) -> tuple[list[FileEntry], str, int, int]:
    """Tar ``files`` straight into a zstd compressor and ``sink``.

    Returns (the files' entries, sha256 of the compressed bytes, their size, tar stream
    size). Without ``digests`` each file is hashed as it is read, in this one pass. One
    zstd frame with ``nb_workers`` threads inside libzstd: this thread only reads files,
    hashes and builds headers -- no tar process, pipe or extra copy on the way.
    """
    options = {zstd.CompressionParameter.compression_level: level,
               zstd.CompressionParameter.checksum_flag: 1}  # fmt: skip
    if threads > 1:
        options[zstd.CompressionParameter.nb_workers] = threads
    compressor = zstd.ZstdCompressor(options=options)
    out = _Output(sink)
    entries: list[FileEntry] = []
    pending = bytearray()
    tar_size = 0
    for i, src in enumerate(files):
        header = ustar_header(src.path, src.size, src.mode)
        pending += header
        with _open_unchanged(src) as f:
            if src.size <= _SMALL:
                data = f.read()
                if len(data) != src.size:
                    raise _changed(src)
                digest = digests[i] if digests else hashlib.sha256(data).hexdigest()
                pending += data
            else:
                out.write(compressor.compress(pending))
                pending = bytearray()
                computed = _compress_large(f, src, compressor, out, hashing=digests is None)
                digest = digests[i] if digests else computed
        entries.append(FileEntry(src.path, src.size, src.mode, digest))
        pending += tar_padding(src.size)
        tar_size += len(header) + src.size + (-src.size % BLOCK)
        if len(pending) >= _FEED:
            out.write(compressor.compress(pending))
            pending = bytearray()
        on_bytes(src.size)
    end = tar_end(tar_size)
    out.write(compressor.compress(pending + end))
    out.write(compressor.flush())
    return entries, out.digest.hexdigest(), out.size, tar_size + len(end)


def _compress_large(f: BinaryIO, src: Source, compressor: Any, out: _Output, hashing: bool) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    seen = 0
    while n := f.readinto(buf):
        if hashing:
            digest.update(view[:n])
        out.write(compressor.compress(view[:n]))
        seen += n
    if seen != src.size:
        raise _changed(src)
    return digest.hexdigest()


class _Output:
    """Counts and hashes the compressed bytes on their way to the sink."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.digest.update(data)
            self.size += len(data)
            self.sink.write(data)


class LocalSink:
    """Local disks and the Drive mount: write a temp name, fsync, rename into place.

    A crash leaves only a dot-file, never a truncated shard under its real name.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        head, tail = os.path.split(path)
        self.tmp = os.path.join(head, f".{tail}.tmp-{os.getpid()}-{threading.get_ident()}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 -- closed by commit() or abort()

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self, path: str | None = None) -> None:
        """Rename into place, as ``path`` when the name is only known now (hashed content)."""
        self.file.flush()
        os.fsync(self.file.fileno())  # the manifest will name this file: it must be on disk
        self.file.close()
        os.replace(self.tmp, path or self.path)

    def abort(self) -> None:
        self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class StoreSink:
    """Object stores: stream into ``fs.open(path, "wb")`` from a helper thread.

    The object appears only when its upload completes (GCS, S3), so no temp name is needed
    -- and a rename there is a copy. The helper thread lets compression run while the
    previous chunk is on the network.
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.path = path
        self.file = fs.open(path, "wb")
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tlaunch-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.file.write(data)
                except BaseException as e:  # handed to the compressing thread
                    self.error = e

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def commit(self, path: str | None = None) -> None:
        assert path in (None, self.path), "an object's name is fixed when its upload starts"
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.file.close()

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join()
        try:
            self.file.discard()  # cancels a resumable / multipart upload
            self.file.closed = True  # so garbage collection does not commit a partial object
        except Exception:  # best effort: an unfinished object is never named by a manifest
            pass
