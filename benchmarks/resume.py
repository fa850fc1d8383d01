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
  after ``accelerator.load_state``.

Each script prints ``time.time()`` at its stages (started, torch+accelerate imported, init,
state loaded, first step); the parent subtracts the time it recorded just before starting the
process. Both read the state from the page cache (the setup runs just wrote it). Target:
tlaunch <= 1.0x plain Accelerate (median of the per-repetition, back-to-back ratios), with
every file's sha256 checked against MANIFEST, which Accelerate does not do.
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

from _proc import run_group  # benchmarks/, on sys.path when a script here runs

T0 = time.time()  # before any heavy import: the script's own process start, near enough
TARGET = 1.0
BATCH = 16
HERE = os.path.abspath(__file__)


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


def worker_run(hidden: int, setup: bool) -> None:
    mark("started", T0)
    import accelerate  # noqa: F401  (tlaunch.init imports it anyway; here "imported" means the same for both)
    import torch.nn.functional as F

    import tlaunch

    mark("imported")
    run = tlaunch.init(hparams={"hidden": hidden})
    mark("init")
    if not setup and run.step == 0:
        raise SystemExit("resume benchmark: tlaunch found no checkpoint to resume from")
    model, opt, loader = build(hidden)
    model, opt, loader = run.prepare(model, opt, loader)
    mark("loaded")
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
    model, opt, loader = accelerator.prepare(*build(hidden))
    mark("init")
    if not setup:
        accelerator.load_state(state_dir)
    mark("loaded")
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
    started = time.time()
    proc = run_group(cmd, env, timeout=600)
    marks = {m[0]: float(m[1]) - started for m in re.findall(r"MARK (\w+) ([\d.]+)", proc.stdout)}
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--worker", choices=("run", "accelerate"), help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "run":
        return worker_run(args.hidden, args.setup)
    if args.worker == "accelerate":
        return worker_accelerate(args.hidden, args.state_dir, args.setup)

    with tempfile.TemporaryDirectory(prefix="tlaunch-bench-resume-") as tmp:
        ckpt, acc_state = os.path.join(tmp, "ckpt"), os.path.join(tmp, "acc-state")
        me = [HERE, "--hidden", str(args.hidden)]
        tl = [sys.executable, "-m", "tlaunch", "--cpus", "1", "--progress", "off"]
        tl += ["--checkpoint-dir", ckpt, "--run-dir", os.path.join(tmp, "runs")]
        cmds = {
            "tlaunch": [*tl, *me, "--worker", "run"],
            "accelerate": [sys.executable, *me, "--worker", "accelerate", "--state-dir", acc_state],
        }
        start([*tl, "--max-steps", "3", *me, "--worker", "run", "--setup"])
        start([*cmds["accelerate"], "--setup"])
        size = {
            "tlaunch": sum(os.path.getsize(f) for f in glob.glob(f"{ckpt}/step-*/*")),
            "accelerate": sum(os.path.getsize(f) for f in glob.glob(f"{acc_state}/*")),
        }
        times: dict[str, list[dict[str, float]]] = {"tlaunch": [], "accelerate": []}
        for rep in range(args.reps):
            for name in ("tlaunch", "accelerate") if rep % 2 == 0 else ("accelerate", "tlaunch"):
                times[name].append(start(cmds[name]))

    print(f"resume: MLP hidden {args.hidden}, Adam; medians of {args.reps} reps, alternating")
    for name in times:
        print(f"  {name:10s} state on disk {size[name] / 1e6:6.1f} MB")
    stages = ("started", "imported", "init", "loaded", "first_step")
    print("  seconds from process start:  " + "  ".join(f"{s:>10s}" for s in stages))
    med = {
        n: {s: statistics.median(r[s] for r in rows) for s in stages} for n, rows in times.items()
    }
    for name in times:
        print(f"  {name:28s} " + "  ".join(f"{med[name][s]:10.2f}" for s in stages))
    first = {n: [r["first_step"] for r in rows] for n, rows in times.items()}
    # Paired: a rep's two runs were back to back, which cancels load drift between reps.
    ratio = statistics.median(a / b for a, b in zip(*first.values(), strict=True))
    for name, values in first.items():
        print(f"  {name:10s} start -> first step, reps: {' '.join(f'{t:.2f}' for t in values)}")
    print(
        f"tlaunch resume / accelerate load_state, start to first step: {ratio:.2f}x "
        f"(target <= {TARGET}x){'' if ratio <= TARGET else '  MISSED'}"
    )
    # tlaunch loads in tlaunch.init and applies in run.prepare; Accelerate loads after prepare:
    # imported -> loaded covers build + prepare + load for both.
    load = {n: med[n]["loaded"] - med[n]["imported"] for n in med}
    print(
        f"tlaunch / accelerate, imported -> state loaded: {load['tlaunch'] / load['accelerate']:.2f}x "
        f"({load['tlaunch']:.2f} s vs {load['accelerate']:.2f} s)"
    )


if __name__ == "__main__":
    main()
