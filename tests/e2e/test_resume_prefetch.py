"""A resume whose checkpoint read starts at the top of ``tlaunch.init`` (the prefetch) ends
bitwise equal to the uninterrupted run, also when that read meets a storage fault."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import SCRIPTS, clean_env, results, run_tlaunch

pytestmark = pytest.mark.timeout(300)
FLAGS = ("--cpus", "1", "--seed", "5", "--save-every", "4", "--progress", "off")


def train(cwd, *flags: str, out: str, signal_at: int = -1):
    script = str(SCRIPTS / "resume_train.py")
    args = ("--", "--epochs", "1", "--out", out, "--signal-at-batch", str(signal_at))
    return run_tlaunch(script, *FLAGS, *flags, *args, cwd=cwd, timeout=200)


def test_a_reset_during_the_prefetch_still_resumes_bitwise(tmp_path):
    ref = str(tmp_path / "ref.pt")
    assert train(tmp_path, out=ref).returncode == 0
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out.pt")
    first = train(tmp_path, "--checkpoint-dir", ckpt, out=out, signal_at=10)
    assert first.returncode == 75, first.stderr[-3000:]
    # Resumed under plain python from faulty://, the first read of optimizer.pt reset.
    env = clean_env(TLAUNCH_SEED="5", TLAUNCH_SAVE_EVERY="4", TLAUNCH_PROGRESS="off")
    cmd = [sys.executable, str(SCRIPTS / "prefetch_faulty.py"), ckpt, "optimizer.pt", "--"]
    second = subprocess.run(
        [*cmd, "--epochs", "1", "--out", out],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 10 " in second.stderr
    (row,) = [r for r in results(second.stdout) if "reset_in" in r]
    assert row["reset_in"] == "tlaunch-prefetch", "the prefetch did not read the checkpoint"
    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "tensors differ after resume"
