"""The supervisor: one short loop around the workers of a run, as an explicit state machine.

::

    STARTING ──▶ RUNNING ──▶ SUCCEEDED                      exit 0
                    │ ├────▶ FAILED ──▶ RESTARTING ──▶ STARTING   (while restarts remain)
                    │ │         └────────────────────▶ exit: the script's code
                    ▼ ▼
                 STOPPING ──▶ PREEMPTED                     exit 75 (everything kept)
                         ├──▶ SUCCEEDED                     exit 0 (the run had finished)
                         └──▶ FAILED                        exit 128+signal (nothing saved)
    RUNNING ──▶ PREEMPTED | FAILED       the workers' own stop (a signal sent to them, their
                                         --time-limit margin): 75, or 1 with nothing saved
    RESTARTING ──▶ FAILED                a stop during the backoff: no new attempt

A stop trigger (a signal, a cloud notice, the deadline) moves RUNNING to STOPPING: the
workers are told, they agree on a step, commit one checkpoint (or find nothing new to save)
and exit; the supervisor then decides PREEMPTED or FAILED from what the workers reported.
A stop after ``run.finish()`` (finished.json) loses no training: the run SUCCEEDED if the
script then exited 0, else it is PREEMPTED when the final checkpoint holds the state.
Workers report through small files in a node-local control directory, not through exit
codes, so that torch's elastic agent never mistakes a clean preemption for a failure to
restart from.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tlaunch.contract import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    FINISHED_REPORT,
    PREEMPTED_REPORT,
    STOP_FILE,
    WORKERS_STOPPING,
)


class RunState(str, enum.Enum):
    """States of one launch. Transitions are listed in the module docstring."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    PREEMPTED = "preempted"
    FAILED = "failed"
    RESTARTING = "restarting"


@dataclass(slots=True)
class Attempt:
    """What one start of the workers ended with."""

    exit_code: int
    #: Human description, e.g. "rank 1 exited with code 3".
    detail: str = ""


class Supervisor:
    """Runs ``start_workers`` until success, preemption, or restarts run out.

    ``start_workers(attempt)`` blocks until the workers are gone and returns an :class:`Attempt`.
    ``stop_workers(signum)`` is called (from the main thread) when a stop is triggered.
    """

    def __init__(
        self,
        *,
        start_workers: Callable[[int], Attempt],
        stop_workers: Callable[[int], None],
        control_dir: str,
        max_restarts: int = 0,
        log: Callable[[str], None] | None = None,
        after_stop: Callable[[], bool] | None = None,
        force_workers: Callable[[], None] | None = None,
        never_started: Callable[[], bool] | None = None,
        outside_run_api: Callable[[], bool] | None = None,
    ) -> None:
        self._start = start_workers
        self._stop_workers = stop_workers
        #: Ends the workers at once: a second Ctrl-C.
        self._force_workers = force_workers
        self.control_dir = control_dir
        self.max_restarts = max_restarts
        self._log = log or (lambda line: print(f"tlaunch: {line}", file=sys.stderr, flush=True))
        #: Extra flush on stop (e.g. --sync-dir); returns True when it preserved the run's state.
        self._after_stop = after_stop
        #: True when no worker got as far as taking a step (a Run API script still starting).
        self._never_started = never_started
        #: True when the script never began a Run: what it saved, tlaunch knows nothing of.
        self._outside_run_api = outside_run_api
        self.state = RunState.STARTING
        self.stop_signal: int | None = None
        self.history: list[RunState] = [self.state]
        # Re-entrant: a signal handler may call request_stop while the main thread is inside
        # _enter, holding the lock.
        self._lock = threading.RLock()
        self._sigint_at: float | None = None
        self._stopping = threading.Event()

    # -- transitions ---------------------------------------------------------------------------
    def _enter(self, state: RunState, why: str = "") -> None:
        with self._lock:
            previous, self.state = self.state, state
            self.history.append(state)
        self._log(f"{previous.value} -> {state.value}" + (f" ({why})" if why else ""))

    def request_stop(self, signum: int = signal.SIGTERM, why: str = "") -> None:
        """A stop trigger: a signal (``why`` empty) or a watcher's reason. Safe from signal
        handlers and watcher threads.

        The first trigger starts the stop. Later SIGTERMs and notices never interrupt it: on a
        preempted VM the notice is followed by the shutdown's SIGTERM, systemd signals every
        process, orchestrators repeat theirs, and each of them only wants what is already
        under way. Only a second Ctrl-C (SIGINT, more than a second after the first: a
        terminal's Ctrl-C can arrive twice at once) is a person who wants out now: the
        workers are ended at once; the commit protocol keeps a half-written save from ever
        being taken for a checkpoint.
        """
        if why and os.path.exists(os.path.join(self.control_dir, WORKERS_STOPPING)):
            return
        now = time.monotonic()
        with self._lock:
            first = self.stop_signal is None
            self.stop_signal = self.stop_signal or signum
            ctrl_c = signum == signal.SIGINT and not why
            forced = ctrl_c and self._sigint_at is not None and now - self._sigint_at > 1.0
            if ctrl_c and self._sigint_at is None:
                self._sigint_at = now
        if first:
            self._stopping.set()
            open(os.path.join(self.control_dir, STOP_FILE), "w").close()
            if self.state in (RunState.RUNNING, RunState.STARTING):
                self._enter(RunState.STOPPING, why or signal.Signals(signum).name)
            self._stop_workers(signum)
        elif forced and self._force_workers is not None:
            self._log("second Ctrl-C: ending the workers now")
            self._force_workers()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        attempt = 0
        while True:
            if self.state == RunState.STARTING:
                self._enter(RunState.RUNNING)
            result = self._start(attempt)
            if self.stop_signal is not None or self._workers_stopped():
                return self._finish_stop(result)
            if result.exit_code == EXIT_OK:
                self._enter(RunState.SUCCEEDED)
                return EXIT_OK
            self._enter(RunState.FAILED, result.detail or f"exit code {result.exit_code}")
            if attempt >= self.max_restarts:
                if self.max_restarts:
                    self._log(
                        f"giving up: {attempt + 1} attempts failed (--max-restarts {self.max_restarts})"
                    )
                return result.exit_code
            attempt += 1
            backoff = min(2.0 ** (attempt - 1), 30.0)
            self._enter(
                RunState.RESTARTING,
                f"attempt {attempt + 1} of {self.max_restarts + 1} in {backoff:.0f}s, resuming from the latest checkpoint",
            )
            self._pause(backoff)
            if self.stop_signal is not None:  # stopped while no worker ran: nothing to save
                return self._finish_stop(Attempt(EXIT_OK, "stopped during the restart backoff"))
            self._enter(RunState.STARTING)

    def _pause(self, seconds: float) -> None:
        """The restart backoff; a stop request ends it at once."""
        self._stopping.wait(seconds)

    def _workers_stopped(self) -> bool:
        """The workers stopped on their own trigger (a signal sent to them directly, their
        --time-limit margin): they said so before saving, and again once everything was kept."""
        return self._preempted_report() is not None or os.path.exists(
            os.path.join(self.control_dir, WORKERS_STOPPING)
        )

    def _finish_stop(self, result: Attempt) -> int:
        report = self._preempted_report()
        finished = self._report(FINISHED_REPORT)
        if report is None and finished is not None:
            at = f"the run had finished at step {finished['step']}"
            if result.exit_code == EXIT_OK:
                self._enter(RunState.SUCCEEDED, f"{at} when the stop came")
                return EXIT_OK
            if finished.get("checkpoint"):
                self._enter(
                    RunState.PREEMPTED,
                    f"{at} (final checkpoint committed); the script was stopped after it: run "
                    "the same command again to finish it",
                )
                return EXIT_PREEMPTED
        preserved = self._after_stop() if self._after_stop else False
        if report is not None or preserved:
            if report is None:
                where = "synced folders committed"
            elif report.get("nothing_new"):
                since = "the start" if not report["step"] else f"step {report['step']}"
                where = f"nothing to lose (no step since {since})"
            else:
                where = f"checkpoint at step {report['step']} committed"
            self._enter(RunState.PREEMPTED, f"{where}; run the same command again to resume")
            return EXIT_PREEMPTED
        if self.stop_signal is None:  # the workers' own stop, with nothing saved
            self._enter(RunState.FAILED, "the workers stopped with nothing saved")
            return result.exit_code or EXIT_FAILED
        if self._never_started is not None and self._never_started():
            self._enter(
                RunState.PREEMPTED,
                "stopped while the workers started, before their Run began: nothing to lose; "
                "run the same command again",
            )
            return EXIT_PREEMPTED
        if self._outside_run_api is not None and self._outside_run_api():
            kept = (
                "its synced folders were not all kept, as named above"
                if self._after_stop
                else "--sync-dir LOCAL=URL keeps the folder it saves to"
            )
            self._enter(
                RunState.FAILED,
                f"stopped by {signal.Signals(self.stop_signal).name}; tlaunch keeps no checkpoint "
                f"of a script outside the Run API ({kept})",
            )
        else:
            self._enter(RunState.FAILED, "stopped before any checkpoint was committed")
        return 128 + self.stop_signal if result.exit_code in (0, 1) else result.exit_code

    def _preempted_report(self) -> dict | None:
        return self._report(PREEMPTED_REPORT)

    def _report(self, name: str) -> dict | None:
        path = os.path.join(self.control_dir, name)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
