"""A run's own goodput: the launcher's last lines and ``tlaunch ckpt ls`` account for its stops."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from helpers import SCRIPTS, clean_env, run_tlaunch, tlaunch_cmd, wait_for

from tlaunch.storage.checkpoint.goodput import GOODPUT_FILE, read_goodput

pytestmark = pytest.mark.timeout(600)

SCRIPT = str(SCRIPTS / "goodput_train.py")
SAVE_EVERY = 5
HOLD_AT = 13  # the second launch is killed here: 3 steps past its last commit, step 10


def _flags(ckpt: str) -> list[str]:
    return [SCRIPT, "--checkpoint-dir", ckpt, "--save-every", str(SAVE_EVERY), "--progress", "off"]


def _start(where, ckpt: str, out: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        tlaunch_cmd(*_flags(ckpt), "--", out),
        cwd=where,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _newest_committed(ckpt: str) -> int:
    steps = [n for n in os.listdir(ckpt) if os.path.exists(os.path.join(ckpt, n, "COMMIT"))]
    with open(os.path.join(ckpt, max(steps), "state.json")) as f:
        return json.load(f)["step"]


def _step(out: str) -> int:
    try:
        with open(out + ".step") as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def _recorded_step(ckpt: str, step: int) -> bool:
    try:
        with open(os.path.join(ckpt, GOODPUT_FILE)) as f:
            return any(json.loads(line).get("step") == step for line in f)
    except (OSError, ValueError):
        return False


def test_a_run_stopped_twice_reports_two_restarts_and_the_steps_it_recomputed(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "model")
    # Launch 1: SIGTERM mid-run; the stop commits the step it reached (nothing recomputed).
    first = _start(tmp_path, ckpt, out)
    try:
        wait_for(lambda: first.poll() is not None or _step(out) >= 3, 240, "step 3")
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 75, err[-3000:]
    stopped_at = _newest_committed(ckpt)
    assert 3 <= stopped_at < HOLD_AT - SAVE_EVERY
    # Launch 2: killed outright at step 13, which its records saw; the newest commit is 10.
    second = _start(tmp_path, ckpt, out, HOLD_AT=str(HOLD_AT))
    try:
        wait_for(lambda: os.path.exists(out + ".held"), 240, "the hold at step 13")
        wait_for(lambda: _newest_committed(ckpt) == 10, 60, "the commit of step 10")
        assert _recorded_step(ckpt, HOLD_AT)
        os.killpg(second.pid, signal.SIGKILL)
        second.communicate(timeout=60)
    finally:
        second.kill()
    resumed_from = _newest_committed(ckpt)
    # Launch 3: resumes from the checkpoint and finishes; its last lines report the run.
    third = run_tlaunch(*_flags(ckpt), "--", out, cwd=tmp_path, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"START step={resumed_from}" in third.stdout
    report = [
        line for line in third.stderr.splitlines() if "goodput" in line or "recomputed" in line
    ]
    assert re.search(r"goodput 0\.\d+ over 3 launches \(2 restarts, ", report[0]), report
    assert report[1].startswith(f"tlaunch: steps recomputed: {HOLD_AT - resumed_from} (")
    summary = read_goodput(ckpt)
    assert [launch.resumed_step for launch in summary.launches] == [0, stopped_at, resumed_from]
    assert [launch.code for launch in summary.launches] == [75, None, 0]
    shares = summary.shares
    assert shares["restore"] > 0 and shares["stop"] > 0 and shares["saves"] > 0
    assert shares["recomputed"] > 0 and 0 < summary.goodput < 1
    # The same figures for the run so far, under `tlaunch ckpt ls`.
    listing = run_tlaunch("ckpt", "ls", ckpt, cwd=tmp_path, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert [
        line for line in listing.stdout.splitlines() if "goodput" in line or "recomputed" in line
    ] == [line.removeprefix("tlaunch: ") for line in report]
