"""--sync-dir: a script with no tlaunch API survives preemption through a bucket."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import SCRIPTS, clean_env, tlaunch_cmd, wait_for

from tlaunch.storage import resolve

pytestmark = pytest.mark.timeout(240)
SCRIPT = str(SCRIPTS / "accelerate_checkpointing.py")


def test_sigterm_flushes_and_a_fresh_machine_restores_and_continues(tmp_path, gcs_bucket):
    url = f"{gcs_bucket}/run1"
    first_dir, second_dir = tmp_path / "machine1", tmp_path / "machine2"
    first_dir.mkdir()
    second_dir.mkdir()
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        tlaunch_cmd(SCRIPT, "--sync-dir", f"ckpts={url}", str(ready), "hold"),
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
        # Stopped once the save has settled and reached the bucket: the stop keeps it all.
        wait_for(lambda: remote_text(url, "latest/step.txt") == "20", 60, "step 20 at the URL")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "SAVED step=20" in stdout and "flushed ckpts" in stderr
    assert "left behind" not in stderr

    second = subprocess.run(
        tlaunch_cmd(SCRIPT, "--sync-dir", f"ckpts={url}", str(tmp_path / "ready2")),
        cwd=second_dir,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "RESUMED step=20" in second.stdout
    assert "restored" in second.stderr and "DONE" in second.stdout
    assert os.path.exists(second_dir / "ckpts" / "latest" / "step.txt")


def remote_text(url: str, rel: str) -> str | None:
    loc = resolve(url)
    loc.fs.invalidate_cache()
    try:
        return loc.fs.cat_file(loc.join(rel)).decode()
    except FileNotFoundError:
        return None


def test_a_file_torn_by_the_stop_does_not_replace_the_good_copy(tmp_path):
    # The URL is a local folder, so the test reads what the launcher left there directly.
    remote, machine, go = tmp_path / "bucket" / "run1", tmp_path / "machine", tmp_path / "go"
    machine.mkdir()
    proc = subprocess.Popen(
        tlaunch_cmd(str(SCRIPTS / "torn_writer.py"), "--sync-dir", f"ckpts={remote}", str(go)),
        cwd=machine, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    good = b"good weights\n" * 1000
    model = remote / "model.bin"
    try:
        wait_for(lambda: model.exists() and model.read_bytes() == good, 60, "the good copy")
        go.touch()
        lines = [proc.stdout.readline() for _ in range(2)]  # bounded by the script's deadline
        assert lines == ["READY\n", "WRITING\n"], lines
        proc.send_signal(signal.SIGTERM)  # the script is mid-write: its default action ends it
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert model.read_bytes() == good  # the URL keeps the last whole copy
    assert proc.returncode != 75, stderr[-3000:]  # not "stopped with everything kept"
    assert "model.bin" in stderr and "left behind" in stderr, stderr[-3000:]
