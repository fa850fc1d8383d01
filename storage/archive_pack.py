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
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tlaunch.storage.archive_format import (
    BLOCK,
    FRAME_SIZE,
    RECORD,
    ArchiveError,
    FileEntry,
    Frame,
    data_mode,
    hasher,
    tar_end,
    ustar_header,
    zstd,
)

_SMALL = 1 << 20  # files up to this size are read whole and batched with their neighbours
_CHUNK = 4 << 20  # read size for large files
_ZEROS = memoryview(bytes(BLOCK))
_MAX_INFLIGHT = 32  # frames being compressed or waiting to be written
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


def _tar_bytes(size: int) -> int:
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
        acc += _tar_bytes(f.size)
        if acc >= shard_size or (acc >= shard_size // 2 and _is_cut_point(f.path, bits)):
            cuts.append(slice(first, i + 1))
            first, acc = i + 1, 0
    if first < len(files):
        cuts.append(slice(first, len(files)))
    return cuts


def _is_cut_point(path: str, bits: int) -> bool:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") >> (64 - bits) == 0


def _open(src: Source) -> int:
    try:
        return os.open(src.abspath, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:  # only the open: errors writing the archive must not be blamed here
        raise ArchiveError(
            f"cannot read {src.abspath}: {e.strerror}; fix its permissions"
        ) from None


def _read_into(fd: int, room: memoryview) -> int:
    """Fill ``room`` from ``fd``; fewer bytes only at the end of the file."""
    got = 0
    while got < len(room) and (n := os.readv(fd, [room[got:]])):
        got += n
    return got


def _check_unchanged(fd: int, src: Source, got: int) -> None:
    """After reading: the file still has the size and mtime it was listed with."""
    st = os.fstat(fd)
    if got != src.size or st.st_size != src.size or st.st_mtime_ns != src.mtime_ns:
        raise ArchiveError(
            f"{src.abspath} changed while packing; pack again once nothing writes to the folder"
        )


def _hash_file(src: Source, buf: bytearray) -> str:
    digest = hasher()
    view = memoryview(buf)
    fd = _open(src)
    try:
        seen = 0
        while seen < src.size and (n := _read_into(fd, view[: min(len(buf), src.size - seen)])):
            digest.update(view[:n])  # blake3 releases the GIL on large updates
            seen += n
        _check_unchanged(fd, src, seen)
    finally:
        os.close(fd)
    return digest.hexdigest()


def hash_files(files: list[Source], threads: int) -> list[str]:
    """The digest of every file, in parallel threads; small files go in batches."""
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
            digests[i] = _hash_file(files[i], buf)

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
) -> tuple[list[FileEntry], str, int, int, tuple[Frame, ...]]:
    """Tar ``files`` into independent zstd frames, compressed in parallel, and into ``sink``.

    Returns (the files' entries, the digest of the compressed bytes, their size, tar stream
    size, the frame table). Without ``digests`` each file is hashed from the frame buffers
    it was read into, in this one pass. This thread only reads files and lays out the tar
    stream, into frame buffers that ``threads`` compressor threads take in turn while one
    more thread hashes them in order (libzstd and blake3 release the GIL) -- no tar
    process, pipe or extra copy on the way.
    """
    frames = _Framer(level, threads, _Output(sink), files, hashing=digests is None)
    tar_size = 0
    try:
        for i, src in enumerate(files):
            header = ustar_header(src.path, src.size, src.mode)
            padded = src.size + (-src.size % BLOCK)
            if frames.fill and frames.fill + len(header) + padded > frames.cap:
                frames.cut((i, 0))  # a file that fits in one frame is never split
            frames.add(header)
            fd = _open(src)
            try:
                if src.size <= _SMALL:
                    got = _read_into(fd, frames.room(src.size))
                    frames.written(got, i, last=True)
                else:
                    got = _copy_large(fd, src, i, frames)
                _check_unchanged(fd, src, got)
            finally:
                os.close(fd)
            frames.pad(src.size)
            tar_size += len(header) + padded
            on_bytes(src.size)
        end = tar_end(tar_size)
        frames.add(end)  # the buffer has room for it past a full frame
        table = frames.finish()
    finally:
        frames.close()
    digests = digests or frames.digests
    entries = [FileEntry(s.path, s.size, s.mode, d) for s, d in zip(files, digests, strict=True)]
    out = frames.out
    return entries, out.digest.hexdigest(), out.size, tar_size + len(end), table


def _copy_large(fd: int, src: Source, index: int, frames: _Framer) -> int:
    """Read a file into the frames, cutting one wherever it fills up (at a BLOCK multiple)."""
    seen = 0
    while seen < src.size:
        want = min(_CHUNK, frames.cap - frames.fill, src.size - seen)
        if want <= 0:
            frames.cut((index, seen))
            continue
        n = _read_into(fd, frames.room(want))
        seen += n
        frames.written(n, index, last=not n or seen >= src.size)
        if not n:
            break
    return seen


def frame_cap(index: int, left: int) -> int:
    """How many tar bytes frame ``index`` of a shard may hold, with ``left`` bytes to go.

    ``FRAME_SIZE``, except at both ends: the first frames ramp up from 1 MiB, so compressor
    threads start after a millisecond rather than after 16 MiB of reading, and the last ones
    shrink to a quarter of what is left, so no core sits idle while one finishes a big frame
    -- on unpacking as well as packing. Always a multiple of 64 KiB; depends only on the
    files, so the same files give the same frames.
    """
    low = min(FRAME_SIZE, 1 << 20)
    tail = left // 4 >> 16 << 16
    return max(low, min(FRAME_SIZE, low << min(index, 16), tail))


class _Framer:
    """Frame buffers filled by the packing thread, compressed by a pool, written in order.

    At most ``2 * threads`` frames are in flight, and never more than ``_MAX_INFLIGHT`` (512
    MiB of buffers on a many-core VM); buffers are reused, so steady state allocates nothing.
    One more thread does, in stream order, what must see the bytes in order: the digest of
    each file (of the pieces of it in each frame, as the frame is cut) and the writing and
    hashing of the compressed frames. Taking that off the reading thread keeps the
    compressors fed: hashed inline, the reading of small files fell behind them.
    """

    _CAPACITY = FRAME_SIZE + 4 * RECORD  # room for the tar end after a full frame

    def __init__(
        self, level: int, threads: int, out: _Output, files: list[Source], hashing: bool
    ) -> None:
        self.out = out
        self.total = sum(_tar_bytes(s.size) for s in files)  # planned tar bytes
        self.done = 0  # tar bytes in frames already cut
        self.level = level
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="tlaunch-zstd")
        self.serial = ThreadPoolExecutor(1, thread_name_prefix="tlaunch-hash")  # runs in order
        self.limit = min(2 * max(1, threads), _MAX_INFLIGHT)
        self.local = threading.local()
        self.inflight: deque[tuple[tuple[int, int], bytearray, Future, Future | None]] = deque()
        self.writes: deque[Future] = deque()
        self.spare: list[bytearray] = []
        self.table: list[Frame] = []
        self.hashing = hashing
        self.digests = [""] * len(files) if hashing else []
        self.partial: dict[int, Any] = {}  # file index -> digest of a file split across frames
        self.spans: list[tuple[int, int, int, bool]] = []  # (file, start, end, last) this frame
        self.buf = bytearray(self._CAPACITY)
        self.view = memoryview(self.buf)
        self.fill = 0
        self.start = (0, 0)
        self.cap = frame_cap(0, self.total)

    def add(self, data: bytes) -> None:
        self.view[self.fill : self.fill + len(data)] = data
        self.fill += len(data)

    def pad(self, size: int) -> None:
        """Zeros up to the next BLOCK after a file's ``size`` bytes (buffers are reused)."""
        n = -size % BLOCK
        self.view[self.fill : self.fill + n] = _ZEROS[:n]
        self.fill += n

    def room(self, n: int) -> memoryview:
        return self.view[self.fill : self.fill + n]

    def written(self, n: int, index: int, last: bool) -> None:
        """``n`` bytes of file ``index`` were read into ``room()``; ``last``: its final ones."""
        if self.hashing:
            self.spans.append((index, self.fill, self.fill + n, last))
        self.fill += n

    def cut(self, next_start: tuple[int, int]) -> None:
        """End the current frame (hand it to the pool); the next one starts at ``next_start``."""
        self.done += self.fill
        if self.fill:
            view = self.view[: self.fill]
            job = self.pool.submit(self._compress, view)
            hashed = self.serial.submit(self._hash, view, self.spans) if self.spans else None
            self.inflight.append((self.start, self.buf, job, hashed))
            self.buf = self.spare.pop() if self.spare else bytearray(self._CAPACITY)
            self.view, self.fill, self.spans = memoryview(self.buf), 0, []
            self._drain(block=len(self.inflight) >= self.limit)
        self.start = next_start
        self.cap = frame_cap(len(self.table) + len(self.inflight), self.total - self.done)

    def finish(self) -> tuple[Frame, ...]:
        self.cut(self.start)
        while self.inflight:
            self._drain(block=True)
        while self.writes:
            self.writes.popleft().result()
        return tuple(self.table)

    def close(self) -> None:
        """Stop every thread (after an error: before the caller aborts the sink)."""
        for _, _, job, hashed in self.inflight:
            job.cancel()
            if hashed:
                hashed.cancel()
        self.pool.shutdown(wait=True)
        self.serial.shutdown(wait=True, cancel_futures=True)

    def _compress(self, data: memoryview) -> bytes:
        compressor = getattr(self.local, "compressor", None)
        if compressor is None:  # one context per thread, reused frame after frame
            options = {zstd.CompressionParameter.compression_level: self.level,
                       zstd.CompressionParameter.checksum_flag: 1}  # fmt: skip
            compressor = self.local.compressor = zstd.ZstdCompressor(options=options)
        # One call with the whole frame: libzstd compresses straight from the buffer (fed in
        # pieces it copies everything into its window first: measured +20% CPU).
        return compressor.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)

    def _hash(self, view: memoryview, spans: list[tuple[int, int, int, bool]]) -> None:
        for index, start, end, last in spans:
            digest = self.partial.pop(index, None)
            if digest is None:
                digest = hasher(view[start:end])
            else:
                digest.update(view[start:end])
            if last:
                self.digests[index] = digest.hexdigest()
            else:
                self.partial[index] = digest

    def _drain(self, block: bool) -> None:
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()  # raises what writing raised
        while self.inflight and (block or self.inflight[0][2].done()):
            start, buf, job, hashed = self.inflight.popleft()
            data = job.result()
            self.writes.append(self.serial.submit(self.out.write, data))
            self.table.append(Frame(len(data), *start))
            if hashed:
                hashed.result()  # ahead of that write in the serial queue: done or nearly
            self.spare.append(buf)
            block = False


class _Output:
    """Counts and hashes the compressed bytes on their way to the sink."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.digest = hasher()
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
        self.fs, self.path = fs, path
        self.existed = fs.exists(path)  # see abort()
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
        try:  # stores that show an object from its open on (memory://): remove it again
            if not self.existed and self.fs.exists(self.path):
                self.fs.rm_file(self.path)
        except Exception:
            pass
