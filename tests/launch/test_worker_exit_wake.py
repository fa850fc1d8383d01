"""The launcher sees its workers gone as soon as they leave, not at the elastic agent's next look,
and a single worker leaving quickly after a stop is not waited for while the kernel frees its
memory.

torch's agent sleeps ``monitor_interval`` between looks at its workers; while it runs, tlaunch
gives its loop a sleep that ends when a child of the launcher exits (a pidfd each). One worker
(DirectWorkers) says its exit code on a pipe right before ``os._exit`` (``TLAUNCH_EXIT_FD``),
the agent's workers on a datagram socket (``TLAUNCH_EXIT_SOCKET``). Real child processes, the
real agent, the workers' real ``sitecustomize``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tlaunch.config import LaunchConfig
from tlaunch.contract import CONTROL_DIR_ENV, EXIT_SOCKET_ENV
from tlaunch.workers import (
    DirectWorkers,
    ElasticWorkers,
    StopDelivery,
    _children,
    _ExitNotices,
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


#: A worker that leaves quickly after a stop whose kernel then takes LONG to free its memory:
#: its ``os._exit`` sleeps first. ``LEAVE_WITH`` is its code (from rank ``TOLD_BY`` only, if
#: set: the other rank then works on for 2 s, notes that it finished, and exits 0 untold).
SLOW_FREEING = f"""
import os, sys, time
told_by = os.environ.get("TOLD_BY")
if told_by is not None and os.environ["LOCAL_RANK"] != told_by:
    time.sleep(2)
    open(os.path.join(os.environ["OUT"], "finished-" + os.environ["LOCAL_RANK"]), "w").close()
    sys.exit(0)
from tlaunch import quick_exit
real_exit = os._exit
def freeing(code):
    time.sleep({LONG})
    real_exit(code)
os._exit = freeing
quick_exit.arm(int(os.environ["LEAVE_WITH"]))
raise SystemExit(0)
"""


def _elastic(tmp_path, nproc: int, extra: dict[str, str]):
    control = tmp_path / "control"
    control.mkdir()
    env = with_exit_hook({CONTROL_DIR_ENV: str(control), "OUT": str(tmp_path), **extra})
    return ElasticWorkers(
        LaunchConfig(cpus=nproc),
        nproc,
        [sys.executable, "-c", SLOW_FREEING],
        env,
        lambda signum: None,
        StopDelivery(str(control), nproc, 10.0, False),
    )


def _start_then_end_children(workers):
    """Run ``workers``; the attempt, how long it took, and the workers still there after it."""
    before = dict(os.environ)
    others = set(_children(os.getpid()))  # this test process's own (a session's servers)
    started = time.monotonic()
    try:
        attempt = workers.start(0)
        waited = time.monotonic() - started
        # Still freeing: the notices, not the exits, ended the attempt.
        left = set(_children(os.getpid())) - others
    finally:
        os.environ.clear()
        os.environ.update(before)  # the agent hands its own environment to the workers
        for pid in set(_children(os.getpid())) - others:
            os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # reaped by the launcher's own thread meanwhile
                pass
    return attempt, waited, left


def test_the_agents_workers_leaving_after_a_stop_are_not_waited_for_past_their_last_line(
    tmp_path,
):
    workers = _elastic(tmp_path, 2, {"LEAVE_WITH": "0"})
    attempt, waited, left = _start_then_end_children(workers)
    assert attempt.exit_code == 0
    assert waited < LONG / 2
    assert len(left) == 2, "the workers exited: nothing shows their notices were heard"
    assert EXIT_SOCKET_ENV not in os.environ


def test_a_told_failure_waits_for_a_worker_still_running_its_last_lines(tmp_path):
    # Rank 0 tells code 3. Taken at its word at once, the agent would end rank 1 (it ends every
    # worker when one fails) while that one still finishes; it is heard once rank 1 exited.
    workers = _elastic(tmp_path, 2, {"LEAVE_WITH": "3", "TOLD_BY": "0"})
    attempt, waited, left = _start_then_end_children(workers)
    assert attempt.exit_code == 3
    assert (tmp_path / "finished-1").exists(), "rank 1 was ended before it finished"
    assert waited < LONG / 2 and len(left) == 1


def test_only_a_workers_own_notice_counts(tmp_path):
    notices = _ExitNotices.open()
    assert notices is not None
    code = (
        "import os, socket, sys\n"
        "sys.stdin.read()\n"
        "with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:\n"
        f"    s.sendto(bytes([5]), '\\0{notices.name}')\n"
        "sys.stdin.read()\n"
    )
    worker = notices.popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(bytes([7]), "\0" + notices.name)  # not a worker: not heard
        time.sleep(0)  # (datagrams on a local socket are queued when sendto returns)
        notices.read()
        notices.settle()
        assert worker.returncode is None and not notices.told
        worker.stdin.write(b"go")
        worker.stdin.flush()
        worker.stdin.close()  # the first read returns: the worker tells 5, then waits on
        wake = _WakeOnChildExit(notices)
        started = time.monotonic()
        while worker.returncode is None and time.monotonic() - started < 30:
            wake.sleep(1.0)
        assert worker.returncode == 5
        assert worker.wait(timeout=30) == 5
    finally:
        worker.kill()
        notices.close()
