"""Scripts written for other launchers run unchanged under tlaunch: a Lightning ``Trainer``
script and a Transformers ``Trainer`` script train on 2 processes exactly as under
``torchrun`` (the same world, the same number of steps, bitwise the same parameters on every
rank), and on 1 process exactly as under ``python``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import SCRIPTS, clean_env, results, run_tlaunch

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def torchrun(cwd, nproc: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if nproc == 1:
        launcher = [sys.executable]
    else:
        launcher += ["--nproc-per-node", str(nproc)]
    return subprocess.run(
        [*launcher, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=240
    )


def same_training(tmp_path, nproc: int, script: str, *args: str) -> None:
    theirs = torchrun(tmp_path, nproc, str(SCRIPTS / script), *args, str(tmp_path / "theirs"))
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    ours = run_tlaunch(
        "--cpus", str(nproc), str(SCRIPTS / script), *args, str(tmp_path / "ours"),
        cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-3000:]
    expected = sorted(results(theirs.stdout), key=lambda r: r["rank"])
    got = sorted(results(ours.stdout), key=lambda r: r["rank"])
    assert len(expected) == nproc and {r["world"] for r in expected} == {str(nproc)}
    assert got == expected
    assert len({r["params"] for r in got}) == 1, "every rank holds the same parameters"


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_lightning_trainer_script_trains_as_under_torchrun(tmp_path, nproc):
    same_training(tmp_path, nproc, "lightning_train.py", str(nproc))


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_transformers_trainer_script_trains_as_under_torchrun(tmp_path, nproc):
    same_training(tmp_path, nproc, "hf_trainer_train.py")
