"""Strategies, accumulation, clipping and the debug flags, through real launches."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SCRIPTS, run_tlaunch

pytestmark = pytest.mark.timeout(240)


def probe(tmp_path, *flags: str, script_args: tuple[str, ...] = ()) -> list[dict]:
    for old in tmp_path.glob("probe-rank*.json"):
        old.unlink()
    out = run_tlaunch(
        str(SCRIPTS / "probe.py"), *flags, "--", *script_args, cwd=tmp_path, timeout=200
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return read_probes(tmp_path)


def read_probes(where) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(where.glob("probe-rank*.json"))]


def assert_params_close(a: dict, b: dict) -> None:
    for pa, pb in zip(a["params"], b["params"], strict=True):
        torch.testing.assert_close(torch.tensor(pa), torch.tensor(pb), rtol=1e-5, atol=1e-6)


def test_flags_choose_the_strategy(tmp_path):
    (one,) = probe(tmp_path, "--cpus", "1", script_args=("--epochs", "1"))
    assert (one["strategy"], one["type"]) == ("cpu", "NO")
    two = probe(tmp_path, "--cpus", "2", script_args=("--epochs", "1"))
    assert [(r["strategy"], r["type"], r["world"]) for r in two] == [("ddp", "MULTI_CPU", 2)] * 2


def test_ddp_keeps_parameters_identical_across_ranks(tmp_path):
    r0, r1 = probe(tmp_path, "--cpus", "2")
    assert r0["digest"] == r1["digest"]
    assert r0["steps"] == r1["steps"] == 2 * 20  # 320 samples / 2 ranks / batch 8, 2 epochs
    assert r0["last_loss"] < r0["first_loss"]
    # run.log(reduce=True) averages a tensor over the ranks: (0 + 1) / 2 on both.
    assert r0["rank_value"] == r1["rank_value"] == 0.5


@pytest.mark.parametrize("cpus", ["1", "2"])
def test_k_micro_batches_equal_one_batch_of_k_times_b(tmp_path, cpus):
    # 160 samples per rank = 20 micro-batches of 8: six windows of 3 and a partial window of 2,
    # which must be stepped (not dropped) and averaged over its own 2 micro-batches.
    big = probe(
        tmp_path, "--cpus", cpus, script_args=("--n", str(160 * int(cpus)), "--batch-size", "24")
    )
    acc = probe(
        tmp_path,
        "--cpus",
        cpus,
        "--grad-accum",
        "3",
        script_args=("--n", str(160 * int(cpus)), "--batch-size", "8"),
    )
    assert [r["steps"] for r in big] == [r["steps"] for r in acc] == [14] * int(cpus)
    for a, b in zip(big, acc, strict=True):
        assert_params_close(a, b)
        assert a["seen"] == b["seen"]  # the same samples, in the same order


def test_no_all_reduce_on_non_final_micro_batches(tmp_path):
    rows = probe(
        tmp_path, "--cpus", "2", "--grad-accum", "4", script_args=("--epochs", "1", "--count-comm")
    )
    # 20 micro-batches per rank in windows of 4: 5 optimizer steps, one gradient bucket each.
    assert [r["steps"] for r in rows] == [5, 5]
    assert [r["comm_calls"] for r in rows] == [5, 5]
    assert rows[0]["digest"] == rows[1]["digest"]


@pytest.mark.parametrize(
    "flags, batches, steps",
    [
        (("--limit-train-batches", "3"), [3, 3], 6),
        (("--limit-train-batches", "0.25"), [10, 10], 20),
        (("--max-steps", "7"), [7], 7),
        (("--max-epochs", "1"), [40], 40),
        (("--fast-dev-run", "2"), [2], 2),
        (("--overfit-batches", "2", "--max-epochs", "3"), [2, 2, 2], 6),
    ],
)
def test_debug_flags_bound_the_loop(tmp_path, flags, batches, steps):
    (row,) = probe(
        tmp_path,
        "--cpus",
        "1",
        *flags,
        script_args=("--epochs", "3" if "--overfit-batches" in flags else "2"),
    )
    assert row["batches"] == batches
    assert row["steps"] == steps
    if "--overfit-batches" in flags:
        assert row["seen"][0] == row["seen"][1] == row["seen"][2]  # the same batches every epoch


def test_fast_dev_run_saves_nothing(tmp_path):
    probe(
        tmp_path,
        "--cpus",
        "1",
        "--fast-dev-run",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--save-every",
        "1",
    )
    assert not list((tmp_path / "ckpt").glob("step-*"))


def test_progress_bar_only_on_rank_zero(tmp_path):
    out = run_tlaunch(
        str(SCRIPTS / "probe.py"),
        "--cpus",
        "2",
        "--progress",
        "on",
        "--",
        "--epochs",
        "1",
        cwd=tmp_path,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr
    rows = read_probes(tmp_path)
    assert [r["progress"] for r in rows] == [True, False]
    assert out.stderr.count("epoch 0: 100%") >= 1 and "20/20" in out.stderr
