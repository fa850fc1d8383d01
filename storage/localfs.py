"""This machine's disk: which URLs name it, and files on it that appear whole or not at all.

:func:`is_local` is the one test of locality in storage: ``store.is_remote`` is its negation,
and ``store.resolve`` derives ``Location.local`` and ``Location.atomic_rename`` from it.

Every local file in storage that someone may read while it is being written -- a checkpoint
file, an archive shard or manifest, a mirrored file, the archive cache's pointers -- is written
by :class:`AtomicFile`: the bytes go to a hidden temp file in the same directory (the same
file system, so the rename is never a copy), are flushed and fsynced, and ``os.replace``
moves the file into place. A process killed at any moment leaves at most a
``.NAME.tmp-*`` dot-file, never a truncated file under its real name; the fsync before the
rename makes that hold across a power cut too. The rename itself is durable only once its
directory is fsynced: where a file's presence is a promise (an archive's manifest, a
checkpoint's COMMIT) the caller asks for that too.

Object stores need none of this: one PUT is atomic there.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from typing import Any, BinaryIO

_COPY_CHUNK = 8 << 20


def is_local(url: str) -> bool:
    """True when ``url`` names this machine's disk: a plain path or ``file://``."""
    return "://" not in url or url.startswith("file://")


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path``, a "/"-separated name from an archive or a bucket, may not name a file
    inside a local folder (a phrase after "it"), or None when it may."""
    if not path or "\0" in path:
        return "is empty or contains a NUL byte"
    if path.startswith("/"):
        return "is an absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "leaves the destination ('..' in its path)"
    if "" in parts or "." in parts:
        return "is not a normalized relative path"
    return None


def temp_path(path: str) -> str:
    """A hidden name beside ``path``, unique to this writer: ``DIR/.NAME.tmp-<pid>-<random>``."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (a rename into it, a removal) survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A new local file, written under a temp name and renamed into place by :meth:`commit`.

    Used as a context manager it commits on success and removes the temp file on an error;
    streaming writers (an archive shard) call :meth:`commit` or :meth:`abort` themselves.
    ``opener`` opens the temp file for writing: ``open`` by default, an fsspec filesystem's
    ``open`` where that is the seam tests inject a full disk through. ``sync_dir`` also fsyncs
    the directory after the rename.
    """

    def __init__(
        self, path: str, *, opener: Callable[[str, str], Any] = open, sync_dir: bool = False
    ) -> None:
        self.path = path
        self.sync_dir = sync_dir
        self.tmp = temp_path(path)
        self.file = opener(self.tmp, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.file.write(data)

    def commit(self, path: str | None = None) -> None:
        """Flush, fsync and rename into place, as ``path`` when the name is only known now."""
        self.file.flush()
        os.fsync(self.file.fileno())  # before the rename: a name must never point at lost bytes
        self.file.close()
        final = path or self.path
        os.replace(self.tmp, final)
        if self.sync_dir:
            fsync_dir(os.path.dirname(final) or ".")

    def abort(self) -> None:
        """Close and remove the temp file; the real name is left as it was."""
        try:
            self.file.close()
        except OSError:  # flushing what is left fails the way the write did: already reported
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_atomic(
    path: str,
    data: bytes | bytearray | memoryview | BinaryIO,
    *,
    opener: Callable[[str, str], Any] = open,
    sync_dir: bool = False,
) -> None:
    """Write ``data`` (bytes, or a binary file to copy from) to ``path``, whole or not at all."""
    with AtomicFile(path, opener=opener, sync_dir=sync_dir) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            shutil.copyfileobj(data, f.file, _COPY_CHUNK)
