"""Per-step cost of the Run API: steady-state steps/s against plain PyTorch and plain Accelerate.

Run: ``.venv/bin/python benchmarks/overhead.py [--reps 3] [--hidden 512] [--glibc-malloc]``

The Run API adds work to every step (``run.batches``/``accumulate``/``backward``/``log``, the
stop checks and, on several processes, an all-reduce of stop/save flags every ~0.1 s of steps:
``tlaunch.agreement``). This measures it
where a step takes milliseconds: an MLP (Adam, shuffled synthetic data) trained by plain
PyTorch (2 processes: torchrun + DDP), plain Accelerate (2 processes: ``python -m
torch.distributed.run``, ``ACCELERATE_USE_CPU=true``) and the Run API under ``tlaunch --cpus N
--progress off``, on 1 and 2 CPU processes. All get ``OMP_NUM_THREADS=1`` (torchrun and tlaunch
set it for 2 processes; spinning OpenMP threads on a shared 2-core machine make a step 5-10x
slower) and fixed glibc malloc thresholds: the adaptive default lets *what a process imported*
decide whether activations come from the heap or from fresh zero-filled mmaps (plain PyTorch
~1000 page faults/step, Accelerate ~270, Run API 0-320: a 10-30% swing unrelated to the loop),
and ``THP_MEM_ALLOC_ENABLE=1``, which tlaunch sets for its workers (``benchmarks/host_memory.py``
measures what that buys): every side gets the same memory, so the ratios are the code's.

Workers skip warm-up steps, time windows of a fixed number of steps and report the 80th
percentile of the windows' steps/s (interference only adds time), plus rank 0's CPU time per
step, which time-slicing by other work does not inflate. Start-up is excluded; the order
rotates across repetitions; ratios are medians of per-repetition (back-to-back) ratios.
Targets: Run API >= 0.98x plain Accelerate, on 1 and on 2 processes; >= 0.99x plain PyTorch
DDP on 2.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

from _proc import FIXED_MALLOC, run_group  # benchmarks/, on sys.path when a script here runs

WARMUP, WINDOWS, WINDOW = 10, 30, 5
BATCH = 64
TARGET = 0.98
#: Run API against plain PyTorch DDP on several processes (what a step adds should be ~free).
DDP_TARGET = 0.99
HERE = os.path.abspath(__file__)


# -- worker side -------------------------------------------------------------------------------
def build(hidden: int, world: int):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    n = BATCH * world * (WARMUP + WINDOWS * WINDOW)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g))
    sizes = [256, hidden, hidden, hidden]
    layers = [
        m for a, b in zip(sizes, sizes[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())
    ]
    model = nn.Sequential(*layers, nn.Linear(hidden, 10))
    return data, model, torch.optim.Adam(model.parameters(), lr=1e-4)


class Clock:
    """Counts optimizer steps; after WARMUP, samples the clocks every WINDOW steps."""

    def __init__(self) -> None:
        self.steps, self.marks = 0, []

    def tick(self) -> None:
        self.steps += 1
        if self.steps >= WARMUP and (self.steps - WARMUP) % WINDOW == 0:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.marks.append((time.perf_counter(), time.process_time(), faults))

    def report(self, rank: int, world: int) -> None:
        # Other work only adds time: the less disturbed windows (80th percentile) estimate the
        # loop's own cost; the fastest window alone is a noisier statistic.
        walls = [m[0] for m in self.marks]
        rates = sorted(WINDOW / (b - a) for a, b in zip(walls, walls[1:], strict=False))
        n, first, last = self.steps - WARMUP, self.marks[0], self.marks[-1]
        if rank == 0:  # RESULT steps/s world page-faults/step cpu-ms/step
            rate = rates[int(0.8 * (len(rates) - 1))]
            cpu, faults = (last[1] - first[1]) * 1000 / n, (last[2] - first[2]) / n
            print(f"RESULT {rate:.3f} {world} {faults:.1f} {cpu:.3f}", flush=True)


def worker_torch(hidden: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler

    world = int(os.environ.get("WORLD_SIZE", "1"))
    data, model, opt = build(hidden, world)
    sampler = None
    if world > 1:
        torch.distributed.init_process_group("gloo")
        sampler = DistributedSampler(data, seed=0)
        model = torch.nn.parallel.DistributedDataParallel(model)
    loader = DataLoader(data, batch_size=BATCH, shuffle=sampler is None, sampler=sampler)
    clock = Clock()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        clock.tick()
    clock.report(int(os.environ.get("RANK", "0")), world)
    if world > 1:
        torch.distributed.destroy_process_group()


def worker_accelerate(hidden: int) -> None:
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    data, model, opt = build(hidden, accelerator.num_processes)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    clock = Clock()
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        clock.tick()
    clock.report(accelerator.process_index, accelerator.num_processes)
    accelerator.end_training()


def worker_run(hidden: int) -> None:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import tlaunch

    run = tlaunch.init(hparams={"hidden": hidden})
    data, model, opt = build(hidden, run.world_size)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    model, opt, loader = run.prepare(model, opt, loader)
    clock = Clock()
    for _epoch in run.epochs(1):
        for x, y in run.batches(loader):
            with run.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                run.backward(loss)
                opt.step()
                opt.zero_grad()
            run.log(loss=loss)
            clock.tick()
    clock.report(run.rank, run.world_size)
    run.finish()


# -- parent side -------------------------------------------------------------------------------
VARIANTS = {"torch": "plain PyTorch", "accelerate": "plain Accelerate", "run": "Run API"}


def measure(variant: str, nproc: int, args: argparse.Namespace, tmp: str) -> list[float]:
    """[steps/s, page faults/step, CPU ms/step] of one run of ``variant`` (rank 0's figures)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLAUNCH_", "ACCELERATE_"))}
    env.update({"OMP_NUM_THREADS": "1", **({} if args.glibc_malloc else FIXED_MALLOC)})
    from tlaunch.strategies.base import HOST_ENV

    env.update(HOST_ENV)  # tlaunch's 2 MB pages for every side: the same memory, other code
    launcher = []
    if variant == "run":
        # No checkpoints: plain PyTorch and Accelerate save none either, and the default
        # folder would make the next repetition resume from the end instead of training.
        launcher = f"-m tlaunch --cpus {nproc} --progress off --run-dir {tmp} --checkpoint-dir none"
        launcher = launcher.split()
    elif nproc > 1:
        launcher = f"-m torch.distributed.run --standalone --nproc-per-node {nproc}".split()
    if variant == "accelerate":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, *launcher, HERE, "--worker", variant, "--hidden", str(args.hidden)]
    proc = run_group(cmd, env, timeout=300)
    found = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found or int(found[0][1]) != nproc:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return [float(found[0][0]), float(found[0][2]), float(found[0][3])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--glibc-malloc", action="store_true", help="keep glibc's adaptive malloc")
    parser.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workers = {"torch": worker_torch, "accelerate": worker_accelerate, "run": worker_run}
        return workers[args.worker](args.hidden)
    names = list(VARIANTS)
    print(
        f"overhead: MLP 256-{args.hidden}x3-10, Adam, batch {BATCH}/process; {WARMUP} warm-up "
        f"steps, then {WINDOWS} windows x {WINDOW} steps; medians of {args.reps} reps; malloc "
        f"{'glibc default' if args.glibc_malloc else 'fixed thresholds'}"
    )
    with tempfile.TemporaryDirectory(prefix="tlaunch-bench-overhead-") as tmp:
        for nproc in (int(n) for n in args.nprocs.split(",")):
            runs: dict[str, list[list[float]]] = {v: [] for v in names}
            for rep in range(args.reps):
                for v in names[rep % 3 :] + names[: rep % 3]:  # rotate who runs first
                    runs[v].append(measure(v, nproc, args, tmp))
            rates = {v: [r[0] for r in rs] for v, rs in runs.items()}
            cpu = {v: [r[2] for r in rs] for v, rs in runs.items()}
            print(f"{nproc} process(es):")
            for v in names:
                med = statistics.median(rates[v])
                reps = " ".join(f"{r:.0f}" for r in rates[v])
                print(
                    f"  {VARIANTS[v]:16s} {med:6.1f} steps/s  {1000 / med:6.2f} ms/step  "
                    f"(reps {reps}; {statistics.median(r[1] for r in runs[v]):.0f} page faults/step; "
                    f"CPU {statistics.median(cpu[v]):.2f} ms/step)"
                )
            for a, b in (("run", "accelerate"), ("run", "torch"), ("accelerate", "torch")):
                # Paired: a rep's variants ran back to back, cancelling load drift between reps.
                pairs = list(zip(rates[a], rates[b], strict=True))
                ratio = statistics.median(x / y for x, y in pairs)
                added = statistics.median(1000 / x - 1000 / y for x, y in pairs)
                # CPU time per step ignores time-slicing by other work (rank 0; waits excluded).
                cpu_ratio = statistics.median(y / x for x, y in zip(cpu[a], cpu[b], strict=True))
                goal = TARGET if b == "accelerate" else DDP_TARGET if nproc > 1 else None
                goal = goal if a == "run" else None
                target = f" (target >= {goal}x)" if goal else ""
                miss = "  MISSED" if goal and ratio < goal else ""
                print(
                    f"{VARIANTS[a]} / {VARIANTS[b]}, {nproc} proc: {ratio:.3f}x{target}{miss}"
                    f"   [{added:+.2f} ms/step; by CPU time/step {cpu_ratio:.3f}x]"
                )


if __name__ == "__main__":
    main()
