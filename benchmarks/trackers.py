"""What ``--log-with tensorboard,csv`` and the figures cost a training step.

Run: ``.venv/bin/python benchmarks/trackers.py [--reps 3] [--steps 600]``

One CPU process under plain ``python`` (``tlaunch.init`` with a local checkpoint folder, so the
run-wide ``metrics.jsonl`` and the figures are written in every variant) trains a small MLP and
calls ``run.log(loss=loss, tokens=n)`` every step: the case where per-step logging costs the
most relative to the step. Variants: no tracker, and TensorBoard + CSV. Each worker skips its
warm-up steps and reports steady-state steps/s; the variants alternate within a repetition and
the ratio is the median of per-repetition ratios. Target: trackers >= 0.95x no tracker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP = 50
TARGET = 0.95
HERE = os.path.abspath(__file__)


def worker(log_with: str, steps: int, folder: str) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import tlaunch

    torch.manual_seed(0)
    n = 32 * (steps + WARMUP)
    data = TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    flags = {"log_with": log_with} if log_with != "none" else {}
    run = tlaunch.init(checkpoint_dir=folder, progress="off", **flags)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=32)
    model, optimizer, loader = run.prepare(model, optimizer, loader)
    started = None
    for _ in run.epochs(1):
        for x, y in run.batches(loader):
            with run.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                run.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            run.log(loss=loss, tokens=32 * 64)
            if run.step == WARMUP:
                started = time.perf_counter()
    elapsed = time.perf_counter() - started
    run.finish()
    print(f"RATE {steps / elapsed:.2f}", flush=True)


def measure(log_with: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TLAUNCH_")}
        env["OMP_NUM_THREADS"] = "1"
        out = subprocess.run(
            [sys.executable, HERE, "--worker", log_with, "--steps", str(steps), "--folder", folder],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if out.returncode != 0:
            raise SystemExit(f"worker failed ({log_with}): {out.stderr[-2000:]}")
        (line,) = [x for x in out.stdout.splitlines() if x.startswith("RATE ")]
        return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--worker")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.folder)
        return
    ratios, rates = [], {"none": [], "tensorboard,csv": []}
    for rep in range(args.reps):
        order = ["none", "tensorboard,csv"][:: 1 if rep % 2 == 0 else -1]
        got = {v: measure(v, args.steps) for v in order}
        for v, r in got.items():
            rates[v].append(r)
        ratios.append(got["tensorboard,csv"] / got["none"])
    none, tracked = statistics.median(rates["none"]), statistics.median(rates["tensorboard,csv"])
    ratio = statistics.median(ratios)
    print(f"trackers: no tracker {none:.0f} steps/s, tensorboard+csv {tracked:.0f} steps/s")
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    print(f"trackers: ratio {ratio:.3f} (target >= {TARGET}) {verdict}")


if __name__ == "__main__":
    main()
