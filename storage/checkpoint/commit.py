"""How a checkpoint becomes visible, chosen per backend (the idea of Orbax's ``atomicity.py``).

A reader must never take a half-written step for a whole one, whatever moment the writer dies.

* **Local POSIX disks** (:class:`RenameCommit`): every file goes into a hidden
  ``.tmp-step-NNNNNNNNN-<random>`` directory beside the final one and is fsynced (written by
  :func:`tlaunch.storage.localfs.write_atomic`, like every local file), the directory is
  fsynced, then ``os.rename`` moves it to ``step-NNNNNNNNN`` and the parent is fsynced. rename
  is atomic on POSIX, so the step appears complete or not at all, and the fsyncs make that
  survive a power cut, not only a killed process. COMMIT is still written (inside the temp
  directory) so that discovery reads the same record on every backend.
* **Object stores and Google Drive** (:class:`MarkerCommit`): there is no atomic rename. gcsfs
  ``mv`` is a copy then a delete (the emulator even rejects the move API) and S3 is the same, so
  a "renamed" directory can be seen half-copied; the Drive FUSE mount uploads files one by one.
  What these stores do promise is that one object PUT is atomic and that listing and reading
  after a successful write see it. So files are written in place, then MANIFEST, then COMMIT
  last; a step without COMMIT does not exist for readers, and ``clean_stale`` removes it.

Files are streamed (:meth:`CommitProtocol.write_stream`): the serializer writes into the local
temp file or the upload stream, hashing on the way, so a save holds no file's bytes in memory.
A stream that fails is retried whole, from the snapshot; a failed upload is cancelled where the
backend can (a resumable or multi-part upload), else closed at once, so a torn attempt can
never land after the retry that replaced it. Either way nothing is visible before COMMIT.

Deleting runs the same protocol backwards: COMMIT goes first, so a delete killed half-way leaves
an uncommitted directory, never a committed one with files missing.

Paths are literal: a step directory is removed file by file from its own listing
(``find`` + ``rm_file``), never with fsspec's ``rm``, which expands ``[``, ``*`` and ``?``:
``rm("b/exp[1]/step-1", recursive=True)`` removes ``b/exp1/step-1``, a sibling run's step.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import Any

from tlaunch.storage.checkpoint.manifest import COMMIT, TMP_PREFIX, HashingWriter, step_dir
from tlaunch.storage.checkpoint.threads import in_parallel
from tlaunch.storage.localfs import AtomicFile, fsync_dir, write_atomic
from tlaunch.storage.store import Location, RetryPolicy, StorageError

#: Bytes an upload stream buffers before it sends a part: gcsfs's own put sends 50 MiB parts.
#: Smaller parts cost time (fake-gcs-server: commit 1.38x a raw put with 16 MiB, 1.22x with
#: 50 MiB); the memory is a part or two per file in flight, not the file.
UPLOAD_PART = 50 << 20


class CommitProtocol:
    """Write a step's files somewhere readers ignore, then make the step visible in one act."""

    def __init__(self, location: Location, retry: RetryPolicy) -> None:
        self.location = location
        self.fs = location.fs
        self.retry = retry

    def final_path(self, step: int) -> str:
        return self.location.join(step_dir(step))

    def begin(self, step: int) -> str:
        """Prepare and return the directory the step's files are written into."""
        raise NotImplementedError

    def write(self, path: str, data: bytes) -> None:
        """Write one whole file durably (its bytes survive once this returns)."""
        raise NotImplementedError

    def write_stream(self, path: str, produce: Callable[[Any], None]) -> dict[str, Any]:
        """Write the file ``produce(sink)`` writes, durably, retried whole while transient;
        returns its MANIFEST entry (size and sha256 of the bytes written)."""

        def attempt() -> dict[str, Any]:
            return self._stream(path, produce)

        return self.retry.call(attempt, action="writing", where=path)

    def _stream(self, path: str, produce: Callable[[Any], None]) -> dict[str, Any]:
        raise NotImplementedError

    def commit(self, staging: str, step: int, record: bytes) -> None:
        """Write COMMIT holding ``record`` and make the step visible; the last act of a save."""
        raise NotImplementedError

    def abort(self, staging: str) -> None:
        """Best-effort removal of a failed save's files; clean_stale catches what this misses."""
        for undo in (self.uncommit, self.remove):
            with contextlib.suppress(Exception):
                undo(staging)

    def uncommit(self, path: str) -> None:
        """Remove ``path``/COMMIT durably: the step is invisible from here on."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """Remove a step directory and all it holds (call :meth:`uncommit` first).

        Every file the directory's listing names is removed by that name, then the
        directories, deepest first. Object stores have no directories: gcsfs ignores
        ``rmdir`` below a bucket and s3fs finds nothing there.
        """
        fs = self.fs
        fs.invalidate_cache(path)
        try:
            listing = self.retry.call(
                fs.find, path, withdirs=True, detail=True, action="listing", where=path
            )
        except FileNotFoundError:
            listing = {}
        inside = {p: meta for p, meta in listing.items() if p.startswith(path + "/")}
        in_parallel(self._remove_file, [p for p, m in inside.items() if m["type"] != "directory"])
        dirs = [p for p, meta in inside.items() if meta["type"] == "directory"]
        for d in [*sorted(dirs, key=lambda p: p.count("/"), reverse=True), path]:
            # Gone already, not a directory here, or storage down (the next call will say so):
            # an empty directory left behind is an uncommitted step clean_stale removes later.
            with contextlib.suppress(FileNotFoundError, StorageError):
                self.retry.call(fs.rmdir, d, action="deleting", where=d)
        fs.invalidate_cache(path)

    def _remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # deleting is idempotent
            self.retry.call(self.fs.rm_file, path, action="deleting", where=path)


class RenameCommit(CommitProtocol):
    """Local POSIX: temp directory, fsync, atomic rename, fsync the parent."""

    def begin(self, step: int) -> str:
        os.makedirs(self.location.path, exist_ok=True)
        staging = self.location.join(f"{TMP_PREFIX}{step:09d}-{secrets.token_hex(4)}")
        os.mkdir(staging)
        return staging

    def write(self, path: str, data: bytes) -> None:
        # Through fs.open, not open(): the one seam where tests inject a full or read-only disk.
        self.retry.call(write_atomic, path, data, opener=self.fs.open, action="writing", where=path)

    def _stream(self, path: str, produce: Callable[[Any], None]) -> dict[str, Any]:
        with AtomicFile(path, opener=self.fs.open) as f:  # temp name, fsync, rename
            sink = HashingWriter(f.file)
            produce(sink)
        return sink.entry()

    def commit(self, staging: str, step: int, record: bytes) -> None:
        self.write(f"{staging}/{COMMIT}", record)
        fsync_dir(staging)
        final = self.final_path(step)
        if os.path.lexists(final):
            # A killed save's leftovers or a quarantined step (the caller refuses sound committed
            # ones): rename cannot replace a non-empty directory. COMMIT goes first, as always.
            self.abort(final)
        os.rename(staging, final)
        fsync_dir(self.location.path)

    def uncommit(self, path: str) -> None:
        os.unlink(f"{path}/{COMMIT}")
        fsync_dir(path)


class MarkerCommit(CommitProtocol):
    """Object stores and Drive: files in place, MANIFEST, then COMMIT last."""

    def begin(self, step: int) -> str:
        final = self.final_path(step)
        if self.retry.call(self.fs.exists, final, action="checking", where=final):
            # Files of a killed save: clear them so the new MANIFEST describes everything there.
            self.abort(final)
        # A no-op on object stores; Drive needs it.
        self.retry.call(self.fs.makedirs, final, exist_ok=True, action="creating", where=final)
        return final

    def write(self, path: str, data: bytes) -> None:
        self.retry.call(self.fs.pipe_file, path, data, action="writing", where=path)

    def _stream(self, path: str, produce: Callable[[Any], None]) -> dict[str, Any]:
        f = self.fs.open(path, "wb", block_size=UPLOAD_PART)
        try:
            sink = HashingWriter(f)
            produce(sink)
            f.close()  # the last part: the object exists from here on
        except BaseException:
            _drop(f)
            raise
        return sink.entry()

    def commit(self, staging: str, step: int, record: bytes) -> None:
        self.write(f"{staging}/{COMMIT}", record)

    def uncommit(self, path: str) -> None:
        self.retry.call(self.fs.rm_file, f"{path}/{COMMIT}", action="deleting", where=path)


def _drop(f: Any) -> None:
    """Make a failed upload land nothing later: cancel it where the backend has a real cancel
    (gcsfs, s3fs), else close it now. Left to the garbage collector, fsspec closes, and so
    uploads, an abandoned file whenever that runs, possibly over the retry's complete one."""
    from fsspec.spec import AbstractBufferedFile

    with contextlib.suppress(Exception):
        if getattr(type(f), "discard", None) not in (None, AbstractBufferedFile.discard):
            f.discard()
    with contextlib.suppress(Exception):
        f.close()


def build_commit_protocol(location: Location, retry: RetryPolicy) -> CommitProtocol:
    """The protocol ``location``'s backend supports (see the module docstring for why)."""
    cls: Any = RenameCommit if location.atomic_rename else MarkerCommit
    return cls(location, retry)
