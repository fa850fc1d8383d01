"""The goodput arithmetic over a run's records (``goodput.jsonl``), without processes."""

from __future__ import annotations

import pytest

from tlaunch import contract
from tlaunch.storage.checkpoint.goodput import (
    GOODPUT_FILE,
    append_record,
    read_goodput,
    read_records,
    summarize,
)


def _launch(name: str, start: float, ready: float, step: int, restore: float = 0.0) -> list[dict]:
    return [
        {"event": "start", "launch": name, "t": start},
        {"event": "ready", "launch": name, "t": ready, "step": step, "restore_s": restore},
    ]


def test_stops_split_the_wall_time_and_a_kill_counts_its_lost_steps_as_recomputed():
    records = [
        # 1: start-up 10 s, trains steps 0-50 for 40 s (one 2 s save), SIGTERM: 5 s stop.
        *_launch("a", 0, 10, 0),
        {"event": "save", "launch": "a", "t": 30, "step": 20, "seconds": 2.0},
        {"event": "stop", "launch": "a", "t": 52, "step": 50},
        {"event": "exit", "launch": "a", "t": 57, "code": 75},
        # 2: resumes at 50 (4 s of its 10 s start-up restoring), reaches 80, killed: no exit.
        *_launch("b", 100, 110, 50, restore=4.0),
        {"event": "save", "launch": "b", "t": 130, "step": 70, "seconds": 1.0},
        {"event": "progress", "launch": "b", "t": 141, "step": 80},
        # 3: resumes at the last commit, 70: steps 71-80 of launch 2 are trained again.
        *_launch("c", 200, 208, 70, restore=3.0),
        {"event": "stop", "launch": "c", "t": 250, "step": 150},
        {"event": "exit", "launch": "c", "t": 251, "code": 0},
    ]
    g = summarize(records)
    assert g.restarts == 2 and [x.code for x in g.launches] == [75, None, 0]
    assert g.wall == pytest.approx(57 + 41 + 51)
    # Launch 2 trained 30 s (31 s less the 1 s save) for 30 steps: 10 of them again.
    assert g.recomputed_steps == 10
    assert g.recomputed == pytest.approx(30 * 10 / 30)
    shares = g.shares
    assert shares["start-up"] == pytest.approx(10 + 10 + 8 - 7)
    assert shares["restore"] == pytest.approx(7)
    assert shares["saves"] == pytest.approx(3)
    assert shares["stop"] == pytest.approx(5 + 1)
    assert shares["training"] == pytest.approx(40 + 30 + 42 - 10)
    assert g.goodput == pytest.approx(102 / 149)
    lines = g.lines()
    assert lines[0].startswith("goodput 0.685 over 3 launches (2 restarts, 149.0 s): training ")
    assert lines[1] == "steps recomputed: 10 (10.0 s)"


def test_records_are_appended_and_a_torn_last_line_is_skipped(tmp_path):
    append_record(str(tmp_path), {"event": "start", "launch": "a", "t": 1.0})
    append_record(str(tmp_path), {"event": "ready", "launch": "a", "t": 3.0, "step": 0})
    with open(tmp_path / GOODPUT_FILE, "a") as f:
        f.write('{"event": "progress", "launch": "a", "t": 9')  # died mid-write
    assert [r["event"] for r in read_records(str(tmp_path))] == ["start", "ready"]
    assert read_goodput(str(tmp_path)).wall == pytest.approx(2.0)
    assert read_goodput(str(tmp_path / "none")).lines() == []


def test_the_contract_declares_the_same_file_name():
    assert contract.GOODPUT_FILE == GOODPUT_FILE
