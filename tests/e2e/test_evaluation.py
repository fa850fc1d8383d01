"""Evaluation passes on real processes: the sharded metric equals one process's, every sample
is evaluated once, and keep-best keeps weights that reproduce the metric recorded with them."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from helpers import SCRIPTS, results, run_tlaunch

from tlaunch.storage import CheckpointStore
from tlaunch.storage.checkpoint.export import read_weights

pytestmark = pytest.mark.timeout(300)

sys.path.insert(0, str(SCRIPTS))
from eval_train import VAL_SAMPLES, build, plain_val_loss  # noqa: E402


def kept_checkpoint_reproduces_its_metric(ckpt) -> tuple[int, float, float]:
    """(best step, the val_loss its COMMIT records, its weights' val_loss evaluated again)."""
    weights = read_weights(str(ckpt), "best", monitor="val_loss", mode="min")
    info = {i.step: i for i in CheckpointStore(str(ckpt)).committed()}[weights.step]
    model = build()
    model.load_state_dict(weights.tensors, strict=True)
    return weights.step, info.metrics["val_loss"], plain_val_loss(model)


def test_keep_best_keeps_the_weights_its_metric_was_measured_on(tmp_path):
    """--save-every 5 with an evaluation every 3 steps: before the fix, the step-5 checkpoint
    carried step 3's val_loss and was kept as best, on weights that score worse."""
    ckpt = tmp_path / "ckpt"
    run = run_tlaunch(
        str(SCRIPTS / "eval_train.py"), "--checkpoint-dir", str(ckpt), "--save-every", "5",
        "--keep-best", "1", "--monitor", "val_loss", "--progress", "off",
        "--", "--out", str(tmp_path / "out"), "--plain-eval",
        cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    step, recorded, again = kept_checkpoint_reproduces_its_metric(ckpt)
    assert again == pytest.approx(recorded, rel=1e-6), (step, recorded, again)


def test_two_ranks_evaluate_every_sample_once_with_the_one_process_metric(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run = run_tlaunch(
        "--cpus", "2", str(SCRIPTS / "eval_train.py"), "--checkpoint-dir", str(ckpt),
        "--save-every", "5", "--keep-best", "1", "--monitor", "val_loss",
        "--val-every-steps", "3", "--progress", "off", "--", "--out", str(out),
        cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = results(run.stdout)
    # 40 samples, batches of 4 on 2 ranks: 5 steps an epoch, 15 in all; one pass every 3.
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12, 15], run.stdout
    for row in rows:  # the average over samples, not over ranks of uneven shards
        plain = float(row["plain"])
        assert float(row["val_loss"]) == pytest.approx(plain, rel=1e-6, abs=1e-9), row
        assert float(row["val_mse"]) == pytest.approx(plain, rel=1e-6, abs=1e-9), row
    ids = [json.loads((tmp_path / f"out.ids-{r}").read_text()) for r in (0, 1)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(list(range(VAL_SAMPLES)) * len(rows))
    # Evaluated weights are saved at once; a step save between evaluations records no score.
    committed = CheckpointStore(str(ckpt)).committed()
    scored = {i.step for i in committed if "val_loss" in i.metrics}
    assert scored and scored <= {3, 6, 9, 12, 15}, [(i.step, i.metrics) for i in committed]
    step, recorded, again = kept_checkpoint_reproduces_its_metric(ckpt)
    assert again == pytest.approx(recorded, rel=1e-6), (step, recorded, again)


EARLY = ("--early-stop", "val_metric", "--patience", "2", "--progress", "off")


def early_stop_run(tmp_path, ckpt: str, out: str, *script_args: str):
    return run_tlaunch(
        "--cpus", "2", str(SCRIPTS / "early_stop_train.py"), "--checkpoint-dir", ckpt, *EARLY,
        "--", "--out", out, *script_args, cwd=tmp_path, timeout=180,
    )  # fmt: skip


def test_early_stopping_stops_every_rank_at_the_same_epoch_and_keeps_its_patience(tmp_path):
    """val_metric is best at epoch 3 and worse after: with --patience 2 the run ends after
    epoch 5. Stopped by SIGTERM in epoch 5 (one bad evaluation counted) and run again, it ends
    after the same epoch with the same parameters."""
    whole = early_stop_run(tmp_path, "whole", "whole.pt")
    assert whole.returncode == 0, whole.stderr[-3000:]
    (row,) = results(whole.stdout)
    assert row["epoch"] == "5", whole.stdout
    (line,) = [x for x in whole.stderr.splitlines() if "early stopping" in x]
    assert line == (
        "tlaunch: early stopping: val_metric did not improve for 2 evaluations (--patience 2, "
        f"--mode min); best val_metric 0 at epoch 3, step {4 * 4}"
    )
    # 64 samples in batches of 8 on 2 ranks: 4 steps an epoch; step 22 is inside epoch 5.
    # Steps of 0.12 s: the ranks agree on a stop every ~0.1 s of steps, i.e. every step here.
    cut = ("--signal-at-step", "22", "--step-seconds", "0.12")
    stopped = early_stop_run(tmp_path, "cut", "cut.pt", *cut)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert not results(stopped.stdout)
    again = early_stop_run(tmp_path, "cut", "cut.pt", *cut)
    assert again.returncode == 0, again.stderr[-3000:]
    assert results(again.stdout) == [row], again.stdout
    # The ranks agree on the stop within a step: it lands at step 22 or 23, in epoch 5 either way.
    assert re.search(r"resuming from step 2[23] \(epoch 5,", again.stderr), again.stderr
    whole_params = torch.load(tmp_path / "whole.pt", weights_only=True)
    cut_params = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert whole_params.keys() == cut_params.keys()
    for name, value in whole_params.items():
        assert torch.equal(value, cut_params[name]), name
