"""``LaunchConfig``: checks driven by the field table, the cross-field rules, ``TLAUNCH_<FLAG>``."""

from __future__ import annotations

import re

import pytest

from tlaunch.cli import build_parser
from tlaunch.config import (
    DEFAULT_KEEP_LAST,
    DEFAULT_SAVE_MINUTES,
    LaunchConfig,
    UsageError,
    default_checkpoint_dir,
)
from tlaunch.run_io import make_run_dir


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_steps": 0}, "--max-steps must be at least 1, got 0"),
        ({"max_restarts": -1}, "--max-restarts must be at least 0, got -1"),
        ({"clip_grad_value": 0.0}, "--clip-grad-value must be positive, got 0.0"),
        ({"tpus": 0, "seed": 3}, "--tpus must be at least 1; run: tlaunch t.py --seed 3 --tpus 1"),
        ({"gpus": "0"}, "--gpus 0 is neither a count >= 1 nor 'all'; run: tlaunch t.py --gpus 1"),
        ({"mode": "best"}, "--mode 'best': use min or max"),
        ({"preemption_watch": "azure"}, "--preemption-watch 'azure': use auto, gce, aws or off"),
        ({"rdzv_endpoint": "host"}, "--rdzv-endpoint 'host' must be HOST:PORT"),
        ({"limit_train_batches": 2.5}, "--limit-train-batches is a whole count >= 1"),
        ({"limit_train_batches": 0.0}, "or a fraction in (0, 1]"),
        ({"sync_dir": ["ckpts"]}, "--sync-dir 'ckpts' must be LOCAL=URL"),
        ({"node_rank": 1}, "--node-rank 1 is outside 0..0 for --nnodes 1"),
        (
            {"nnodes": 2, "node_rank": 1},
            "run: tlaunch t.py --nnodes 2 --rdzv-endpoint HOST:29400 --node-rank 1",
        ),
    ],
)
def test_each_bad_value_names_its_flag(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        LaunchConfig(script="t.py", **kwargs)


def test_values_are_normalized_once_and_survive_json():
    c = LaunchConfig(precision="BF16-mixed", strategy="DDP", gpus=2, time_limit="1h")
    assert (c.precision, c.strategy, c.gpus, c.time_limit) == ("bf16", "ddp", "2", "1h")
    assert LaunchConfig.from_json(c.to_json()) == c


def test_help_shows_the_choices_from_the_table():
    help_text = build_parser().format_help()
    assert "--progress {auto,on,off}" in help_text and "--mode {min,max}" in help_text
    assert "--fast-dev-run [N]" in help_text


def test_env_defaults_convert_each_variable_to_its_field_type():
    environ = {
        "TLAUNCH_CPUS": "2",
        "TLAUNCH_GRACE": "5.5",
        "TLAUNCH_RESUME_FORCE": "yes",
        "TLAUNCH_DATA": "gs://b/a.tlar,gs://b/b.tlar",
        "TLAUNCH_MONITOR": "val_loss",
        "TLAUNCH_SCRIPT": "other.py",  # what to run comes from the command line only
        "TLAUNCH_MODULE": "pkg.other",
        "HOME": "/root",
    }
    assert LaunchConfig.env_defaults(environ) == {
        "cpus": 2,
        "grace": 5.5,
        "resume_force": True,
        "data": ["gs://b/a.tlar", "gs://b/b.tlar"],
        "monitor": "val_loss",
    }
    assert LaunchConfig.env_defaults({"TLAUNCH_RESUME_FORCE": "off"}) == {"resume_force": False}


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("TLAUNCH_CPUS", "x", "TLAUNCH_CPUS='x' is not a valid int"),
        ("TLAUNCH_GRACE", "1e", "TLAUNCH_GRACE='1e' is not a valid float"),
        ("TLAUNCH_RESUME_FORCE", "maybe", "TLAUNCH_RESUME_FORCE='maybe' is not a valid bool"),
    ],
)
def test_a_bad_variable_is_named_in_the_error(variable, value, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        LaunchConfig.env_defaults({variable: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grace": 0.0}, "--grace must be positive, got 0.0"),
        ({"grace": -5.0}, "--grace must be positive, got -5.0"),
        ({"grace": float("nan")}, "--grace must be a finite number, got nan"),
        ({"save_every_minutes": 0.0}, "--save-every-minutes must be positive"),
        ({"save_every_minutes": float("nan")}, "--save-every-minutes must be a finite number"),
        ({"clip_grad_norm": float("inf")}, "--clip-grad-norm must be a finite number, got inf"),
        ({"time_limit": "0s"}, "--time-limit '0s' leaves no time to train"),
        ({"time_limit": "0"}, "--time-limit '0' leaves no time to train"),
        ({"gpus": "\u0663"}, "is neither a count >= 1 nor 'all'"),  # an Arabic-Indic three
        ({"time_limit": "\u0663h"}, "is not a duration"),
    ],
)
def test_values_that_were_once_accepted_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        LaunchConfig(**kwargs)


# -- where checkpoints go ----------------------------------------------------------------------
def test_the_default_checkpoint_folder_is_keyed_by_the_script_and_its_arguments(tmp_path):
    def where(script="train.py", args=(), **flags):
        config = LaunchConfig(script=script, script_args=list(args), **flags)
        return default_checkpoint_dir(config, cwd=str(tmp_path))

    base = where()
    assert base.startswith(str(tmp_path / "tlaunch-checkpoints" / "train-"))
    assert where(cpus=2, precision="bf16", seed=9) == base  # launcher flags do not move it
    assert where(args=["--lr", "0.1"]) != base != where(script="other.py")
    assert where(args=["--lr", "0.1"]) != where(args=["--lr", "0.2"])
    assert where(script=str(tmp_path / "train.py")) == base  # relative or absolute: one script


def test_no_checkpoint_dir_takes_the_default_with_its_save_policy():
    settled = LaunchConfig().with_checkpoint_default("/d")
    assert (settled.checkpoint_dir, settled.save_every_minutes, settled.keep_last) == (
        "/d", DEFAULT_SAVE_MINUTES, DEFAULT_KEEP_LAST,
    )  # fmt: skip
    # The user's own policy flags stand; none of them is overwritten by the default's.
    mine = LaunchConfig(save_every=50, keep_best=1, monitor="loss").with_checkpoint_default("/d")
    assert (mine.save_every, mine.save_every_minutes, mine.keep_last) == (50, None, None)
    # Outside the launcher (no default), under --fast-dev-run, or given: nothing changes.
    assert LaunchConfig().with_checkpoint_default(None).checkpoint_dir is None
    assert LaunchConfig(fast_dev_run=1).with_checkpoint_default("/d").checkpoint_dir is None
    assert LaunchConfig(checkpoint_dir="gs://b/r").with_checkpoint_default("/d").checkpoint_dir == (
        "gs://b/r"
    )


def test_checkpoint_dir_none_means_no_checkpoints_not_a_folder_named_none(tmp_path, monkeypatch):
    assert LaunchConfig(checkpoint_dir="none").with_checkpoint_default("/d").checkpoint_dir is None
    monkeypatch.chdir(tmp_path)
    run_dir = make_run_dir(LaunchConfig(checkpoint_dir="none"))
    assert run_dir.startswith(str(tmp_path / "tlaunch-runs"))
    assert not (tmp_path / "none").exists()


def test_a_file_url_checkpoint_dir_keeps_its_runs_on_that_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = make_run_dir(LaunchConfig(checkpoint_dir=f"file://{tmp_path}/ck"))
    assert run_dir.startswith(str(tmp_path / "ck" / "runs")), run_dir
    assert not (tmp_path / "file:").exists()


def test_init_keywords_fill_the_flags_the_launch_left_at_their_defaults():
    launched = LaunchConfig(cpus=2, save_every=10)
    config, lost = launched.with_overrides({"checkpoint_dir": "ck", "save_every": 5, "cpus": 2})
    assert (config.checkpoint_dir, config.save_every, config.cpus) == ("ck", 10, 2)
    assert lost == ["save_every"]  # a flag given at launch wins, and is reported
    with pytest.raises(TypeError, match="unknown flag 'checkpoint_folder'"):
        launched.with_overrides({"checkpoint_folder": "x"})
