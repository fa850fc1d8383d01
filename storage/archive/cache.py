"""This machine's cache of unpacked archives: an entry counts only once it is whole and durable.

Layout (``$TLAUNCH_CACHE_DIR`` or ``~/.cache/tlaunch/data``)::

    <id>/                 the unpacked data, renamed into place once every file verified
    <id>.json             its completion record, written last: the archive id and the size
                          and mtime of every file as unpacked. No record, no entry.
    <id>.lock             flock'ed while one process fills <id>; others wait, then reuse it
    .<id>.shards/         downloaded shards, kept across interruptions so a rerun resumes
    .<id>.unpack-<pid>/   the temp directory being unpacked, next to its final place
    .<id>.damaged-<pid>/  a damaged entry on its way out
    urls/<hash>.json      which id a URL had when last fetched, so a machine that already
                          holds the data can start even when the store is unreachable

**Filling** (:func:`commit`): the unpacked temp directory is made durable with one
``syncfs(2)`` of the cache's file system -- every file and directory in one call, where an
``fsync`` per file costs a journal commit each (minutes for a million small files; containerd
syncs unpacked image layers the same way) -- then renamed into place, the cache directory
fsynced, and the record written (temp file, fsync, rename, fsync). After a power cut, a record
means the data under its name is on disk.

**A hit** (:func:`entry_problem`) costs one ``stat`` per file and reads no data: the record
must parse and name the entry's id, and every file it lists must be a regular file with the
recorded size and mtime. Digests are not recomputed on a hit: that would read the whole
dataset at every start and every restart (minutes for a large one), which is what the cache
exists to avoid. What damages a cache entry in practice -- a fill cut short, a file removed
or truncated by a cleanup or a full disk, a file edited in place -- changes a size or an
mtime, or removes the record; every byte was checked against its digest when it was
unpacked. A damaged entry is removed (record first) and fetched again, with one warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator

from tlaunch.storage.archive.format import ArchiveError, Manifest
from tlaunch.storage.localfs import fsync_dir, temp_path, write_atomic
from tlaunch.storage.store import redact

log = logging.getLogger(__name__)

#: The cache's location when ``cache_dir`` is not given (launch/contract.py lists it too).
CACHE_DIR_ENV = "TLAUNCH_CACHE_DIR"
RECORD_FORMAT = "tlaunch-cache/1"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_DIR_ENV) or os.path.join("~", ".cache", "tlaunch", "data")


def cache_root(cache_dir: str | None) -> str:
    return os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive flock on ``path``: released by the kernel even if this process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _record_path(cache: str, archive_id: str) -> str:
    return os.path.join(cache, archive_id + ".json")


def entry_problem(cache: str, archive_id: str) -> str | None:
    """Why ``cache/<archive_id>`` may not be used (a phrase), or None when it is whole."""
    entry = os.path.join(cache, archive_id)
    try:
        with open(_record_path(cache, archive_id), "rb") as f:
            record = json.load(f)
    except FileNotFoundError:
        return "there is no record that it was completed"
    except (OSError, ValueError) as e:
        return f"its completion record is unreadable ({type(e).__name__})"
    try:
        if record["format"] != RECORD_FORMAT or record["id"] != archive_id:
            return "its completion record is for another archive"
        paths = [str(p) for p, _, _ in record["files"]]
        stamps = [[int(size), int(mtime)] for _, size, mtime in record["files"]]
    except (KeyError, TypeError, ValueError):
        return "its completion record is unreadable"
    if not os.path.isdir(entry):
        return "its folder is missing"
    try:
        if _stamps(entry, paths) == stamps:  # the common case, in one pass
            return None
    except OSError:
        pass
    return _first_difference(entry, paths, stamps)


def _stamps(entry: str, paths: list[str]) -> list[list[int]]:
    """[size, mtime_ns] of each file (one lstat each; paths are "/"-separated)."""
    return [[st.st_size, st.st_mtime_ns] for st in (os.lstat(f"{entry}/{p}") for p in paths)]


def _first_difference(entry: str, paths: list[str], stamps: list[list[int]]) -> str:
    for path, (size, mtime) in zip(paths, stamps, strict=True):
        try:
            st = os.lstat(f"{entry}/{path}")
        except OSError:
            return f"{path} is missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if st.st_size != size:
            return f"{path} has {st.st_size} bytes, not {size}"
        if st.st_mtime_ns != mtime:
            return f"{path} was modified after it was unpacked"
    return "it changed while it was being checked"


def reuse_or_fill(cache: str, archive_id: str, what: str, fill: Callable[[], None]) -> str:
    """``cache/<archive_id>``, after ``fill()`` (under the entry's lock) unless it is whole.

    A damaged entry is removed first, with one warning naming ``what`` (the URL).
    """
    final = os.path.join(cache, archive_id)
    if entry_problem(cache, archive_id) is None:
        return final
    with locked(final + ".lock"):
        problem = entry_problem(cache, archive_id)  # another process may have filled it
        if problem is not None:
            if os.path.lexists(final) or os.path.lexists(_record_path(cache, archive_id)):
                remove_damaged(cache, archive_id, problem, what)
            remove_leftovers(cache, archive_id)
            fill()
    return final


def commit(tmp: str, cache: str, manifest: Manifest) -> str:
    """Make the unpacked ``tmp`` durable, rename it to ``cache/<id>`` and record it there."""
    final = os.path.join(cache, manifest.id)
    sync_tree(tmp)
    os.rename(tmp, final)
    fsync_dir(cache)
    paths = [f.path for f in manifest.files]
    files = [[p, *stamp] for p, stamp in zip(paths, _stamps(final, paths), strict=True)]
    record = {"format": RECORD_FORMAT, "id": manifest.id, "files": files}
    write_atomic(_record_path(cache, manifest.id), json.dumps(record).encode(), sync_dir=True)
    return final


def remove_damaged(cache: str, archive_id: str, problem: str, what: str) -> None:
    """Warn (one line) and remove the damaged entry; call it under the entry's lock."""
    final = os.path.join(cache, archive_id)
    log.warning(
        "tlaunch: warning: the cached copy of %s in %s is damaged (%s); fetching it again",
        redact(what), final, problem,
    )  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(cache, archive_id))  # first: a half-removed entry is no entry
    if os.path.lexists(final):
        doomed = os.path.join(cache, f".{archive_id}.damaged-{os.getpid()}")
        os.rename(final, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(cache: str, archive_id: str) -> None:
    """Temp and damaged directories of a process killed meanwhile; call it under the lock."""
    prefixes = (f".{archive_id}.unpack-", f".{archive_id}.damaged-")
    for name in os.listdir(cache):
        if name.startswith(prefixes):
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)


_libc_syncfs = None


def sync_tree(path: str) -> None:
    """Flush every file and directory under ``path`` to disk: ``syncfs`` of its file system
    (Linux), else ``sync``."""
    global _libc_syncfs
    if _libc_syncfs is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _libc_syncfs = getattr(libc, "syncfs", False)
    if _libc_syncfs:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc_syncfs(fd) == 0:
                return
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", path)
        finally:
            os.close(fd)
    os.sync()


def remember(cache: str, url: str, archive_id: str) -> None:
    path = _pointer(cache, url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps({"url": redact(url), "id": archive_id}).encode())


def cached_copy(cache: str, url: str) -> str | None:
    """The unpacked copy of the archive ``url`` had when last fetched here, if still whole."""
    try:
        with open(_pointer(cache, url)) as f:
            archive_id = str(json.load(f)["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = os.path.join(cache, archive_id)
    if not os.path.isdir(path):
        return None
    problem = entry_problem(cache, archive_id)
    if problem is not None:
        log.warning(
            "tlaunch: warning: the copy of %s this machine fetched before is damaged (%s); "
            "it cannot be used",
            redact(url), problem,
        )  # fmt: skip
        return None
    return path


def _pointer(cache: str, url: str) -> str:
    return os.path.join(cache, "urls", hashlib.sha256(url.encode()).hexdigest()[:32] + ".json")


def link(dest: str, target: str, cache: str) -> str:
    """Make ``dest`` a symlink to the unpacked ``target`` (atomically); return ``dest``."""
    dest = os.path.abspath(os.path.expanduser(dest))
    if os.path.islink(dest):
        if not os.readlink(dest).startswith(cache + os.sep):
            raise ArchiveError(
                f"{dest} is a symlink to {os.readlink(dest)}, not to tlaunch's data cache; "
                "remove it or choose another destination"
            )
    elif os.path.isdir(dest) and not os.listdir(dest):
        os.rmdir(dest)
    elif os.path.lexists(dest):
        raise ArchiveError(
            f"{dest} already exists; choose a new path (tlaunch makes it a link to the "
            "unpacked data) or remove it"
        )
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = temp_path(dest)
    os.symlink(target, tmp)
    os.replace(tmp, dest)
    return dest
