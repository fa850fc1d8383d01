"""run.log buffers its records; every way a run ends keeps what was logged, except SIGKILL,
which loses at most the records since the last flush."""

from __future__ import annotations

import json

import pytest
from helpers import SCRIPTS, results, run_tlaunch

pytestmark = pytest.mark.timeout(200)
SCRIPT = str(SCRIPTS / "log_metrics.py")


def launch(tmp_path, *flags: str, script_args: tuple[str, ...] = ()):
    out = run_tlaunch(
        SCRIPT,
        "--progress",
        "off",
        "--run-dir",
        str(tmp_path / "runs"),
        *flags,
        "--",
        *script_args,
        cwd=tmp_path,
        timeout=180,
    )
    (run_dir,) = (tmp_path / "runs").iterdir()
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # lines on disk just after each step's run.log, as rank 0 saw them
    seen = {int(r["step"]): int(r["lines"]) for r in results(out.stdout)}
    return out, records, seen


def assert_one_line_per_step(records: list[dict], last: int, world: int = 1) -> None:
    assert [r["step"] for r in records] == list(range(1, last + 1))
    assert [list(r) for r in records] == [
        ["step", "epoch", "loss", "counter", "rank", "time"]
    ] * last
    # counter is changed in place after each log: a line keeps the value it had when logged
    assert [r["counter"] for r in records] == [float(s) for s in range(1, last + 1)]
    assert {r["rank"] for r in records} == {(world - 1) / 2}  # reduce=True: the ranks' mean


def test_finish_writes_what_the_buffer_held(tmp_path):
    out, records, seen = launch(tmp_path, "--max-steps", "12")
    assert out.returncode == 0, out.stderr[-3000:]
    assert seen == {s: 0 for s in range(1, 13)}, "no line is written before a flush point"
    assert_one_line_per_step(records, 12)


def test_each_save_flushes_the_lines_logged_before_it(tmp_path):
    out, records, seen = launch(
        tmp_path,
        "--max-steps",
        "12",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--save-every",
        "5",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # step s's log comes before step s's save: the file holds the lines up to the last save
    assert seen == {s: 5 * ((s - 1) // 5) for s in range(1, 13)}
    assert_one_line_per_step(records, 12)


def test_a_full_buffer_flushes_and_sigkill_loses_only_the_unflushed_rest(tmp_path):
    out, records, seen = launch(
        tmp_path, "--max-steps", "12", script_args=("--flush-records", "5", "--end", "sigkill")
    )
    assert out.returncode == 128 + 9, out.stderr[-3000:]
    assert seen == {s: 5 * (s // 5) for s in range(1, 13)}
    assert [r["step"] for r in records] == list(range(1, 11)), "steps 11 and 12 were in memory"


def test_a_script_that_raises_still_writes_everything_it_logged(tmp_path):
    out, records, _ = launch(tmp_path, "--max-steps", "12", script_args=("--end", "raise"))
    assert out.returncode == 1 and "the script fails after logging" in out.stderr
    assert_one_line_per_step(records, 12)


def test_a_preemption_stop_on_two_ranks_writes_every_line_up_to_the_committed_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    out, records, seen = launch(
        tmp_path,
        "--cpus",
        "2",
        "--max-steps",
        "30",
        "--checkpoint-dir",
        str(ckpt),
        "--save-every",
        "1000",
        script_args=("--signal-at-step", "7", "--step-seconds", "0.12"),
    )
    assert out.returncode == 75, out.stderr[-3000:]
    (step_dir,) = (p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    stopped_at = int(step_dir[len("step-") :])
    # 0.12 s steps: the ranks agree on every step, acting one or two steps after the signal
    # (an all-reduce started at one step is read at the next)
    assert stopped_at in (8, 9) and f"checkpoint at step {stopped_at} committed" in out.stderr
    assert all(lines == 0 for lines in seen.values()), "only the stop flushed"
    assert_one_line_per_step(records, stopped_at, world=2)
