"""This machine's disk: which URLs name it, and files on it that appear whole or not at all.

:func:`is_local` is the one test of locality in storage: ``store.is_remote`` is its negation,
and ``store.resolve`` derives ``Location.local`` and ``Location.atomic_rename`` from it, the
latter together with :func:`renames_atomically`: a local path on a FUSE mount (the Colab
Drive mount, gcsfuse, rclone, ...) is this machine's file system to ``os`` calls, but a
directory renamed there is not renamed atomically. :func:`drive_mounts` reads the same mount
table for Colab's Google Drive mount, wherever ``drive.mount()`` put it.

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
import re
import secrets
import shutil
from collections.abc import Callable
from typing import Any, BinaryIO

_COPY_CHUNK = 8 << 20
#: The mount table :func:`renames_atomically` and :func:`drive_mounts` read (tests point it at a
#: fixture file).
MOUNTS_FILE = "/proc/mounts"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # /proc/mounts writes a space as \040


class LocalFiles:
    """fsspec's local file system, imported when :meth:`load` is called or a call needs it.

    :func:`~tlaunch.storage.store.resolve` gives every local path this in place of
    ``fsspec.filesystem("file")``, loaded at once unless asked for ``lazy``. The launcher's own
    work on a local disk -- the write probe (:func:`~tlaunch.storage.probe_writable`) and the
    lease (:class:`~tlaunch.storage.Lease`) -- is done with ``os`` calls on a lazy one, so a
    launch on a local disk never imports fsspec: 0.05 s of every start, most of it the asyncio
    that fsspec imports. Any other call (listing, ranged reads, ...) goes to fsspec's file
    system, unchanged. Everything else loads it when it resolves its URL: a first call from a
    background thread while the interpreter exits (a checkpoint save in flight) could not
    import it any more.
    """

    protocol = ("file", "local")
    _fs: Any = None

    def load(self) -> LocalFiles:
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem("file")
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.load()._fs, name)

    def __repr__(self) -> str:
        return "LocalFiles()"


def read_bytes(path: str) -> bytes:
    """The whole of the local file ``path``."""
    with open(path, "rb") as f:
        return f.read()


def create_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new local file ``path``; FileExistsError when one is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as f:
        f.write(data)


def is_local(url: str) -> bool:
    """True when ``url`` names this machine's disk: a plain path or ``file://``."""
    return "://" not in url or url.startswith("file://")


def renames_atomically(path: str) -> bool:
    """False when the local ``path`` is on a FUSE file system, where a rename is not atomic.

    Every ``fuse`` and ``fuse.*`` type counts except ``fuseblk`` (ntfs-3g, exFAT: a driver
    for a disk in this machine, which renames in one metadata update). In practice FUSE
    mounts are network and cloud stores: Colab's Drive (``fuse.drive``) uploads files one
    by one, gcsfuse, s3fs and rclone rename a directory by copying its objects, and some
    (mountpoint-s3 shows as plain ``fuse``) name no kind at all. Guessing wrong the other way
    costs little: the MANIFEST + COMMIT protocol used instead is correct on every file
    system and costs two small files.
    """
    mount = _mount_of(path)
    return mount is None or not _is_fuse(mount[2])


def drive_mounts() -> list[str]:
    """Mount points of Colab's Google Drive (``drive.mount(...)``), in mount-table order.

    Colab mounts Drive as a FUSE file system named ``drive`` of type ``fuse.drive``; either
    mark is enough (the type has changed before, the name has not). Other FUSE mounts that
    may hold a Drive (rclone, google-drive-ocamlfuse) are not recognised: their layout and
    their delete semantics are their own configuration's.
    """
    return [point for source, point, kind in _mounts() if _is_drive(source, kind)]


def on_drive_mount(path: str) -> bool:
    """True when the local ``path`` is on a Colab Google Drive mount."""
    mount = _mount_of(path)
    return mount is not None and _is_drive(mount[0], mount[2])


def _is_fuse(kind: str) -> bool:
    return (kind == "fuse" or kind.startswith("fuse.")) and kind != "fuseblk"


def _is_drive(source: str, kind: str) -> bool:
    return _is_fuse(kind) and (kind == "fuse.drive" or source == "drive")


def _mount_of(path: str) -> tuple[str, str, str] | None:
    """The mount holding ``path``: the longest mount point that contains its real path
    (symlinks resolved), the last one mounted there winning; None without a mount table."""
    real = os.path.realpath(path)
    best = None
    for mount in _mounts():
        point = mount[1]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[1])):
            best = mount
    return best


def _mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, file system type) of every line of :data:`MOUNTS_FILE`, in order."""
    try:
        with open(MOUNTS_FILE, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux, or no /proc: nothing known to be FUSE
        return []
    table = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:
            source, point = (
                _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), f) for f in fields[:2]
            )
            table.append((source, point, fields[2]))
    return table


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
