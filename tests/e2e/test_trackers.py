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
    flags = ("--progress", "off", "--checkpoint-dir", "ckpt", "--save-every", "5")
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
    out = launch(tmp_path, "--kill-at-step", "8")
    assert out.returncode == 128 + 9, out.stderr[-3000:]
    logs = tmp_path / "ckpt" / "logs"
    killed = [
        json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()
    ]
    assert killed == list(range(1, 9)), "steps 6-8 were logged after the checkpoint at step 5"
    # a writer killed in the middle of a line
    with open(logs / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    with open(logs / "metrics.csv", "a") as f:
        f.write("9,lo")

    out = launch(tmp_path, "--term-at-step", "13")
    assert out.returncode == 75, out.stderr[-3000:]
    assert "resuming from step 5" in out.stderr
    out = launch(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from step 13" in out.stderr

    # metrics.jsonl: the run's, each step once, in order; the figures computed on the way
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    figured = [r for r in records if set(r) >= FIGURES]
    assert len(figured) >= STEPS - 6, "figures at every flush after each launch's first"
    for r in figured:
        assert r["lr"] == pytest.approx(0.1 * 0.5 ** (r["step"] // 10)), r  # StepLR(10, 0.5)
        # 100 tokens and 4 samples a step: the two rates count the same steps
        assert r["tokens_per_sec"] == pytest.approx(25 * r["samples_per_sec"]), r
        assert r["step_time_s"] > 0 and r["peak_memory_mb"] > 10
    loss = {r["step"]: r["loss"] for r in records}

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
