"""Compressing one shard: tar members laid out in independent zstd frames, in parallel.

The packing thread reads files straight into frame buffers in tar layout (:func:`write_shard`);
a pool compresses the frames, and one more thread hashes files and compressed bytes in stream
order and hands the frames to a sink. The frame format is described in
:mod:`tlaunch.storage.archive.format`; its reader is :mod:`tlaunch.storage.archive.unpack`.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tlaunch.storage.archive.format import (
    BLOCK,
    FRAME_SIZE,
    RECORD,
    FileEntry,
    Frame,
    hasher,
    tar_end,
    ustar_header,
    zstd,
)
from tlaunch.storage.archive.sources import (
    READ_CHUNK,
    SMALL_FILE,
    Source,
    check_unchanged,
    open_source,
    read_into,
    tar_bytes,
)

_ZEROS = memoryview(bytes(BLOCK))
_MAX_INFLIGHT = 32  # frames being compressed or waiting to be written


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
            fd = open_source(src)
            try:
                if src.size <= SMALL_FILE:
                    got = read_into(fd, frames.room(src.size))
                    frames.written(got, i, last=True)
                else:
                    got = _copy_large(fd, src, i, frames)
                check_unchanged(fd, src, got)
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
        want = min(READ_CHUNK, frames.cap - frames.fill, src.size - seen)
        if want <= 0:
            frames.cut((index, seen))
            continue
        n = read_into(fd, frames.room(want))
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
        self.total = sum(tar_bytes(s.size) for s in files)  # planned tar bytes
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
