"""DataLoader worker processes stay out of a stop: the rank decides, saves and exits.

Whatever delivers a stop may reach a loader's worker processes too: systemd signals every
process of a unit, a terminal's Ctrl-C reaches the whole foreground process group, a person
runs ``pkill``. torch gives each worker a SIGTERM handler that dies unless its parent sent the
signal, and Python's SIGINT raises in the worker loop; either way the worker is gone, and the
rank fails on its next batch ("DataLoader worker (pid …) is killed by signal: Terminated")
before it can save. So every worker ignores SIGINT and SIGUSR1, and blocks SIGTERM and hands it
to one thread that waits for it: the parent's SIGTERM (how torch and multiprocessing end a
worker that outlived its loader) still ends it at once, anyone else's is dropped. A worker whose
rank is gone ends at once, in the middle of a sample too: another thread waits for the rank's
exit (a pidfd). torch's own check of the parent comes only between samples, every 5 s, and a
rank that ends without shutting its loader down (a script without a SIGTERM handler, a crash,
SIGKILL, tlaunch's quick exit after a stop) would otherwise leave its workers loading on.

Where the shield goes up:

* in every worker process tlaunch starts, Run API or not: its ``sitecustomize`` installs the
  hook below once the script imports torch (:func:`install_when_torch_loads`), so that a script
  which handles SIGTERM itself (Lightning's ``OnExceptionCheckpoint``, a handler of its own)
  still has its loader when it saves;
* right after torch sets a worker's signal handlers, through a hook on
  ``torch.utils.data._utils.signal_handling`` installed when the Run starts
  (:func:`install_worker_hook`): every loader of the rank, prepared or not, torchdata's
  ``StatefulDataLoader`` included, whose workers are forked (Linux's default);
* in the ``worker_init_fn`` of the loaders ``run.prepare`` builds (:class:`ShieldedInit`), for
  a torch without that function; those loaders start their workers with the stop signals
  blocked (:func:`stops_held`), so that none lands before the shield.

A forked worker has one thread when its shield goes up, and the block holds for every thread it
starts later. A worker started by ``spawn`` or ``forkserver`` is shielded from SIGINT and
SIGUSR1 only: it runs threads of its own before any code of ours, and the kernel may hand a
SIGTERM to one of them, whose handler is torch's.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tlaunch.contract import STOP_SIGNALS

#: The pid of the process whose shield is up (a fork of it must raise its own).
_shielded_in: int | None = None


def shield_this_worker() -> None:
    """Keep this process (a loader worker) alive through stop signals; its parent's SIGTERM
    still ends it. Idempotent; the main thread only (where the worker loop runs)."""
    global _shielded_in
    if _shielded_in == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    _shielded_in = os.getpid()
    others = [s for s in STOP_SIGNALS if s != signal.SIGTERM]
    for s in others:  # no parent sends these: ignored by every thread
        signal.signal(s, signal.SIG_IGN)
    # Threads started from here on inherit the mask: only the waiter below takes SIGTERM. (The
    # others may arrive blocked by stops_held: a blocked signal is kept even when ignored.)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, others)
    parent = os.getppid()
    waiter = threading.Thread(
        target=_drop_sigterm, args=(parent,), name="tlaunch-loader-shield", daemon=True
    )
    waiter.start()
    try:
        parent_fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfds (Linux < 5.3): torch's check between samples
        return
    watcher = threading.Thread(
        target=_end_with_parent, args=(parent_fd,), name="tlaunch-loader-parent", daemon=True
    )
    watcher.start()


def _drop_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo([signal.SIGTERM])
        if info.si_pid == parent:
            os._exit(0)  # what torch's own handler does on its parent's SIGTERM


def _end_with_parent(parent_fd: int) -> None:
    select.select([parent_fd], [], [])  # readable once the parent has exited
    os._exit(0)  # no one is left to take what this worker loads


class ShieldedInit:
    """A loader's ``worker_init_fn``: the shield first, then the script's own function.

    A class rather than a closure so that loaders whose workers are spawned can pickle it.
    """

    def __init__(self, user: Callable[[int], Any] | None) -> None:
        self.user = user

    def __call__(self, worker_id: int) -> None:
        shield_this_worker()
        if self.user is not None:
            self.user(worker_id)


@contextlib.contextmanager
def stops_held() -> Iterator[None]:
    """Block the stop signals in this thread while a loader starts its workers: they inherit
    the mask, so a signal waits for their shield instead of killing them first. Signals that
    came meanwhile reach this process when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def install_worker_hook() -> None:
    """Shield every loader worker this process forks from now on (see the module docstring).

    The hook wraps a private torch function, looked up at every worker start; where a torch
    release no longer has it, only the loaders ``run.prepare`` builds are shielded.
    """
    try:
        from torch.utils.data._utils import signal_handling
    except ImportError:
        return
    original = getattr(signal_handling, "_set_worker_signal_handlers", None)
    if original is None or getattr(original, "tlaunch_shield", False):
        return

    def set_handlers_then_shield(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        shield_this_worker()
        return result

    set_handlers_then_shield.tlaunch_shield = True  # type: ignore[attr-defined]
    signal_handling._set_worker_signal_handlers = set_handlers_then_shield
