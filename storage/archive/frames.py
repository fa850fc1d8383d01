"""Reading a shard's zstd frames: which bytes each frame holds, and a forward reader of them.

The reading counterpart of :mod:`tlaunch.storage.archive.compress`; the frame table is
described in :mod:`tlaunch.storage.archive.format`. :mod:`tlaunch.storage.archive.unpack`
runs one :class:`FrameReader` per frame, in parallel. The bounds that hold against a hostile
shard (:func:`frame_bound`, :class:`HeaderBudget`) are described in the format's "Bounds".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tlaunch.storage.archive.format import (
    BLOCK,
    FRAME_SLACK,
    MAX_HEADER,
    MAX_HEADER_READS,
    MEMBER_SLACK,
    RECORD,
    FileEntry,
    ShardEntry,
    frame_starts,
    header_size,
    zstd,
)

_RAW_CHUNK = 256 << 10  # compressed bytes per read
# Decompressed bytes per call: small enough to stay in cache until written out, and below
# glibc's mmap threshold, so blocks are recycled from the heap instead of page-faulted in
# fresh (measured: 256 KiB blocks, ~300 page faults per 300 MB; 1 MiB blocks, ~20,000).
_OUT_BLOCK = 256 << 10


@dataclass(frozen=True, slots=True)
class FrameTask:
    offset: int  # of its compressed bytes in the shard file
    size: int
    start: tuple[int, int]  # (shard-local file index, offset into its data)
    end: tuple[int, int]  # where the next frame starts; (count, 0) for the last
    last: bool  # holds the tar end


def frame_tasks(shard: ShardEntry) -> list[FrameTask]:
    if not shard.frames:  # not written by tlaunch: one stream, read in order
        return [FrameTask(0, shard.size, (0, 0), (shard.count, 0), True)]
    starts = frame_starts(shard)
    tasks, offset = [], 0
    for k, frame in enumerate(shard.frames):
        last = k == len(shard.frames) - 1
        tasks.append(FrameTask(offset, frame.size, starts[k], starts[k + 1], last))
        offset += frame.size
    return tasks


class Oversized(Exception):
    """A shard asks for more than its manifest allows: a frame expands past its bound, or a
    tar header claims more metadata than :class:`HeaderBudget` reads."""


def frame_bound(task: FrameTask, files: Sequence[FileEntry]) -> int:
    """The most bytes ``task``'s frame may decompress to: tlaunch's tar layout of the part of
    ``files`` it holds (byte-exact for a shard tlaunch wrote), plus slack for another writer's
    headers (``MEMBER_SLACK`` a member, ``FRAME_SLACK`` a frame). Sums rather than a loop:
    this runs for every file of every fetch."""
    (j, o), (k, p) = task.start, task.end
    total = FRAME_SLACK + (2 * BLOCK + RECORD if task.last else 0)  # at least tar_end()
    if o:  # it starts inside file j's data
        f = files[j]
        total += (p if k == j else f.size + (-f.size % BLOCK)) - o
        j += 1
    whole = files[j:k]  # header, data and padding in this frame
    total += sum(f.size + (-f.size % BLOCK) for f in whole) + len(whole) * (BLOCK + MEMBER_SLACK)
    total += sum(header_size(f.path, f.size, f.mode) - BLOCK for f in whole
                 if len(f.path) > 100 or f.size >= 8**11 or not f.path.isascii())  # fmt: skip
    if p and k >= j:  # it ends inside file k's data
        f = files[k]
        total += header_size(f.path, f.size, f.mode) + MEMBER_SLACK + p
    return total


class FrameReader:
    """The decompressed bytes of one byte range of a shard file, read forward.

    Also the file object tarfile reads on the general path (through :class:`HeaderBudget`):
    it seeks only forward, except that ``unread`` puts back a header the fast path looked at.
    More than ``limit`` decompressed bytes (:func:`frame_bound`) raise :class:`Oversized`,
    before they are held.
    """

    def __init__(self, fd: int, offset: int, size: int, limit: int) -> None:
        self._fd, self._pos, self._end = fd, offset, offset + size
        self._start, self._limit = offset, limit
        self._raw = memoryview(bytearray(min(_RAW_CHUNK, size)))  # reused: no page faults
        self._dec = zstd.ZstdDecompressor()
        self._block = memoryview(b"")
        self._off = 0
        self._base = 0  # stream offset of the current block

    def _next_block(self) -> bool:
        """Decompress the next block; False at the end of the range."""
        while True:
            dec = self._dec
            if dec.eof:  # a range may hold several frames (e.g. from the zstd CLI)
                data = dec.unused_data
                if not data and self._pos >= self._end:
                    return False
                self._dec = dec = zstd.ZstdDecompressor()
            elif dec.needs_input:
                if self._pos >= self._end:
                    raise EOFError("the zstd stream is truncated")
                n = os.preadv(self._fd, [self._raw[: self._end - self._pos]], self._pos)
                if not n:
                    raise EOFError("the shard file is shorter than its manifest says")
                data, self._pos = self._raw[:n], self._pos + n
            else:
                data = b""
            out = dec.decompress(data, _OUT_BLOCK)
            if out:
                if self._base + len(self._block) + len(out) > self._limit:
                    raise Oversized(
                        f"the zstd frame at byte {self._start:,} of the shard decompresses to "
                        f"more than {self._limit:,} bytes, all that the manifest's files take "
                        "in it"
                    )
                self._base += len(self._block)
                self._block, self._off = memoryview(out), 0
                return True

    def read(self, size: int = -1) -> bytes:
        end = self._off + size
        if size >= 0 and end <= len(self._block):
            data = self._block[self._off : end].tobytes()
            self._off = end
            return data
        parts = []
        while size:
            avail = len(self._block) - self._off
            if not avail:
                if not self._next_block():
                    break
                continue
            take = avail if size < 0 else min(size, avail)
            parts.append(self._block[self._off : self._off + take])
            self._off += take
            size -= take
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        at = self.tell() - len(data)
        self._block = memoryview(data + self._block[self._off :].tobytes())
        self._base, self._off = at, 0

    def copy_to(self, fd: int, size: int, digest: Any = None) -> None:
        """Write the next ``size`` bytes to ``fd`` straight from the decompressed blocks,
        hashing them into ``digest`` on the way when one is given."""
        while size > 0:
            avail = len(self._block) - self._off
            if not avail:
                if not self._next_block():
                    raise EOFError("the tar stream ends inside a file")
                continue
            view = self._block[self._off : self._off + min(size, avail)]
            self._off += len(view)
            size -= len(view)
            if digest is not None:
                digest.update(view)
            while view:
                view = view[os.write(fd, view) :]

    def at_end(self) -> bool:
        return self._off == len(self._block) and not self._next_block()

    def tell(self) -> int:
        return self._base + self._off

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._base:
            raise OSError(f"shard stream cannot seek back to {pos} (at {self.tell()})")
        while pos > self._base + len(self._block) and self._next_block():
            pass
        self._off = min(pos - self._base, len(self._block))
        return self.tell()


class HeaderBudget:
    """tarfile's view of a :class:`FrameReader`, reading at most ``MAX_HEADER`` bytes in
    ``MAX_HEADER_READS`` reads per member.

    Everything tarfile reads itself is header metadata: file data goes from the reader to
    disk by ``copy_to``. So a read past the budget is a long name or pax header that claims
    too much (or a negative size, which tarfile would pass on as "read everything"); it is
    refused before any of it is read. ``renew`` before each member.
    """

    def __init__(self, reader: FrameReader) -> None:
        self.reader = reader
        self.renew()

    def renew(self) -> None:
        self._bytes, self._reads = MAX_HEADER, MAX_HEADER_READS

    def read(self, size: int = -1) -> bytes:
        if not 0 <= size <= self._bytes:
            raise Oversized(
                f"a tar header asks for {size:,} bytes of long name or pax records; tlaunch "
                f"reads at most {MAX_HEADER:,} bytes of headers per member"
            )
        self._reads -= 1
        if self._reads < 0:
            raise Oversized(f"more than {MAX_HEADER_READS} tar headers precede one member")
        self._bytes -= size
        return self.reader.read(size)

    def tell(self) -> int:
        return self.reader.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.reader.seek(pos, whence)
