"""Unpacking one shard: verify its checksum while reading, refuse anything unexpected.

Every member passes three gates before a byte is written: our own checks (no absolute
path, no ``..``, no link, device, FIFO or other special; only regular files), the manifest
(the member must be exactly the next file it lists: name, size, mode), and tarfile's
``data`` extraction filter as a second opinion. Files are then created with
``O_EXCL | O_NOFOLLOW`` inside a fresh temp directory, so nothing can be written through a
planted link or over an existing file. The caller renames that directory into place only
when every shard has unpacked and verified.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import tarfile
import threading
from collections.abc import Callable, Sequence

from tlaunch.storage.archive_format import (
    ArchiveError,
    FileEntry,
    ShardEntry,
    unsafe_path_reason,
    zstd,
)

_RAW_CHUNK = 4 << 20
_OUT_BLOCK = 8 << 20  # decompressed block size handed to the tar reader
_QUEUE = 8  # blocks decompressed ahead: up to 64 MB, so small-file stretches overlap
_TICK = 4 << 20  # progress is reported in steps of this many bytes
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EOF = object()
_SPECIAL = "special files are refused"


class ShardCorrupt(ArchiveError):
    """A shard's bytes do not match the checksum its manifest records."""


class ShardStream:
    """The decompressed tar stream of one shard file, as a forward-only file for tarfile.

    A helper thread reads the compressed file, hashes it and decompresses it in 8 MB
    blocks (libzstd and hashlib release the GIL), so decompression runs alongside the
    Python-side tar parsing and file writing, like ``zstd -d | tar x`` but in one process.
    tarfile only seeks forward, and only back by one byte at a member's end (``next()``
    reads the byte before the next header); keeping the current block until the next one
    is needed covers that.
    """

    def __init__(self, path: str) -> None:
        self._raw = open(path, "rb")  # noqa: SIM115 -- closed by close()
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE)
        self._stop = threading.Event()
        self._digest = hashlib.sha256()
        self._block = memoryview(b"")
        self._base = 0  # stream offset of the current block
        self._off = 0  # read position inside the current block
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="tlaunch-unzstd", daemon=True)
        self._thread.start()

    # -- helper thread -------------------------------------------------------------------
    def _produce(self) -> None:
        decompressor, fresh, failed = zstd.ZstdDecompressor(), True, False
        try:
            while not self._stop.is_set() and (chunk := self._raw.read(_RAW_CHUNK)):
                self._digest.update(chunk)
                if failed:
                    continue  # keep hashing: the checksum tells corruption from a bad archive
                try:
                    decompressor, fresh = self._decompress(decompressor, chunk)
                except zstd.ZstdError as e:
                    self._put(e)
                    failed = True
            if not failed and not fresh and not decompressor.eof:
                self._put(EOFError("the zstd stream is truncated"))
        except BaseException as e:  # handed to the reading thread
            self._put(e)
        finally:
            self._put(_EOF)

    def _decompress(self, decompressor, data: bytes):  # -> (decompressor, fresh)
        fresh = False
        while True:
            out = decompressor.decompress(data, _OUT_BLOCK)
            if out:
                self._put(out)
            if decompressor.eof:  # a shard may hold several frames (e.g. from the zstd CLI)
                data, decompressor, fresh = decompressor.unused_data, zstd.ZstdDecompressor(), True
                if not data:
                    return decompressor, fresh
                fresh = False
                continue
            if decompressor.needs_input:
                return decompressor, fresh
            data = b""

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- reading thread ------------------------------------------------------------------
    def _advance(self) -> bool:
        """Make the next block current; False at the end of the stream."""
        if self._done:
            return False
        item = self._queue.get()
        if item is _EOF:
            self._done = True
            return False
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._base += len(self._block)
        self._block, self._off = memoryview(item), 0
        return True

    def read(self, size: int) -> bytes:
        parts = []
        while size > 0:
            avail = len(self._block) - self._off
            if not avail:
                if not self._advance():
                    break
                continue
            take = min(size, avail)
            parts.append(self._block[self._off : self._off + take])
            self._off += take
            size -= take
        return b"".join(parts)

    def tell(self) -> int:
        return self._base + self._off

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._base:
            raise OSError(f"shard stream cannot seek back to {pos} (at {self.tell()})")
        while pos > self._base + len(self._block) and self._advance():
            pass
        self._off = min(pos - self._base, len(self._block))
        return self.tell()

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes to ``fd`` straight from the decompressed blocks."""
        while size > 0:
            avail = len(self._block) - self._off
            if not avail:
                if not self._advance():
                    raise EOFError("the tar stream ends inside a file")
                continue
            view = self._block[self._off : self._off + min(size, avail)]
            self._off += len(view)
            size -= len(view)
            while view:
                view = view[os.write(fd, view) :]

    def finish(self) -> str:
        """Read to the end (hashing everything) and return the sha256 of the compressed file."""
        while not self._done:
            try:
                self._advance()
            except (zstd.ZstdError, EOFError):
                pass  # the helper keeps hashing after a decompression error
            self._off = len(self._block)
        self._thread.join()
        return self._digest.hexdigest()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._raw.close()


def extract_shard(
    path: str,
    shard: ShardEntry,
    files: Sequence[FileEntry],
    dest: str,
    where: str,
    on_bytes: Callable[[int], None],
) -> None:
    """Unpack the shard file at ``path`` into ``dest``, which must be a fresh directory."""
    if not hasattr(tarfile, "data_filter"):
        raise ArchiveError(
            "unpacking needs tarfile's extraction filters (Python 3.10.12+, 3.11.4+, 3.12+); "
            "upgrade Python"
        )
    stream = ShardStream(path)
    try:
        try:
            _extract_members(stream, files, dest, where, on_bytes)
        except (ArchiveError, tarfile.TarError, zstd.ZstdError, EOFError) as e:
            # A bit flip can look like a bad member name; the checksum tells which it is.
            if stream.finish() != shard.sha256:
                raise ShardCorrupt(_corrupt(where, shard)) from None
            if isinstance(e, ArchiveError):
                raise
            raise ArchiveError(f"refusing {where}: not a valid tar.zst shard ({e})") from None
        if stream.finish() != shard.sha256:
            raise ShardCorrupt(_corrupt(where, shard))
    finally:
        stream.close()


def _corrupt(where: str, shard: ShardEntry) -> str:
    return f"{where}: shard {shard.name} does not match its checksum (sha256 {shard.sha256[:12]}…)"


def _extract_members(
    stream: ShardStream,
    files: Sequence[FileEntry],
    dest: str,
    where: str,
    on_bytes: Callable[[int], None],
) -> None:
    made = {dest}  # directories known to exist
    index = unreported = 0
    with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[call-overload]
        while (member := tar.next()) is not None:
            del tar.members[:]  # tarfile keeps every TarInfo; a shard may hold millions
            reason = member_refusal(member, files[index] if index < len(files) else None)
            if reason is None:
                try:
                    safe = tarfile.data_filter(member, dest)
                except tarfile.FilterError as e:
                    reason = f"is refused by tarfile's data filter ({e})"
            if reason is not None:
                raise ArchiveError(f"refusing {where}: member {member.name!r} {reason}")
            try:
                _write_file(stream, member, safe, dest, made)
            except OSError as e:
                raise ArchiveError(
                    f"cannot write {member.name!r} from {where}: {e.strerror}"
                ) from None
            stream.seek(tar.offset)  # at the next header, so tarfile need not seek back
            index += 1
            unreported += member.size
            if unreported >= _TICK:
                on_bytes(unreported)
                unreported = 0
    on_bytes(unreported)
    if index < len(files):
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
    stream: ShardStream, member: tarfile.TarInfo, safe: tarfile.TarInfo, dest: str, made: set
) -> None:
    path = os.path.join(dest, safe.name)
    parent = os.path.dirname(path)
    if parent not in made:
        os.makedirs(parent, exist_ok=True)
        made.add(parent)
    stream.seek(member.offset_data)
    fd = os.open(path, _OPEN_FLAGS, 0o600)
    try:
        stream.copy_to(fd, member.size)
        os.fchmod(fd, safe.mode)
    finally:
        os.close(fd)
