"""One writer per checkpoint directory, from the launch side: who takes the lease, and what
they say about it.

The launcher takes the lease on ``--checkpoint-dir`` before any worker starts
(:mod:`tlaunch.preflight`), renews it while the workers run and gives it back when it exits,
whatever the exit code. Its token reaches the workers in ``TLAUNCH_LEASE_TOKEN``; rank 0 fences
its commits, clean-up and retention with it (:func:`worker_fence`), so a worker orphaned by a
killed launcher commits nothing once another run holds the lease. A script run without the
launcher (plain ``python``, ``torchrun``, a notebook) has no token: its rank 0 takes the lease
itself. The lease, its format and its race windows: :mod:`tlaunch.storage.checkpoint.lease`.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from tlaunch.contract import EXIT_UNAVAILABLE, LEASE_TOKEN_ENV, fail

#: Seconds a lease stays valid unrenewed; renewed every third of it. A run killed without
#: releasing blocks the next start (without --takeover) for at most this long.
LEASE_TTL = 60.0
#: How often a launcher waiting for an abandoned lease looks at it again.
LEASE_POLL = 1.0


class LeaseHold:
    """A lease this process took; renewed in the background from :meth:`keep_alive` until
    :meth:`release`."""

    def __init__(self, lease: Any, replaced: Any, takeover: bool) -> None:
        self.lease = lease
        self._beat: Any = None
        self._released = False
        #: A warning to show when the lease was taken from another run, else None.
        self.note = None if replaced is None else _takeover_note(lease.url, replaced, takeover)

    @property
    def token(self) -> str:
        return self.lease.token

    def keep_alive(self, say: Callable[[str], None]) -> None:
        """Renew every TTL/3; ``say`` gets one line about a renewal that failed or a lost lease."""
        from tlaunch.storage import LeaseLost

        def problem(e: Exception) -> None:
            if isinstance(e, LeaseLost):
                say(f"warning: {e}: the next checkpoint save will fail")
            else:
                say(f"warning: renewing the lease failed, will retry: {e}")

        self._beat = self.lease.keep_alive(problem)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (idempotent, never raises)."""
        if self._released:
            return
        self._released = True
        if self._beat is not None:
            self._beat.stop()
        try:
            self.lease.release()
        except Exception as e:  # it expires on its own within the TTL
            print(f"tlaunch: warning: could not release the lease: {e}", file=sys.stderr)


def take_lease(url: str, *, takeover: bool) -> LeaseHold | None:
    """Take the lease on ``url``; None where no other process could see one (memory://).

    Raises LeaseHeld (its message completed by :func:`held_message`) or a StorageError.
    """
    from tlaunch.storage import Lease, LeaseHeld

    lease = Lease(url, ttl=LEASE_TTL)
    if not lease.shared:
        return None
    try:
        replaced = lease.acquire(takeover=takeover)
    except LeaseHeld as e:
        # On this machine the owner's pid says whether it lives (Lease.acquire asked it);
        # only a lease from another machine can be an abandoned one we must wait out.
        if e.owner is None or e.owner.host == socket.gethostname():
            raise
        replaced = _wait_out(lease, e)
    return LeaseHold(lease, replaced, takeover)


def _wait_out(lease: Any, held: Any) -> Any:
    """A lease held from another machine whose heartbeat stops: a VM that was reclaimed
    without a chance to release it, and this is the replacement running the same command.
    Watch it until it expires (at most one TTL) and take it then; a heartbeat that moves
    meanwhile is a live run, refused as before."""
    owner = held.owner
    print(
        f"tlaunch: the checkpoint directory's lease is held by {owner.owner}; waiting up to "
        f"{max(0.0, owner.expires - time.time()):.0f} s for it to expire (a live run renews it)",
        file=sys.stderr,
        flush=True,
    )
    while time.time() < owner.expires + LEASE_POLL:
        time.sleep(LEASE_POLL)
        current = lease.read()
        if current is not None and current.token == owner.token:
            if current.heartbeat != owner.heartbeat:
                raise held  # renewed: the owner is alive
            if not current.stale(time.time()):
                continue
        return lease.acquire()  # expired, released or replaced: one more try, as usual
    return lease.acquire()


def held_message(e: Exception) -> str:
    return f"{e}; pass --takeover if that run is gone"


def _takeover_note(url: str, replaced: Any, takeover: bool) -> str:
    from tlaunch.storage import redact

    now = time.time()
    if replaced.stale(now):
        why = f"its lease expired {now - replaced.expires:.0f} s ago (the run died without releasing it)"
    elif replaced.abandoned():
        why = "its process is gone (it was killed without releasing the lease)"
    else:
        why = "--takeover; if that run still runs, its next checkpoint save will fail"
    return f"warning: taking over the lease on {redact(url)} from {replaced.owner}: {why}"


def worker_fence(config: Any) -> tuple[Callable[[], None] | None, LeaseHold | None]:
    """Rank 0's fence for the checkpoint store, and the lease it holds itself (if any).

    Under the launcher: a check of the launcher's lease token. Without one: rank 0 takes the
    lease (exit 2 with the owner named when another run holds it; 69 when storage is down).
    """
    from tlaunch.storage import Lease, LeaseHeld, StorageError, StorageUnavailable

    token = os.environ.get(LEASE_TOKEN_ENV)
    if token:
        return Lease(config.checkpoint_dir, token=token).check, None
    try:
        hold = take_lease(config.checkpoint_dir, takeover=config.takeover)
    except LeaseHeld as e:
        fail(held_message(e))
    except StorageUnavailable as e:
        fail(f"storage unreachable; nothing was changed; run again later ({e})", EXIT_UNAVAILABLE)
    except StorageError as e:
        fail(str(e))
    if hold is None:
        return None, None

    def say(line: str) -> None:
        print(f"tlaunch: {line}", file=sys.stderr, flush=True)

    if hold.note:
        say(hold.note)
    hold.keep_alive(say)
    atexit.register(hold.release)  # after the writer's own exit flush (atexit runs LIFO)
    return hold.lease.check, hold
