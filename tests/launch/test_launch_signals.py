"""The launcher's own signals, from its first line to its exit code (real signals to this
process; the handlers run at the next bytecode, before ``os.kill`` is followed by anything)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tlaunch.launcher import StoppedBeforeStart, _LaunchSignals


class _Supervisor:
    def __init__(self, during_run: int | None = None) -> None:
        self.stops: list[int] = []
        self.during_run = during_run

    def request_stop(self, signum: int) -> None:
        self.stops.append(signum)

    def run(self) -> int:
        if self.during_run is not None:
            os.kill(os.getpid(), self.during_run)
        return 75


def test_before_the_workers_start_the_first_signal_unwinds_the_launch_and_later_ones_wait():
    previous = signal.getsignal(signal.SIGTERM)
    with _LaunchSignals():
        with pytest.raises(StoppedBeforeStart) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: the handler raises at the next bytecode
        assert stopped.value.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # while unwinding (releasing the lease): ignored
    assert signal.getsignal(signal.SIGTERM) is previous


def test_while_the_supervisor_runs_signals_are_stop_requests_and_after_it_they_change_nothing():
    supervisor = _Supervisor(during_run=signal.SIGUSR1)
    with _LaunchSignals() as signals:
        assert signals.supervise(supervisor) == 75
        assert supervisor.stops == [signal.SIGTERM]  # SIGUSR1 stops like SIGTERM
        # The exit code is decided: the launcher writes its records and exits with it.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(os.getpid(), sig)
        assert supervisor.stops == [signal.SIGTERM] and signals.decided
        # Only a second Ctrl-C, more than a second after the first, still ends it at once.
        signals._sigint_at = time.monotonic() - 2
        with pytest.raises(SystemExit) as forced:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert forced.value.code == 128 + signal.SIGINT
