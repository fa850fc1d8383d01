"""One writer per checkpoint directory: a lease object beside the steps.

Two runs saving into one directory destroy each other's work: each one's start removes the
other's in-flight steps (``clean_stale``; on object stores ``begin`` too), retention deletes
steps the other still counts on, and both try to commit the same step numbers. So the writer
holds ``LEASE.json`` in the directory::

    {"version": 1, "token": "3f0c...", "host": "vm-1", "pid": 4242,
     "started": 1767000000.0, "heartbeat": 1767000040.0, "ttl": 60.0, "expires": 1767000100.0}

* :meth:`Lease.acquire` takes a free lease, or refuses with :class:`LeaseHeld` naming the
  owner's host and pid and when its lease expires, unless that lease is stale (its ``expires``
  has passed: the owner died without releasing it) or ``takeover`` is given.
* :meth:`Lease.heartbeat` renews it (``expires = heartbeat + ttl``); :class:`Heartbeat` does
  that every ``ttl / 3`` in a daemon thread for as long as the run lives.
* :meth:`Lease.check` is the fence: a writer calls it right before each COMMIT (and before
  clean-up and retention delete anything), and :class:`LeaseLost` stops it once the lease names
  another token. That is what stops a worker orphaned by a killed launcher: it goes on
  training, but its next COMMIT fails once a new run holds the lease.
* :meth:`Lease.release` removes it, only while it is still ours.

Race windows. fsspec has no compare-and-swap. What the stores do offer is create-only-if-absent:
locally a hard link of a complete temp file (``link`` fails when the name exists), on GCS
``pipe_file(mode="create")`` (gcsfs sends ``ifGenerationMatch=0``), on S3 the same (s3fs sends
``If-None-Match: *``). So two runs that find no lease can never both create one. gcsfs exposes
no ``ifGenerationMatch=<generation>`` through fsspec's generic API, so replacing an *existing*
lease (stale or taken over) and renewing one are read-compare-write: a second acquirer that
read the old record before the first replaced it may delete the first's new lease in the one
round trip between its compare and its delete, and a heartbeat may overwrite a takeover that
landed between its read and its write. Every acquire reads the lease back and every heartbeat
and fence reads it again, so the loser finds out at its next read (at most ``ttl / 3`` later)
and, whatever it believes meanwhile, its COMMIT is refused from the moment the lease names
another token. What remains is one PUT wide: a fence check that passed just before the lease
changed hands, followed by that COMMIT. On stores without create-only writes (memory://, Drive)
creating is exists-then-write; the read-back narrows that window to the same size.

Clocks: ``expires`` is written with the owner's clock and compared with the reader's, so the
machines' clocks must agree to well within the TTL (NTP does; 60 s leaves room).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from tlaunch.storage.checkpoint.manifest import CheckpointError
from tlaunch.storage.localfs import read_bytes, write_atomic
from tlaunch.storage.store import Location, RetryPolicy, StorageError, redact, resolve

__all__ = ["DEFAULT_TTL", "LEASE", "Heartbeat", "Lease", "LeaseHeld", "LeaseLost", "LeaseRecord"]

LEASE = "LEASE.json"
DEFAULT_TTL = 60.0
_VERSION = 1


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What ``LEASE.json`` says: who writes here, and until when the claim holds unrenewed."""

    token: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl: float
    expires: float

    def stale(self, now: float) -> bool:
        return now >= self.expires

    def abandoned(self) -> bool:
        """The owner ran on this host and its process is gone: a run killed with SIGKILL (a
        hard stop, an OOM kill) that could not release its lease. Rerunning the command on
        the same machine then resumes at once instead of waiting out the TTL. A reused pid
        reads as alive: the safe side."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # EPERM: someone else's live process
            return False
        return False

    @property
    def owner(self) -> str:
        return f"host {self.host} pid {self.pid}"

    def describe(self, now: float) -> str:
        """``host vm-1 pid 4242 (started 2026-01-02 10:00:00, last heartbeat 3 s ago, ...)``."""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        beat = f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"
        if self.stale(now):
            return f"{self.owner} (started {started}, {beat}; its lease expired)"
        return f"{self.owner} (started {started}, {beat}; its lease expires in {self.expires - now:.0f} s)"

    def encode(self) -> bytes:
        return json.dumps({"version": _VERSION, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord:
        """The record in ``data``; a damaged one (not ours, cut off) as an expired nobody's."""
        try:
            raw = json.loads(data)
            record = cls(
                token=str(raw["token"]),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                started=float(raw["started"]),
                heartbeat=float(raw["heartbeat"]),
                ttl=float(raw["ttl"]),
                expires=float(raw["expires"]),
            )
        except (ValueError, TypeError, KeyError):
            return cls("", "unknown", 0, 0.0, 0.0, 0.0, 0.0)
        return record


class LeaseHeld(StorageError):
    """Another run holds the checkpoint directory's lease (``owner``; None: it changed while we
    looked)."""

    def __init__(self, url: str, owner: LeaseRecord | None, now: float) -> None:
        self.url, self.owner = url, owner
        who = owner.describe(now) if owner is not None else "another run that is taking it now"
        super().__init__(f"checkpoint directory {redact(url)} is in use by {who}")


class LeaseLost(CheckpointError):
    """The lease no longer names this writer: it must not write there any more."""

    def __init__(self, url: str, owner: LeaseRecord | None) -> None:
        self.url, self.owner = url, owner
        if owner is None:
            # A takeover deletes the old lease before it creates its own: a fence check in
            # between finds none.
            why = "its lease is gone (deleted, released, or another run is taking it over)"
        else:
            why = f"it now belongs to {owner.owner}: another run took it over"
        super().__init__(
            f"checkpoint directory {redact(url)}: {why}; this run commits nothing more there"
        )


class Lease:
    """The lease on the checkpoint directory ``url`` for the writer holding ``token``.

    Without ``token`` a new random one is made (a writer about to :meth:`acquire`); with the
    token of a lease another process acquired, :meth:`check` fences this process's writes.
    """

    def __init__(
        self,
        url: str | Location,
        *,
        token: str | None = None,
        ttl: float = DEFAULT_TTL,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # local: os calls only (see _remove), no fsspec import in the launcher
        self.location = url if isinstance(url, Location) else resolve(url, lazy=True)
        self.url = self.location.url.rstrip("/")
        self.path = self.location.join(LEASE)
        self.token = token or secrets.token_hex(16)
        self.ttl = ttl
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._where = f"{self.url}/{LEASE}"

    def __repr__(self) -> str:
        return f"Lease({redact(self.url)!r})"

    @property
    def shared(self) -> bool:
        """False for ``memory://``: only this process sees it, so no other writer can."""
        protocol = self.location.fs.protocol
        return "memory" not in ((protocol,) if isinstance(protocol, str) else protocol)

    # -- reading -----------------------------------------------------------------------------
    def read(self) -> LeaseRecord | None:
        """The current record, or None when there is no lease."""
        read = read_bytes if self.location.local else self.location.fs.cat_file
        try:
            data = self._retry.call(read, self.path, action="reading", where=self._where)
        except FileNotFoundError:
            return None
        return LeaseRecord.decode(data)

    def check(self) -> None:
        """The fence: LeaseLost unless the lease still names our token."""
        current = self.read()
        if current is None or current.token != self.token:
            raise LeaseLost(self.url, current)

    # -- taking, keeping, giving back ------------------------------------------------------
    def acquire(self, *, takeover: bool = False) -> LeaseRecord | None:
        """Take the lease; returns the record it replaced (stale, or taken over), else None.

        LeaseHeld when another run's live lease is there and ``takeover`` is not given, or when
        another acquirer won the race for it.
        """
        current = self.read()
        if current is not None and current.token == self.token:
            self.heartbeat()
            return None
        if current is not None:
            if not (takeover or current.stale(self._clock()) or current.abandoned()):
                raise LeaseHeld(self.url, current, self._clock())
            self._remove_if_still(current)
        now = self._clock()
        record = LeaseRecord(
            self.token, socket.gethostname(), os.getpid(), now, now, self.ttl, now + self.ttl
        )
        self._create(record.encode())
        confirmed = self.read()  # also settles a create whose reply was lost and then retried
        if confirmed is None or confirmed.token != self.token:
            raise LeaseHeld(self.url, confirmed, self._clock())
        return current

    def heartbeat(self) -> LeaseRecord:
        """Renew the lease: LeaseLost if it is no longer ours."""
        current = self.read()
        if current is None or current.token != self.token:
            raise LeaseLost(self.url, current)
        now = self._clock()
        renewed = replace(current, heartbeat=now, ttl=self.ttl, expires=now + self.ttl)
        self._write(renewed.encode())
        return renewed

    def release(self) -> bool:
        """Remove the lease if it is still ours; returns whether it was."""
        current = self.read()
        if current is None or current.token != self.token:
            return False
        with contextlib.suppress(FileNotFoundError):
            self._retry.call(self._remove, self.path, action="deleting", where=self._where)
        return True

    def keep_alive(
        self, on_problem: Callable[[Exception], None], interval: float | None = None
    ) -> Heartbeat:
        """Start renewing every ``interval`` (``ttl / 3``) in a daemon thread."""
        return Heartbeat(self, on_problem, interval or self.ttl / 3).start()

    # -- storage -----------------------------------------------------------------------------
    # On this machine's file system (a disk, the Drive mount) the lease is read and removed with
    # os calls, so that the launcher never imports fsspec for it.
    def _remove(self, path: str) -> None:
        if self.location.local:
            os.remove(path)
        else:
            self.location.fs.rm_file(path)

    def _remove_if_still(self, expected: LeaseRecord) -> None:
        """Delete the lease we are replacing, unless it changed since we read it (then its
        owner is alive, or another run got there first)."""
        again = self.read()
        if again is None:
            return
        if again != expected:
            raise LeaseHeld(self.url, again, self._clock())
        with contextlib.suppress(FileNotFoundError):
            self._retry.call(self._remove, self.path, action="deleting", where=self._where)

    def _create(self, data: bytes) -> None:
        """Write the lease only if none exists (see the module docstring for how per store).
        Losing that race is not an error here: the read-back in :meth:`acquire` reports it."""
        if self.location.atomic_rename and self._link_into_place(data):
            return
        fs = self.location.fs

        def create() -> None:
            if self.location.local:  # a FUSE mount (Drive): no folder appears for a file there
                os.makedirs(self.location.path, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                fs.pipe_file(self.path, data, mode="create")

        self._retry.call(create, action="writing", where=self._where)

    def _link_into_place(self, data: bytes) -> bool:
        """A local disk: link a complete, fsynced temp file to LEASE.json, which fails if that
        name exists. False when this file system has no hard links (then create-if-absent)."""
        folder = self.location.path
        temp = self.location.join(f".{LEASE}.{self.token[:12]}")
        self._retry.call(os.makedirs, folder, exist_ok=True, action="creating", where=self.url)
        self._retry.call(write_atomic, temp, data, action="writing", where=self._where)
        try:
            os.link(temp, self.path)
        except FileExistsError:
            pass
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return True

    def _write(self, data: bytes) -> None:
        if self.location.atomic_rename:  # readers never see a half-written lease
            self._retry.call(write_atomic, self.path, data, action="writing", where=self._where)
        else:  # one PUT is atomic on object stores
            self._retry.call(
                self.location.fs.pipe_file, self.path, data, action="writing", where=self._where
            )


class Heartbeat:
    """Renews a lease every ``interval`` seconds in a daemon thread until :meth:`stop`.

    A renewal that fails for a storage reason is reported to ``on_problem`` and tried again at
    the next beat (the lease stays valid until it expires). A lost lease is reported and ends
    the beats: renewing it would overwrite the new owner's.
    """

    def __init__(
        self, lease: Lease, on_problem: Callable[[Exception], None], interval: float
    ) -> None:
        self.lease, self.interval, self._on_problem = lease, interval, on_problem
        self.lost: LeaseLost | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlaunch-lease", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.lease.heartbeat()
            except LeaseLost as e:
                self.lost = e
                self._report(e)
                return
            except Exception as e:  # storage trouble: the next beat tries again
                self._report(e)

    def _report(self, e: Exception) -> None:
        if not self._stopped.is_set():
            with contextlib.suppress(Exception):  # a reporter that fails must not end the beats
                self._on_problem(e)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
