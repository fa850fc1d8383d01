"""Unpacking one shard: its frames in parallel, each checked member by member.

A member is written only if its 512-byte header is byte-identical to the header tlaunch
writes for the file the manifest lists next: same name, size and mode, a regular file, no
link, owner or device fields. That is stricter than any filter, and the manifest it is
compared against has already been checked (normalized relative paths, no ``..``, modes as
tarfile's ``data`` filter leaves them). Any other member -- from an archive tlaunch did not
write, or a hostile one -- goes the general way: tarfile parses it, our own checks (no
absolute path, no ``..``, no link, device, FIFO or other special; only the regular file the
manifest lists next) and then tarfile's ``data`` filter as a second opinion judge it, and
the refusal names the member and the reason. Files are created with ``O_EXCL |
O_NOFOLLOW`` inside a fresh temp directory, so nothing can be written through a planted
link or over an existing file. The caller renames that directory into place only when
every shard has unpacked and verified.

Frames (see :mod:`tlaunch.storage.archive.format`) unpack in parallel on a thread pool:
libzstd, ``os.write`` and blake3 release the GIL, and the per-member Python work is a
header comparison and three system calls. The shard's digest is computed meanwhile, as one
more task on the same pool; when a frame fails, it tells a damaged shard from a bad archive.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass

from tlaunch.storage.archive.format import (
    BLOCK,
    DIGEST,
    ArchiveError,
    FileEntry,
    ShardEntry,
    frame_starts,
    hasher,
    unsafe_path_reason,
    ustar_header,
    zstd,
)

_RAW_CHUNK = 256 << 10  # compressed bytes per read
# Decompressed bytes per call: small enough to stay in cache until written out, and below
# glibc's mmap threshold, so blocks are recycled from the heap instead of page-faulted in
# fresh (measured: 256 KiB blocks, ~300 page faults per 300 MB; 1 MiB blocks, ~20,000).
_OUT_BLOCK = 256 << 10
_HASH_CHUNK = 1 << 20
_TICK = 4 << 20  # progress is reported in steps of this many bytes
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_ZERO_BLOCK = bytes(BLOCK)
_SPECIAL = "special files are refused"


class ShardCorrupt(ArchiveError):
    """A shard's bytes do not match the checksum its manifest records."""


class Aborted(Exception):
    """Another frame or shard failed: stop at the next member."""


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


class FrameReader:
    """The decompressed bytes of one byte range of a shard file, read forward.

    Also the file object tarfile reads on the general path: it seeks only forward, except
    that ``unread`` puts back a header the fast path looked at.
    """

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._pos, self._end = fd, offset, offset + size
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

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes to ``fd`` straight from the decompressed blocks."""
        while size > 0:
            avail = len(self._block) - self._off
            if not avail:
                if not self._next_block():
                    raise EOFError("the tar stream ends inside a file")
                continue
            view = self._block[self._off : self._off + min(size, avail)]
            self._off += len(view)
            size -= len(view)
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


def unpack_shard(
    path: str,
    shard: ShardEntry,
    files: Sequence[FileEntry],
    dest: str,
    where: str,
    on_bytes: Callable[[int], None],
    pool: Executor,
    abort: threading.Event,
    verify: bool = True,
) -> None:
    """Unpack the shard file at ``path`` into ``dest``, a fresh directory, on ``pool``.

    ``verify``: check the shard's digest (False when it was just checked on download).
    A failure sets ``abort``, which stops every other frame at its next member.
    """
    if not hasattr(tarfile, "data_filter"):
        raise ArchiveError(
            "unpacking needs tarfile's extraction filters (Python 3.10.12+, 3.11.4+, 3.12+); "
            "upgrade Python"
        )
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tasks = frame_tasks(shard)
        umask = _umask()
        split = {t.start[0] for t in tasks if t.start[1]}  # files whose data spans frames
        for j in sorted(split):  # created here, so frames can fill them in any order
            os.close(_create(f"{dest}/{files[j].path}", files[j].mode, umask))
        # The hash is one more task on the pool, queued first, rather than work for this
        # thread: a third busy thread on two cores cost 13% of the wall time (measured).
        hashed = pool.submit(_hash, fd, shard.size) if verify else None
        jobs = [pool.submit(_extract_frame, fd, t, files, dest, where, on_bytes, abort, split,
                            umask) for t in tasks]  # fmt: skip
        for job in jobs:
            job.add_done_callback(lambda job: _error(job) is None or abort.set())
        wait(jobs)
        digest = hashed.result() if hashed is not None else None
    finally:
        os.close(fd)
    errors = [e for e in map(_error, jobs) if e is not None]
    failure = next((e for e in errors if not isinstance(e, Aborted)), None)
    if digest is not None and digest != shard.digest:  # a bit flip can look like a bad member
        raise ShardCorrupt(
            f"{where}: shard {shard.name} does not match its checksum ({DIGEST} {shard.digest[:12]}…)"
        )
    if failure is None and errors:
        raise errors[0]  # stopped because something else failed
    if isinstance(failure, (tarfile.TarError, zstd.ZstdError, EOFError)):
        raise ArchiveError(f"refusing {where}: not a valid tar.zst shard ({failure})")
    if failure is not None:
        raise failure


def _error(job: Future) -> BaseException | None:
    return Aborted() if job.cancelled() else job.exception()


def _hash(fd: int, size: int) -> str:
    digest, pos = hasher(), 0
    buf = memoryview(bytearray(_HASH_CHUNK))
    while n := os.preadv(fd, [buf], pos):
        digest.update(buf[:n])  # blake3 releases the GIL on large updates
        pos += n
    return digest.hexdigest() if pos == size else ""


def _umask() -> int | None:
    """This process's umask, read without changing it (Linux 4.7+); None if unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _create(path: str, mode: int, umask: int | None) -> int:
    try:
        fd = os.open(path, _CREATE, mode)
    except FileNotFoundError:  # a directory the manifest does not list
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, _CREATE, mode)
    if umask is None or mode & umask:
        os.fchmod(fd, mode)
    return fd


def _extract_frame(
    fd: int,
    task: FrameTask,
    files: Sequence[FileEntry],
    dest: str,
    where: str,
    on_bytes: Callable[[int], None],
    abort: threading.Event,
    split: set[int],
    umask: int | None,
) -> None:
    reader = FrameReader(fd, task.offset, task.size)
    (j, o), end = task.start, task.end
    unreported = 0
    general = False  # a member tlaunch did not write: tarfile takes over from here
    while (j, o) < end:
        if abort.is_set():
            raise Aborted
        entry = files[j]
        if o == 0:
            header = ustar_header(entry.path, entry.size, entry.mode)
            got = reader.read(len(header))
            if got != header:
                reader.unread(got)
                general = True
                break
        stop = entry.size if j < end[0] else end[1]  # the frame may end inside this file
        path = f"{dest}/{entry.path}"
        try:
            if j in split:
                out = os.open(path, _REOPEN)
                os.lseek(out, o, os.SEEK_SET)
            else:
                out = _create(path, entry.mode, umask)
            try:
                reader.copy_to(out, stop - o)
            finally:
                os.close(out)
        except OSError as e:
            raise ArchiveError(f"cannot write {entry.path!r} from {where}: {e.strerror}") from None
        unreported += stop - o
        if unreported >= _TICK:
            on_bytes(unreported)
            unreported = 0
        if stop < entry.size:
            o = stop
        else:
            reader.read(-entry.size % BLOCK)
            j, o = j + 1, 0
    on_bytes(unreported)
    if not general:
        general = not _at_end(reader, task.last)
    if general:  # the rest of this frame is for tarfile and our full checks
        _extract_members(reader, files, j, end[0], dest, where, on_bytes, abort, umask)


def _at_end(reader: FrameReader, last: bool) -> bool:
    """At the end of the frame, past the tar end in the last one; else put back what follows."""
    if not last:
        return reader.at_end()
    while block := reader.read(BLOCK):
        if block.strip(b"\0"):
            reader.unread(block)
            return False
    return True


def _extract_members(
    reader: FrameReader,
    files: Sequence[FileEntry],
    index: int,
    stop: int,
    dest: str,
    where: str,
    on_bytes: Callable[[int], None],
    abort: threading.Event,
    umask: int | None,
) -> None:
    """The general way, through tarfile, for ``files[index:stop]`` and anything unexpected."""
    unreported = 0
    with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
        # Opening reads the first header; asking again after an empty start would seek back.
        member, tar.firstmember = tar.firstmember, None
        while member is not None:
            del tar.members[:]  # tarfile keeps every TarInfo; a shard may hold millions
            if abort.is_set():
                raise Aborted
            reason = member_refusal(member, files[index] if index < stop else None)
            if reason is None:
                try:
                    safe = tarfile.data_filter(member, dest)
                except tarfile.FilterError as e:
                    reason = f"is refused by tarfile's data filter ({e})"
            if reason is not None:
                raise ArchiveError(f"refusing {where}: member {member.name!r} {reason}")
            try:
                _write_file(reader, member, safe, dest, umask)
            except OSError as e:
                raise ArchiveError(
                    f"cannot write {member.name!r} from {where}: {e.strerror}"
                ) from None
            reader.seek(tar.offset)  # at the next header, so tarfile need not seek back
            index += 1
            unreported += member.size
            if unreported >= _TICK:
                on_bytes(unreported)
                unreported = 0
            member = tar.next()
    on_bytes(unreported)
    if index < stop:
        raise ArchiveError(
            f"refusing {where}: the shard ends before {files[index].path!r}, "
            "which the manifest lists; pack the archive again"
        )


def member_refusal(member: tarfile.TarInfo, expected: FileEntry | None) -> str | None:
    """Why ``member`` may not be unpacked (a phrase after its name), or None."""
    reason = unsafe_path_reason(member.name)
    if reason and not reason.startswith("is not a normalized"):
        return reason  # absolute or '..': the worst news first
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hard link"
        # A symlink resolves from its own directory, a hard link from the archive root.
        base = posixpath.dirname(member.name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(base, member.linkname))
        if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
            return f"is a {kind} to {member.linkname!r}, which leaves the destination"
        return f"is a {kind} to {member.linkname!r}; tlaunch archives hold regular files only"
    for test, kind in ((member.ischr, "character device"), (member.isblk, "block device"),
                       (member.isfifo, "FIFO")):  # fmt: skip
        if test():
            return f"is a {kind}; {_SPECIAL}"
    if member.isdir():
        return "is a directory entry; tlaunch archives list directories in the manifest only"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"has tar type {member.type!r}; tlaunch archives hold regular files only"
    if reason:
        return reason
    return _manifest_refusal(member, expected)


def _manifest_refusal(member: tarfile.TarInfo, expected: FileEntry | None) -> str | None:
    if expected is None:
        return "is not in the manifest"
    if member.name != expected.path:
        return f"is not the file the manifest lists next ({expected.path!r})"
    if member.size != expected.size:
        return f"has {member.size} bytes where the manifest says {expected.size}"
    if member.mode != expected.mode:
        return f"has mode {member.mode:o} where the manifest says {expected.mode:o}"
    return None


def _write_file(
    reader: FrameReader, member: tarfile.TarInfo, safe: tarfile.TarInfo, dest: str,
    umask: int | None,
) -> None:  # fmt: skip
    reader.seek(member.offset_data)
    fd = _create(os.path.join(dest, safe.name), safe.mode, umask)
    try:
        reader.copy_to(fd, member.size)
    finally:
        os.close(fd)
