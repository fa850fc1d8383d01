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

COMMIT -> exit is split into its stages, from marks the real processes append to a trace file
while they stop (``--no-split``: none). The worker and the launcher run the code as shipped;
this file wraps a few of its functions to note the time each returns (rank 0's writer, its
retention, the flush and its barrier, the report and the end of the process group, the exit
functions, ``os._exit``; the launcher noticing its workers gone, its decision, its records,
the lease's release, its own ``os._exit``). Each stage is printed as the median time after
COMMIT's mtime at which it was reached.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _proc import compile_tlaunch  # benchmarks/, on sys.path when a script here runs

NOTICE = 30.0
EXIT_PREEMPTED = 75
BATCH = 8
HERE = os.path.abspath(__file__)
#: The trace file the stopping processes note their stages in (not a tlaunch setting: this
#: benchmark's own, read only by the wrappers below).
TRACE_ENV = "PREEMPTION_BENCH_TRACE"
#: The stages of COMMIT -> launcher exit, in the order they happen: (who, stage, label).
#: ``rank0`` is the writing rank; ``ranks`` the last of all ranks; ``bench`` this process.
STAGES = [
    ("rank0", "saved", "COMMIT durable, save returned"),
    ("rank0", "retention", "retention pass done"),
    ("rank0", "writer flushed", "writer flushed"),
    ("rank0", "flush + barrier", "flush's barrier passed"),
    ("rank0", "closed", "writer closed"),
    ("rank0", "exit()", "StopController.exit entered"),
    ("rank0", "group ended", "process group ended"),
    ("rank0", "exit functions", "exit functions begin"),
    ("rank0", "scan", "tlaunch's exit: file scan begins"),
    ("rank0", "files flushed", "open files flushed"),
    ("rank0", "os._exit", "rank 0 os._exit"),
    ("ranks", "os._exit", "last rank os._exit"),
    ("launcher", "agent noticed", "elastic agent saw them exit"),
    ("launcher", "workers gone", "launcher: workers gone"),
    ("launcher", "decided", "launcher: exit code decided"),
    ("launcher", "records", "launcher: exit.json, goodput"),
    ("launcher", "lease released", "launcher: lease released"),
    ("launcher", "os._exit", "launcher os._exit"),
    ("bench", "exit seen", "launcher exit seen here"),
]
_who = "bench"


def _mark(stage: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{time.time():.6f}\t{stage}\t{_who}\n".encode())
        finally:
            os.close(fd)


def _wrap(owner: object, name: str, stage: str, before: str | None = None) -> None:
    """Note ``stage`` each time ``owner.name`` returns (or raises); ``before`` when called."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def noted(*args, **kwargs):
        if before:
            _mark(before)
        try:
            return original(*args, **kwargs)
        finally:
            _mark(stage)

    setattr(owner, name, noted)


def _note_os_exit() -> None:
    leave = os._exit

    def noted(code: int) -> None:
        _mark("os._exit")
        leave(code)

    os._exit = noted


def instrument_worker() -> None:
    """The worker side of the split: rank 0's save, retention, flush, close; every rank's
    exit path. Wrappers only: the code that runs is tlaunch's."""
    global _who
    _who = f"rank{os.environ.get('RANK', '0')}"
    import atexit

    import tlaunch.quick_exit
    from tlaunch.checkpointing import CheckpointManager
    from tlaunch.stopping import StopController
    from tlaunch.storage.checkpoint.store import CheckpointStore
    from tlaunch.storage.checkpoint.writer import AsyncCheckpointWriter
    from tlaunch.strategies.base import Strategy

    _wrap(CheckpointStore, "save", "saved")
    _wrap(CheckpointStore, "apply_retention", "retention")
    _wrap(AsyncCheckpointWriter, "flush", "writer flushed")
    _wrap(CheckpointManager, "flush", "flush + barrier")
    _wrap(CheckpointManager, "close", "closed")
    enter_exit = StopController.exit

    def exit_noted(self, **kwargs):
        _mark("exit()")
        return enter_exit(self, **kwargs)

    StopController.exit = exit_noted
    _wrap(Strategy, "end_process_group", "group ended")
    atexit.register(_mark, "exit functions")  # before tlaunch.init's: it runs after theirs
    _wrap(tlaunch.quick_exit, "_flush_open_files", "files flushed", before="scan")
    _note_os_exit()


def instrument_launcher() -> None:
    """The launcher side of the split: its workers gone, its decision, records, lease, exit."""
    global _who
    _who = "launcher"
    from tlaunch.goodput import LaunchRecord
    from tlaunch.preflight import Preflight
    from tlaunch.supervisor import Supervisor
    from tlaunch.workers import DirectWorkers, ElasticWorkers

    _wrap(DirectWorkers, "start", "workers gone")
    _wrap(ElasticWorkers, "start", "workers gone")
    _wrap(Supervisor, "run", "decided")
    _wrap(LaunchRecord, "finish", "records")
    _wrap(Preflight, "release", "lease released")
    configure = ElasticWorkers._elastic_config

    def configure_noted(self, attempt):  # torch is imported by now: note the agent's monitor
        from torch.distributed.elastic.agent.server.api import WorkerState
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

        monitor = LocalElasticAgent._monitor_workers

        def monitor_noted(agent, group):
            result = monitor(agent, group)
            if result.state in (WorkerState.SUCCEEDED, WorkerState.FAILED):
                _mark("agent noticed")
            return result

        LocalElasticAgent._monitor_workers = monitor_noted
        return configure(self, attempt)

    ElasticWorkers._elastic_config = configure_noted
    _note_os_exit()


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

    if os.environ.get(TRACE_ENV):
        instrument_worker()
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


def preempt_once(nproc: int, hidden: int, tmp: str, warm_steps: int, split: bool) -> dict:
    ckpt, step_file = os.path.join(tmp, "ckpt"), os.path.join(tmp, "step")
    trace = os.path.join(tmp, "trace.tsv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLAUNCH_", "ACCELERATE_"))}
    env.pop(TRACE_ENV, None)
    if split:
        env[TRACE_ENV] = trace
    flags = f"--cpus {nproc} --progress off --preemption-watch off --checkpoint-dir".split()
    program = [HERE, "--launcher"] if split else ["-m", "tlaunch"]
    cmd = [sys.executable, *program, *flags, ckpt, "--run-dir", os.path.join(tmp, "runs")]
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
    stages = read_split(trace, signalled, commit_time) if split else {}
    stages["launcher exit seen here"] = elapsed + signalled - commit_time
    return {
        "split": stages,
        "t": elapsed,
        "code": code,
        "at": at_signal,
        "committed": step,
        "lost": at_signal if step is None else max(0, at_signal - step),
        "to_commit": commit_time - signalled,
        "step_s": seen[-1][1] - seen[-2][1],
    }


def read_split(trace: str, signalled: float, commit_time: float) -> dict[str, float]:
    """Seconds after COMMIT's mtime at which each stage of :data:`STAGES` was first reached
    after the signal (the last rank's, for ``ranks``)."""
    first: dict[tuple[str, str], float] = {}
    try:
        with open(trace) as f:
            rows = [line.rstrip("\n").split("\t") for line in f]
    except OSError:
        return {}
    for t, stage, who in rows:
        if float(t) >= signalled:
            first.setdefault((who, stage), float(t))
    found: dict[str, float] = {}
    for who, stage, label in STAGES:
        if who == "ranks":
            times = [t for (w, s), t in first.items() if s == stage and w.startswith("rank")]
            if times:
                found[label] = max(times) - commit_time
        elif (who, stage) in first:
            found[label] = first[who, stage] - commit_time
    return found


def main() -> None:
    if sys.argv[1:2] == ["--launcher"]:  # the tlaunch program, its stop path noted
        instrument_launcher()
        sys.argv = ["tlaunch", *sys.argv[2:]]
        from tlaunch.cli import program

        program()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--warm-steps", type=int, default=3, help="steps before the signal")
    parser.add_argument(
        "--no-split", action="store_true", help="run tlaunch unwrapped: no split of COMMIT -> exit"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.hidden, args.step_file)
    compile_tlaunch()

    nprocs = [int(n) for n in args.nprocs.split(",")]
    results: dict[int, list[dict]] = {n: [] for n in nprocs}
    saves: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tlaunch-bench-preempt-") as root:
        for rep in range(args.reps):
            saves.append(plain_save_seconds(args.hidden, os.path.join(root, "plain.pt")))
            for n in nprocs if rep % 2 == 0 else nprocs[::-1]:
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    results[n].append(
                        preempt_once(n, args.hidden, tmp, args.warm_steps, not args.no_split)
                    )
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
        for line in lines + split_lines(rows):
            print(f"--cpus {n}: {line}")


def split_lines(rows: list[dict]) -> list[str]:
    """COMMIT -> exit, stage by stage: median seconds after COMMIT (and the step from the
    stage before), over the reps that reached it."""
    lines, before = [], 0.0
    for _who, _stage, label in [*STAGES]:
        times = [r["split"][label] for r in rows if label in r["split"]]
        if not times:
            continue
        at = statistics.median(times)
        if not lines:
            lines.append("  COMMIT -> exit by stage (median s after COMMIT's mtime; +step):")
        lines.append(f"    {label:<32} {at:6.3f}  (+{at - before:.3f})")
        before = at
    return lines


def miss(missed: bool) -> str:
    return "  MISSED" if missed else ""


if __name__ == "__main__":
    main()
