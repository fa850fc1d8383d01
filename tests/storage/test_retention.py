"""Retention rules in isolation: pure functions of a list of CheckpointInfo."""

from __future__ import annotations

import math

import pytest

from tlaunch.storage import CheckpointInfo, KeepBest, KeepEvery, KeepLast, RetentionPolicy


def infos(*steps: int, losses: dict[int, float] | None = None) -> list[CheckpointInfo]:
    losses = losses or {}
    return [
        CheckpointInfo(
            s,
            f"mem://x/step-{s:09d}",
            True,
            float(s),
            10,
            {"loss": losses[s]} if s in losses else {},
        )
        for s in steps
    ]


def test_no_rule_deletes_nothing():
    assert RetentionPolicy().to_delete(infos(1, 2, 3)) == []


def test_keep_last():
    assert RetentionPolicy(keep_last=2).to_delete(infos(1, 2, 3, 4)) == [1, 2]
    assert RetentionPolicy(keep_last=5).to_delete(infos(1, 2)) == []


def test_keep_every():
    assert RetentionPolicy(keep_every=100).to_delete(infos(100, 150, 200, 250, 260)) == [150, 250]


@pytest.mark.parametrize(("mode", "deleted"), [("min", [2, 3]), ("max", [1, 2, 4])])
def test_keep_best(mode, deleted):
    losses = {1: 0.1, 2: 0.5, 3: 0.7, 4: 0.2, 5: 0.9}
    policy = RetentionPolicy(keep_best=2, monitor="loss", mode=mode)
    # newest (5) always survives; best two by mode survive
    assert policy.to_delete(infos(1, 2, 3, 4, 5, losses=losses)) == deleted


def test_steps_without_a_finite_metric_are_never_best():
    losses = {1: math.nan, 3: 0.4}
    assert KeepBest(1, "loss").keep(infos(1, 2, 3, 4, losses=losses)) == {3}
    assert KeepBest(2, "loss").keep(infos(1, 2, losses={})) == set()


def test_ties_keep_the_newer_step():
    assert KeepBest(1, "loss").keep(infos(1, 2, 3, losses={1: 0.5, 2: 0.5, 3: 0.9})) == {2}


def test_rules_combine_by_union():
    losses = {10: 0.1, 20: 0.9, 30: 0.8, 40: 0.7, 50: 0.6, 60: 0.95}
    policy = RetentionPolicy(keep_last=2, keep_every=20, keep_best=1, monitor="loss")
    # keep_last: 50, 60; every 20: 20, 40, 60; best: 10
    assert policy.to_delete(infos(10, 20, 30, 40, 50, 60, losses=losses)) == [30]


def test_the_newest_survives_even_a_rule_that_would_drop_it():
    assert RetentionPolicy(keep_every=10).to_delete(infos(10, 20, 25)) == []
    assert RetentionPolicy.of(KeepEvery(10)).to_delete(infos(10, 15, 25)) == [15]


def test_uncommitted_and_quarantined_are_not_retention_business():
    items = infos(1, 2, 3)
    items[0] = CheckpointInfo(1, "x", False, 0.0, 0)
    items[1] = CheckpointInfo(2, "x", True, 1.0, 1, quarantined=True)
    assert RetentionPolicy(keep_last=1).to_delete(items) == []


def test_custom_rules_through_of():
    policy = RetentionPolicy.of(KeepLast(1), KeepEvery(3))
    assert policy.to_delete(infos(1, 2, 3, 4, 5)) == [1, 2, 4]
    assert "KeepLast(n=1)" in repr(policy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, r"keep_last must be a whole number >= 1 \(e.g. --keep-last 3\), got 0"),
        ({"keep_every": -5}, r"--keep-every 3"),
        (
            {"keep_best": 2},
            r"keep_best needs the metric to rank by, e.g. --keep-best 3 --monitor val_loss",
        ),
        (
            {"keep_best": 1, "monitor": "acc", "mode": "maximum"},
            r"mode must be 'min' or 'max'.*got 'maximum'",
        ),
        ({"keep_last": 2.5}, r"keep_last must be a whole number"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)
