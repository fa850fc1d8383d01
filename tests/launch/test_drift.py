"""The drift check: which changed settings a resume refuses, which it only warns about."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from tlaunch.config import LaunchConfig
from tlaunch.drift import (
    check_drift,
    checked_state,
    config_hash,
    differences,
    refuse_tensor_changes,
    tensor_differences,
)


def _loaded(hparams: dict, config: LaunchConfig, step: int = 40) -> SimpleNamespace:
    state = {"hparams": hparams, "config": dataclasses.asdict(config)}
    return SimpleNamespace(state=state, info=SimpleNamespace(step=step))


@pytest.mark.parametrize(
    "key", ["lr", "base_lr", "learning_rate", "batch_size", "scheduler", "warmup_steps", "accum"]
)
def test_a_changed_hparam_that_changes_the_run_is_refused_with_one_line(key, capsys):
    config = LaunchConfig()
    with pytest.raises(SystemExit) as exit:
        check_drift(_loaded({key: 1}, config), {key: 2}, config, warn=True)
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tlaunch: error: the checkpoint at step 40 was made with different")
    assert f"{key}: 1 -> 2" in line and "--resume-force" in line


@pytest.mark.parametrize("key", ["epochs", "log_every", "flr", "lrx", "dropout"])
def test_a_changed_hparam_that_does_not_change_the_run_is_only_warned_about(key):
    config = LaunchConfig()
    with pytest.warns(UserWarning, match=f"resuming with changed settings: {key}: 1 -> 2"):
        check_drift(_loaded({key: 1}, config), {key: 2}, config, warn=True)


@pytest.mark.parametrize("flag, value", [("grad_accum", 4), ("seed", 7)])
def test_changed_accumulation_or_seed_is_refused(flag, value):
    saved = LaunchConfig()
    now = dataclasses.replace(saved, **{flag: value})
    changes, breaking = differences({}, dataclasses.asdict(saved), {}, now)
    assert breaking == ["--" + flag.replace("_", "-")]
    with pytest.raises(SystemExit):
        check_drift(_loaded({}, saved), {}, now, warn=False)


def test_resume_force_continues_with_a_warning():
    saved = LaunchConfig()
    now = dataclasses.replace(saved, resume_force=True)
    with pytest.warns(UserWarning, match="lr: 0.1 -> 0.2"):
        check_drift(_loaded({"lr": 0.1}, saved), {"lr": 0.2}, now, warn=True)


def test_settings_that_do_not_change_the_run_pass_silently(recwarn):
    saved = LaunchConfig(max_epochs=3, save_every=10)
    now = dataclasses.replace(saved, max_epochs=9, save_every=50, cpus=2)
    check_drift(_loaded({"lr": 0.1}, saved), {"lr": 0.1}, now, warn=True)
    assert not recwarn.list


def test_an_added_or_removed_hparam_counts_as_a_change():
    changes, breaking = differences({"lr": 0.1}, {}, {"batch_size": 8}, LaunchConfig())
    assert changes == ["batch_size: '<unset>' -> 8", "lr: 0.1 -> '<unset>'"]
    assert breaking == ["batch_size", "lr"]


def test_the_config_hash_covers_what_changes_the_numbers_only():
    base = dataclasses.asdict(LaunchConfig())
    assert config_hash(base) == config_hash({**base, "max_epochs": 9, "cpus": 2})
    for key, value in [("precision", "bf16"), ("grad_accum", 2), ("clip_grad_norm", 1.0)]:
        assert config_hash(base) != config_hash({**base, key: value})


def test_tensor_differences_name_each_tensor_and_both_shapes():
    saved = {"a.weight": torch.zeros(4, 2), "b": torch.zeros(3), "gone": torch.zeros(1)}
    now = {"a.weight": torch.zeros(8, 2), "b": torch.zeros(3), "new": torch.zeros(1)}
    assert tensor_differences(saved, now) == [
        "a.weight: saved (4, 2), now (8, 2)",
        "gone: in the checkpoint, not in the model",
        "new: in the model, not in the checkpoint",
    ]
    assert tensor_differences(saved, dict(saved)) == []


def test_tensor_changes_are_refused_with_one_line_each(capsys):
    with pytest.raises(SystemExit) as exit:
        refuse_tensor_changes("model", ["a: saved (4,), now (8,)", "b: saved (1,), now (2,)"], 40)
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("tlaunch: error: the checkpoint at step 40 holds a model of")
    assert lines[1:] == ["  a: saved (4,), now (8,)", "  b: saved (1,), now (2,)"]
    refuse_tensor_changes("model", [], 40)  # nothing differs: nothing happens


@pytest.mark.parametrize(
    "state",
    [
        {"epoch": 1, "batch_in_epoch": 0, "samples_seen": 0, "world_size": 1},  # no step
        {"step": "40", "epoch": 1, "batch_in_epoch": 0, "samples_seen": 0, "world_size": 1},
        {"step": 40, "epoch": -1, "batch_in_epoch": 0, "samples_seen": 0, "world_size": 1},
        {"step": 40, "epoch": 1, "batch_in_epoch": True, "samples_seen": 0, "world_size": 1},
        {"step": 40, "epoch": 1, "batch_in_epoch": 0, "samples_seen": 0, "world_size": 0},
        {
            "step": 4,
            "epoch": 1,
            "batch_in_epoch": 0,
            "samples_seen": 0,
            "world_size": 1,
            "metrics": [],
        },
    ],
)
def test_a_malformed_state_record_is_refused_in_one_line(state, capsys):
    loaded = SimpleNamespace(state=state, info=SimpleNamespace(step=40, url="memory://r/step-40"))
    with pytest.raises(SystemExit) as exit:
        checked_state(loaded)
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "malformed state.json" in line and "--resume never" in line


def test_a_well_formed_state_record_passes():
    state = {"step": 40, "epoch": 1, "batch_in_epoch": 16, "samples_seen": 640, "world_size": 2}
    loaded = SimpleNamespace(state=state, info=SimpleNamespace(step=40, url="u"))
    assert checked_state(loaded) is state
