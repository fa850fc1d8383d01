"""--log-with validation, where a run's logs go, how a resume cuts them, and what the trackers
are started with (W&B and MLflow are not installed here: their wiring is checked up to
Accelerate's ``init_trackers``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import tlaunch.strategies.tracking as tracking
from tlaunch.checkpointing import Position
from tlaunch.config import LaunchConfig, UsageError
from tlaunch.contract import LAUNCH_DIR_ENV
from tlaunch.run_io import MetricsLog
from tlaunch.trackers import RunLogs, keep_lines, logs_dir, parse_log_with


def test_log_with_names_are_checked_and_deduplicated():
    assert parse_log_with(" TensorBoard,csv,tensorboard ") == "tensorboard,csv"
    with pytest.raises(UsageError, match="'neptune' is unknown; use a comma list of tensorboard"):
        LaunchConfig(log_with="csv,neptune")
    with pytest.raises(UsageError, match="needs tracker names"):
        parse_log_with(" , ")


def test_a_tracker_without_its_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(UsageError) as e:
        parse_log_with("csv,tensorboard")
    assert str(e.value) == (
        "--log-with tensorboard needs the tensorboard package, which is not installed: "
        "pip install 'tlaunch[tensorboard]'"
    )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_the_launcher_refuses_a_missing_tracker_before_anything_starts(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('must not run')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLAUNCH_")}
    out = subprocess.run(
        [sys.executable, "-m", "tlaunch", "--log-with", "tensorboard,wandb", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "tlaunch: error: --log-with wandb needs the wandb package, which is not installed: "
        "pip install 'tlaunch[wandb]'"
    ]
    assert sorted(os.listdir(tmp_path)) == ["train.py"], "no run directory, no checkpoints"


def test_logs_live_beside_local_checkpoints_and_on_this_machine_for_a_bucket(tmp_path):
    local = LaunchConfig(checkpoint_dir=str(tmp_path / "ckpt"))
    assert logs_dir(local) == str(tmp_path / "ckpt" / "logs")
    bucket = LaunchConfig(checkpoint_dir="gs://bucket/runs/exp1", run_dir=str(tmp_path / "r"))
    where = logs_dir(bucket)
    assert os.path.dirname(where) == str(tmp_path / "r" / "logs")
    assert os.path.basename(where).startswith("exp1-")
    other = LaunchConfig(checkpoint_dir="gs://bucket/exp1", run_dir=str(tmp_path / "r"))
    assert logs_dir(other) != where, "two buckets' runs never share a folder"
    assert logs_dir(LaunchConfig()) is None


def test_a_resume_keeps_the_lines_its_checkpoint_counted_and_drops_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)]
    path.write_text("".join(lines) + '{"step": 9, "lo')
    assert keep_lines(str(path), 5) == 5
    assert path.read_text() == "".join(lines[:5])
    # a checkpoint without the count (saved before it was kept): by step, the torn line gone
    path.write_text("".join(lines) + '{"step": 9, "lo')
    assert keep_lines(str(path), None, after_step=6) == 6
    assert path.read_text() == "".join(lines[:6])
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,name,value\n1,loss,0.5\n2,loss,0.25\n3,lo")
    assert keep_lines(str(csv), None, after_step=1) == 2
    assert csv.read_text() == "step,name,value\n1,loss,0.5\n"


def test_a_file_with_nothing_to_cut_is_left_as_it_is(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    inode = path.stat().st_ino
    assert keep_lines(str(path), 2) == 2
    assert path.stat().st_ino == inode, "not rewritten"
    assert keep_lines(str(tmp_path / "absent.jsonl"), 3) == 0


class _Accelerator:
    is_main_process, num_processes, trackers = True, 1, []


def _start(tmp_path, monkeypatch, state: dict | None, names: list[str]) -> tuple[RunLogs, dict]:
    started: dict = {}

    def fake_start(accelerator, project, **kwargs):
        started.update(project=project, **kwargs)
        return {"wandb": "w-new", "mlflow": "m-new"}

    monkeypatch.setattr(tracking, "start_trackers", fake_start)
    monkeypatch.setattr(
        tracking,
        "log_to_trackers",
        lambda accelerator, records, only=None: started.setdefault("replayed", []).append(
            (only, records)
        ),
    )
    logs = RunLogs(LaunchConfig(checkpoint_dir=str(tmp_path / "exp1")))
    logs.names = names  # wandb and mlflow are not installed: past the flag's check
    registered = {}
    checkpoints = SimpleNamespace(
        enabled=True,
        loaded=object() if state is not None else None,
        register=lambda name, obj: registered.update({name: obj}),
    )
    if state is not None:
        logs.load_state_dict(state)
    logs.start(
        strategy=None,
        accelerator=_Accelerator(),
        checkpoints=checkpoints,
        metrics=MetricsLog(None),
        position=Position(step=7 if state is not None else 0),
        optimizers=[],
        hparams={"lr": 0.1},
    )
    assert registered == {"trackers": logs}
    return logs, started


def test_a_fresh_run_starts_new_tracker_runs_and_logs_its_hyperparameters(tmp_path, monkeypatch):
    logs, started = _start(tmp_path, monkeypatch, None, ["wandb", "mlflow"])
    assert started["project"] == "exp1"
    assert started["hparams_for"] == {"wandb", "mlflow"}
    wandb = started["init_kwargs"]["wandb"]
    assert wandb["resume"] == "allow" and len(wandb["id"]) == 16
    assert wandb["dir"] == str(tmp_path / "exp1" / "logs")
    assert started["init_kwargs"]["mlflow"]["run_id"] is None
    state = logs.state_dict()
    assert state["ids"] == {"wandb": "w-new", "mlflow": "m-new"}
    assert state["hparams_logged"] == ["mlflow", "wandb"]


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    saved = {
        "jsonl_lines": 0,
        "csv_lines": None,
        "hparams_logged": ["wandb"],
        "ids": {"wandb": "w-saved", "mlflow": "m-saved"},
    }
    _, started = _start(tmp_path, monkeypatch, saved, ["wandb", "mlflow", "tensorboard"])
    kwargs = started["init_kwargs"]
    assert kwargs["wandb"]["id"] == "w-saved" and kwargs["wandb"]["resume"] == "allow"
    assert kwargs["mlflow"]["run_id"] == "m-saved"
    assert kwargs["tensorboard"]["purge_step"] == 7, "events from the step-7 checkpoint on go"
    assert started["hparams_for"] == {"mlflow", "tensorboard"}, "wandb has them already"


def test_tensorboard_gets_back_the_kept_records_of_the_resumed_step(tmp_path, monkeypatch):
    logs = tmp_path / "exp1" / "logs"
    logs.mkdir(parents=True)
    kept = [{"step": 6, "loss": 0.6}, {"step": 7, "loss": 0.5}, {"step": 7, "lr": 0.1}]
    after = [{"step": 7, "val": 0.4}, {"step": 8, "loss": 0.3}]  # logged after the checkpoint
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept + after))
    saved = {"jsonl_lines": 3, "csv_lines": None, "hparams_logged": ["tensorboard"], "ids": {}}
    _, started = _start(tmp_path, monkeypatch, saved, ["tensorboard"])
    # purge_step=7 hides every event from step 7 on; the two kept records of step 7 come back
    assert started["init_kwargs"]["tensorboard"]["purge_step"] == 7
    assert started["replayed"] == [("tensorboard", [(7, {"loss": 0.5}), (7, {"lr": 0.1})])]
    assert (logs / "metrics.jsonl").read_text().splitlines() == [json.dumps(r) for r in kept]
    assert started["hparams_for"] == set()


def test_without_checkpoints_the_trackers_log_in_the_launch_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path / "run"))
    assert RunLogs(LaunchConfig(log_with="csv")).accelerator_kwargs() == {
        "log_with": ["csv"],
        "logging_dir": str(tmp_path / "run" / "logs"),
    }
    assert RunLogs(LaunchConfig()).accelerator_kwargs() == {}, "no tracker, nothing to set up"
