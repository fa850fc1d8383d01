"""Early stopping's counting, its saved state, and how an evaluation set is shared out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlaunch.config import LaunchConfig, UsageError
from tlaunch.early_stop import EarlyStopping
from tlaunch.evaluation import Evaluation, shard_indices, val_batch_limit


def feed(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    seen = []
    for i, v in enumerate(values):
        stopper.update(v, step=10 * (i + 1), epoch=i)
        seen.append(stopper.stopped)
    return seen


def test_patience_counts_evaluations_without_improvement_in_a_row():
    stopper = EarlyStopping("val_loss", patience=2)
    assert feed(stopper, [3.0, 2.0, 2.5, 1.0, 1.5, 1.2]) == [False] * 5 + [True]
    assert (stopper.best, stopper.best_epoch, stopper.best_step, stopper.bad) == (1.0, 3, 40, 2)
    assert "best val_loss 1 at epoch 3, step 40" in stopper.reason()


def test_max_mode_and_min_delta_decide_what_improves():
    stopper = EarlyStopping("acc", patience=1, mode="max", min_delta=0.05)
    assert feed(stopper, [0.5, 0.6, 0.63]) == [False, False, True]  # +0.03 is not enough
    assert stopper.best == 0.6


def test_a_missing_or_nan_value_is_a_bad_evaluation():
    stopper = EarlyStopping("val_loss", patience=2)
    assert feed(stopper, [1.0, float("nan")]) == [False, False]
    stopper.update(None, step=30, epoch=2)
    assert stopper.stopped and stopper.best == 1.0


def test_the_state_round_trips_and_another_metric_s_state_is_ignored():
    stopper = EarlyStopping("val_loss", patience=3)
    feed(stopper, [1.0, 2.0])
    again = EarlyStopping("val_loss", patience=3)
    again.load_state_dict(stopper.state_dict())
    assert again.state_dict() == stopper.state_dict()
    other = EarlyStopping("acc", patience=3)
    other.load_state_dict(stopper.state_dict())
    assert other.best is None and other.bad == 0


def test_shards_cover_every_index_once_without_padding():
    order = list(range(17))
    shards = [shard_indices(order, rank=r, world=3) for r in range(3)]
    assert sorted(sum(shards, [])) == order
    assert [len(s) for s in shards] == [6, 6, 5]
    assert shard_indices([4], rank=1, world=2) == []  # a rank may get nothing at all


@pytest.mark.parametrize(
    ("total", "limit", "kept"),
    [(10, None, 10), (10, 3, 3), (10, 30, 10), (10, 0.25, 2), (10, 0.01, 1), (10, 1.0, 10)],
)
def test_limit_val_batches_is_a_count_or_a_fraction(total, limit, kept):
    assert val_batch_limit(total, limit) == kept


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"early_stop": "val_loss"}, "--early-stop val_loss --patience 3"),
        ({"patience": 2}, "--patience 2 --early-stop val_loss"),
        (
            {"val_every_epochs": 1, "val_every_steps": 5},
            "--val-every-epochs or --val-every-steps: choose one",
        ),
        ({"limit_val_batches": 2.5}, "--limit-val-batches is a whole count"),
        ({"min_delta": -1.0}, "--min-delta must be at least 0"),
    ],
)
def test_bad_evaluation_flags_are_one_line_usage_errors(flags, message):
    with pytest.raises(UsageError, match=message.replace("-", r"\-")) as e:
        LaunchConfig(script="train.py", **flags)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("limit", "kept"), [(None, 17), (2, 8), (0.5, 8)])
def test_a_pass_shares_out_the_first_batches_of_the_set_dropping_none(limit, kept):
    """17 samples in batches of 4, on 2 ranks: every kept sample once, on one rank; the last
    short batch is evaluated even though the loader itself drops it."""
    loader = DataLoader(TensorDataset(torch.arange(17)), batch_size=4, drop_last=True)
    seen: list[list[int]] = []
    for rank in (0, 1):
        evaluation = Evaluation.__new__(Evaluation)  # only the sharding, without a Run
        evaluation.run = SimpleNamespace(rank=rank, world_size=2)
        evaluation.config = LaunchConfig(limit_val_batches=limit)
        seen.append([int(i) for (batch,) in evaluation._shard(loader) for i in batch])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(kept))


def test_a_batch_sampler_of_the_script_s_own_is_dealt_out_by_whole_batches():
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_sampler=batches)
    seen = []
    for rank in (0, 1):
        evaluation = Evaluation.__new__(Evaluation)
        evaluation.run = SimpleNamespace(rank=rank, world_size=2)
        evaluation.config = LaunchConfig()
        mine, count = evaluation._rank_batches(loader)
        seen.append([int(i) for (batch,) in mine for i in batch])
        assert count == 2
    assert seen == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
