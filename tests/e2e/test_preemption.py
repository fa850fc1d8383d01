"""Fault injection: signals at random moments, cloud notices, deadlines, crashes, SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading

import pytest
import torch
from helpers import (
    SCRIPTS,
    clean_env,
    gce_metadata,
    processes_mentioning,
    run_tlaunch,
    tlaunch_cmd,
    wait_for,
)

from tests.e2e.test_resume import assert_bitwise_equal, reference

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(SCRIPTS / "resume_train.py")
FLAGS = ("--cpus", "2", "--seed", "3", "--progress", "off")


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("references"))


def committed(ckpt: str) -> list[int]:
    if not os.path.isdir(ckpt):
        return []
    return sorted(
        int(d[5:])
        for d in os.listdir(ckpt)
        if d.startswith("step-") and os.path.exists(os.path.join(ckpt, d, "COMMIT"))
    )


def start(where, *flags: str, out: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        tlaunch_cmd(SCRIPT, *FLAGS, *flags, "--", "--out", out),
        cwd=where,
        env=clean_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_and_compare(where, ckpt: str, out: str, expected) -> None:
    again = run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", ckpt, "--", "--out", out, cwd=where, timeout=200
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))


@pytest.mark.parametrize("trial", range(3))
def test_sigterm_at_a_random_step_commits_there_and_resumes_bitwise(tmp_path, ref_root, trial):
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    proc = start(
        tmp_path,
        "--checkpoint-dir",
        ckpt,
        "--save-every",
        "1000",
        out=out,
        env={"RESUME_TEST_STEP_DELAY": "0.05"},
    )
    try:
        # Wait for the first training step, then a random short moment more.
        wait_for(lambda: proc.poll() is not None or trained(out), 120, "the first training step")
        threading.Event().wait(random.Random(trial).uniform(0.0, 0.6))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal landed")
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    steps = committed(ckpt)
    assert len(steps) == 1, "--save-every 1000: the only checkpoint is the one the stop committed"
    assert f"checkpoint at step {steps[0]} committed" in stderr
    finish_and_compare(tmp_path, ckpt, out, expected)


def test_a_stop_file_seen_by_one_rank_stops_every_rank_at_the_same_step(tmp_path, ref_root):
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    result = run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", ckpt, "--", "--out", out, "--stop-file-at-batch", "5",
        cwd=tmp_path, timeout=200, RESUME_TEST_STEP_DELAY="0.05",
    )  # fmt: skip
    assert result.returncode == 75, result.stderr[-3000:]
    (step,) = committed(ckpt)
    # Rank 1 writes the file in step 5 and polls it at most 0.1 s (two >= 50 ms steps) later;
    # the agreement comes one step after that, on both ranks (or the resume would differ).
    assert 6 <= step <= 8, step
    assert f"checkpoint at step {step} committed" in result.stderr
    finish_and_compare(tmp_path, ckpt, out, expected)


def trained(out: str) -> bool:
    """The script marks its first training step next to its output file."""
    return os.path.exists(out + ".started")


def start_watched(where, ckpt: str, out: str, url: str, step_delay: str) -> subprocess.Popen:
    """The reference job with --preemption-watch gce pointed at ``url``."""
    env = {"TLAUNCH_GCE_METADATA_URL": url, "RESUME_TEST_STEP_DELAY": step_delay}
    return start(where, "--checkpoint-dir", ckpt, "--preemption-watch", "gce", out=out, env=env)


def test_gce_preemption_notice_stops_the_run_without_any_signal(tmp_path, ref_root):
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    with gce_metadata() as (url, preempted):
        proc = start_watched(tmp_path, ckpt, out, url, "0.05")
        try:
            wait_for(lambda: proc.poll() is not None or trained(out), 120, "the first step")
            preempted.set()
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "GCE preemption notice" in stderr
    assert len(committed(ckpt)) == 1
    finish_and_compare(tmp_path, ckpt, out, expected)


def test_time_limit_stops_with_a_checkpoint_before_the_deadline(tmp_path, ref_root):
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    # Slow steps so the limit lands mid-run whatever the machine's speed: 36 steps of 1.5 s
    # outlast 40 s even when starting two workers takes half of it on a loaded machine.
    result = run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", ckpt, "--time-limit", "40s", "--", "--out", out,
        cwd=tmp_path, timeout=200, RESUME_TEST_STEP_DELAY="1.5",
    )  # fmt: skip
    assert result.returncode == 75, result.stderr[-3000:]
    assert "--time-limit reached" not in result.stderr, (
        "the Run's own deadline must act before the backstop"
    )
    assert len(committed(ckpt)) == 1
    finish_and_compare(tmp_path, ckpt, out, expected)


def test_crashing_rank_restarts_and_resumes_within_max_restarts(tmp_path, ref_root):
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    result = run_tlaunch(
        SCRIPT,
        *FLAGS,
        "--checkpoint-dir",
        ckpt,
        "--save-every",
        "3",
        "--max-restarts",
        "2",
        "--",
        "--out",
        out,
        "--crash-at-batch",
        "20",
        cwd=tmp_path,
        timeout=250,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running -> failed (rank 1 exited with code 13)" in result.stderr
    assert "failed -> restarting" in result.stderr and "resuming from step 18" in result.stderr
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))


def test_restarts_exhausted_are_reported_with_the_scripts_code(tmp_path):
    script = tmp_path / "always_fails.py"
    script.write_text("import sys; sys.exit(5)\n")
    result = run_tlaunch(str(script), "--max-restarts", "1", cwd=tmp_path, timeout=120)
    assert result.returncode == 5
    assert result.stderr.count("running -> failed") == 2
    assert "giving up: 2 attempts failed (--max-restarts 1)" in result.stderr


def test_sigkill_of_the_launcher_loses_only_steps_since_the_last_commit(tmp_path, ref_root):
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    proc = subprocess.Popen(
        tlaunch_cmd(
            SCRIPT, *FLAGS, "--checkpoint-dir", ckpt, "--save-every", "2", "--", "--out", out
        ),
        cwd=tmp_path,
        env=clean_env(RESUME_TEST_STEP_DELAY="0.05"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(committed(ckpt)) >= 2, 120, "two committed checkpoints")
        proc.kill()  # SIGKILL to the launcher: its workers must not outlive it
        proc.wait(timeout=30)
        wait_for(lambda: not processes_mentioning(out), 30, "the workers to die with the launcher")
    finally:
        if proc.poll() is None:
            proc.kill()
    before = committed(ckpt)
    assert before[-1] < 36, "the run must not have gone on after the kill"
    again = run_tlaunch(
        SCRIPT,
        *FLAGS,
        "--checkpoint-dir",
        ckpt,
        "--save-every",
        "2",
        "--",
        "--out",
        out,
        cwd=tmp_path,
        timeout=200,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {before[-1]} " in again.stderr
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))


def test_second_sigterm_during_the_save_leaves_no_corrupt_checkpoint(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    proc = start(
        tmp_path,
        "--checkpoint-dir",
        ckpt,
        "--save-every",
        "2",
        out=out,
        env={"RESUME_TEST_STEP_DELAY": "0.05"},
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or len(committed(ckpt)) >= 1, 120, "a first checkpoint"
        )
        proc.send_signal(signal.SIGTERM)
        threading.Event().wait(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    verify = subprocess.run(
        tlaunch_cmd("ckpt", "verify", ckpt),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert committed(ckpt), "the checkpoint committed before the signals must survive"
