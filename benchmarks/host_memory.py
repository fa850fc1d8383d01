"""What tlaunch's host-memory setting buys a CPU training step: torch's tensors on 2 MB pages.

Run: ``.venv/bin/python benchmarks/host_memory.py [--reps 5] [--seconds 8]``

tlaunch starts every worker with ``THP_MEM_ALLOC_ENABLE=1`` unless the environment sets it
(``tlaunch.strategies.base.HOST_ENV``): torch's CPU allocator then advises the kernel to back
each buffer of 2 MB or more with transparent huge pages. This runs the same training steps in
fresh processes with the setting on (tlaunch's default) and off (``THP_MEM_ALLOC_ENABLE=0``,
what a plain ``python``/``torchrun`` start gets on a kernel in THP's ``madvise`` mode),
alternating, ``OMP_NUM_THREADS=1`` for both, on three models:

* ``mlp``: ``benchmarks/goodput.py``'s job, an MLP of 25.2M parameters + Adam (302 MB of
  state), batch 8: a step streams the weights and both moments through memory;
* ``conv``: a small convolutional net, batch 32 of 64x64 images;
* ``small``: an MLP of 0.26M parameters, whose tensors are all below 2 MB (unchanged by it).

Each child times steps for ``--seconds`` after three warm-up steps and prints the median; it
also times one fresh :func:`tlaunch.storage.cpu_snapshot` of its state (a save's first-touch
cost, which 2 MB pages raise) and reports its peak resident memory (``VmHWM``). Printed:
the ratio of the medians of the per-process medians, with the per-pair ratios. The kernel's
THP mode is printed first: under ``never`` the setting can change nothing, under ``always``
the kernel already uses 2 MB pages where it can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("mlp", "conv", "small")


def _thp(name: str) -> str:
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
            return f.read().strip()
    except OSError:
        return "(not available)"


def child(kind: str, seconds: float) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tlaunch.storage import cpu_snapshot

    torch.manual_seed(0)
    if kind == "mlp":
        h = 3072
        model = nn.Sequential(
            nn.Linear(1024, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
            nn.Linear(h, 1024),
        )  # fmt: skip
        x, y = torch.randn(8, 1024), torch.randn(8, 1024)
        loss = lambda: F.mse_loss(model(x), y)  # noqa: E731
    elif kind == "conv":
        model = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        )  # fmt: skip
        x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
        loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    else:
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
        x, y = torch.randn(64, 256), torch.randn(64, 256)
        loss = lambda: F.mse_loss(model(x), y)  # noqa: E731
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    cpu_snapshot({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    snapshot = time.perf_counter() - started
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"step": statistics.median(times), "snapshot": snapshot, "peak": peak}))


def run(kind: str, setting: str, seconds: float) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": setting}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--seconds", str(seconds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="processes per side and model")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed steps per process")
    parser.add_argument("--models", default=",".join(MODELS), help="of: " + ", ".join(MODELS))
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.seconds)
        return 0
    print(
        f"host memory: THP enabled {_thp('enabled')}, defrag {_thp('defrag')}; load "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; medians of {args.reps} processes"
    )
    for kind in args.models.split(","):
        on: list[dict[str, float]] = []
        off: list[dict[str, float]] = []
        for rep in range(args.reps):
            for setting in ("1", "0") if rep % 2 == 0 else ("0", "1"):
                (on if setting == "1" else off).append(run(kind, setting, args.seconds))

        def median(side: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in side)

        ratio = median(off, "step") / median(on, "step")
        pairs = " ".join(f"{b['step'] / a['step']:.2f}" for a, b in zip(on, off, strict=True))
        print(
            f"  {kind:5s} step {median(on, 'step') * 1e3:7.1f} ms with 2 MB pages, "
            f"{median(off, 'step') * 1e3:7.1f} ms without: without / with {ratio:.2f}x (per "
            f"pair {pairs}); first snapshot {median(on, 'snapshot') * 1e3:.0f} ms vs "
            f"{median(off, 'snapshot') * 1e3:.0f} ms; peak RSS {median(on, 'peak') / 1024:.0f} "
            f"vs {median(off, 'peak') / 1024:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
