"""--sync-dir: a script with no tlaunch API survives preemption through a bucket."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import SCRIPTS, clean_env, tlaunch_cmd, wait_for

pytestmark = pytest.mark.timeout(240)
SCRIPT = str(SCRIPTS / "accelerate_checkpointing.py")


def test_sigterm_flushes_and_a_fresh_machine_restores_and_continues(tmp_path, gcs_bucket):
    url = f"{gcs_bucket}/run1"
    first_dir, second_dir = tmp_path / "machine1", tmp_path / "machine2"
    first_dir.mkdir()
    second_dir.mkdir()
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        tlaunch_cmd(SCRIPT, "--sync-dir", f"ckpts={url}", str(ready)),
        cwd=first_dir,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or ready.exists(), 120, "the script's second save_state"
        )
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    saved = max(int(line.split("=")[1]) for line in stdout.splitlines() if line.startswith("SAVED"))
    assert "flushed ckpts" in stderr

    second = subprocess.run(
        tlaunch_cmd(SCRIPT, "--sync-dir", f"ckpts={url}", str(tmp_path / "ready2")),
        cwd=second_dir,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"RESUMED step={saved}" in second.stdout
    assert "restored" in second.stderr and "DONE" in second.stdout
    assert os.path.exists(second_dir / "ckpts" / "latest" / "step.txt")
