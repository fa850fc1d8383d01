"""A Run API script saves somewhere by default: with no ``--checkpoint-dir``, a stop commits a
checkpoint into a local folder keyed by the script and its arguments, and the same command
resumes from it; ``--checkpoint-dir none`` turns that off."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from helpers import SCRIPTS, clean_env, run_tlaunch, tlaunch_cmd, wait_for

from tests.e2e.test_preemption import trained
from tests.e2e.test_resume import assert_bitwise_equal, reference

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(SCRIPTS / "resume_train.py")
FLAGS = ("--cpus", "1", "--seed", "5", "--progress", "off")
ROOT = "tlaunch-checkpoints"


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("references"))


def _folders(where) -> list[str]:
    root = os.path.join(where, ROOT)
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def _committed(folder: str) -> list[str]:
    return sorted(
        d for d in os.listdir(folder) if os.path.exists(os.path.join(folder, d, "COMMIT"))
    )


def test_without_checkpoint_dir_a_stop_saves_and_the_same_command_resumes_bitwise(
    tmp_path, ref_root
):
    expected = reference(ref_root, FLAGS)
    out = str(tmp_path / "final.pt")
    command = (SCRIPT, *FLAGS, "--", "--out", out)
    proc = subprocess.Popen(
        tlaunch_cmd(*command), cwd=tmp_path, env=clean_env(RESUME_TEST_STEP_DELAY="0.1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or trained(out), 120, "the first step")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    [folder] = _folders(tmp_path)
    assert folder.startswith("resume_train-"), folder
    where = os.path.join(tmp_path, ROOT, folder)
    # Named in the first lines, with the way to turn it off.
    assert os.path.join(ROOT, folder) in stderr and "--checkpoint-dir none" in stderr
    [step] = _committed(where)

    again = run_tlaunch(*command, cwd=tmp_path)  # the same command, character for character
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {int(step[5:])} " in again.stderr
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))
    # The final checkpoint is committed, and retention keeps the last two.
    assert 1 <= len(_committed(where)) <= 2


def test_other_script_arguments_get_their_own_folder(tmp_path):
    for lr in ("0.01", "0.02"):
        result = run_tlaunch(
            SCRIPT, *FLAGS, "--max-steps", "2", "--", "--out", str(tmp_path / "o.pt"), "--lr", lr,
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming" not in result.stderr  # a new --lr starts over, it does not resume
    assert len(_folders(tmp_path)) == 2


def test_checkpoint_dir_none_saves_nothing_anywhere(tmp_path):
    out = str(tmp_path / "final.pt")
    stopped = run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", "none", "--", "--out", out, "--signal-at-batch", "4",
        cwd=tmp_path,
    )  # fmt: skip
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert "nothing saved" in stopped.stderr
    assert not os.path.exists(tmp_path / ROOT)
    assert not os.path.exists(tmp_path / "none"), "'none' was taken for a folder name"
