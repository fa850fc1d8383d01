"""Preemption: from SIGTERM to the launcher's exit 75, for a ~500 MB state, and steps lost.

Run: ``.venv/bin/python benchmarks/preemption.py [--reps 3] [--hidden 4096]``

A spot VM or Colab gives about 30 s between the notice and the hard kill. Everything tlaunch
does on a stop -- all ranks agree on a step, one committed checkpoint is written (snapshot,
serialize, checksum, fsync, COMMIT), the launcher exits 75 -- has to fit in that window, and
the checkpoint must be at the step the signal arrived at, or later (the step in flight may
complete first). This trains an MLP of ~42M parameters with Adam (~500 MB of weights and
moments; ``--hidden`` scales it) under ``tlaunch --cpus N --checkpoint-dir D`` with no periodic
saves, waits until training is in steady state, reads the step the script last recorded (it
writes ``run.step`` to a file after every step), sends SIGTERM to the launcher process and
measures until the launcher exits. Then it reads ``state.json`` of the newest ``step-*/``
that has a ``COMMIT``.

Printed, for ``--cpus 1`` and ``--cpus 2`` (medians of the repetitions; steps lost: worst):
stop time ``t`` and ``margin: 30 - t``; its two parts, signal -> COMMIT (target: within one step
plus 1.5x a plain save) and COMMIT -> launcher exit (target: under 0.2 s); ``t`` against a plain
synchronous ``torch.save`` + fsync of the same state measured in this run; exit code (target
75); steps lost (target 0).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

NOTICE = 30.0
EXIT_PREEMPTED = 75
BATCH = 8
HERE = os.path.abspath(__file__)


def build(hidden: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    sizes = [1024, hidden, hidden, hidden]
    layers = [
        m for a, b in zip(sizes, sizes[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())
    ]
    model = nn.Sequential(*layers, nn.Linear(hidden, 1024))
    return model, torch.optim.Adam(model.parameters(), lr=1e-5)


def worker(hidden: int, step_file: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import tlaunch

    run = tlaunch.init(hparams={"hidden": hidden})
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(BATCH * 256, 1024, generator=g), torch.randn(BATCH * 256, 1024, generator=g)
    )
    model, opt = build(hidden)
    model, opt, loader = run.prepare(model, opt, DataLoader(data, batch_size=BATCH, shuffle=True))
    for _epoch in run.epochs(1000):
        for x, y in run.batches(loader):
            with run.accumulate(model):
                run.backward(F.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
            if run.is_main:
                with open(step_file + ".tmp", "w") as f:
                    f.write(str(run.step))
                os.replace(step_file + ".tmp", step_file)
    run.finish()


def plain_save_seconds(hidden: int, path: str) -> float:
    """A synchronous torch.save + fsync of the same model + Adam state: the floor of a save."""
    import torch

    model, opt = build(hidden)
    model(torch.randn(BATCH, 1024)).square().mean().backward()
    opt.step()
    started = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


def committed(ckpt: str) -> tuple[int | None, float]:
    """(step, COMMIT's mtime) of the newest step-*/ that has a COMMIT."""
    steps = sorted(glob.glob(os.path.join(ckpt, "step-*", "COMMIT")))
    if not steps:
        return None, float("nan")
    with open(os.path.join(os.path.dirname(steps[-1]), "state.json")) as f:
        return int(json.load(f)["step"]), os.stat(steps[-1]).st_mtime


def read_step(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def preempt_once(nproc: int, hidden: int, tmp: str, warm_steps: int) -> dict:
    ckpt, step_file = os.path.join(tmp, "ckpt"), os.path.join(tmp, "step")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLAUNCH_", "ACCELERATE_"))}
    flags = f"--cpus {nproc} --progress off --preemption-watch off --checkpoint-dir".split()
    cmd = [sys.executable, "-m", "tlaunch", *flags, ckpt, "--run-dir", os.path.join(tmp, "runs")]
    cmd += [HERE, "--worker", "--hidden", str(hidden), "--step-file", step_file]
    log = open(os.path.join(tmp, "launcher.log"), "w")
    # Its own process group: a hung run is killed with its workers, not only the launcher.
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    seen = [(0, 0.0)]  # (step, time first seen): the last two give the length of a step
    while seen[-1][0] < warm_steps:
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"the training run ended early ({proc.poll()}): see {log.name}")
        step = read_step(step_file)
        if step != seen[-1][0]:
            seen.append((step, time.time()))
        time.sleep(0.005)
    at_signal = read_step(step_file)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"the run did not stop within 300 s of SIGTERM: see {log.name}") from None
    elapsed = time.time() - signalled
    log.close()
    step, commit_time = committed(ckpt)
    return {
        "t": elapsed,
        "code": code,
        "at": at_signal,
        "committed": step,
        "lost": at_signal if step is None else max(0, at_signal - step),
        "to_commit": commit_time - signalled,
        "step_s": seen[-1][1] - seen[-2][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--warm-steps", type=int, default=3, help="steps before the signal")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.hidden, args.step_file)

    nprocs = [int(n) for n in args.nprocs.split(",")]
    results: dict[int, list[dict]] = {n: [] for n in nprocs}
    saves: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tlaunch-bench-preempt-") as root:
        for rep in range(args.reps):
            saves.append(plain_save_seconds(args.hidden, os.path.join(root, "plain.pt")))
            for n in nprocs if rep % 2 == 0 else nprocs[::-1]:
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    results[n].append(preempt_once(n, args.hidden, tmp, args.warm_steps))
    params = 2 * 1024 * args.hidden + 2 * args.hidden * args.hidden
    save = statistics.median(saves)
    print(
        f"preemption: MLP {params / 1e6:.1f}M params + Adam = {params * 12 / 1e6:.0f} MB state; "
        f"medians of {args.reps} reps; plain torch.save+fsync of it: {save:.2f} s"
    )
    for n, rows in results.items():
        t = statistics.median(r["t"] for r in rows)
        codes = sorted({r["code"] for r in rows})
        lost = max(r["lost"] for r in rows)
        to_commit = statistics.median(r["to_commit"] for r in rows)
        step_s = statistics.median(r["step_s"] for r in rows)
        pairs = ", ".join(f"{r['at']}->{r['committed']}" for r in rows)
        reps = " ".join(f"{r['t']:.2f}" for r in rows)
        commit_budget = step_s + 1.5 * save
        after = t - to_commit
        lines = [
            f"SIGTERM -> launcher exit: {t:.2f} s (reps {reps})",
            f"  of which signal -> COMMIT on disk {to_commit:.2f} s (target <= one step "
            f"{step_s:.2f} s + 1.5x the plain save = {commit_budget:.2f} s)"
            f"{miss(to_commit > commit_budget)}",
            f"  and COMMIT -> launcher exit {after:.2f} s (target < 0.2 s){miss(after >= 0.2)}",
            f"margin: 30 - t = {NOTICE - t:.1f} s (target > 0){miss(t >= NOTICE)}",
            f"stop time / plain torch.save+fsync: {t / save:.2f}x",
            f"exit codes {codes} (target [75]){miss(codes != [EXIT_PREEMPTED])}",
            f"steps lost: {lost} (target 0; step at signal -> committed: {pairs}){miss(lost > 0)}",
        ]
        for line in lines:
            print(f"--cpus {n}: {line}")


def miss(missed: bool) -> str:
    return "  MISSED" if missed else ""


if __name__ == "__main__":
    main()
