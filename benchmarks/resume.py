"""Time to the first resumed training step: ``tlaunch`` + Run API against ``accelerator.load_state``.

Run: ``.venv/bin/python benchmarks/resume.py [--reps 7] [--hidden 2048]``

After a preemption the product's promise is "run the same command again"; what that costs
before training continues is start-up + finding, verifying and loading the checkpoint. This
builds a ~150 MB state (an MLP of ~12.6M parameters + Adam's two moments; ``--hidden``
scales it), once as a committed tlaunch checkpoint (a short ``tlaunch --max-steps`` run with
``--checkpoint-dir``) and once with ``accelerator.save_state``, then times, alternating:

* ``tlaunch --cpus 1 --checkpoint-dir D script.py``: launcher start to the end of the first
  resumed optimizer step (``tlaunch.init`` finds and loads the checkpoint, ``run.prepare``
  applies it);
* ``python script.py``: a plain Accelerate script, process start to the end of its first step
  after ``accelerator.load_state``: the baseline the target is judged against (no launcher
  process at all);
* ``accelerate launch --cpu script.py``: the same script as an Accelerate user restarts it (and
  as ``benchmarks/goodput.py``'s Accelerate setup runs it), for context: its launcher imports
  torch and Accelerate before it starts the script.

Every side gets ``THP_MEM_ALLOC_ENABLE=1``, as tlaunch's workers do.
Each script prints ``time.time()`` at its stages (started, torch+accelerate imported, init,
model and optimizer built, state loaded, first step); the parent subtracts the time it recorded
just before starting the process. Both read the state from the page cache (the setup runs just
wrote it). Target: tlaunch <= 1.0x plain Accelerate (median of the per-repetition, back-to-back
ratios, with their range), with every file's sha256 checked against MANIFEST, which Accelerate
does not do.

The split, medians in seconds: ``start`` (the launcher, for tlaunch, until the worker's
interpreter runs the script), ``imports`` (torch, accelerate, tlaunch), ``init``
(``tlaunch.init``: the Accelerator and the checkpoint found, read, verified and parsed; for
Accelerate, ``Accelerator()``), ``build`` (the script's model and optimizer), ``prepare``
(``run.prepare`` applying the loaded state; ``prepare`` + ``load_state`` for Accelerate) and
``step``. ``restore`` is the restore's own time within them (tlaunch: what it records as its
restore; Accelerate: ``load_state``). ``--without-prefetch`` adds a third row: tlaunch with the
checkpoint read left to the restore (the read that starts in the worker's ``sitecustomize``
and at the top of ``tlaunch.init`` dropped), to measure what overlapping it buys.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from _proc import compile_tlaunch, run_group  # benchmarks/, on sys.path when a script here runs

T0 = time.time()  # before any heavy import: the script's own process start, near enough
TARGET = 1.0
BATCH = 16
HERE = os.path.abspath(__file__)
#: ``accelerate launch`` for one CPU process, every choice given (it asks for no config file).
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--cpu"]
ACCELERATE_LAUNCH += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
ACCELERATE_LAUNCH += ["--dynamo_backend", "no"]


def mark(stage: str, at: float | None = None) -> None:
    print(f"MARK {stage} {at or time.time():.6f}", flush=True)


def build(hidden: int):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(BATCH * 64, 1024, generator=g), torch.randn(BATCH * 64, 1024, generator=g)
    )
    sizes = [1024, hidden, hidden, hidden]
    layers = [
        m for a, b in zip(sizes, sizes[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())
    ]
    model = nn.Sequential(*layers, nn.Linear(hidden, 1024))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, opt, DataLoader(data, batch_size=BATCH, shuffle=True)


def worker_run(hidden: int, setup: bool, prefetch: bool = True) -> None:
    mark("started", T0)
    import accelerate  # noqa: F401  (tlaunch.init imports it anyway; here "imported" means the same for both)
    import torch.nn.functional as F

    import tlaunch

    mark("imported")
    if not prefetch:  # the ablation: the restore reads everything itself
        import tlaunch.prefetch as ahead

        ahead.discard()
        ahead.maybe_start = lambda overrides: False
    run = tlaunch.init(hparams={"hidden": hidden})
    mark("init")
    if not setup and run.step == 0:
        raise SystemExit("resume benchmark: tlaunch found no checkpoint to resume from")
    model, opt, loader = build(hidden)
    mark("built")
    model, opt, loader = run.prepare(model, opt, loader)
    mark("loaded")
    print(f"RESTORE {run._restore_s:.6f}", flush=True)
    for _epoch in run.epochs(1000):
        for x, y in run.batches(loader):
            with run.accumulate(model):
                run.backward(F.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
            if not setup:
                mark("first_step")
                os._exit(0)  # leave the checkpoint dir exactly as it was for the next repetition
    run.finish()


def worker_accelerate(hidden: int, state_dir: str, setup: bool) -> None:
    mark("started", T0)
    import torch.nn.functional as F
    from accelerate import Accelerator

    mark("imported")
    accelerator = Accelerator(cpu=True)
    mark("init")
    objects = build(hidden)
    mark("built")
    model, opt, loader = accelerator.prepare(*objects)
    restoring = time.time()
    if not setup:
        accelerator.load_state(state_dir)
    mark("loaded")
    print(f"RESTORE {time.time() - restoring:.6f}", flush=True)
    for i, (x, y) in enumerate(loader):
        accelerator.backward(F.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
        if not setup:
            mark("first_step")
            os._exit(0)
        if i == 2:
            break
    accelerator.save_state(state_dir)


def start(cmd: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLAUNCH_", "ACCELERATE_"))}
    env["ACCELERATE_USE_CPU"] = "true"
    from tlaunch.strategies.base import HOST_ENV  # here: the workers run this file too

    env.update(HOST_ENV)  # tlaunch's 2 MB pages for every side (benchmarks/host_memory.py)
    started = time.time()
    proc = run_group(cmd, env, timeout=600)
    marks = {m[0]: float(m[1]) - started for m in re.findall(r"MARK (\w+) ([\d.]+)", proc.stdout)}
    restore = re.search(r"RESTORE ([\d.]+)", proc.stdout)
    marks["restore"] = float(restore.group(1)) if restore else float("nan")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument(
        "--without-prefetch",
        action="store_true",
        help="also time tlaunch with the checkpoint read left to the restore",
    )
    parser.add_argument(
        "--worker", choices=("run", "run-no-prefetch", "accelerate"), help=argparse.SUPPRESS
    )
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker in ("run", "run-no-prefetch"):
        return worker_run(args.hidden, args.setup, prefetch=args.worker == "run")
    if args.worker == "accelerate":
        return worker_accelerate(args.hidden, args.state_dir, args.setup)
    compile_tlaunch()

    with tempfile.TemporaryDirectory(prefix="tlaunch-bench-resume-") as tmp:
        ckpt, acc_state = os.path.join(tmp, "ckpt"), os.path.join(tmp, "acc-state")
        me = [HERE, "--hidden", str(args.hidden)]
        tl = [sys.executable, "-m", "tlaunch", "--cpus", "1", "--progress", "off"]
        tl += ["--checkpoint-dir", ckpt, "--run-dir", os.path.join(tmp, "runs")]
        cmds = {
            "tlaunch": [*tl, *me, "--worker", "run"],
            "accelerate": [sys.executable, *me, "--worker", "accelerate", "--state-dir", acc_state],
            "acc. launch": [
                *ACCELERATE_LAUNCH,
                *me,
                "--worker",
                "accelerate",
                "--state-dir",
                acc_state,
            ],
        }
        if args.without_prefetch:
            cmds["no prefetch"] = [*tl, *me, "--worker", "run-no-prefetch"]
        start([*tl, "--max-steps", "3", *me, "--worker", "run", "--setup"])
        start([*cmds["accelerate"], "--setup"])
        size = {
            "tlaunch": sum(os.path.getsize(f) for f in glob.glob(f"{ckpt}/step-*/*")),
            "accelerate": sum(os.path.getsize(f) for f in glob.glob(f"{acc_state}/*")),
        }
        times: dict[str, list[dict[str, float]]] = {name: [] for name in cmds}
        for rep in range(args.reps):
            order = list(cmds) if rep % 2 == 0 else list(reversed(cmds))
            for name in order:
                times[name].append(start(cmds[name]))
    report(args, times, size)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (reps {min(values):.2f}-{max(values):.2f})"


def report(
    args: argparse.Namespace, times: dict[str, list[dict[str, float]]], size: dict[str, int]
) -> None:
    print(f"resume: MLP hidden {args.hidden}, Adam; medians of {args.reps} reps, alternating")
    for name in size:
        print(f"  {name:10s} state on disk {size[name] / 1e6:6.1f} MB")
    marks = ("started", "imported", "init", "built", "loaded", "first_step")
    parts = ("start", "imports", "init", "build", "prepare", "step")
    print("  seconds, medians:      " + "".join(f"{p:>9s}" for p in (*parts, "restore", "total")))
    for name, rows in times.items():
        durations = [
            [r[b] - (r[a] if a else 0.0) for a, b in zip((None, *marks), marks, strict=False)]
            for r in rows
        ]
        cells = [statistics.median(d[i] for d in durations) for i in range(len(parts))]
        cells += [statistics.median(r["restore"] for r in rows)]
        cells += [statistics.median(r["first_step"] for r in rows)]
        print(f"  {name:22s} " + "".join(f"{c:9.2f}" for c in cells))
    for name, rows in times.items():
        reps = " ".join(f"{r['first_step']:.2f}" for r in rows)
        print(f"  {name:12s} start -> first step, reps: {reps}")
    # Paired: a rep's runs were back to back, which cancels load drift between reps.
    ratios = {
        name: [
            a["first_step"] / b["first_step"]
            for a, b in zip(rows, times["accelerate"], strict=True)
        ]
        for name, rows in times.items()
        if name not in ("accelerate", "acc. launch")
    }
    ratio = statistics.median(ratios["tlaunch"])
    print(
        f"tlaunch resume / accelerate load_state, start to first step: "
        f"{spread(ratios['tlaunch'])} (target <= {TARGET}x){'' if ratio <= TARGET else '  MISSED'}"
    )
    if "no prefetch" in ratios:
        print(f"  without the prefetch: {spread(ratios['no prefetch'])}")
    versus_launch = [
        a["first_step"] / b["first_step"]
        for a, b in zip(times["tlaunch"], times["acc. launch"], strict=True)
    ]
    print(
        "  for context, tlaunch / `accelerate launch` of the same script: " + spread(versus_launch)
    )
    # tlaunch loads in tlaunch.init and applies in run.prepare; Accelerate loads after prepare:
    # imported -> loaded covers init + build + prepare + load for both.
    load = {n: [r["loaded"] - r["imported"] for r in rows] for n, rows in times.items()}
    tl, acc = statistics.median(load["tlaunch"]), statistics.median(load["accelerate"])
    print(
        f"tlaunch / accelerate, imported -> state loaded: {tl / acc:.2f}x "
        f"({tl:.2f} s vs {acc:.2f} s)"
    )


if __name__ == "__main__":
    main()
