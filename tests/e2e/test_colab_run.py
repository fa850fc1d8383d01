"""A Colab-style run through the real launcher: checkpoints on Drive, ``--time-limit
runtime+DURATION`` counted from a runtime that started long ago."""

from __future__ import annotations

import os
import time

import pytest
from helpers import SCRIPTS, run_tlaunch

pytestmark = pytest.mark.timeout(300)

#: Seconds of the runtime's limit left at the launch: room for a slow start (torch imports on a
#: busy machine) before the first step, far less than the 2 h the limit names.
LEFT = 45.0


def test_a_run_saving_to_drive_stops_with_a_checkpoint_before_the_runtime_limit(tmp_path):
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    began = time.time()
    result = run_tlaunch(
        str(SCRIPTS / "resume_train.py"), "--progress", "off",
        "--checkpoint-dir", "drive://exp1", "--time-limit", "runtime+2h",
        "--", "--out", str(tmp_path / "final.pt"), "--epochs", "5",
        cwd=tmp_path, timeout=240,
        TLAUNCH_DRIVE_ROOT=str(drive),
        TLAUNCH_RUNTIME_START=str(began - 2 * 3600 + LEFT),
        RESUME_TEST_STEP_DELAY="0.5",  # 120 steps: 60 s at least, past the deadline
    )  # fmt: skip
    took = time.time() - began
    assert result.returncode == 75, result.stderr[-3000:]
    assert took < LEFT + 30, f"a 2 h limit counted from the launch would not stop at {took:.0f} s"
    assert "--time-limit reached" not in result.stderr, "the Run's own deadline acts first"
    steps = sorted(p.name for p in (drive / "exp1").glob("step-*") if (p / "COMMIT").exists())
    assert len(steps) == 1 and 1 <= int(steps[0][5:]) < 120, steps
    assert "checkpoint committed at step" in result.stderr
    # The run directory is on Drive beside the checkpoints, not on the runtime's disk.
    (run_dir,) = (drive / "exp1" / "runs").iterdir()
    assert (run_dir / "launcher.log").is_file() and (run_dir / "metrics.jsonl").stat().st_size
    assert not os.path.exists(tmp_path / "tlaunch-runs")
    # Saving to Drive with no retention rule: said once, with the fix.
    assert result.stderr.count("add --keep-last 2") == 1, result.stderr[-3000:]
