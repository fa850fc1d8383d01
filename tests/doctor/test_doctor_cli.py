"""``tlaunch doctor`` through the real launcher: 1 process (an unchanged script) and 2 gloo
processes (a Run API script), the table, the JSON, the exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.helpers import run_tlaunch

pytestmark = pytest.mark.timeout(600)  # torch starts slowly on a loaded machine
SCRIPTS = Path(__file__).parent / "scripts"


def test_a_broken_script_gets_a_table_a_verdict_and_exit_1(tmp_path):
    done = run_tlaunch(
        "doctor", str(SCRIPTS / "gallery.py"), "--bug", "no-shuffle", "--steps", "5",
        cwd=tmp_path, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # no-shuffle is a warning
    lines = done.stdout.splitlines()
    assert lines[0].startswith("tlaunch doctor: ") and "in 1 process" in lines[0]
    assert lines[2].split() == ["ID", "LEVEL", "WHAT", "WAS", "SEEN"]
    rows = {line.split()[0]: line.split()[1] for line in lines[3:] if line[:1].isalpha()}
    assert rows.get("no-shuffle") == "warn" and rows.get("checkpoint-budget") == "info"
    assert "fix: DataLoader(dataset, batch_size=..., shuffle=True)" in done.stdout
    assert "pin-memory: no GPU on this host" in done.stdout
    assert lines[-1] == "verdict: no errors, 1 warning: the run is sound (exit 0)"
    # The script's own output went to stderr: stdout is the report alone.
    assert "val" not in done.stdout and "step 8 val" in done.stderr
    assert not (tmp_path / "tlaunch-checkpoints").exists()


def test_two_processes_run_api_accumulating_small_batchnorm_as_json(tmp_path):
    done = run_tlaunch(
        "doctor", "--cpus", "2", "--grad-accum", "2", str(SCRIPTS / "run_api.py"),
        "--bug", "small-batchnorm",
        "--steps", "5", "--overfit-steps", "6", "--json", "--cloud", "gce",
        cwd=tmp_path, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["run"]["processes"] == 2 and report["run"]["platform"] == "gce"
    findings = {f["id"]: f for f in report["findings"]}
    # Gradients kept across the accumulation window are not a missing zero_grad.
    assert set(findings) == {"small-batchnorm", "checkpoint-budget"}
    batchnorm = findings["small-batchnorm"]
    assert batchnorm["severity"] == "warn" and batchnorm["data"]["per_device_batch"] == 8
    assert "SyncBatchNorm" in batchnorm["fix"]
    budget = findings["checkpoint-budget"]
    assert budget["data"]["platforms"] == ["gce"] and budget["data"]["bytes"] > 0
    assert "30 s notice" in budget["seen"] and "--save-every-minutes" in budget["fix"]
    assert report["exit_code"] == 0
    assert not (tmp_path / "tlaunch-checkpoints").exists()


def test_bad_doctor_flags_are_one_line_usage_errors(tmp_path):
    done = run_tlaunch("doctor", "--cloud", "azure", "x.py", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--cloud" in done.stderr and "gce" in done.stderr
    done = run_tlaunch("doctor", str(SCRIPTS / "gallery.py"), "--steps", "1", cwd=tmp_path)
    assert done.returncode == 2 and "--steps must be at least 3" in done.stderr
    done = run_tlaunch("doctor", "--json", cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "run: tlaunch doctor [flags] train.py" in done.stderr
