"""The metrics buffer and the run's clock: what reaches metrics.jsonl, when, and what is polled."""

from __future__ import annotations

import json

import pytest
import torch

from tlaunch.run_io import MetricsLog


def lines(log: MetricsLog) -> list[dict]:
    with open(log.path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def log(tmp_path, monkeypatch):
    monkeypatch.setattr(MetricsLog, "FLUSH_SECONDS", 3600.0)  # only counts and calls flush
    monkeypatch.setattr(MetricsLog, "FLUSH_RECORDS", 5)
    log = MetricsLog(str(tmp_path))
    yield log
    log.close()


def test_records_wait_in_memory_and_are_written_unchanged_at_a_flush(log):
    log.add(1, 0, {"loss": 0.5, "acc": torch.tensor(0.25)})
    log.add(2, 0, {"loss": torch.tensor(0.125, dtype=torch.float64)})
    assert lines(log) == [], "run.log must not write a line per call"
    log.flush()
    got = lines(log)
    assert [list(r) for r in got] == [
        ["step", "epoch", "loss", "acc", "time"],
        ["step", "epoch", "loss", "time"],
    ]
    assert [(r["step"], r["epoch"], r["loss"]) for r in got] == [(1, 0, 0.5), (2, 0, 0.125)]
    assert got[0]["acc"] == 0.25 and isinstance(got[0]["acc"], float)


def test_a_full_buffer_writes_itself_and_sigkill_loses_only_the_rest(log):
    for step in range(1, 8):
        log.add(step, 0, {"loss": float(step)})
    # What a SIGKILL now would leave on disk: the first FLUSH_RECORDS lines, nothing torn.
    assert [r["step"] for r in lines(log)] == [1, 2, 3, 4, 5]
    log.close()
    assert [r["step"] for r in lines(log)] == list(range(1, 8))


def test_time_bound_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(MetricsLog, "FLUSH_SECONDS", 0.0)
    log = MetricsLog(str(tmp_path))
    log.add(1, 0, {"loss": 1.0})
    assert [r["step"] for r in lines(log)] == [1]
    log.close()


def test_latest_reads_pending_values_and_writes_their_lines(log):
    log.add(3, 1, {"loss": torch.tensor(2.0), "lr": 0.1})
    log.add(4, 1, {"loss": torch.tensor(1.5)})
    assert log.latest() == {"loss": 1.5, "lr": 0.1}
    assert [r["step"] for r in lines(log)] == [3, 4]
    log.replace({"val_loss": 0.7})  # a resumed run starts from its checkpoint's metrics
    assert log.latest() == {"val_loss": 0.7}


def test_close_twice_and_ranks_without_a_file(log, tmp_path):
    log.add(1, 0, {"loss": 1.0})
    log.close()
    log.close()  # finish, then the interpreter's exit hook
    assert len(lines(log)) == 1
    log.add(2, 0, {"loss": 0.5})  # after finish: kept in memory only
    assert log.latest()["loss"] == 0.5 and len(lines(log)) == 1
    other_rank = MetricsLog(None)
    other_rank.add(1, 0, {"x": torch.tensor(3.0)})
    assert other_rank.latest() == {"x": 3.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
