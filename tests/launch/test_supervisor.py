"""The supervisor's state machine, driven by fake workers: no processes, no waiting.

A fake ``start_workers`` plays one scripted step per attempt: an :class:`Attempt` to return,
or a function that acts as the workers (or a trigger) would mid-attempt: write the control
files, call ``request_stop``. The restart backoff's ``time.sleep`` is replaced by a recorder.
"""

from __future__ import annotations

import json
import signal
import threading
import types
from pathlib import Path

import pytest

import tlaunch.supervisor as supervisor_module
from tlaunch.contract import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    FINISHED_REPORT,
    PREEMPTED_REPORT,
    STOP_FILE,
    WORKERS_STOPPING,
)
from tlaunch.supervisor import Attempt, RunState, Supervisor

pytestmark = pytest.mark.timeout(30)

S = RunState
SIGTERM_CODE = 128 + signal.SIGTERM
# The transitions the module docstring draws; every history must walk only these.
DOCUMENTED = {
    (S.STARTING, S.RUNNING),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.FAILED, S.RESTARTING),
    (S.RESTARTING, S.STARTING),
    (S.RUNNING, S.STOPPING),
    (S.STOPPING, S.PREEMPTED),
    (S.STOPPING, S.SUCCEEDED),
    (S.STOPPING, S.FAILED),
}


class FakeWorkers:
    """Plays ``steps[i]`` for attempt ``i``; records attempt numbers and stop calls."""

    def __init__(self, steps: list) -> None:
        self.steps = steps
        self.attempts: list[int] = []
        self.stops: list[int] = []
        self.stopped = threading.Event()
        self.supervisor: Supervisor | None = None

    def start(self, attempt: int) -> Attempt:
        self.attempts.append(attempt)
        step = self.steps[len(self.attempts) - 1]
        return step(self) if callable(step) else step

    def stop(self, signum: int) -> None:
        self.stops.append(signum)
        self.stopped.set()


class Clock:
    """The supervisor's clock: ``now`` moves only when a test moves it."""

    now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeps(monkeypatch, clock) -> list[float]:
    """The backoff delays the supervisor asked for (it does not really wait)."""
    asked: list[float] = []
    monkeypatch.setattr(Supervisor, "_pause", lambda self, seconds: asked.append(seconds))
    monkeypatch.setattr(supervisor_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return asked


@pytest.fixture
def build(tmp_path, sleeps):
    """``build(steps, **kwargs)`` -> (supervisor, workers, log lines)."""

    def make(steps: list, **kwargs) -> tuple[Supervisor, FakeWorkers, list[str]]:
        workers, lines = FakeWorkers(steps), []
        sup = Supervisor(
            start_workers=workers.start,
            stop_workers=workers.stop,
            control_dir=str(tmp_path),
            log=lines.append,
            **kwargs,
        )
        workers.supervisor = sup
        return sup, workers, lines

    return make


def commit_report(control_dir: Path, step: int = 12) -> None:
    """What local rank 0 writes once the stop checkpoint is committed."""
    (control_dir / PREEMPTED_REPORT).write_text(
        json.dumps({"step": step, "epoch": 0, "batch": step})
    )


def assert_documented(history: list[RunState]) -> None:
    walked = set(zip(history, history[1:], strict=False))
    assert walked <= DOCUMENTED, f"undocumented transitions: {walked - DOCUMENTED}"


# -- success, failure, restarts -------------------------------------------------------------


def test_success_exits_0_through_running(build, sleeps):
    sup, workers, _ = build([Attempt(0)])
    assert sup.run() == EXIT_OK
    assert sup.history == [S.STARTING, S.RUNNING, S.SUCCEEDED]
    assert workers.attempts == [0] and workers.stops == [] and sleeps == []


def test_failure_with_restarts_left_restarts_and_then_succeeds(build, sleeps):
    sup, workers, lines = build(
        [Attempt(3, "rank 1 exited with code 3"), Attempt(0)], max_restarts=2
    )
    assert sup.run() == EXIT_OK
    assert workers.attempts == [0, 1]
    assert sup.history == [
        *(S.STARTING, S.RUNNING, S.FAILED, S.RESTARTING),
        *(S.STARTING, S.RUNNING, S.SUCCEEDED),
    ]
    assert sleeps == [1]
    assert any("rank 1 exited with code 3" in line for line in lines)
    assert any("attempt 2 of 3" in line for line in lines)
    assert_documented(sup.history)


def test_backoff_doubles_from_1s_and_is_capped_at_30s(build, sleeps):
    sup, workers, _ = build([Attempt(1)] * 8 + [Attempt(0)], max_restarts=8)
    assert sup.run() == EXIT_OK
    assert workers.attempts == list(range(9))
    assert sleeps == [1, 2, 4, 8, 16, 30, 30, 30]


def test_failures_that_exhaust_the_restarts_return_the_scripts_own_code(build, sleeps):
    sup, workers, lines = build([Attempt(3), Attempt(4), Attempt(5)], max_restarts=2)
    assert sup.run() == 5
    assert workers.attempts == [0, 1, 2]
    assert sleeps == [1, 2]
    assert sup.history[-1] == S.FAILED and sup.history.count(S.RESTARTING) == 2
    assert any("giving up: 3 attempts failed" in line for line in lines)
    assert_documented(sup.history)


def test_a_failure_without_restarts_returns_its_code_at_once(build, sleeps):
    sup, workers, _ = build([Attempt(7)])
    assert sup.run() == 7
    assert sup.history == [S.STARTING, S.RUNNING, S.FAILED]
    assert workers.attempts == [0] and sleeps == []


# -- stops requested by the launcher --------------------------------------------------------


def stop_then(code: int, *, commit: bool, signum: int = signal.SIGTERM):
    """Workers during which a stop arrives; they commit a checkpoint (or not) and exit."""

    def attempt(workers: FakeWorkers) -> Attempt:
        workers.supervisor.request_stop(signum)
        if commit:
            commit_report(Path(workers.supervisor.control_dir))
        return Attempt(code)

    return attempt


def test_stop_with_a_committed_checkpoint_exits_75(build, tmp_path):
    sup, workers, lines = build([stop_then(0, commit=True)], max_restarts=3)
    assert sup.run() == EXIT_PREEMPTED
    assert (tmp_path / STOP_FILE).exists()
    assert workers.stops == [signal.SIGTERM]
    assert workers.attempts == [0], "a stop is not a failure to restart from"
    assert sup.history == [S.STARTING, S.RUNNING, S.STOPPING, S.PREEMPTED]
    assert any("checkpoint at step 12 committed" in line for line in lines)
    assert_documented(sup.history)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("workers_code", [0, 1])
def test_stop_before_any_commit_exits_128_plus_the_signal(build, signum, workers_code):
    # 1 is torchrun's code when its agent raises SignalException; 0 a worker that left cleanly.
    sup, workers, _ = build([stop_then(workers_code, commit=False, signum=signum)])
    assert sup.run() == 128 + signum
    assert sup.history == [S.STARTING, S.RUNNING, S.STOPPING, S.FAILED]
    assert workers.stops == [signum]
    assert_documented(sup.history)


def stop_after_finish(code: int, *, checkpoint: bool):
    """The run finished (its final checkpoint committed, or none kept); then a stop came."""

    def attempt(workers: FakeWorkers) -> Attempt:
        control = Path(workers.supervisor.control_dir)
        (control / FINISHED_REPORT).write_text(json.dumps({"step": 9, "checkpoint": checkpoint}))
        workers.supervisor.request_stop(signal.SIGTERM)
        return Attempt(code)

    return attempt


@pytest.mark.parametrize(
    ("code", "checkpoint", "expected", "state"),
    [
        (0, True, EXIT_OK, S.SUCCEEDED),  # the script then left cleanly: the run succeeded
        (0, False, EXIT_OK, S.SUCCEEDED),
        (143, True, EXIT_PREEMPTED, S.PREEMPTED),  # ended after training: run it again
        (143, False, 143, S.FAILED),  # nothing kept: "run again" would train again
    ],
)
def test_a_stop_after_the_run_finished_is_not_lost_work(build, code, checkpoint, expected, state):
    sup, _, lines = build([stop_after_finish(code, checkpoint=checkpoint)])
    assert sup.run() == expected
    assert sup.history[-1] == state
    assert_documented(sup.history)
    if state is not S.FAILED:
        assert any("had finished at step 9" in line for line in lines)


@pytest.mark.parametrize(("never_started", "expected"), [(True, EXIT_PREEMPTED), (False, 137)])
def test_a_stop_that_ends_workers_still_starting_lost_nothing(build, never_started, expected):
    # --grace ran out while a Run API script still imported torch (a loaded machine, torch_xla):
    # SIGKILL before any Run began, so no step was taken and none can have been lost.
    sup, _, lines = build([stop_then(137, commit=False)], never_started=lambda: never_started)
    assert sup.run() == expected
    assert_documented(sup.history)
    assert any("nothing to lose" in line for line in lines) == never_started


@pytest.mark.parametrize("synced", [False, True])
def test_a_stopped_script_outside_the_run_api_is_not_said_to_have_lost_a_checkpoint(build, synced):
    # tlaunch knows nothing of what a torchrun/Lightning script saved itself: it says so, and
    # names --sync-dir (or the folders it could not keep), with the signal's code as before.
    after_stop = (lambda: False) if synced else None
    sup, _, lines = build(
        [stop_then(0, commit=False)], outside_run_api=lambda: True, after_stop=after_stop
    )
    assert sup.run() == SIGTERM_CODE
    assert sup.history[-1] == S.FAILED
    assert_documented(sup.history)
    (last,) = [line for line in lines if "stopped by SIGTERM" in line]
    assert "outside the Run API" in last and "checkpoint was committed" not in last
    assert ("synced folders were not all kept" in last) == synced
    assert ("--sync-dir" in last) != synced


def test_a_stopped_run_api_script_still_reports_the_checkpoint_it_lacks(build):
    sup, _, lines = build([stop_then(0, commit=False)], outside_run_api=lambda: False)
    assert sup.run() == SIGTERM_CODE
    assert any("stopped before any checkpoint was committed" in line for line in lines)


def test_stop_where_workers_died_of_their_own_code_returns_it(build):
    sup, _, _ = build([stop_then(3, commit=False)])
    assert sup.run() == 3


def test_after_stop_that_preserved_the_state_turns_the_stop_into_75(build):
    flushes: list[bool] = []

    def flush() -> bool:
        flushes.append(True)
        return True

    sup, _, lines = build([stop_then(SIGTERM_CODE, commit=False)], after_stop=flush)
    assert sup.run() == EXIT_PREEMPTED
    assert flushes == [True]
    assert sup.history[-1] == S.PREEMPTED
    assert any("synced folders committed" in line for line in lines)


def test_after_stop_that_preserved_nothing_leaves_the_signal_code(build):
    flushes: list[bool] = []
    sup, _, _ = build(
        [stop_then(SIGTERM_CODE, commit=False)], after_stop=lambda: flushes.append(1) or False
    )
    assert sup.run() == SIGTERM_CODE
    assert flushes == [1]


def test_after_stop_runs_even_when_a_checkpoint_was_committed(build):
    flushes: list[bool] = []
    sup, _, _ = build([stop_then(0, commit=True)], after_stop=lambda: flushes.append(1) or False)
    assert sup.run() == EXIT_PREEMPTED
    assert flushes == [1], "the synced folders are flushed on every stop"


def test_stop_from_another_thread_mid_attempt(build, tmp_path):
    """A watcher thread triggers while the main thread blocks in start_workers."""

    def attempt(workers: FakeWorkers) -> Attempt:
        watcher = threading.Thread(
            target=workers.supervisor.request_stop, args=(signal.SIGTERM, "GCE preemption notice")
        )
        watcher.start()
        assert workers.stopped.wait(10), "stop_workers was never called"
        watcher.join(10)
        assert (tmp_path / STOP_FILE).exists(), "workers poll the STOP file"
        commit_report(tmp_path, step=40)
        return Attempt(0)

    sup, workers, lines = build([attempt])
    assert sup.run() == EXIT_PREEMPTED
    assert workers.stops == [signal.SIGTERM]
    assert any("running -> stopping (GCE preemption notice)" in line for line in lines)
    assert any("checkpoint at step 40 committed" in line for line in lines)


def test_a_second_stop_request_does_not_reenter_stopping(build, tmp_path):
    def attempt(workers: FakeWorkers) -> Attempt:
        sup = workers.supervisor
        sup.request_stop(signal.SIGINT)
        (tmp_path / STOP_FILE).unlink()  # seen by the workers; must not come back
        sup.request_stop(signal.SIGTERM)
        sup.request_stop(signal.SIGTERM, "deadline")
        assert not (tmp_path / STOP_FILE).exists(), "STOP is written once"
        return Attempt(1)

    sup, workers, _ = build([attempt])
    assert sup.run() == 128 + signal.SIGINT, "the first trigger's signal names the exit code"
    assert sup.history.count(S.STOPPING) == 1
    # Later SIGTERMs and notices never interrupt the stop under way: nothing more is sent.
    assert workers.stops == [signal.SIGINT]


def test_only_a_second_ctrl_c_a_second_later_forces_the_workers(build, tmp_path, clock):
    forced: list[bool] = []

    def attempt(workers: FakeWorkers) -> Attempt:
        sup = workers.supervisor
        sup.request_stop(signal.SIGTERM, "GCE preemption notice")
        sup.request_stop(signal.SIGINT)  # the first Ctrl-C: a stop is already under way
        clock.now += 0.5
        sup.request_stop(signal.SIGINT)  # the same Ctrl-C delivered twice: not a second one
        sup.request_stop(signal.SIGTERM)
        assert forced == []
        clock.now += 1.0
        sup.request_stop(signal.SIGINT)  # a person pressing Ctrl-C again
        assert forced == [True]
        return Attempt(128 + signal.SIGKILL)

    sup, workers, lines = build([attempt], force_workers=lambda: forced.append(True))
    assert sup.run() == 128 + signal.SIGKILL
    assert workers.stops == [signal.SIGTERM], "the workers were told once"
    assert any("second Ctrl-C" in line for line in lines)


# -- stops the workers decided themselves -----------------------------------------------------


def test_workers_that_stopped_on_their_own_with_a_commit_exit_75(build, tmp_path):
    def attempt(workers: FakeWorkers) -> Attempt:
        (tmp_path / WORKERS_STOPPING).touch()
        commit_report(tmp_path, step=8)
        return Attempt(0)  # under the launcher a stopping worker exits 0

    sup, workers, lines = build([attempt], max_restarts=2)
    assert sup.run() == EXIT_PREEMPTED
    assert workers.attempts == [0] and workers.stops == []
    assert sup.history[-1] == S.PREEMPTED
    assert any("checkpoint at step 8 committed" in line for line in lines)
    # Not checked against DOCUMENTED: this history goes RUNNING -> PREEMPTED, which the
    # module's diagram does not draw (it shows PREEMPTED only after STOPPING).


def test_a_watcher_is_ignored_once_the_workers_are_stopping(build, tmp_path):
    def attempt(workers: FakeWorkers) -> Attempt:
        (tmp_path / WORKERS_STOPPING).touch()
        workers.supervisor.request_stop(signal.SIGTERM, "deadline in 5m")
        assert not (tmp_path / STOP_FILE).exists()
        assert workers.supervisor.stop_signal is None
        commit_report(tmp_path)
        return Attempt(0)

    sup, workers, _ = build([attempt])
    assert sup.run() == EXIT_PREEMPTED
    assert workers.stops == []
    assert S.STOPPING not in sup.history


def test_a_signal_is_not_ignored_when_the_workers_are_stopping(build, tmp_path):
    # Only watchers (a why) defer to the workers' own stop; a signal may be a person's second.
    def attempt(workers: FakeWorkers) -> Attempt:
        (tmp_path / WORKERS_STOPPING).touch()
        workers.supervisor.request_stop(signal.SIGINT)
        return Attempt(1)

    sup, workers, _ = build([attempt])
    assert sup.run() == 128 + signal.SIGINT
    assert workers.stops == [signal.SIGINT]
    assert (tmp_path / STOP_FILE).exists()


# -- what the docstrings promise and the code does not do (yet) -------------------------------


def test_workers_that_stopped_on_their_own_without_a_commit_do_not_succeed(build, tmp_path):
    # e.g. --time-limit with --checkpoint-dir none: the workers stop cleanly, nothing is kept.
    def attempt(workers: FakeWorkers) -> Attempt:
        (tmp_path / WORKERS_STOPPING).touch()
        return Attempt(0)

    sup, _, lines = build([attempt], max_restarts=2)
    assert sup.run() == EXIT_FAILED, "not 0, and not a signal's code: no signal was sent"
    assert sup.history[-1] == S.FAILED
    assert any("stopped with nothing saved" in line for line in lines)


def test_a_stop_before_the_first_step_with_nothing_to_lose_exits_75(build, tmp_path):
    def attempt(workers: FakeWorkers) -> Attempt:
        workers.supervisor.request_stop(signal.SIGTERM)
        (tmp_path / PREEMPTED_REPORT).write_text(
            json.dumps({"step": 0, "epoch": 0, "batch": 0, "nothing_new": True})
        )
        return Attempt(0)

    sup, _, lines = build([attempt])
    assert sup.run() == EXIT_PREEMPTED
    assert any("nothing to lose (no step since the start)" in line for line in lines)


def test_a_stop_during_the_restart_backoff_starts_no_new_attempt(build, monkeypatch):
    sup, workers, _ = build([Attempt(3), Attempt(0)], max_restarts=1)
    monkeypatch.setattr(Supervisor, "_pause", lambda self, seconds: sup.request_stop())
    code = sup.run()
    assert workers.attempts == [0]
    assert code == SIGTERM_CODE


@pytest.mark.timeout(10)
def test_the_backoff_itself_ends_at_a_stop_request(tmp_path):
    sup = Supervisor(
        start_workers=lambda attempt: Attempt(3), stop_workers=lambda s: None,
        control_dir=str(tmp_path), max_restarts=1, log=lambda line: None,
    )  # fmt: skip
    threading.Timer(0.2, sup.request_stop).start()
    assert sup.run() == SIGTERM_CODE  # a 1 s backoff cut short, no second attempt


class _SignalDuringAppend(list):
    """A history whose append runs the stop signal's handler, as a signal landing there would."""

    def __init__(self, items, supervisor: Supervisor) -> None:
        super().__init__(items)
        self.supervisor = supervisor
        self.fired = False

    def append(self, state) -> None:
        super().append(state)
        if state == S.RUNNING and not self.fired:
            self.fired = True
            self.supervisor.request_stop(signal.SIGTERM)


def test_a_signal_landing_inside_a_transition_does_not_deadlock(build, tmp_path):
    sup, workers, _ = build([stop_then(0, commit=True)])
    sup.history = _SignalDuringAppend(sup.history, sup)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(sup.run()), daemon=True)
    runner.start()
    runner.join(3)  # the run itself takes milliseconds; a deadlocked one never returns
    assert not runner.is_alive(), "the supervisor deadlocked"
    assert codes == [EXIT_PREEMPTED]
