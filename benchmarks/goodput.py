"""Goodput under preemption: tlaunch against an Accelerate script, under the same stops.

Run: ``.venv/bin/python benchmarks/goodput.py [--quick] [--every 60] [--nprocs 1,2]
[--hidden 3072] [--train-seconds 300] [--kill-share 0.25] [--seed 0] [--baselines 3]``

Goodput is the share of wall time that ends up as training progress that was kept. One small
real training job (an MLP 1024-H-H-H-1024 with Adam, ~12 x its parameters in bytes of state:
``--hidden 3072`` is 25M parameters, ~300 MB; a fixed number of optimizer steps over one
epoch of synthetic data, batch 8 a process: as many as ``--train-seconds`` of training at the
step time measured first, so that the job spans the same number of stops on a loaded machine
as on a quiet one) runs three ways:

(a) ``tlaunch`` with the Run API, ``--save-every K``, the Run's own stop on SIGTERM;
(b) the same job as an Accelerate script: ``accelerator.save_state`` every K steps (into a
    temporary folder renamed into place, the newest two kept), and on start ``load_state`` of
    the newest folder plus ``skip_first_batches``; under ``accelerate launch --cpu`` (1
    process) or ``torch.distributed.run`` with ``ACCELERATE_USE_CPU=true`` (2 processes:
    ``accelerate launch --cpu`` starts only one). It has no SIGTERM handler, as such scripts
    rarely do: a stop kills it and it loses the steps since its last save;
(c) the job uninterrupted and without saves (the Accelerate script): its training time, first
    step to last, is the work every way has to do. It runs ``--baselines`` times, before,
    between and after the two ways (3: c a c b c; 2: c a b c), and the median is used: a
    load that changes during the run moves (c) as it moves the ways, so the ratio stays
    meaningful; the spread of the (c)s is printed with them.

The schedule is drawn once from ``--seed``: a stop every T seconds (``--every``) of the way's
wall time, each moved by up to +-20% at random, and for a share of them (``--kill-share``:
every 1/share-th stop from a seeded offset, so a job that spans that many stops meets one)
SIGKILL to every process with no notice; the others SIGTERM to every process (as a VM's
shutdown sends it) followed by SIGKILL 30 s later if anything is still running (GCE spot's
notice window). After each stop the same command starts again at once, as on a new VM.
Every way runs with ``OMP_NUM_THREADS=1`` and with the 2 MB pages tlaunch gives its workers
(``THP_MEM_ALLOC_ENABLE=1``: a step of this job is ~1.4x faster with them, see
``benchmarks/host_memory.py``), so that the ways differ in what stops cost, not in step speed.

K is chosen as a user would, by Young's rule: a save interval of sqrt(2 C T) seconds for a
save that costs C seconds and a failure every T seconds, with C measured first by timing
``accelerator.save_state`` of this state (the calibration line says C, the step time and K).
Both (a) and (b) save every K steps.

Printed per way: goodput = (c)'s training time / the way's total wall time, launches and
restarts, steps recomputed (steps a launch trained past the step the next launch resumed
from), and the wall time split into parts that add up to it: start-up (the command's start
to its first step, or to the stop if that came first: the launcher, the interpreters,
imports, rendezvous, less restore), restore (loading the checkpoint, as the job measures it:
``load_state`` for (b); for (a) what the run records in ``goodput.jsonl``), saves (time
training waited for periodic saves), stop (signal to exit), recomputed steps (at (c)'s mean
step time), end (the last launch's last step to its exit: the final save and teardown) and
kept (the rest: training that was kept; ``kept = 1.0x (c)`` when the split is right and the
per-step cost matches (c)'s). For (a) also the goodput the run itself reported in its
launcher's last line. Target: (a) >= 0.95 at
``--every 60`` on 1 process, and above (b) at every T.

``--quick``: 1 process, a ~50 MB state, ~20 s of training, a stop every 15 s, (c) twice:
under three minutes on a quiet machine. A start-up longer than T (a loaded machine) leaves no
time to train between stops: the line then says the way did not finish.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for:
from _proc import compile_tlaunch  # benchmarks/, on sys.path when a script here runs

from tests.e2e.helpers import clean_env, processes_mentioning  # noqa: E402
from tlaunch.strategies.base import HOST_ENV  # noqa: E402

HERE = os.path.abspath(__file__)
BATCH = 8
NOTICE = 30.0
TARGET = 0.95
MARK = re.compile(r"^GP (\w+) (.*)$", re.MULTILINE)


# -- the job (worker side) ---------------------------------------------------------------------
def build(hidden: int, steps: int, world: int):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    sizes = [1024, hidden, hidden, hidden]
    layers = [
        m for a, b in zip(sizes, sizes[1:], strict=False) for m in (nn.Linear(a, b), nn.ReLU())
    ]
    model = nn.Sequential(*layers, nn.Linear(hidden, 1024))
    g = torch.Generator().manual_seed(1)
    n = steps * BATCH * world
    data = TensorDataset(torch.randn(n, 1024, generator=g), torch.randn(n, 1024, generator=g))
    return model, torch.optim.Adam(model.parameters(), lr=1e-5), data


def mark(kind: str, *values: object) -> None:
    print(f"GP {kind} {' '.join(str(v) for v in values)}", flush=True)


def worker_tlaunch(args: argparse.Namespace) -> None:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import tlaunch

    run = tlaunch.init(hparams={"hidden": args.hidden, "steps": args.steps})
    model, opt, data = build(args.hidden, args.steps, run.world_size)
    loader = DataLoader(data, batch_size=BATCH)
    model, opt, loader = run.prepare(model, opt, loader)
    if run.is_main:
        mark("ready", time.time(), run.step, -1)
    for _epoch in run.epochs(1):
        for x, y in run.batches(loader):
            with run.accumulate(model):
                run.backward(F.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()
            if run.is_main:
                mark("step", run.step, time.time())
    run.finish()


def worker_accelerate(args: argparse.Namespace) -> None:
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    model, opt, data = build(args.hidden, args.steps, accelerator.num_processes)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=BATCH))
    main = accelerator.is_main_process
    ckpt, step, restore = args.ckpt, 0, 0.0
    saved = sorted(int(n[5:]) for n in os.listdir(ckpt) if n.startswith("step-")) if ckpt else []
    if saved:
        started = time.perf_counter()
        accelerator.load_state(os.path.join(ckpt, f"step-{saved[-1]}"))
        step, restore = saved[-1], time.perf_counter() - started
    batches = accelerator.skip_first_batches(loader, step) if step else loader
    if main:
        mark("ready", time.time(), step, restore)
    began = time.time()
    for x, y in batches:
        loss = F.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        step += 1
        if main:
            mark("step", step, time.time())
        if args.every_k and step % args.every_k == 0 and step < args.steps:
            started = time.perf_counter()
            save_accelerate(accelerator, ckpt, step)
            if main:
                mark("save", step, time.perf_counter() - started)
    if main:
        mark("done", began, time.time(), step)
    accelerator.end_training()


def save_accelerate(accelerator, ckpt: str, step: int) -> None:
    """``save_state`` into a temporary folder renamed into place (a kill mid-save leaves the
    previous one whole), then the older ones but the newest two removed."""
    tmp = os.path.join(ckpt, "tmp")
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, os.path.join(ckpt, f"step-{step}"))
        steps = sorted(int(n[5:]) for n in os.listdir(ckpt) if n.startswith("step-"))
        for old in steps[:-2]:
            shutil.rmtree(os.path.join(ckpt, f"step-{old}"), ignore_errors=True)
    accelerator.wait_for_everyone()


def worker_calibrate(args: argparse.Namespace) -> None:
    """Step time, and the seconds ``save_state`` of this state takes (median of 3)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    model, opt, data = build(args.hidden, 15, accelerator.num_processes)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=BATCH))
    times = []
    for x, y in loader:
        times.append(time.perf_counter())
        accelerator.backward(F.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
    steps = [b - a for a, b in zip(times[3:], times[4:], strict=False)]
    saves = []
    for _ in range(3):
        started = time.perf_counter()
        accelerator.save_state(os.path.join(args.ckpt, "calibration"))
        saves.append(time.perf_counter() - started)
    if accelerator.is_main_process:
        mark("calibration", statistics.median(steps), statistics.median(saves))
    accelerator.end_training()


# -- the harness -------------------------------------------------------------------------------
@dataclass
class Stop:
    at: float  # seconds of the way's wall time
    kill: bool


def schedule(seed: int, every: float, kill_share: float, horizon: float) -> list[Stop]:
    """Stops every ``every`` s +-20%; every ``1/kill_share``-th one a SIGKILL, from a seeded
    offset, so that a job spanning that many stops meets at least one whatever the seed (a
    coin per stop left seed 0 without any at T=60)."""
    rng = random.Random(seed)
    period = round(1 / kill_share) if kill_share > 0 else 0
    offset = rng.randrange(period) if period else 0
    stops, at = [], 0.0
    while at < horizon:
        at += every * rng.uniform(0.8, 1.2)
        stops.append(Stop(at, bool(period) and (len(stops) + offset) % period == 0))
    return stops


@dataclass
class LaunchResult:
    began: float
    ended: float
    ready: float | None = None
    resumed: int = 0
    restore: float = 0.0
    last_step: int = 0
    last_step_at: float | None = None  # epoch seconds of its last step
    saves: float = 0.0
    stop: float = 0.0
    signalled: str = ""
    signalled_at: float | None = None  # epoch seconds
    code: int | None = None
    output: str = ""


@dataclass
class Way:
    name: str
    launches: list[LaunchResult] = field(default_factory=list)
    reported: str = ""
    unfinished: bool = False  # still short of the last step when the schedule ran out

    @property
    def wall(self) -> float:
        return sum(x.ended - x.began for x in self.launches)


def command(way: str, nproc: int, args: argparse.Namespace, folder: str, k: int) -> list[str]:
    job = [
        HERE,
        "--hidden",
        str(args.hidden),
        *(["--steps", str(args.steps)] if args.steps else []),
    ]
    ckpt = os.path.join(folder, "ckpt")
    if way == "tlaunch":
        flags = f"--cpus {nproc} --progress off --preemption-watch off --save-every {k}".split()
        # --ckpt: unused by the worker; names the folder on its command line (signal_all).
        return [sys.executable, "-m", "tlaunch", *flags, "--checkpoint-dir", ckpt, *job,
                "--worker", "tlaunch", "--ckpt", ckpt]  # fmt: skip
    job += ["--worker", way, "--ckpt", ckpt, "--every-k", str(k)]
    if nproc == 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu"]
        launcher += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
        launcher += ["--dynamo_backend", "no"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc-per-node", str(nproc)]
    return [*launcher, *job]


def environment(way: str, nproc: int) -> dict[str, str]:
    """No TLAUNCH_/ACCELERATE_ settings of this shell; one OpenMP thread for every way."""
    env = clean_env(OMP_NUM_THREADS="1")  # spinning OpenMP threads on a shared machine: 5-10x
    # tlaunch's 2 MB pages for every way: the ways differ in what a stop costs, not in how
    # fast a step is (1.4x faster with them for this job: benchmarks/host_memory.py).
    env.update(HOST_ENV)
    if way != "tlaunch":
        env["ACCELERATE_USE_CPU"] = "true"  # torch.distributed.run: one CPU job, not two
    return env


def run_way(way: str, nproc: int, args, root: str, k: int, stops: list[Stop]) -> Way:
    folder = tempfile.mkdtemp(prefix=f"{way}-{nproc}-", dir=root)
    os.makedirs(os.path.join(folder, "ckpt"))
    cmd, env = command(way, nproc, args, folder, k), environment(way, nproc)
    result, wall, pending = Way(way), 0.0, list(stops) if way != "uninterrupted" else []
    for attempt in range(len(pending) + 2):
        log = os.path.join(folder, f"launch-{attempt}.log")
        launch = one_launch(cmd, env, log, folder, wall, pending)
        result.launches.append(launch)
        wall += launch.ended - launch.began
        if launch.code == 0:
            break
        if not launch.signalled:
            raise SystemExit(f"{way} failed ({launch.code}) without a stop: see {log}")
    else:  # the schedule ran out: a launch takes about as long to start as T lasts
        result.unfinished = True
    if way == "tlaunch":
        add_run_records(result, os.path.join(folder, "ckpt"))
        found = re.findall(r"tlaunch: (goodput .*)", result.launches[-1].output)
        result.reported = found[-1] if found else "(none)"
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def one_launch(cmd, env, log: str, folder: str, wall: float, pending: list[Stop]) -> LaunchResult:
    with open(log, "w") as f:
        began = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        launch = LaunchResult(began=time.time(), ended=0.0)
        signalled_at, deadline = None, None
        while proc.poll() is None:
            now = time.monotonic()
            if signalled_at is None and pending and wall + now - began >= pending[0].at:
                stop = pending.pop(0)
                launch.signalled = "SIGKILL" if stop.kill else "SIGTERM"
                signalled_at = now
                deadline = now if stop.kill else now + NOTICE
                signal_all(proc.pid, folder, signal.SIGKILL if stop.kill else signal.SIGTERM)
            if deadline is not None and now >= deadline:
                signal_all(proc.pid, folder, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)
        ended = time.monotonic()
    reap(folder)
    launch.ended = launch.began + (ended - began)
    launch.code = proc.returncode
    launch.stop = 0.0 if signalled_at is None else ended - signalled_at
    if signalled_at is not None:
        launch.signalled_at = launch.began + (signalled_at - began)
    with open(log) as f:
        launch.output = f.read()
    for kind, rest in MARK.findall(launch.output):
        values = rest.split()
        if kind == "ready":
            launch.ready, launch.resumed = float(values[0]), int(values[1])
            launch.restore = max(0.0, float(values[2]))
        elif kind == "step":
            launch.last_step = max(launch.last_step, int(values[0]))
            launch.last_step_at = float(values[1])
        elif kind == "save":
            launch.saves += float(values[1])
    return launch


def signal_all(launcher: int, folder: str, sig: int) -> None:
    """``sig`` to the launcher's group and to every process of the job, as a shutdown does
    (tlaunch's workers run in sessions of their own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher, sig)
    for pid in processes_mentioning(folder):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def reap(folder: str) -> None:
    deadline = time.monotonic() + 10
    while (left := [p for p in processes_mentioning(folder) if p != os.getpid()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def add_run_records(way: Way, ckpt: str) -> None:
    """tlaunch's restore and save waits, from what its run recorded (in launch order)."""
    from tlaunch.storage import read_goodput

    recorded = read_goodput(ckpt).launches
    for launch in way.launches:  # a launch stopped before it recorded anything has no record
        for record in recorded:
            if launch.began - 1 <= record.start <= launch.ended:
                launch.restore, launch.saves = record.restore, record.saves


def shares(way: Way, step_s: float) -> dict[str, float]:
    """The way's wall time, split into parts that add up to it (seconds).

    Each launch: start-up from its start to its first step or its stop, whichever came first
    (less the restore inside it); stop from the signal to the exit; between the two, training,
    of which the saves training waited for and the steps the next launch recomputed are their
    own parts; after the last launch's last step, ``end`` (its final save and exit). What is
    left is training that was kept: close to (c)'s training time when the split is right."""
    launches = way.launches
    trained = [x for x in launches if x.ready is not None]  # stopped in start-up: no resume
    recomputed_steps = sum(
        max(0, a.last_step - max(a.resumed, b.resumed))
        for a, b in zip(trained, trained[1:], strict=False)
    )
    startup = restore = saves = stop = training = end = 0.0
    for x in launches:
        began_training = min(t for t in (x.ready, x.signalled_at, x.ended) if t is not None)
        stopped = x.signalled_at if x.signalled_at is not None else x.ended
        restore += x.restore
        startup += began_training - x.began - x.restore
        stop += x.ended - stopped if x.signalled_at is not None else 0.0
        if x.signalled_at is None:  # it ran to the end (or, resumed at the last step, only
            stopped = max(began_training, x.last_step_at or 0.0)  # finished: no step at all)
            end += x.ended - stopped
        training += max(0.0, stopped - began_training)
        saves += x.saves
    recomputed = recomputed_steps * step_s
    return {
        "recomputed_steps": recomputed_steps,
        "start-up": startup,
        "restore": restore,
        "saves": saves,
        "stop": stop,
        "recomputed": recomputed,
        "end": end,
        "kept": training - saves - recomputed,
    }


def calibrate(nproc: int, args, root: str) -> tuple[float, float]:
    folder = tempfile.mkdtemp(prefix="calibrate-", dir=root)
    cmd = command("calibrate", nproc, args, folder, 0)
    cmd[cmd.index("--worker") + 1] = "calibrate"
    proc = subprocess.run(cmd, cwd=folder, env=environment("calibrate", nproc), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    found = re.findall(r"^GP calibration (\S+) (\S+)$", proc.stdout, re.MULTILINE)
    shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"calibration failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(found[0][0]), float(found[0][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 process, 50 MB, stop every 15 s")
    parser.add_argument("--every", type=float, help="seconds between stops (default 60)")
    parser.add_argument("--nprocs", help="process counts (default 1,2)")
    parser.add_argument("--hidden", type=int, help="MLP width: the state's size (default 3072)")
    parser.add_argument("--train-seconds", type=float, help="the job's length (default 300)")
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)  # the job's, once measured
    parser.add_argument("--kill-share", type=float, default=0.25, help="share of SIGKILL stops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baselines", type=int, help="runs of (c) among the ways (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the launches' folders")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--every-k", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = {"every": 15.0, "nprocs": "1", "hidden": 1024, "train_seconds": 20.0, "baselines": 2}
    full = {"every": 60.0, "nprocs": "1,2", "hidden": 3072, "train_seconds": 300.0, "baselines": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.worker:
        workers = {"tlaunch": worker_tlaunch, "accelerate": worker_accelerate}
        workers["uninterrupted"], workers["calibrate"] = worker_accelerate, worker_calibrate
        return workers[args.worker](args)
    compile_tlaunch()
    params = 2 * 1024 * args.hidden + 2 * args.hidden * args.hidden
    print(
        f"goodput: MLP {params / 1e6:.1f}M params + Adam = {params * 12 / 1e6:.0f} MB state, "
        f"~{args.train_seconds:.0f} s of training, batch {BATCH}/process; a stop every "
        f"{args.every:.0f} s (+-20%, seed {args.seed}), {args.kill_share:.0%} of them SIGKILL, "
        f"the rest SIGTERM "
        f"with a {NOTICE:.0f} s notice"
    )
    root = tempfile.mkdtemp(prefix="tlaunch-bench-goodput-")
    try:
        for nproc in (int(n) for n in args.nprocs.split(",")):
            measure(nproc, args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def measure(nproc: int, args, root: str) -> None:
    step_s, save_s = calibrate(nproc, args, root)
    interval = math.sqrt(2 * save_s * args.every)
    k = max(1, round(interval / step_s))
    args.steps = max(k + 1, round(args.train_seconds / step_s))
    print(
        f"{nproc} process(es): save_state {save_s:.2f} s, a step {step_s:.3f} s: Young's "
        f"sqrt(2 C T) = {interval:.1f} s -> save every K={k} steps (both ways); "
        f"the job: {args.steps} steps"
    )
    # (c) before, between and after the ways: a load that changes during the run moves
    # every way's wall time and the median of the (c)s alike.
    stops, rows, trains = [], {}, []
    for way in order(args.baselines):
        if way != "uninterrupted":
            rows[way] = run_way(way, nproc, args, root, k, stops)
            continue
        base = run_way("uninterrupted", nproc, args, root, 0, [])
        done = [v.split() for kind, v in MARK.findall(base.launches[0].output) if kind == "done"]
        trains.append(float(done[0][1]) - float(done[0][0]))
        if not stops:  # a horizon no way outlasts: several times (c)'s wall plus stops
            stops = schedule(
                args.seed, args.every, args.kill_share, 4 * base.wall + 10 * args.every
            )
            startup = base.wall - trains[0]
            if startup > args.every / 2:  # most stops then land in a start-up: every way loses
                print(f"  warning: (c) took {startup:.0f} s to start and finish, more than half "
                      f"of T = {args.every:.0f} s: this machine is too loaded for this schedule; "
                      "the goodputs below mostly measure start-up")  # fmt: skip
    train = statistics.median(trains)
    mean_step = train / args.steps
    spread = (max(trains) - min(trains)) / train
    print(f"  (c) uninterrupted: training {train:.1f} s ({mean_step:.3f} s/step), median of "
          f"{len(trains)} runs ({', '.join(f'{t:.1f}' for t in trains)}: spread "
          f"{spread:.1%})")  # fmt: skip
    for way, label in (("tlaunch", "(a) tlaunch   "), ("accelerate", "(b) accelerate")):
        print(way_line(way, label, rows, train, mean_step, args, nproc))
    print(f"  (a)'s own report: {rows['tlaunch'].reported}")


def order(baselines: int) -> list[str]:
    """The ways in turn with ``baselines`` runs of (c) spread among them: 2 -> c a b c,
    3 -> c a c b c."""
    if baselines >= 3:
        return ["uninterrupted", "tlaunch", "uninterrupted", "accelerate", "uninterrupted"]
    return ["uninterrupted", "tlaunch", "accelerate", "uninterrupted"][: 4 if baselines >= 2 else 3]


def way_line(way: str, label: str, rows: dict, train: float, mean_step: float, args, nproc) -> str:
    w = rows[way]
    s = shares(w, mean_step)
    kinds = ",".join(x.signalled[3:] for x in w.launches if x.signalled)
    parts = "  ".join(
        f"{name} {s[name] / w.wall:.1%}"
        for name in ("start-up", "restore", "saves", "stop", "recomputed", "end", "kept")
    )
    goodput = 0.0 if w.unfinished else train / w.wall
    target = "  (did not finish: stops outpaced it)" if w.unfinished else ""
    if way == "tlaunch":
        other = rows["accelerate"]
        beaten = goodput > (0.0 if other.unfinished else train / other.wall)
        target += f"  (target >= {TARGET} and above (b))"
        if (args.every == 60 and nproc == 1 and goodput < TARGET) or not beaten:
            target += "  MISSED"
    return (
        f"  {label} goodput {goodput:.3f}  wall {w.wall:.1f} s  {len(w.launches)} launches "
        f"({len(w.launches) - 1} restarts: {kinds or '-'})  steps recomputed "
        f"{s['recomputed_steps']}  |  {parts} (kept = {s['kept'] / train:.2f}x (c)){target}"
    )


if __name__ == "__main__":
    main()
