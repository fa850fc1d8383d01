"""The stop rule: the first trigger starts the stop, later SIGTERMs and notices never
interrupt it, and only a second Ctrl-C (SIGINT) forces the exit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import SCRIPTS, clean_env, tlaunch_cmd, wait_for

from tests.e2e.test_preemption import (
    FLAGS,
    committed,
    finish_and_compare,
    gce_metadata,
    processes_mentioning,
    ref_root,  # noqa: F401  (fixture)
    start,
    start_watched,
    trained,
)
from tests.e2e.test_resume import reference

pytestmark = pytest.mark.timeout(300)


def _signal_all(proc: subprocess.Popen, out: str, sig: int) -> None:
    """``sig`` to the launcher and to every worker, as systemd's shutdown does."""
    proc.send_signal(sig)
    for pid in processes_mentioning(out):
        if pid != proc.pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def test_a_notice_then_sigterm_to_every_process_still_commits_and_exits_75(tmp_path, ref_root):  # noqa: F811
    # The reproduction: 2 processes, 1 s steps, a GCE notice, then 1.5 s later the
    # shutdown's SIGTERM to the launcher and to every worker.
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    with gce_metadata() as (url, preempted):
        proc = start_watched(tmp_path, ckpt, out, url, "1.0")
        try:
            wait_for(lambda: proc.poll() is not None or trained(out), 120, "the first step")
            preempted.set()
            threading.Event().wait(1.5)
            _signal_all(proc, out, signal.SIGTERM)
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(committed(ckpt)) == 1
    finish_and_compare(tmp_path, ckpt, out, expected)


def test_a_repeated_sigterm_during_slow_steps_does_not_kill_the_save(tmp_path, ref_root):  # noqa: F811
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    proc = start(tmp_path, "--checkpoint-dir", ckpt, out=out, env={"RESUME_TEST_STEP_DELAY": "1.0"})
    try:
        wait_for(lambda: proc.poll() is not None or trained(out), 120, "the first training step")
        for _ in range(3):  # an orchestrator repeating its SIGTERM every 1.2 s
            proc.send_signal(signal.SIGTERM)
            threading.Event().wait(1.2)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert len(committed(ckpt)) == 1
    finish_and_compare(tmp_path, ckpt, out, expected)


def test_a_second_ctrl_c_forces_the_exit_and_leaves_no_corrupt_checkpoint(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    proc = start(
        tmp_path, "--checkpoint-dir", ckpt, "--save-every", "1", out=out,
        env={"RESUME_TEST_STEP_DELAY": "2.0"},
    )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or committed(ckpt), 120, "a first checkpoint")
        proc.send_signal(signal.SIGINT)
        threading.Event().wait(1.2)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)  # well before a 2 s step and a save would end
    finally:
        proc.kill()
    assert proc.returncode not in (0, 75)
    wait_for(lambda: not processes_mentioning(out), 30, "every worker to be gone")
    verify = subprocess.run(
        tlaunch_cmd("ckpt", "verify", ckpt), capture_output=True, text=True, timeout=60,
        env=clean_env(),
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert committed(ckpt), "the checkpoint committed before the Ctrl-Cs survives"


@pytest.mark.parametrize("nprocs", ["1", "2"])
def test_a_stop_while_the_workers_start_exits_75_and_loses_nothing(tmp_path, ref_root, nprocs):  # noqa: F811
    # SIGTERM as soon as the launcher has started the workers: they are still importing torch.
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    # A long --grace: importing torch on a loaded machine must not be cut short by it.
    flags = ("--cpus", nprocs, *FLAGS[2:], "--checkpoint-dir", ckpt, "--grace", "200")
    proc = subprocess.Popen(
        tlaunch_cmd(str(SCRIPTS / "resume_train.py"), *flags, "--", "--out", out),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        workers = lambda: [p for p in processes_mentioning(out) if p != proc.pid]  # noqa: E731
        wait_for(workers, 60, "the workers to start")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "nothing to lose" in stderr
    assert not trained(out), "no step was taken"
    if nprocs == "2":
        finish_and_compare(tmp_path, ckpt, out, expected)


SLOW_START = """
import pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text("started")
time.sleep(600)  # a start that takes long: importing torch on a loaded machine, a big model
import tlaunch
tlaunch.init()
"""


def test_a_stop_before_any_run_began_does_not_wait_for_the_start_up_to_finish(tmp_path):
    # Nothing can be lost before the first step, so the stop must not cost the rest of the
    # start-up (the next launch pays it again): the launcher ends the workers at once.
    script, started = tmp_path / "slow_start.py", tmp_path / "started"
    script.write_text(SLOW_START)
    flags = ("--cpus", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), "--grace", "300")
    proc = subprocess.Popen(
        tlaunch_cmd(str(script), *flags, "--", str(started)),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or started.exists(), 120, "the worker to start")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)  # not the worker's 600 s, nor --grace's 300
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "nothing to lose" in stderr and "Traceback" not in stderr
    assert not processes_mentioning(str(started)), "the worker is gone"


def test_a_worker_still_starting_dies_with_its_launcher(tmp_path):
    # A hard kill of the launcher (an OOM kill, a lost VM's agent) while its worker still
    # starts: the worker must not run on (and later train and write beside the next launch).
    script, started = tmp_path / "slow_start.py", tmp_path / "started"
    script.write_text(SLOW_START)
    proc = subprocess.Popen(
        tlaunch_cmd(str(script), "--cpus", "1", "--checkpoint-dir", str(tmp_path / "ckpt"),
                    "--", str(started)),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or started.exists(), 120, "the worker to start")
        assert processes_mentioning(str(started)), "the worker runs"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    wait_for(lambda: not processes_mentioning(str(started)), 30, "the worker to die with it")


@contextlib.contextmanager
def _silent_storage() -> Iterator[tuple[str, threading.Event]]:
    """A loopback "storage endpoint" that accepts connections and never answers: the launcher
    hangs in its preflight probe for as long as the test likes. The event: someone connected."""
    server = socket.create_server(("127.0.0.1", 0))
    connected, held = threading.Event(), []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])
                connected.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connected
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_the_preflight_exits_75_in_one_line(tmp_path, sig):
    # Nothing has started: a stop while the launcher probes its storage (or takes the lease,
    # or stages data) loses nothing, and must say so with 75, not die by the signal.
    with _silent_storage() as (endpoint, connected):
        proc = subprocess.Popen(
            tlaunch_cmd("--cpus", "1", "--checkpoint-dir", "gs://bkt/run", "--max-restarts", "0",
                        str(SCRIPTS / "resume_train.py")),
            cwd=tmp_path, env=clean_env(STORAGE_EMULATOR_HOST=endpoint),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert connected.wait(60), "the launcher never probed the storage"
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "before any worker started" in line]
    assert "run the same command again" in line


@pytest.mark.parametrize(("after", "code"), [("exit", 0), ("linger", 75)])
def test_a_stop_after_the_run_finished_is_not_reported_as_lost_work(tmp_path, after, code):
    # run.finish() committed the final checkpoint; the stop comes while the script tears down
    # (it then exits 0: the run succeeded) or while it works on after training (it is ended at
    # once, not after --grace, and running the command again finishes the script): never
    # "stopped before any checkpoint was committed".
    ckpt, marker = str(tmp_path / "ckpt"), tmp_path / "finished"
    proc = subprocess.Popen(
        tlaunch_cmd("--cpus", "1", "--checkpoint-dir", ckpt, "--grace", "20",
                    str(SCRIPTS / "finish_then_linger.py"), "--", str(marker), after),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(marker.exists, 120, "run.finish() to return")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    assert time.monotonic() - started < 15, "ended by the stop, not by --grace's SIGKILL"
    assert "Traceback" not in stderr
    assert any("the run had finished at step 2" in line for line in stderr.splitlines())
    assert committed(ckpt)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_to_every_process_while_the_workers_start_exits_75(tmp_path, sig):
    # systemd's shutdown (or a terminal's Ctrl-C) reaches the workers too, while they are still
    # starting: nothing was lost, so 75 and "run the same command again", not 143 or 130.
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    proc = subprocess.Popen(
        # A long --grace: importing torch on a loaded machine must not be cut short by it.
        tlaunch_cmd("--cpus", "2", "--checkpoint-dir", ckpt, "--grace", "200",
                    str(SCRIPTS / "slow_start.py"), "--", str(out)),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        starting = [tmp_path / f"out.starting.{rank}" for rank in (0, 1)]
        wait_for(lambda: all(p.exists() for p in starting), 120, "both workers to start")
        _signal_all(proc, str(out), sig)
        (tmp_path / "out.go").touch()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "nothing to lose" in stderr
    assert not out.exists(), "the run stopped before training"
