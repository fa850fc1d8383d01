"""The worker side of a stop, in one place: what triggers it, how the ranks agree, how it ends.

::

    trigger (any rank)                      agreement                   end
    ───────────────────                     ─────────                   ───
    SIGTERM / SIGINT / SIGUSR1 ─┐
    the launcher's STOP file ───┼─▶ local ─▶ StepAgreement ─▶ agreed ─▶ announce
    --time-limit minus margin ──┘   flag     (one all-reduce       │     (WORKERS_STOPPING)
                                             every ~0.1 s of       ▼
                                             steps, a step late) the Run commits one
                                                              checkpoint, then exit():
                                                              report (preempted.json),
                                                              end the process group, leave

Every rank reaches the same decision at the same optimizer step, so every rank saves the
same step. The launcher's side (signals to the launcher, cloud notices, the supervisor's state
machine) is in :mod:`tlaunch.supervisor` and :mod:`tlaunch.launcher`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from tlaunch.agreement import StepAgreement
from tlaunch.config import LaunchConfig
from tlaunch.contract import (
    CONTROL_DIR_ENV,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    FINISHED_REPORT,
    LAUNCHER_PID_ENV,
    PREEMPTED_REPORT,
    START_TIME_ENV,
    STOP_FILE,
    STOP_SIGNALS,
    WORKERS_STOPPING,
    ready_file,
)
from tlaunch.preemption import time_limit_span


class StepClock:
    """Times optimizer steps, decides when the slower checks are due, and the deadline.

    The margin before ``--time-limit`` covers what stopping costs, measured on this run: the
    slowest save so far with half again for safety, plus a few steps and one poll interval,
    and never less than 5% of the limit (capped at a minute) before any save was seen.
    """

    #: The deadline, timed saves and the launcher's STOP file are looked at on one step per
    #: this many seconds at most: a stop or timed save comes at most this much later, and a
    #: step pays one monotonic clock read instead of a stat and several clock reads.
    POLL_SECONDS = 0.1

    def __init__(self, limit: float | None, started: float | None = None) -> None:
        """``limit``: seconds from ``started`` (epoch seconds; default: the launch's start) to
        the deadline, or None."""
        self.limit = limit
        self.started = (
            float(os.environ.get(START_TIME_ENV, time.time())) if started is None else started
        )
        self._last_step: float | None = None  # the first step's time includes start-up
        self._next_poll = 0.0
        self.slowest_step = 0.0

    def tick(self) -> float:
        """Called once per optimizer step: times the step; returns the monotonic time."""
        now = time.monotonic()
        if self._last_step is not None:
            self.slowest_step = max(self.slowest_step, now - self._last_step)
        self._last_step = now
        return now

    def poll_due(self) -> bool:
        """Called once per optimizer step instead of :meth:`tick`; True on the steps where the
        slower checks are due."""
        now = self.tick()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.POLL_SECONDS
        return True

    def margin(self, slowest_save: float) -> float:
        assert self.limit is not None
        floor = min(60.0, 0.05 * self.limit)
        return max(floor, 1.5 * slowest_save + 3 * self.slowest_step + self.POLL_SECONDS)

    def deadline_near(self, slowest_save: float) -> bool:
        if self.limit is None:
            return False
        return time.time() + self.margin(slowest_save) >= self.started + self.limit


class Stopped(Exception):
    """A stop (Ctrl-C, the kernel's interrupt, SIGTERM, ``--time-limit``) ended ``tlaunch.init``'s
    run in an interactive session, a notebook's kernel or a Python prompt, where leaving the
    process would end the session. A script run as a program exits 75 instead.

    ``kept``: everything trained is in a committed checkpoint (run the cell again to resume);
    ``step``: the optimizer step the run stopped at.
    """

    def __init__(self, *, step: int, kept: bool) -> None:
        self.step, self.kept = step, kept
        what = "committed in a checkpoint" if kept else "not saved (no checkpoint directory)"
        super().__init__(f"the run stopped at step {step}; everything up to it is {what}")


def interactive() -> bool:
    """True in a Jupyter/IPython kernel or at an interactive Python prompt, where a stop must
    return to the user instead of ending the process."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


class StopController:
    """Owns this worker's stop: signal handlers, the triggers, the agreement, the exit."""

    def __init__(self, config: LaunchConfig, strategy: Any, accelerator: Any) -> None:
        self.strategy, self.accelerator = strategy, accelerator
        self.control_dir = os.environ.get(CONTROL_DIR_ENV)
        self._stop_file = os.path.join(self.control_dir, STOP_FILE) if self.control_dir else None
        self._local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._local_rank0 = self._local_rank == 0
        started = float(os.environ.get(START_TIME_ENV, time.time()))
        self.clock = StepClock(time_limit_span(config.time_limit, started), started)
        #: This rank's own request (a signal); ``agreed``: every rank's decision.
        self.requested = False
        self.agreed = False
        self._sigint_at: float | None = None
        self._previous: dict[int, Any] = {}
        several = getattr(accelerator, "num_processes", 1) > 1
        self._agreement = StepAgreement(strategy, accelerator) if several else None

    @property
    def under_launcher(self) -> bool:
        return self.control_dir is not None

    # -- triggers ----------------------------------------------------------------------------
    def install(self) -> None:
        """Take SIGTERM, SIGINT and SIGUSR1 for this run (main thread only); :meth:`restore`
        gives them back."""
        if threading.current_thread() is not threading.main_thread():
            return
        from tlaunch.early_signals import release

        held = release()  # signals that came while the script started: a stop like any other
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        if held:
            self.requested = True
            if signal.SIGINT in held:
                self._sigint_at = time.monotonic()
        if self.under_launcher:
            _die_with_launcher()
            # From here on the launcher stops us through the STOP file alone; one that is
            # there already (a stop while we started) is a request like any other.
            open(os.path.join(self.control_dir, ready_file(self._local_rank)), "w").close()
            self.requested = self.requested or os.path.exists(self._stop_file)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        """The first signal requests the stop; later SIGTERMs and SIGUSR1s are the same
        request again (see :meth:`tlaunch.supervisor.Supervisor.request_stop`). A second
        SIGINT forces the exit: a terminal's Ctrl-C reaches us twice at once (directly and
        forwarded by the agent), so only one more than a second after the first counts."""
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._sigint_at is not None and now - self._sigint_at > 1.0:
                previous = self._previous.get(signum)
                self.restore()
                if callable(previous):  # a kernel's or the prompt's: KeyboardInterrupt there
                    previous(signum, frame)
                    return
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._sigint_at = self._sigint_at or now
        self.requested = True

    # -- agreement ---------------------------------------------------------------------------
    def after_step(self, *, timed_save_due: Any, slowest_save: Any) -> tuple[bool, bool]:
        """Once per optimizer step on every rank: (stop now, save now), agreed by all ranks.

        ``timed_save_due`` and ``slowest_save`` are callables, asked only on polling steps:
        on one process every :attr:`StepClock.POLL_SECONDS`, on several the steps that start
        an agreement (:mod:`tlaunch.agreement`: a few times a second, the same steps on every
        rank).
        """

        def local() -> list[bool]:
            stop = (
                self.requested
                or self.clock.deadline_near(slowest_save())
                or (self._stop_file is not None and os.path.exists(self._stop_file))
            )
            return [stop, timed_save_due()]

        if self._agreement is None:  # one process: nothing to agree on
            stop, save_due = local() if self.clock.poll_due() else (self.requested, False)
        else:
            self.clock.tick()
            # Stops and timed saves depend on clocks and signals that differ between ranks;
            # every rank must take the same decision at the same step before anyone saves.
            agreed = self._agreement.after_step(local)
            if agreed is None:
                return False, False
            stop, save_due = agreed
        self.agreed = self.agreed or stop
        return stop, save_due

    def agree_before_start(self) -> bool:
        """Before the first step: has any rank been asked to stop? (One blocking all-reduce.)"""
        local = self.requested or (self._stop_file is not None and os.path.exists(self._stop_file))
        (stop,) = self.strategy.any_rank(self.accelerator, [local])
        self.agreed = self.agreed or stop
        return stop

    @property
    def should_stop(self) -> bool:
        return self.agreed or (self.accelerator.num_processes == 1 and self.requested)

    # -- the end -----------------------------------------------------------------------------
    def announce(self) -> None:
        """Tell the launcher the workers stop on their own: a watcher firing now adds nothing.
        Under the launcher this process will leave quickly: its exit's search for open files
        begins now, while the checkpoint is written (:func:`tlaunch.quick_exit.prepare`)."""
        if self.under_launcher:
            from tlaunch.quick_exit import prepare

            prepare()
        if self.under_launcher and self._local_rank0:
            open(os.path.join(self.control_dir, WORKERS_STOPPING), "w").close()

    def finished(self, step: int, *, checkpoint: bool) -> None:
        """``run.finish()`` is done (on every rank, after the final commit): the launcher
        signals a later stop instead of writing STOP that nobody polls, and does not count it
        as lost work. ``checkpoint``: the final state is committed."""
        if self.under_launcher and self._local_rank0:
            path = os.path.join(self.control_dir, FINISHED_REPORT)
            with open(path + ".tmp", "w") as f:
                json.dump({"step": step, "checkpoint": checkpoint}, f)
            os.replace(path + ".tmp", path)  # read whole or not at all

    def exit(
        self, *, kept: bool, nothing_new: bool, step: int, epoch: int, batch: int, is_main: bool
    ) -> None:
        """Report the stop, end the process group and leave the script. ``kept``: everything
        is in a committed checkpoint (``nothing_new``: no step since the last one)."""
        if kept and self.under_launcher and self._local_rank0:
            record = {"step": step, "epoch": epoch, "batch": batch, "nothing_new": nothing_new}
            with open(os.path.join(self.control_dir, PREEMPTED_REPORT), "w") as f:
                json.dump(record, f)
        if is_main:
            if nothing_new:
                what = f"nothing to lose: no step since {_since(step)}"
            elif kept:
                what = f"checkpoint committed at step {step}"
            else:
                what = "--checkpoint-dir none, nothing saved"
            print(f"tlaunch: stop requested; {what}", file=sys.stderr, flush=True)
        self.strategy.end_process_group(self.accelerator)
        self.restore()
        # Under the launcher the report file carries "preempted"; exit 0 keeps torch's elastic
        # agent from treating the stop as a failure to restart from. Everything is kept: the
        # interpreter's teardown only costs time (tlaunch.quick_exit).
        if self.under_launcher:
            from tlaunch.quick_exit import arm

            arm(0)
            raise SystemExit(0)
        if interactive():  # a notebook's kernel or a Python prompt: back to the user
            raise Stopped(step=step, kept=kept)
        raise SystemExit(EXIT_PREEMPTED if kept else EXIT_FAILED)


def _since(step: int) -> str:
    return "the start" if step == 0 else f"the checkpoint at step {step}"


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this worker when the launcher dies (torch's elastic agent starts
    workers in sessions of their own, so a hard kill of the launcher would leave them training
    on, and writing checkpoints beside the next launch). Elsewhere this is a no-op."""
    from tlaunch.early_signals import die_with

    # The launcher's pid, not getppid(): a launcher killed while this worker still imported
    # torch has already left it to the reaper, whose pid getppid() would return.
    die_with(int(os.environ.get(LAUNCHER_PID_ENV) or os.getppid()))
