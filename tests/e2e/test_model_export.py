"""Getting a trained model out of a real run: a torch.compile'd model trained on 2 gloo
processes (DDP around the compiled module) is exported, and loads strictly into a plain,
uncompiled module with exactly its final parameters; ``best`` and ``last`` name its steps."""

from __future__ import annotations

import pytest
import torch
from helpers import SCRIPTS, results, run_tlaunch
from torch import nn

import tlaunch

pytestmark = pytest.mark.timeout(300)


def plain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One compiled 2-process run, saved at every step with ``--monitor score``."""
    where = tmp_path_factory.mktemp("compiled")
    ckpt, final = where / "ckpt", where / "final.pt"
    run = run_tlaunch(
        "--cpus", "2", str(SCRIPTS / "compiled_train.py"), "--checkpoint-dir", str(ckpt),
        "--save-every", "1", "--monitor", "score", "--progress", "off", "--", "--out", str(final),
        cwd=where, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = results(run.stdout)
    return where, ckpt, torch.load(final, weights_only=True), int(row["step"])


def test_a_compiled_ddp_model_exports_to_a_plain_model_with_its_final_parameters(trained):
    where, ckpt, final, steps = trained
    out = where / "exported" / "model.safetensors"
    run = run_tlaunch("ckpt", "export", str(ckpt), str(out), cwd=where, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"exported step {steps}" in run.stdout
    import safetensors.torch

    weights = safetensors.torch.load_file(out)
    assert not [k for k in weights if k.startswith("module.") or "_orig_mod" in k], list(weights)
    model = plain()
    model.load_state_dict(weights, strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_best_and_last_name_the_steps_of_the_recorded_monitor(trained):
    where, ckpt, final, steps = trained
    listing = run_tlaunch("ckpt", "ls", str(ckpt), cwd=where, timeout=60)
    assert listing.returncode == 0, listing.stderr
    tags = {
        int(row[0]): row[6]
        for row in map(str.split, listing.stdout.splitlines())
        if row[0].isdigit() and row[6] in ("best", "last", "best,last")
    }
    assert tags == {2: "best", steps: "last"}, listing.stdout  # score = |step - 2|
    best = tlaunch.load_weights(str(ckpt), step="best")
    last = tlaunch.load_weights(str(ckpt), step="last")
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert best.keys() == final.keys() and not torch.equal(best["0.weight"], final["0.weight"])


def test_resume_best_names_the_step_and_the_way_to_continue_from_it(trained):
    where, ckpt, _, _ = trained
    run = run_tlaunch(
        "--cpus", "1", str(SCRIPTS / "compiled_train.py"), "--checkpoint-dir", str(ckpt),
        "--resume", "best", "--monitor", "score", "--progress", "off",
        "--", "--out", str(where / "again.pt"), cwd=where, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("tlaunch: error:")]
    assert "step-000000002 --checkpoint-dir NEW_DIR" in line, line


def test_resume_best_without_a_metric_is_a_usage_error(tmp_path):
    run = run_tlaunch(
        str(SCRIPTS / "compiled_train.py"), "--resume", "best", cwd=tmp_path, timeout=60
    )
    assert run.returncode == 2
    assert run.stderr.startswith("tlaunch: error: --resume best needs the metric to rank by")
    assert "--monitor val_loss" in run.stderr and run.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())
