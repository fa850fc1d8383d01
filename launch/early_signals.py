"""Stop signals that reach a worker before its Run has handlers: held, not fatal.

A shutdown signals every process (systemd), a terminal's Ctrl-C reaches the whole process
group: a worker still importing torch would die of it and the launcher would report a stop that
lost work (143), though no step had been taken. When the launcher expects the Run API (the
script calls ``tlaunch.init``: ``TLAUNCH_HOLD_SIGNALS``), the workers' ``sitecustomize`` calls
:func:`hold` at interpreter start, in the launcher's own children only (never in processes they
spawn); :class:`tlaunch.stopping.StopController` :func:`release`-s them when it installs its
handlers and counts a held signal as a stop requested before the first step (exit 75). A script
that calls ``tlaunch.init`` only late (or in code that does not run) holds its stop signals
until the launcher's ``--grace`` SIGKILL. :func:`die_with` ties a worker to its launcher's
death, from ``sitecustomize`` and again when the Run installs its handlers.

No torch, nothing of tlaunch: this runs before the script.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_held: list[int] = []
_previous: dict[int, Any] = {}


def _record(signum: int, frame: Any) -> None:
    _held.append(signum)


def hold() -> None:
    """From now on, record stop signals instead of dying of them."""
    for s in SIGNALS:
        _previous[s] = signal.signal(s, _record)


def release() -> list[int]:
    """Give the signals their earlier handlers back; the ones held so far, in order."""
    for s, handler in _previous.items():
        if signal.getsignal(s) is _record:  # unless someone has taken it since
            signal.signal(s, handler)
    _previous.clear()
    held, _held[:] = list(_held), []
    return held


def die_with(parent: int) -> None:
    """Ask Linux to SIGKILL this process when ``parent`` (its launcher) dies; leave at once if
    it is gone already (the request only covers a death still to come). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)
