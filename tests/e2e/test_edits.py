"""An edited script meets its old checkpoint: a refusal that lists the differences, exit 2,
nothing changed, and --resume-force where continuing means something."""

from __future__ import annotations

import os

import pytest
from helpers import SCRIPTS, results, run_tlaunch

from tests.e2e.test_preemption import committed

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(SCRIPTS / "resume_train.py")
FLAGS = ("--cpus", "1", "--seed", "3", "--progress", "off")


def _run(where, ckpt: str, *script_args: str, flags: tuple[str, ...] = ()):
    return run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", ckpt, *flags, "--",
        "--out", os.path.join(where, "final.pt"), *script_args, cwd=where, timeout=200,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[str, list[int]]:
    """A run stopped by SIGTERM at micro-batch 40 (epoch 1): its checkpoint directory."""
    where = str(tmp_path_factory.mktemp("edits"))
    ckpt = os.path.join(where, "ckpt")
    first = _run(where, ckpt, "--signal-at-batch", "40")
    assert first.returncode == 75, first.stderr[-3000:]
    return ckpt, committed(ckpt)


def _copy(stopped, tmp_path) -> str:
    import shutil

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(stopped[0], ckpt)
    return ckpt


def _error_lines(stderr: str) -> list[str]:
    start = stderr.index("tlaunch: error:")
    return stderr[start:].strip().splitlines()


def test_a_wider_model_is_refused_naming_the_tensors_and_shapes(stopped, tmp_path):
    ckpt = _copy(stopped, tmp_path)
    result = _run(str(tmp_path), ckpt, "--hidden", "96")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    assert "model" in lines[0] and "--resume never" in " ".join(lines)
    assert any(
        "net.0.weight" in line and "(64, 16)" in line and "(96, 16)" in line for line in lines
    )
    assert committed(ckpt) == stopped[1], "nothing changed"


def test_another_optimizer_is_refused_naming_both(stopped, tmp_path):
    ckpt = _copy(stopped, tmp_path)
    result = _run(str(tmp_path), ckpt, "--optimizer", "sgd")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Adam" in result.stderr and "SGD" in result.stderr
    assert committed(ckpt) == stopped[1]


def test_another_optimizer_with_resume_force_continues_with_a_fresh_optimizer(stopped, tmp_path):
    ckpt = _copy(stopped, tmp_path)
    result = _run(str(tmp_path), ckpt, "--optimizer", "sgd", flags=("--resume-force",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer state is not restored" in result.stderr


def test_a_grown_dataset_is_refused_naming_both_lengths(stopped, tmp_path):
    ckpt = _copy(stopped, tmp_path)
    result = _run(str(tmp_path), ckpt, "--samples", "448")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "384" in result.stderr and "448" in result.stderr
    assert committed(ckpt) == stopped[1]


def test_a_grown_dataset_with_resume_force_restarts_the_interrupted_epoch(stopped, tmp_path):
    ckpt = _copy(stopped, tmp_path)
    result = _run(str(tmp_path), ckpt, "--samples", "448", flags=("--resume-force",))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from the start of epoch 1" in result.stderr
    # Stopped at step 40, in epoch 1: epochs 1 and 2 are now 448 / 16 = 28 steps each, in full.
    assert results(result.stdout)[-1]["step"] == str(40 + 2 * 28)
