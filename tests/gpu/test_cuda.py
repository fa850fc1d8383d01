"""The CUDA lane (``make test-gpu``): real ``tlaunch`` runs on one and two GPUs.

Every test here is marked ``gpu``: ``make test`` deselects them, ``make test-gpu`` selects
them, and on a machine without CUDA they are skipped with the reason. Each one launches
``scripts/cuda_train.py`` — the e2e reference run (shuffled data, dropout, BatchNorm, Adam,
StepLR) plus one ``RESULT`` line per rank saying where and in what precision it trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.helpers import results, run_tlaunch

SCRIPT = str(Path(__file__).parent / "scripts" / "cuda_train.py")
HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not HAS_CUDA, reason="no CUDA device here; the gpu lane needs one (make test-gpu)"
    ),
]
# Deterministic CUDA kernels: cuBLAS needs a fixed workspace for that.
DETERMINISTIC = {"GPU_TEST_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# 384 samples, batch 16, 3 epochs: 72 optimizer steps on one process, 36 per rank on two.
STEPS = 72


def train(where: Path, *flags: str, out: Path, signal_at: int = -1, **env: str):
    script_args = ("--out", str(out), "--signal-at-batch", str(signal_at))
    flags = (*flags, "--progress", "off")
    return run_tlaunch(SCRIPT, *flags, "--", *script_args, cwd=where, timeout=600, **env)


def rank_rows(proc) -> list[dict[str, str]]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted((r for r in results(proc.stdout) if "rank" in r), key=lambda r: r["rank"])


def committed(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.glob("step-*") if (p / "COMMIT").exists())


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "precision, compute_dtype, scaler",
    [
        ("no", "float32", False),
        ("fp16", "float16", True),
        pytest.param(
            "bf16",
            "bfloat16",
            False,
            marks=pytest.mark.skipif(
                HAS_CUDA and not torch.cuda.is_bf16_supported(), reason="this GPU has no bfloat16"
            ),
        ),
    ],
)
def test_one_gpu_trains_in_its_precision_and_checkpoints(
    tmp_path, precision, compute_dtype, scaler
):
    ckpt = tmp_path / "ckpt"
    flags = ("--gpus", "1", "--precision", precision, "--checkpoint-dir", str(ckpt))
    proc = train(tmp_path, *flags, "--save-every", "24", out=tmp_path / "final.pt")
    (row,) = rank_rows(proc)
    assert (row["device"], row["world"], row["backend"]) == ("cuda:0", "1", "none")
    assert "gpu strategy" in proc.stderr
    # What the Linear layers computed in during training: --precision reached the forward.
    assert (row["linear_dtype"], row["scaler"]) == (compute_dtype, str(scaler))
    steps = committed(ckpt)
    assert [p.name for p in steps] == [f"step-{s:09d}" for s in (24, 48, STEPS)]
    assert all(torch.isfinite(t).all() for t in load(tmp_path / "final.pt").values())
    for step in steps:
        # fp16's loss scale and growth tracker are saved with every checkpoint.
        assert (step / "scaler.pt").is_file() == scaler, step.name
        if scaler:
            state = load(step / "scaler.pt")
            assert state["scale"] > 0 and "_growth_tracker" in state


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_preempted_run_resumes_bitwise_on_cuda(tmp_path, precision):
    flags = ("--gpus", "1", "--precision", precision, "--seed", "5")
    whole = train(tmp_path, *flags, out=tmp_path / "whole.pt", **DETERMINISTIC)
    assert whole.returncode == 0, whole.stderr[-4000:]
    ckpt = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--save-every", "4")
    out = tmp_path / "resumed.pt"
    # SIGTERM to the launcher and the worker after micro-batch 10 (mid-epoch, between saves).
    first = train(tmp_path, *flags, *ckpt, out=out, signal_at=10, **DETERMINISTIC)
    assert first.returncode == 75, first.stderr[-4000:]
    assert not out.exists(), "the interrupted run must not reach the end"
    second = train(tmp_path, *flags, *ckpt, out=out, **DETERMINISTIC)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from step" in second.stderr
    expected, got = load(tmp_path / "whole.pt"), load(out)
    assert expected.keys() == got.keys()
    assert not [k for k in expected if not torch.equal(expected[k], got[k])]


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_one_ddp_job_over_nccl(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = train(
        tmp_path,
        "--gpus",
        "2",
        "--checkpoint-dir",
        str(ckpt),
        "--save-every",
        "12",
        out=tmp_path / "final.pt",
    )
    rows = rank_rows(proc)
    assert [(r["rank"], r["world"], r["backend"]) for r in rows] == [
        ("0", "2", "nccl"),
        ("1", "2", "nccl"),
    ]
    assert [r["device"] for r in rows] == ["cuda:0", "cuda:1"]
    assert rows[0]["digest"] == rows[1]["digest"], "DDP keeps the parameters identical"
    assert committed(ckpt)[-1].name == f"step-{STEPS // 2:09d}"
