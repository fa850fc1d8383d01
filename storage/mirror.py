"""Mirror a local folder to a URL and back, one file at a time, each upload atomic.

Used by ``--sync-dir LOCAL=URL`` for scripts that write their own checkpoints. A file is
uploaded only once it is stable (same size and mtime on two scans in a row), so a file still
being written is not copied half-way; files the script deletes (checkpoint rotation) are
deleted at the URL once everything else is uploaded.

The last sync, :meth:`FolderMirror.flush`, runs after the script has ended, and a file's
stat cannot say whether its writer finished it or was killed in the middle. So it goes by
how the script ended. Exit code 0 on its own (``complete=True``): every file it wrote is
whole, and each changed one is uploaded once two stats spaced by the mtime granularity agree
(nothing else still writes it). A stop or a failure: only files unchanged for ``settle``
seconds (the sync interval) before the flush are taken for whole -- the same evidence the
periodic sync goes by; a file changed more recently may be torn, so it is *left behind*
(:attr:`FolderMirror.left_behind`): the URL keeps the last copy it had, and deletions wait.
The price: a save finished in the last seconds before a stop is not uploaded either. Atomic per file: on object stores a
single PUT either creates the whole object or nothing; on local disks and Drive mounts the
bytes go to a temp name first and are renamed (:func:`tlaunch.storage.localfs.write_atomic`).

Restoring writes only inside LOCAL: a key the bucket holds that is absolute, has a ``..``
or NUL, or whose folder resolves outside LOCAL (through a symlink already there) is skipped
with one warning. S3 and GCS accept any key, ``run1/../../../../.bashrc`` included.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tlaunch.storage.localfs import unsafe_path_reason, write_atomic
from tlaunch.storage.store import Location, StorageError, redact, resolve

log = logging.getLogger(__name__)

Stamp = tuple[int, int]  # (size, mtime_ns)


def _local_files(root: str) -> dict[str, Stamp]:
    """relative path -> (size, mtime_ns) of every regular file under ``root``."""
    found: dict[str, Stamp] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted between listing and stat
            if os.path.isfile(path) and not os.path.islink(path):
                found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


def _remote(loc: Location, rel: str) -> str:
    """Where the file at ``rel`` (relative, OS separators) lives at the URL."""
    return loc.join(*rel.split(os.sep))


def _mtime_granularity(scan: dict[str, Stamp]) -> float:
    """Seconds between two stats that tell a file being written from a still one: 2 on a file
    system keeping whole seconds (FAT keeps 2 s), else 50 ms (ext4, xfs, tmpfs: a tick)."""
    if scan and all(mtime % 1_000_000_000 == 0 for _, mtime in scan.values()):
        return 2.0
    return 0.05


def _put_atomic(loc: Location, local_path: str, rel: str) -> None:
    target = _remote(loc, rel)
    parent = target.rsplit("/", 1)[0]
    loc.fs.makedirs(parent, exist_ok=True)
    if loc.local:
        with open(local_path, "rb") as src:
            write_atomic(target, src)
    else:
        loc.fs.put_file(local_path, target)


@dataclass
class FolderMirror:
    """One ``LOCAL=URL`` pair."""

    local: str
    url: str
    #: Seconds a file must have stayed unchanged before :meth:`flush` after a stop or a
    #: failure to be taken for whole: the periodic sync's interval.
    settle: float = 2.0
    clock: Callable[[], float] = time.monotonic
    uploaded: dict[str, Stamp] = field(default_factory=dict)
    #: What the last :meth:`flush` did not upload because it may be half-written.
    left_behind: list[str] = field(default_factory=list)
    #: rel -> (its stamp, when a scan first saw that stamp)
    _seen: dict[str, tuple[Stamp, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loc = resolve(self.url)

    def restore(self) -> int:
        """Copy files the URL has and LOCAL lacks (or holds at another size). Returns the count."""
        os.makedirs(self.local, exist_ok=True)
        fs, root = self.loc.fs, self.loc.path.rstrip("/")
        try:
            remote = fs.find(root, detail=True) if fs.exists(root) else {}
        except OSError as e:
            raise StorageError(f"cannot list {redact(self.url)}: {e}") from None
        local = _local_files(self.local)
        count = 0
        same: set[str] = set()  # here and at the URL alike: restored or already present
        for path, info in remote.items():
            rel = path[len(root) + 1 :] if path.startswith(root + "/") else ""
            if not rel or os.path.basename(rel).startswith(".") and ".tmp-" in rel:
                continue
            dest = self._restore_target(rel)
            if dest is None:
                continue
            same.add(rel)
            if rel in local and local[rel][0] == info.get("size"):
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with fs.open(path, "rb") as src:
                write_atomic(dest, src)
            count += 1
        # What the URL has: files only here are uploaded by the first sync.
        scan, _ = self._scan()  # the script has not started: nothing here is being written
        self.uploaded = {r: st for r, st in scan.items() if r in same}
        return count

    def _scan(self) -> tuple[dict[str, Stamp], float]:
        """Stat every file, remembering since when each has had its current stamp."""
        now = self.clock()
        scan = _local_files(self.local)
        seen = {}
        for rel, stamp in scan.items():
            before = self._seen.get(rel)
            seen[rel] = before if before is not None and before[0] == stamp else (stamp, now)
        self._seen = seen
        return scan, now

    def _restore_target(self, rel: str) -> str | None:
        """Where the key ``rel`` is restored to, or None (with a warning) when that would
        not be a file inside LOCAL."""
        reason = unsafe_path_reason(rel)
        dest = os.path.join(self.local, *rel.split("/"))
        if reason is None:
            root = os.path.realpath(self.local)
            folder = os.path.realpath(os.path.dirname(dest))  # the file itself is replaced
            if folder != root and not folder.startswith(root + os.sep):
                reason = f"resolves to {folder}, outside the folder (through a symlink)"
        if reason is None:
            return dest
        log.warning(
            "tlaunch: warning: --sync-dir: skipping %r at %s: it %s", rel, redact(self.url), reason
        )
        return None

    def sync(self) -> tuple[int, int]:
        """Upload new and changed files that an earlier scan already saw as they are now, then
        delete from the URL what the script deleted here. Returns the counts.

        Deletions wait until every file here is uploaded, so the URL always holds a superset
        of the folder: a script that removes its previous checkpoint before (or while) it
        writes the next one never leaves the URL without either. A missing folder deletes
        nothing.
        """
        if not os.path.isdir(self.local):
            return 0, 0
        scan, now = self._scan()
        settled = {rel for rel, (_, since) in self._seen.items() if since < now}
        return self._upload(scan, settled), self._delete(scan)

    def flush(self, *, complete: bool = False) -> tuple[int, int]:
        """The last sync, after the script ended; ``complete``: it exited 0 on its own (see
        the module docstring). Files it does not upload are in :attr:`left_behind`."""
        self.left_behind = []
        if not os.path.isdir(self.local):
            return 0, 0
        scan, now = self._scan()
        changed = {rel: st for rel, st in scan.items() if self.uploaded.get(rel) != st}
        if complete and changed:
            time.sleep(_mtime_granularity(changed))
            again = _local_files(self.local)
            settled = {rel for rel, st in changed.items() if again.get(rel) == st}
        else:
            settled = {r for r, (_, since) in self._seen.items() if since <= now - self.settle}
        uploaded = self._upload(scan, settled)
        self.left_behind = sorted(r for r, st in scan.items() if self.uploaded.get(r) != st)
        return uploaded, self._delete(scan)

    def _upload(self, scan: dict[str, Stamp], settled: set[str]) -> int:
        uploaded = 0
        for rel, stamp in sorted(scan.items()):
            if self.uploaded.get(rel) == stamp or rel not in settled:
                continue  # unchanged, or still changing (or new): wait for it to settle
            try:
                _put_atomic(self.loc, os.path.join(self.local, rel), rel)
            except FileNotFoundError:
                continue  # the script removed it meanwhile (e.g. checkpoint rotation)
            self.uploaded[rel] = stamp
            uploaded += 1
        return uploaded

    def _delete(self, scan: dict[str, Stamp]) -> int:
        """Delete at the URL what is gone here, once everything here is uploaded."""
        if any(self.uploaded.get(rel) != stamp for rel, stamp in scan.items()):
            return 0
        deleted = 0
        for rel in [r for r in self.uploaded if r not in scan]:
            try:
                self.loc.fs.rm_file(_remote(self.loc, rel))
            except FileNotFoundError:
                pass
            del self.uploaded[rel]
            deleted += 1
        return deleted
