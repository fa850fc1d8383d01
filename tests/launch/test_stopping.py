"""The worker's stop clock and the save durations that set the deadline's margin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tlaunch import stopping
from tlaunch.checkpointing import CheckpointManager
from tlaunch.config import LaunchConfig
from tlaunch.stopping import StepClock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


def test_the_clocks_are_polled_a_few_times_a_second_and_every_step_is_timed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(stopping, "time", clock)
    watch = StepClock(100.0)
    assert watch.poll_due(), "the first step polls"
    polled = []
    for _ in range(30):
        clock.now += 0.01
        polled.append(watch.poll_due())
    # One poll per POLL_SECONDS (0.1 s) of 10 ms steps; float steps may land a poll a step late.
    assert 2 <= sum(polled) <= 3 and not any(polled[:9])
    clock.now += 5.0  # one slow step
    watch.poll_due()
    assert watch.margin(0.0) == pytest.approx(max(5.0, 3 * 5.0 + watch.POLL_SECONDS))


def test_the_deadline_comes_one_margin_before_the_limit(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(stopping, "time", clock)
    monkeypatch.delenv("TLAUNCH_START_TIME", raising=False)
    watch = StepClock(100.0)  # started at 1000; floor margin: 5 s
    clock.now = 1000.0 + 100.0 - 5.0 - 0.01
    assert not watch.deadline_near(0.0)
    clock.now += 0.02
    assert watch.deadline_near(0.0)
    clock.now = 1000.0 + 100.0 - 1.5 * 10.0 - watch.POLL_SECONDS  # a 10 s save widens it
    assert watch.deadline_near(10.0)
    assert not StepClock(None).deadline_near(1e9), "no --time-limit, no deadline"


class _Writer:
    def __init__(self) -> None:
        self.save_durations: list[float] = []

    def check(self) -> None:
        pass


def test_the_slowest_save_keeps_the_slowest_background_save_as_the_history_grows():
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    manager = CheckpointManager(LaunchConfig(time_limit="10s"), None, accelerator, {})
    manager.writer = writer = _Writer()
    writer.save_durations += [1.0, 4.0]  # the writer's list, which only grows
    manager.check_writer()
    writer.save_durations.append(2.0)
    manager.check_writer()
    assert manager.slowest_save == 4.0
    writer.save_durations.append(9.0)
    manager.check_writer()
    assert manager.slowest_save == 9.0
    assert StepClock(10.0).margin(manager.slowest_save) == pytest.approx(
        1.5 * 9.0 + StepClock.POLL_SECONDS
    )


def test_a_lost_lease_ends_the_run_even_with_on_save_error_continue(capsys):
    from tlaunch.storage import LeaseLost

    class _Lost(_Writer):
        def check(self) -> None:
            raise LeaseLost("memory://run", None)

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    manager = CheckpointManager(LaunchConfig(on_save_error="continue"), None, accelerator, {})
    manager.writer = _Lost()
    with pytest.raises(SystemExit) as exit:
        manager.check_writer()
    assert exit.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tlaunch: error:") and "this run stops" in line


def test_a_worker_whose_launcher_died_while_it_started_leaves_at_once(tmp_path):
    # The launcher was SIGKILLed while this worker imported torch: the worker's parent is
    # already the reaper when it asks to die with its launcher, and must leave instead of
    # training on (and committing) as an orphan.
    import os
    import subprocess
    import sys

    from tlaunch.contract import LAUNCHER_PID_ENV

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = (
        "from tlaunch.stopping import _die_with_launcher\n"
        "_die_with_launcher()\n"
        "print('trained on')\n"
    )
    env = {**os.environ, LAUNCHER_PID_ENV: str(gone.pid)}
    orphan = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert orphan.returncode == 1 and "trained on" not in orphan.stdout
    # With its launcher alive (here: this test process), the same worker carries on.
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    alive = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert alive.returncode == 0 and "trained on" in alive.stdout


class _Strategy:
    """The strategy members a one-process save touches."""

    def rng_state(self) -> dict:
        return {}

    def gather_object(self, accelerator, obj):
        return [obj]

    def barrier(self, accelerator) -> None:
        pass

    def unwrap(self, accelerator, model):
        return model

    def scaler_state(self, accelerator):
        return None


def _failing_manager(tmp_path, **flags) -> tuple[CheckpointManager, object]:
    """A one-process manager whose every commit fails (the bucket refuses COMMIT)."""
    import torch

    from tests.storage.ckpt_helpers import faulty_store
    from tlaunch.storage import AsyncCheckpointWriter

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0)
    config = LaunchConfig(checkpoint_dir=str(tmp_path), **flags)
    manager = CheckpointManager(config, _Strategy(), accelerator, {})
    manager.states.models.append(torch.nn.Linear(2, 2))
    store = faulty_store(str(tmp_path), PermissionError("denied by the bucket"), "COMMIT")
    manager.writer = AsyncCheckpointWriter(store)
    return manager, store


@pytest.mark.parametrize("surfaces_in", ["flush", "the next save"])
def test_a_failed_background_save_ends_the_run_in_one_line_wherever_it_surfaces(
    surfaces_in, tmp_path, capsys
):
    # The writer re-raises a failed save from submit() and flush() too, not only check():
    # each path must end the run with the one-line error, never a raw traceback.
    from tlaunch.checkpointing import Position

    manager, store = _failing_manager(tmp_path)
    manager.save(Position(step=1), {})
    with pytest.raises(SystemExit) as exit:
        if surfaces_in == "flush":
            manager.flush()
        else:
            manager.writer._wait(None)  # the failure is stored, not yet seen by anyone
            manager.save(Position(step=2), {})
    assert exit.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tlaunch: error: checkpoint save failed") and "denied" in line
    assert store.latest() is None


def test_on_save_error_continue_retries_the_step_and_never_excuses_a_failed_stop_save(tmp_path):
    from tlaunch.checkpointing import Position

    manager, store = _failing_manager(tmp_path, on_save_error="continue")
    manager.save(Position(step=1), {})
    with pytest.warns(UserWarning, match="training continues"):
        manager.flush()
    # Step 1 was not saved: a stop at step 1 must save it again, not skip it as saved.
    assert manager.saved_step == -1
    manager.save(Position(step=1), {})
    with pytest.raises(SystemExit) as exit:  # a stop's save failed: not "everything kept"
        manager.flush(stopping=True)
    assert exit.value.code == 1
    assert store.latest() is None


@pytest.mark.parametrize(
    ("source", "calls"),
    [
        ("import tlaunch\nrun = tlaunch.init(hparams={})\n", True),
        ("from tlaunch import init\nrun = init()\n", True),
        ('"""Tears its own file. No tlaunch API."""\nimport torch\n', False),
        ("import tlaunch\nstate = tlaunch.load_weights('ckpt')\n", False),
    ],
)
def test_only_a_script_that_starts_a_run_is_treated_as_one(tmp_path, source, calls):
    # Its workers hold stop signals until their Run is ready, and if none got to it, the stop
    # lost nothing: a plain script that merely names tlaunch must die of its signal instead.
    from tlaunch.workers import calls_run_api

    script = tmp_path / "train.py"
    script.write_text(source)
    assert calls_run_api(LaunchConfig(script=str(script))) is calls
