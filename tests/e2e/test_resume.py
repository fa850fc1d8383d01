"""Exact resume: interrupted-and-resumed runs end bitwise equal to uninterrupted ones."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from helpers import SCRIPTS, run_tlaunch

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(SCRIPTS / "resume_train.py")
# 384 samples, batch 16: 24 micro-batches per epoch on 1 process, 12 per rank on 2.


def launch(where, *flags: str, out: str, signal_at: int = -1, timeout: float = 200):
    # An interrupted run's batches take 0.12 s: the ranks agree on a stop every ~0.1 s of
    # steps, so every step here, and the stop lands before the run's end on any machine.
    pace = {"RESUME_TEST_STEP_DELAY": "0.12"} if signal_at >= 0 else {}
    return run_tlaunch(
        SCRIPT,
        *flags,
        "--progress",
        "off",
        "--",
        "--out",
        out,
        "--signal-at-batch",
        str(signal_at),
        cwd=where,
        timeout=timeout,
        **pace,
    )


@functools.cache
def reference(tmp_root: str, flags: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The uninterrupted run for these flags (computed once per flag set)."""
    out = os.path.join(tmp_root, f"ref-{abs(hash(flags))}.pt")
    result = launch(tmp_root, *flags, out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("references"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different}"


@pytest.mark.parametrize(
    "cpus, precision, accum, signal_at, where",
    [
        ("1", "no", "1", 10, "mid-epoch"),
        ("1", "no", "1", 24, "epoch boundary"),
        ("1", "bf16", "3", 29, "inside an accumulation window"),
        ("2", "no", "1", 7, "mid-epoch"),
        ("2", "no", "1", 12, "epoch boundary"),
        ("2", "bf16", "3", 16, "inside an accumulation window"),
    ],
)
def test_preempted_and_resumed_run_ends_bitwise_equal(
    tmp_path, ref_root, cpus, precision, accum, signal_at, where
):
    flags = ("--cpus", cpus, "--precision", precision, "--grad-accum", accum, "--seed", "5")
    expected = reference(ref_root, flags)
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "final.pt")
    first = launch(
        tmp_path,
        *flags,
        "--checkpoint-dir",
        ckpt,
        "--save-every",
        "4",
        out=out,
        signal_at=signal_at,
    )
    assert first.returncode == 75, first.stderr[-3000:]
    assert not os.path.exists(out), "the interrupted run must not reach the end"
    second = launch(tmp_path, *flags, "--checkpoint-dir", ckpt, "--save-every", "4", out=out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step" in second.stderr
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))


def test_resume_never_starts_fresh_and_explicit_step_resumes_there(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "a.pt")
    flags = ("--cpus", "1", "--checkpoint-dir", ckpt, "--save-every", "5", "--seed", "5")
    assert launch(tmp_path, *flags, out=out).returncode == 0
    never = launch(tmp_path, *flags, "--resume", "never", out=str(tmp_path / "b.pt"))
    assert never.returncode == 2 and "already holds committed checkpoints" in never.stderr
    assert "resuming" not in never.stderr
    fresh_flags = (
        "--cpus",
        "1",
        "--checkpoint-dir",
        str(tmp_path / "new"),
        "--save-every",
        "5",
        "--seed",
        "5",
    )
    fresh = launch(tmp_path, *fresh_flags, "--resume", "never", out=str(tmp_path / "b.pt"))
    assert fresh.returncode == 0 and "resuming" not in fresh.stderr
    assert_bitwise_equal(
        torch.load(out, weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    )
    clash = launch(tmp_path, *flags, "--resume", "10", out=str(tmp_path / "c.pt"))
    assert clash.returncode == 2 and "resume into a new directory" in clash.stderr
    branch = (
        "--cpus",
        "1",
        "--checkpoint-dir",
        str(tmp_path / "branch"),
        "--save-every",
        "5",
        "--seed",
        "5",
    )
    at10 = launch(
        tmp_path, *branch, "--resume", f"{ckpt}/step-000000010", out=str(tmp_path / "c.pt")
    )
    assert at10.returncode == 0, at10.stderr[-2000:]
    assert "resuming from step 10 " in at10.stderr
    assert_bitwise_equal(
        torch.load(out, weights_only=True), torch.load(tmp_path / "c.pt", weights_only=True)
    )
    missing = launch(
        tmp_path, *branch, "--resume", f"{ckpt}/step-000000011", out=str(tmp_path / "d.pt")
    )
    assert missing.returncode != 0 and "step 11" in missing.stderr


def test_changed_batch_size_or_accumulation_is_refused_unless_forced(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    base = ("--cpus", "1", "--checkpoint-dir", ckpt, "--save-every", "5")
    first = launch(tmp_path, *base, out=str(tmp_path / "a.pt"), signal_at=6)
    assert first.returncode == 75
    changed = run_tlaunch(
        SCRIPT,
        *base,
        "--progress",
        "off",
        "--",
        "--out",
        str(tmp_path / "b.pt"),
        "--batch-size",
        "32",
        cwd=tmp_path,
        timeout=200,
    )
    assert changed.returncode == 2
    assert "batch_size: 16 -> 32" in changed.stderr and "--resume-force" in changed.stderr
    accum = launch(tmp_path, *base, "--grad-accum", "2", out=str(tmp_path / "b.pt"))
    assert accum.returncode == 2 and "--grad-accum: 1 -> 2" in accum.stderr
    forced = run_tlaunch(
        SCRIPT,
        *base,
        "--resume-force",
        "--progress",
        "off",
        "--",
        "--out",
        str(tmp_path / "b.pt"),
        "--batch-size",
        "32",
        cwd=tmp_path,
        timeout=200,
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "resuming with changed settings: batch_size: 16 -> 32" in forced.stderr


def test_world_size_change_resumes_with_a_warning(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out = str(tmp_path / "a.pt")
    first = launch(
        tmp_path, "--cpus", "2", "--checkpoint-dir", ckpt, "--save-every", "4", out=out, signal_at=8
    )
    assert first.returncode == 75, first.stderr[-2000:]
    second = launch(tmp_path, "--cpus", "1", "--checkpoint-dir", ckpt, "--save-every", "4", out=out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "saved with 2 processes on 1" in second.stderr
    assert "per-rank random numbers cannot continue exactly" in second.stderr
