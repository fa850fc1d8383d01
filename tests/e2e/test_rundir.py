"""Each launch leaves a run directory telling what happened: transitions, metrics, config."""

from __future__ import annotations

import json

import pytest
from helpers import SCRIPTS, run_tlaunch

pytestmark = pytest.mark.timeout(200)


def test_run_directory_holds_log_metrics_and_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = run_tlaunch(
        str(SCRIPTS / "resume_train.py"),
        "--cpus",
        "2",
        "--checkpoint-dir",
        str(ckpt),
        "--epochs-unused-flag-goes-to-script",
        "--",
        "--out",
        str(tmp_path / "p.pt"),
        "--epochs",
        "1",
        cwd=tmp_path,
        timeout=180,
    )
    # The unknown flag reaches the script, whose argparse refuses it: exit 2 from the script.
    assert (
        out.returncode == 2
        and "unrecognized arguments: --epochs-unused-flag-goes-to-script" in out.stderr
    )
    out = run_tlaunch(
        str(SCRIPTS / "resume_train.py"),
        "--cpus",
        "2",
        "--checkpoint-dir",
        str(ckpt),
        "--",
        "--out",
        str(tmp_path / "p.pt"),
        "--epochs",
        "1",
        cwd=tmp_path,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted((ckpt / "runs").iterdir())
    assert len(runs) == 2, "one run directory per launch"
    latest = runs[-1]
    log = (latest / "launcher.log").read_text()
    assert "starting -> running" in log and "running -> succeeded" in log
    config = json.loads((latest / "config.json").read_text())
    assert config["cpus"] == 2 and config["checkpoint_dir"] == str(ckpt)
    records = [json.loads(line) for line in (latest / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # 12 steps, logged after each
    assert all(isinstance(r["loss"], float) for r in records)
    assert json.loads((latest / "exit.json").read_text())["exit_code"] == 0
