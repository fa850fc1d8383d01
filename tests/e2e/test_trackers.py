"""A run's logs across a hard kill, a preemption and a resume: the run-wide metrics.jsonl, the CSV
tracker and TensorBoard's events hold each step once, in order, and the hyperparameters once.

One process is enough: what is checked is what rank 0 writes, and where a resume cuts it."""

from __future__ import annotations

import json

import pytest
from helpers import SCRIPTS, run_tlaunch

pytestmark = pytest.mark.timeout(400)
SCRIPT = str(SCRIPTS / "tracked_train.py")
STEPS = 32  # 2 epochs of 16 batches
FIGURES = {"lr", "samples_per_sec", "step_time_s", "peak_memory_mb", "tokens_per_sec"}


def launch(tmp_path, *script_args: str):
    flags = ("--progress", "off", "--checkpoint-dir", "ckpt", "--save-every", "4")
    return run_tlaunch(
        SCRIPT,
        *flags,
        "--log-with",
        "tensorboard,csv",
        "--",
        *script_args,
        cwd=tmp_path,
        timeout=150,
    )


def test_a_killed_then_preempted_run_logs_each_step_once(tmp_path):
    # saves at steps 4, 8, 12 and 16; epoch 0's val is logged at step 16, after that save
    out = launch(tmp_path, "--kill-at-step", "18")
    assert out.returncode == 128 + 9, out.stderr[-3000:]
    logs = tmp_path / "ckpt" / "logs"
    killed = [
        json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()
    ]
    assert killed == [*range(1, 17), 16, 17, 18], "val@16, 17, 18: after the step-16 checkpoint"
    # a writer killed in the middle of a line
    with open(logs / "metrics.jsonl", "a") as f:
        f.write('{"step": 19, "lo')
    with open(logs / "metrics.csv", "a") as f:
        f.write("19,lo")

    out = launch(tmp_path, "--term-at-step", "25")
    assert out.returncode == 75, out.stderr[-3000:]
    assert "resuming from step 16" in out.stderr
    out = launch(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from step 25" in out.stderr

    # metrics.jsonl: the run's, each step once, in order; the figures computed on the way
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [(r["step"], list(r)[2]) for r in records if "val" in r] == [(16, "val"), (32, "val")]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    figured = [r for r in records if set(r) >= FIGURES]
    assert len(figured) >= STEPS - 6, "figures at every flush after each launch's first"
    for r in figured:
        assert r["lr"] == pytest.approx(0.1 * 0.5 ** (r["step"] // 10)), r  # StepLR(10, 0.5)
        # 100 tokens and 4 samples a step: the two rates count the same steps
        assert r["tokens_per_sec"] == pytest.approx(25 * r["samples_per_sec"]), r
        assert r["step_time_s"] > 0 and r["peak_memory_mb"] > 10
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    val = {r["step"]: r["val"] for r in records if "val" in r}

    # metrics.csv: a header, then each (step, metric) once, steps increasing per metric
    header, *rows = (logs / "metrics.csv").read_text().splitlines()
    assert header == "step,name,value"
    by_name: dict[str, list[int]] = {}
    for row in rows:
        step, name, value = row.split(",")
        by_name.setdefault(name, []).append(int(step))
        if name == "loss":
            assert float(value) == loss[int(step)]
    assert by_name["loss"] == list(range(1, STEPS + 1))
    assert by_name["val"] == [16, 32]
    for name, steps in by_name.items():
        assert steps == sorted(set(steps)), name

    # TensorBoard: read back as TensorBoard reads it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = logs / "ckpt"
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, STEPS + 1))
    assert [e.value for e in scalars] == pytest.approx([loss[s] for s in range(1, STEPS + 1)])
    # val@16 was logged after the step-16 save, then again by the resumed run: shown once
    assert [(e.step, e.value) for e in events.Scalars("val")] == [
        (s, pytest.approx(v)) for s, v in val.items()
    ]
    lr = [e.step for e in events.Scalars("lr")]
    assert lr == sorted(set(lr)) and len(lr) >= STEPS - 6
    assert [hparams_of(f) for f in folders(board) if hparams_of(f)] == [
        {"lr": 0.1, "batch_size": 4.0, "layers": "[8, 2]"}
    ], "the hyperparameters, once per run"


def folders(board):
    return [board, *sorted(p for p in board.rglob("*") if p.is_dir())]


def hparams_of(folder) -> dict | None:
    """The hyperparameters of the session TensorBoard's hparams plugin finds in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    if not _has_plugin(events, "hparams"):
        return None
    content = events.PluginTagToContent("hparams").get("_hparams_/session_start_info")
    if content is None:
        return None
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {
        k: (v.number_value if v.HasField("number_value") else v.string_value)
        for k, v in start.hparams.items()
    }


def _has_plugin(events, name: str) -> bool:
    try:
        events.PluginTagToContent(name)
    except KeyError:
        return False
    return True
