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
link or over an existing file. Every file's bytes are hashed on their way to disk and
compared with the manifest's digest -- the archive id is a digest of those, so what lands is
what the id names, whatever the shards hold. The caller renames the directory into place
only when every shard has unpacked and verified.

Frames (see :mod:`tlaunch.storage.archive.format`; read by :mod:`.frames`) unpack in parallel on a thread pool:
libzstd, ``os.write`` and blake3 release the GIL, and the per-member Python work is a
header comparison, a digest and three system calls. A file split across frames is hashed
back from the page cache as its pieces land in order (:class:`_SplitFiles`). The shard's own
digest is computed only when something failed: it tells a damaged shard from a bad archive.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from typing import Any

from tlaunch.storage.archive.format import (
    BLOCK,
    DIGEST,
    ArchiveError,
    FileEntry,
    ShardEntry,
    hasher,
    shown,
    unsafe_path_reason,
    ustar_header,
    zstd,
)
from tlaunch.storage.archive.frames import (
    FrameReader,
    FrameTask,
    HeaderBudget,
    Oversized,
    frame_bound,
    frame_tasks,
)

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
    ready: Callable[[int], None] | None = None,
) -> None:
    """Unpack the shard file at ``path`` into ``dest``, a fresh directory, on ``pool``.

    Every file is checked against its digest in ``files``. ``verify``: when that or anything
    else fails, hash the shard to tell a damaged shard (:class:`ShardCorrupt`) from a bad
    archive (False when the shard is checked on download). A failure sets ``abort``, which
    stops every other frame at its next member. ``ready(n)``, when given, returns once the
    file holds its first ``n`` bytes (it is still being downloaded), or raises
    :class:`Aborted`: each frame is handed to ``pool`` as soon as it is all there.
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
        spans = _SplitFiles(files, split, tasks, dest, pool, abort)
        jobs: list[Future] = []
        stopped: list[BaseException] = []  # the download ended before all frames were there
        for t in tasks:
            if ready is not None:
                try:
                    ready(t.offset + t.size)
                except Aborted as e:
                    stopped.append(e)
                    break
            job = pool.submit(_unpack_frame, spans, fd, t, files, dest, where, on_bytes, abort,
                              split, umask)  # fmt: skip
            job.add_done_callback(lambda job: _error(job) is None or abort.set())
            jobs.append(job)
        wait(jobs)
        errors = [e for e in map(_error, jobs) if e is not None] + stopped or spans.check(where)
        failure = next((e for e in errors if not isinstance(e, Aborted)), None)
        # Only now the shard's digest: with every file's checked, it tells what failed.
        digest = _hash(fd, shard.size) if verify and failure is not None else None
    finally:
        os.close(fd)
    if digest is not None and digest != shard.digest:  # a bit flip can look like a bad member
        raise ShardCorrupt(
            f"{where}: shard {shard.name} does not match its checksum ({DIGEST} {shard.digest[:12]}…)"
        )
    if failure is None and errors:
        raise errors[0]  # stopped because something else failed
    if isinstance(failure, (tarfile.TarError, zstd.ZstdError, EOFError)):
        raise ArchiveError(f"refusing {where}: not a valid tar.zst shard ({failure})")
    if isinstance(failure, Oversized):
        raise ArchiveError(
            f"refusing {where}: {failure}; the archive is damaged or hostile; pack it again"
        )
    if failure is not None:
        raise failure


def _digest_refusal(where: str, entry: FileEntry) -> ArchiveError:
    return ArchiveError(
        f"refusing {where}: member {entry.path!r} does not match the manifest's {DIGEST} "
        f"digest ({entry.digest[:12]}…); the archive is damaged or not what it claims; pack it again"
    )


class _SplitFiles:
    """Digests of the files whose data spans frames, hashed from the page cache as they land.

    Their pieces unpack on different threads in any order, and BLAKE3 hashes a file front to
    back only: so each file's digest follows the run of its pieces, from its start, that are
    written, reading it back from the page cache on the pool whenever a frame extends that
    run. When the last frame holding a piece is done, only what is not yet hashed is left --
    about a frame, rather than the whole file, which for a file of several GB at the end of
    a shard would be seconds after its last byte arrived.
    """

    def __init__(self, files: Sequence[FileEntry], split: set[int], tasks: list[FrameTask],
                 dest: str, pool: Executor, abort: threading.Event) -> None:  # fmt: skip
        self.files, self.dest, self.pool, self.abort = files, dest, pool, abort
        self.left = dict.fromkeys(split, 0)  # frames still to finish, per split file
        for task in tasks:
            for j in self._touched(task):
                self.left[j] += 1
        self.lock = threading.Lock()
        self.written: dict[int, dict[int, int]] = {j: {} for j in split}  # start -> end
        self.runs = {j: _Run() for j in split}
        self.digests: dict[int, Future] = {}

    def _touched(self, task: FrameTask) -> list[int]:
        files = range(task.start[0], task.end[0] + (1 if task.end[1] else 0))
        return [j for j in files if j in self.left]

    def frame_done(self, task: FrameTask) -> None:
        with self.lock:
            for j in self._touched(task):
                start = task.start[1] if task.start[0] == j else 0
                self.written[j][start] = task.end[1] if task.end[0] == j else self.files[j].size
                self.left[j] -= 1
                job = self.pool.submit(self._hash_written, j)
                if not self.left[j]:  # every piece is written: this one ends with the digest
                    self.digests[j] = job

    def _hash_written(self, j: int) -> str | None:
        """Hash what is written of file ``j`` past what is hashed; its digest once whole."""
        run, size = self.runs[j], self.files[j].size
        with run.lock:  # one at a time per file, in file order, whichever frame came last
            if run.error is None:
                try:
                    while not self.abort.is_set():
                        with self.lock:
                            end = self.written[j].pop(run.at, None)
                        if end is None:
                            break
                        _hash_range(f"{self.dest}/{self.files[j].path}", run.at, end, run.digest)
                        run.at = end
                except OSError as e:
                    run.error = e
            with self.lock:
                whole = not self.left[j]
            if not whole:
                return None
            if run.at == size:
                return run.digest.hexdigest()
            if self.abort.is_set():
                raise Aborted
            raise run.error or OSError(f"{self.files[j].path} was not written whole")

    def check(self, where: str) -> list[BaseException]:
        """After every frame succeeded: [] when each split file matches its digest."""
        wait(self.digests.values())
        for j, job in sorted(self.digests.items()):
            if (error := _error(job)) is not None:
                return [error]
            if job.result() != self.files[j].digest:
                return [_digest_refusal(where, self.files[j])]
        return []


class _Run:
    """One split file's digest so far: of its first ``at`` bytes."""

    def __init__(self) -> None:
        self.digest, self.at = hasher(), 0
        self.error: OSError | None = None
        self.lock = threading.Lock()


def _unpack_frame(spans: _SplitFiles, fd: int, task: FrameTask, *args: Any) -> None:
    _extract_frame(fd, task, *args)
    spans.frame_done(task)  # inside the task: wait(jobs) sees every digest submitted


def _error(job: Future) -> BaseException | None:
    return Aborted() if job.cancelled() else job.exception()


def hash_span(fd: int, digest: Any, start: int = 0, end: int | None = None) -> int:
    """Hash bytes ``[start, end)`` of ``fd`` into ``digest`` (to the file's end when ``end``
    is None, or sooner where the file ends); returns the offset it got to."""
    span = _HASH_CHUNK if end is None else min(_HASH_CHUNK, end - start)
    buf = memoryview(bytearray(max(span, 1)))
    while end is None or start < end:
        n = os.preadv(fd, [buf if end is None else buf[: end - start]], start)
        if not n:
            break
        digest.update(buf[:n])  # blake3 releases the GIL on large updates
        start += n
    return start


def _hash(fd: int, size: int) -> str:
    digest = hasher()
    return digest.hexdigest() if hash_span(fd, digest) == size else ""


def _hash_range(path: str, start: int, end: int, digest: Any) -> None:
    """Hash bytes ``[start, end)`` of a file just written here (in our fresh temp directory),
    from the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if hash_span(fd, digest, start, end) < end:
            raise OSError(f"{path} is shorter than was written")
    finally:
        os.close(fd)


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
    reader = FrameReader(fd, task.offset, task.size, frame_bound(task, files))
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
        digest = None  # a file in one frame is hashed here; a split one by _SplitFiles
        try:
            if j in split:
                out = os.open(path, _REOPEN)
                os.lseek(out, o, os.SEEK_SET)
            else:
                out, digest = _create(path, entry.mode, umask), hasher()
            try:
                reader.copy_to(out, stop - o, digest)
            finally:
                os.close(out)
        except OSError as e:
            raise ArchiveError(f"cannot write {entry.path!r} from {where}: {e.strerror}") from None
        if digest is not None and digest.hexdigest() != entry.digest:
            raise _digest_refusal(where, entry)
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
    budget = HeaderBudget(reader)
    with tarfile.open(fileobj=budget, mode="r:") as tar:  # type: ignore[call-overload]
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
                raise ArchiveError(f"refusing {where}: member {shown(member.name)} {reason}")
            try:
                digest = _write_file(reader, member, safe, dest, umask)
            except OSError as e:
                raise ArchiveError(
                    f"cannot write {shown(member.name)} from {where}: {e.strerror}"
                ) from None
            if digest != files[index].digest:  # member_refusal: it is files[index]
                raise _digest_refusal(where, files[index])
            reader.seek(tar.offset)  # at the next header, so tarfile need not seek back
            index += 1
            unreported += member.size
            if unreported >= _TICK:
                on_bytes(unreported)
                unreported = 0
            budget.renew()
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
        link = shown(member.linkname)
        if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
            return f"is a {kind} to {link}, which leaves the destination"
        return f"is a {kind} to {link}; tlaunch archives hold regular files only"
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
) -> str:  # fmt: skip
    """Write the member's data; return its digest."""
    reader.seek(member.offset_data)
    fd, digest = _create(os.path.join(dest, safe.name), safe.mode, umask), hasher()
    try:
        reader.copy_to(fd, member.size, digest)
    finally:
        os.close(fd)
    return digest.hexdigest()
