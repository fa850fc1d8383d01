"""What one tlaunch launch spends before its first step, stage by stage.

Run: ``.venv/bin/python benchmarks/startup.py [--reps 5]``

A restart after a preemption pays the whole start-up again, so its parts decide goodput as
much as the stop and the restore do. One launch (1 CPU process, a Run API script with a
4M-parameter MLP and Adam, a local checkpoint folder, nothing to restore) is cut at:

- launcher: interpreter and imports (``tlaunch.cli``, ``tlaunch.launcher``), parsing the flags,
  the strategy check, the preflight (storage probe and lease), then the rest up to the
  worker's process start (run directory, worker environment, spawning). The first four are
  timed in a fresh interpreter running the launcher's own functions in turn; the total, from
  the command's start to the worker's process start (``/proc/<pid>/stat``), in the launch.
  With 2 or more processes the launcher also imports torch's elastic agent before it spawns
  anything: timed there too, after the others (so torch's import is not counted twice).
- worker: interpreter start with tlaunch's ``sitecustomize`` (process start to the script's
  first line), ``import torch``, ``tlaunch.init`` (Accelerate's import, the Run, the lease's
  fence, looking for a checkpoint), the user's model and optimizer (torch's optimizers import
  ``torch._dynamo`` on first use), ``run.prepare``, the first optimizer step.

Baselines measured in the same run, interleaved: ``python -c pass`` (the floor any Python
process pays) and ``python -c "import torch"``. Medians of ``--reps`` launches with their
spread; the machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for:
from _proc import compile_tlaunch  # noqa: E402  (benchmarks/, on sys.path when a script here runs)

from tests.e2e.helpers import clean_env  # noqa: E402

TIMEOUT = 600.0
STAGE = re.compile(r"^STARTUP (\S+) (\S+)$", re.MULTILINE)

#: The Run API job; prints epoch seconds at each cut.
JOB = """\
import os, time
def process_start():
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return time.time() - up + ticks / os.sysconf("SC_CLK_TCK")
def mark(name, t=None):
    print(f"STARTUP {name} {time.time() if t is None else t!r}", flush=True)
mark("process", process_start())
mark("main")
import torch
mark("torch")
import tlaunch
run = tlaunch.init()
mark("init")
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
data = torch.utils.data.TensorDataset(torch.randn(64, 1024), torch.randn(64, 1024))
loader = torch.utils.data.DataLoader(data, batch_size=8)
mark("model")
model, opt, loader = run.prepare(model, opt, loader)
mark("prepare")
for _ in run.epochs(1):
    for x, y in run.batches(loader):
        with run.accumulate(model):
            run.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        mark("step")
        break
    break
"""

#: The launcher's stages before any worker, in a fresh interpreter, in the order it runs them.
LAUNCHER = """\
import sys, time
t = [time.perf_counter()]
import tlaunch.cli, tlaunch.launcher
t.append(time.perf_counter())
config = tlaunch.cli.parse_args(sys.argv[1:])
t.append(time.perf_counter())
tlaunch.launcher._check_strategy(config)
t.append(time.perf_counter())
tlaunch.launcher.preflight(config).release()
t.append(time.perf_counter())
import torch.distributed.launcher.api  # what ElasticWorkers imports before spawning
t.append(time.perf_counter())
names = ("imports", "flags", "strategy", "preflight", "(2+ processes: torch's elastic agent)")
print("|".join(f"{n}={b - a!r}" for n, a, b in zip(names, t, t[1:])))
"""

WORKER_STAGES = (
    ("interpreter + sitecustomize", "process", "main"),
    ("import torch", "main", "torch"),
    ("tlaunch.init", "torch", "init"),
    ("model + optimizer (user's)", "init", "model"),
    ("run.prepare", "model", "prepare"),
    ("first step", "prepare", "step"),
)


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, str]:
    began = time.time()
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return began, elapsed, proc.stdout


def one_launch(folder: str, env: dict[str, str]) -> dict[str, float]:
    """Stage durations of one launch, seconds."""
    ckpt = os.path.join(folder, "ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    flags = ["--cpus", "1", "--progress", "off", "--preemption-watch", "off"]
    cmd = [sys.executable, "-m", "tlaunch", *flags, "--checkpoint-dir", ckpt, "job.py"]
    began, total, out = timed(cmd, env, folder)
    at = {name: float(value) for name, value in STAGE.findall(out)}
    stages = {"launcher until the worker's process": at["process"] - began}
    stages.update({name: at[b] - at[a] for name, a, b in WORKER_STAGES})
    stages["command start -> first step"] = at["step"] - began
    stages["whole command (to exit)"] = total
    return stages


def launcher_parts(folder: str, env: dict[str, str]) -> dict[str, float]:
    ckpt = os.path.join(folder, "ckpt-probe")
    flags = ["--cpus", "1", "--checkpoint-dir", ckpt, "job.py"]
    _, _, out = timed([sys.executable, "-c", LAUNCHER, *flags], env, folder)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {f"  {k}": float(v) for k, v in (kv.split("=") for kv in out.strip().split("|"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    compile_tlaunch()
    env = clean_env(OMP_NUM_THREADS="1")
    folder = tempfile.mkdtemp(prefix="tlaunch-bench-startup-")
    with open(os.path.join(folder, "job.py"), "w") as f:
        f.write(JOB)
    baselines = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {}
    load = os.getloadavg()[0]
    try:
        one_launch(folder, env)  # warms the page cache and the bytecode caches
        for _ in range(args.reps):
            for name, cmd in baselines.items():
                times.setdefault(name, []).append(timed(cmd, env, folder)[1])
            for name, seconds in {**launcher_parts(folder, env), **one_launch(folder, env)}.items():
                times.setdefault(name, []).append(seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = (load + os.getloadavg()[0]) / 2
    print(
        f"startup: one launch, 1 CPU process, medians of {args.reps} (min..max); "
        f"load average {load:.1f} on {os.cpu_count()} cores"
    )
    parts = [n for n in times if n.startswith("  ")]
    rest = [n for n in times if n not in baselines and n not in parts]
    for name in [*baselines, rest[0], *parts, *rest[1:]]:
        values = times[name]
        print(
            f"  {name:38s} {statistics.median(values):7.3f} s  "
            f"({min(values):.3f}..{max(values):.3f})"
        )


if __name__ == "__main__":
    main()
