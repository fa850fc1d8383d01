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
