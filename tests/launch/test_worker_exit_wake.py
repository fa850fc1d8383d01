"""The launcher sees its workers gone as soon as they leave, not at the elastic agent's next look,
and a single worker leaving quickly after a stop is not waited for while the kernel frees its
memory.

torch's agent sleeps ``monitor_interval`` between looks at its workers; while it runs, tlaunch
gives its loop a sleep that ends when a child of the launcher exits (a pidfd each). One worker
(DirectWorkers) says its exit code on a pipe right before ``os._exit`` (``TLAUNCH_EXIT_FD``).
Real child processes, the real agent, the workers' real ``sitecustomize``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tlaunch.config import LaunchConfig
from tlaunch.contract import CONTROL_DIR_ENV
from tlaunch.workers import (
    DirectWorkers,
    ElasticWorkers,
    StopDelivery,
    _WakeOnChildExit,
    with_exit_hook,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds: Linux 5.3+"),
]

#: Far longer than any of these tests takes when the wake works.
LONG = 60.0


def test_a_sleep_ends_when_a_child_exits_and_a_reaped_child_wakes_nothing_again():
    wake = _WakeOnChildExit()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        wake._watch()  # the child is watched from here on, as the agent's loop would
        child.stdin.close()  # the child exits now
        started = time.monotonic()
        wake.sleep(LONG)
        assert time.monotonic() - started < LONG / 2, "the sleep did not end at the child's exit"
        # Not yet reaped (a zombie): it woke one sleep; the next sleeps its whole time.
        started = time.monotonic()
        wake.sleep(0.2)
        assert time.monotonic() - started >= 0.2
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        wake.close()


def test_the_agent_sees_its_workers_exit_without_waiting_out_its_monitor_interval(
    tmp_path, monkeypatch
):
    configure = ElasticWorkers._elastic_config

    def slow_monitor(self, attempt):  # the agent looks at its workers once a minute
        config = configure(self, attempt)
        config.monitor_interval = LONG
        return config

    monkeypatch.setattr(ElasticWorkers, "_elastic_config", slow_monitor)
    slept = []  # how long each of the agent's sleeps lasted (its start-up is not timed)
    sleep = _WakeOnChildExit.sleep

    def timed(self, seconds):
        started = time.monotonic()
        sleep(self, seconds)
        slept.append(time.monotonic() - started)

    monkeypatch.setattr(_WakeOnChildExit, "sleep", timed)
    before = dict(os.environ)
    control = tmp_path / "control"
    control.mkdir()
    workers = ElasticWorkers(
        LaunchConfig(cpus=1),
        1,
        [sys.executable, "-c", "pass"],
        {CONTROL_DIR_ENV: str(control)},
        lambda signum: None,
        StopDelivery(str(control), 1, 10.0, False),
    )
    try:
        attempt = workers.start(0)
    finally:
        os.environ.clear()
        os.environ.update(before)  # the agent hands its own environment to the workers
    assert attempt.exit_code == 0
    assert slept and max(slept) < LONG / 2, slept


LEAVES_QUICKLY = "from tlaunch import quick_exit; quick_exit.arm(0); raise SystemExit(0)"


@pytest.mark.parametrize(
    ("script", "code", "waited"),
    [(LEAVES_QUICKLY, 0, False), ("raise SystemExit(3)", 3, True)],
    ids=["quick exit after a stop", "plain exit"],
)
def test_one_worker_leaving_after_a_stop_is_not_waited_for_past_its_last_line(
    tmp_path, script, code, waited
):
    control = tmp_path / "control"
    control.mkdir()
    env = with_exit_hook({**os.environ, CONTROL_DIR_ENV: str(control)})
    workers = DirectWorkers(
        [sys.executable, "-c", script], env, StopDelivery(str(control), 1, 10.0, False)
    )
    attempt = workers.start(0)
    assert attempt.exit_code == code
    # Its notice, not its exit, ended the wait: the process was not reaped then.
    assert (workers.proc.returncode is not None) == waited
    assert workers.proc.wait(timeout=30) == code
