"""Fault campaign: a small training job under random faults, each run finished by running the
same command again, must end bitwise equal to an uninterrupted run, losing nothing.

Run: ``.venv/bin/python benchmarks/faults.py [--runs 50] [--seed 0] [--only INDEX] [--keep]``
(``--only`` replays one run's plan: the same faults at the same steps; ``--keep`` keeps the
logs and checkpoints of every run, not only of those that missed a target).

The job is this file with ``--worker``: a Run API script training an MLP with dropout, Adam
and a StepLR schedule over shuffled batches for 3 epochs of ~20 ms steps (120 steps on
``--cpus 1``, 60 on ``--cpus 2``), under ``tlaunch --seed 7 --save-every 10 --keep-last 3
--preemption-watch gce``; its rank 0 writes its step to a file after each step. The reference
is one uninterrupted launch per process count.

Each run draws from its own seeded generator (``--seed``, run index): the process count
(1 and 2 take turns), a fault kind (the kinds take turns, so every kind is represented), its
moment and extras. 30% of the faults land in start-up, at a moment uniform over the
reference's time to its first step; the rest at an optimizer step uniform over the run's
steps, counted from the launch's first step (a resumed launch has fewer left, so some faults
never fire: the per-run line says how many did). The kinds:

* ``storage``: 10% of all storage calls of every process of every launch (launcher, agent,
  workers) fail with a transient error: a reset, a timeout, HTTP 429 or 503 (``flaky://``, see
  ``benchmarks/_flaky.py``, through the fault layer of ``tests/faultfs.py``). Also added to
  40% of the other runs. Runs without it use a plain local path (the rename commit), runs
  with it an object store's protocol (files, MANIFEST, COMMIT).
* ``sigkill``: SIGKILL to the launch's process group, the launcher and its workers.
* ``sigterm x2``: SIGTERM to the launcher, and again 0.5-3 s later.
* ``notice``: the loopback GCE metadata server reports a preemption, and 0.5-3 s later every
  process of the launch gets SIGTERM, as a VM's shutdown sends it.
* ``second``: the same command started again while the first runs (same URL, same output);
  the later one must be refused (exit 2) without touching anything; the refused command is
  run again once the other has ended, so both end done.
* ``damage``: a SIGKILL or SIGTERM late in the launch, then bytes flipped in one file of the
  newest committed step. The next launch must quarantine that step and resume from the one
  before. Were it refused instead (exit 2), the campaign would do what a user does with such
  a message: ``tlaunch ckpt verify``, delete the step it names BAD, run again (counted as
  ``refused``).
* A quarter of the runs also get a SIGKILL, double SIGTERM or notice in their second launch.

After each launch the same command runs again, until a launch ends with every command it
started exiting 0 (at most 8 launches a run; a launch still running after 300 s is killed
with its process group and counted as a hang).

Measured, and their targets:

* **bitwise equal**: the model the final launch saved, and the weights of the newest
  committed checkpoint, are ``torch.equal`` to the reference's, tensor by tensor (target: all).
* **committed steps lost** (target 0): optimizer steps of training that had been committed
  and had to be done again, or were gone. Before each launch the campaign reads the newest
  committed step whose bytes verify, N (a step it damaged itself does not verify). A launch
  loses the larger of N - R, when it starts training from step R < N (the job prints its
  first step), and peak - M, when, while it runs or once it ended, the newest committed step
  M falls below the highest seen since it started (peak >= N): retention deleting too much,
  a commit vanishing. The directory is listed every 0.05 s.
* **unverifiable checkpoints left** (target 0): committed steps at the end whose bytes fail
  ``CheckpointStore.verify`` (what ``tlaunch ckpt verify`` runs) and that are not quarantined,
  so that a later run would trust them. Steps quarantined because the campaign damaged them
  are reported apart; a quarantined step the campaign did not damage counts as a **false
  quarantine** (target 0: only proof quarantines).
* **tracebacks seen** (target 0): ``Traceback (most recent call last)`` in the output of any
  command of any launch; tlaunch promises one-line errors, and no fault here is the script's.
* **hangs** and **stray processes** (target 0): a launch past its timeout; processes of the
  job (its workers run in sessions of their own) alive 5 s after its launchers exited: a
  launcher waits for its workers, and a killed one takes them with it.

Also printed: the storage errors injected, by process (the launcher, rank N: proof that the
faults reached the workers too), and the stops (by SIGTERM or a notice) that exited neither
75 nor 0. ``--error-rate`` raises the share of failing storage calls, to find what breaks when
retries run out.

The process exits 1 when any target is missed. Per run it prints one line: index, process
count, kind, faults (``kill@step+37``: 37 steps after the launch's first; ``term/term@4.1s,+1.3s``:
4.1 s after its start, then 1.3 s later), actions fired, exit codes of each launch (``a/b``: the
two launchers of a ``second`` launch; ``KILL``, ``TERM``: ended by that signal), steps lost, equal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import _flaky  # benchmarks/, on sys.path when a script here runs
from _launches import PROGRESS_SUFFIX, Fault, Job, Launch, Ledger, build_env, run_launch

from tests.e2e.helpers import gce_metadata  # importable: _launches put the root on sys.path
from tlaunch.contract import GCE_URL_ENV

HERE = os.path.abspath(__file__)

EPOCHS, SAMPLES, BATCH, STEP_SECONDS = 3, 320, 8, 0.02
FLAGS = (
    "--seed", "7", "--save-every", "10", "--keep-last", "3", "--progress", "off",
    "--preemption-watch", "gce",
)  # fmt: skip
KINDS = ("storage", "sigkill", "sigterm x2", "notice", "second", "damage")
STORAGE_ERROR_RATE = 0.1
MAX_LAUNCHES = 8
TRACEBACK = "Traceback (most recent call last)"


def worker(out: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import tlaunch

    run = tlaunch.init(hparams={"lr": 1e-2, "batch_size": BATCH})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 16, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(SAMPLES, 4, generator=g)).argmax(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=25, gamma=0.7)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    model, optimizer, loader, scheduler = run.prepare(model, optimizer, loader, scheduler)
    if run.is_main:
        print(f"FAULTS start step={run.step}", flush=True)
    for _epoch in run.epochs(EPOCHS):
        for xb, yb in run.batches(loader):
            with run.accumulate(model):
                run.backward(F.cross_entropy(model(xb), yb))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            time.sleep(STEP_SECONDS)
            if run.is_main:
                with open(out + ".tmp", "w") as f:
                    f.write(str(run.step))
                os.replace(out + ".tmp", out + PROGRESS_SUFFIX)
    run.finish()
    if run.is_main:
        torch.save(run.accelerator.unwrap_model(model).state_dict(), out)


# -- a run's plan ---------------------------------------------------------------------------------


def total_steps(nproc: int) -> int:
    return EPOCHS * (SAMPLES // (BATCH * nproc))


@dataclass
class Plan:
    index: int
    nproc: int
    kind: str
    storage_errors: float  # the share of storage calls that fail (0: a plain local folder)
    faults: list[Fault | None]  # the faults of the first launches; later ones run clean
    damage_after: set[int]

    def describe(self) -> str:
        parts = [f"L{i + 1}:{fault}" for i, fault in enumerate(self.faults) if fault]
        parts += ["damage after L1"] if self.damage_after else []
        parts += [f"storage {self.storage_errors:.0%}"] if self.storage_errors else []
        return " ".join(parts)


ACTIONS = {
    "sigkill": ("kill",),
    "sigterm x2": ("term", "term"),
    "notice": ("notice", "term-all"),
    "second": ("second",),
}


def interruption(kind: str, rng: random.Random, steps: int, startup: float, late=False):
    """One fault of ``kind``: 30% of them in start-up (a moment uniform over the reference's
    start-up), the rest at a step uniform over the run's ``steps`` (``late``: its second half,
    so that steps are committed by then)."""
    if kind not in ACTIONS:
        return None
    if late:
        at, in_steps = round(rng.uniform(0.5, 1.0) * steps), True
    elif rng.random() < 0.3:
        at, in_steps = rng.uniform(0.0, startup), False
    else:
        at, in_steps = rng.randrange(steps), True
    return Fault(ACTIONS[kind], at, in_steps, gap=rng.uniform(0.5, 3.0))


def make_plan(seed: int, index: int, startup: dict[int, float], error_rate: float) -> Plan:
    rng = random.Random(f"{seed}:{index}")
    kind = KINDS[index % len(KINDS)]
    nproc = 1 + (index // len(KINDS)) % 2
    steps = total_steps(nproc)
    errors = error_rate if kind == "storage" or rng.random() < 0.4 else 0.0
    if kind == "damage":
        interrupt = rng.choice(("sigkill", "sigterm x2"))
        faults = [interruption(interrupt, rng, steps, startup[nproc], late=True)]
    else:
        faults = [interruption(kind, rng, steps, startup[nproc])]
    if rng.random() < 0.25:
        again = rng.choice(("sigkill", "sigterm x2", "notice"))
        faults.append(interruption(again, rng, steps, startup[nproc]))
    return Plan(index, nproc, kind, errors, faults, {0} if kind == "damage" else set())


# -- a run: launches until done, then the verdict -------------------------------------------------


@dataclass
class Verdict:
    launches: list[Launch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    equal: bool = False
    lost: int = 0
    unverifiable: list[int] = field(default_factory=list)
    quarantined: list[int] = field(default_factory=list)
    false_quarantines: list[int] = field(default_factory=list)
    tracebacks: int = 0
    refused: int = 0
    #: Exit codes of launches stopped by SIGTERM or a notice that ended neither 75 nor 0.
    odd_stops: list[int] = field(default_factory=list)
    #: Storage errors injected, by process role (launcher, rank N).
    injected: Counter = field(default_factory=Counter)

    @property
    def clean(self) -> bool:
        """Every target met."""
        return (
            self.equal
            and not (self.lost or self.unverifiable or self.false_quarantines or self.tracebacks)
            and not any(launch.hung or launch.strays for launch in self.launches)
        )


def run_job(job: Job, plan: Plan, ledger: Ledger, rng: random.Random) -> Verdict:
    """Launch until a launch ends with every command it started exiting 0."""
    verdict = Verdict()
    for i in range(MAX_LAUNCHES):
        fault = plan.faults[i] if i < len(plan.faults) else None
        if os.path.exists(job.out):
            os.remove(job.out)  # the final model must be the final launch's
        launch = run_launch(job, ledger, fault, f"{i + 1:02d}", ledger.newest_sound())
        verdict.launches.append(launch)
        verdict.lost += launch.lost
        verdict.tracebacks += sum(TRACEBACK in out for out in launch.outputs)
        stopped = fault is not None and launch.fired and fault.actions[0] in ("term", "notice")
        if stopped and launch.codes[0] not in (0, 75):
            verdict.odd_stops.append(launch.codes[0])
        if launch.codes == [2] and i - 1 in plan.damage_after:
            verdict.refused += 1
            verdict.notes.append(user_deletes_bad_steps(ledger))
        if i in plan.damage_after:
            verdict.notes.append(ledger.damage(rng))
        elif all(code == 0 for code in launch.codes):
            break
    return verdict


def user_deletes_bad_steps(ledger: Ledger) -> str:
    """What a user told that a checkpoint is damaged does: verify, delete what is BAD."""
    bad = [s for s, problems in ledger.store().verify(full=True).items() if problems]
    for step in bad:
        shutil.rmtree(ledger.step_path(step))
    return f"refused; deleted bad steps {bad}"


def judge(verdict: Verdict, job: Job, ledger: Ledger, reference: dict) -> None:
    """Equality with the reference, and what the checkpoint folder holds at the end."""
    import torch

    store = ledger.store()
    quarantined = {i.step for i in store.all_steps() if i.quarantined}
    problems = store.verify(full=True)
    for step, found in sorted(problems.items()):
        if step in quarantined:
            verdict.quarantined.append(step)
            if ledger.damaged.get(step, "none") != ledger.commit_id(step):
                verdict.false_quarantines.append(step)
        elif found:
            verdict.unverifiable.append(step)
    committed = [i.step for i in store.committed()]
    done = all(code == 0 for code in verdict.launches[-1].codes) and os.path.exists(job.out)
    if not done or not committed or problems[committed[-1]]:
        return
    final = torch.load(job.out, weights_only=True)
    weights = store.load(committed[-1]).tensors["model"]
    verdict.equal = same(reference, final) and same(reference, weights)


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def new_job(root: str, site: str, name: str, nproc: int, errors: float, metadata) -> Job:
    folder = os.path.join(root, name)
    os.makedirs(folder)
    ckpt, out = os.path.join(folder, "ckpt"), os.path.join(folder, "model.pt")
    url = f"{_flaky.PROTOCOL}://{ckpt}" if errors else ckpt
    command = [
        sys.executable, "-m", "tlaunch", HERE, "--cpus", str(nproc), *FLAGS,
        "--checkpoint-dir", url, "--run-dir", os.path.join(folder, "runs"),
        "--", "--worker", "--out", out,
    ]  # fmt: skip
    env = build_env(folder, site, name, errors, **{GCE_URL_ENV: metadata[0]})
    return Job(command, folder, out, ckpt, env, metadata[1])


def reference_run(root: str, site: str, nproc: int) -> tuple[dict, float, float]:
    """The uninterrupted run: its final model, its start-up and its training time (s)."""
    import torch

    with gce_metadata() as metadata:
        job = new_job(root, site, f"reference-{nproc}", nproc, 0.0, metadata)
        launch = run_launch(job, Ledger(job.ckpt), None, "01", -1)
    if launch.codes != [0] or TRACEBACK in launch.outputs[0] or launch.training_at is None:
        raise SystemExit(f"the reference run failed ({launch.codes}):\n{launch.outputs[0][-3000:]}")
    model = torch.load(job.out, weights_only=True)
    return model, launch.training_at, launch.seconds - launch.training_at


def campaign_run(
    root: str, site: str, plan: Plan, seed: int, reference: dict, keep: bool
) -> Verdict:
    rng = random.Random(f"{seed}:{plan.index}:damage")
    with gce_metadata() as metadata:
        name = f"run-{plan.index:03d}"
        job = new_job(root, site, name, plan.nproc, plan.storage_errors, metadata)
        ledger = Ledger(job.ckpt)
        verdict = run_job(job, plan, ledger, rng)
    judge(verdict, job, ledger, reference)
    with (
        contextlib.suppress(FileNotFoundError),
        open(os.path.join(job.folder, "injected.log")) as f,
    ):
        verdict.injected.update(line.strip() for line in f)
    if verdict.clean and not verdict.odd_stops and not keep:
        shutil.rmtree(job.folder, ignore_errors=True)
    return verdict


# -- the campaign ---------------------------------------------------------------------------------


def code_text(code: int) -> str:
    return signal.Signals(-code).name.removeprefix("SIG") if code < 0 else str(code)


def report_line(plan: Plan, verdict: Verdict, seconds: float) -> str:
    exits = " ".join("/".join(map(code_text, launch.codes)) for launch in verdict.launches)
    planned = sum(len(f.actions) for f in plan.faults[: len(verdict.launches)] if f)
    fired = sum(launch.fired for launch in verdict.launches)
    extra = [
        f"{name}={value}"
        for name, value in (
            ("unverifiable", verdict.unverifiable),
            ("false-quarantine", verdict.false_quarantines),
            ("tracebacks", verdict.tracebacks),
            ("hung", sum(launch.hung for launch in verdict.launches)),
            ("strays", sum(launch.strays for launch in verdict.launches)),
            ("stop-exits", [code_text(c) for c in verdict.odd_stops]),
            ("injected", sum(verdict.injected.values())),
        )
        if value
    ]
    extra += [f"({'; '.join(verdict.notes)})"] if verdict.notes else []
    return (
        f"run {plan.index:3d} cpus={plan.nproc} {plan.kind:<10} [{plan.describe()}] "
        f"fired {fired}/{planned} exits={exits} lost={verdict.lost} "
        f"equal={'yes' if verdict.equal else 'NO'} " + " ".join([*extra, f"{seconds:.0f}s"])
    )


def summary(verdicts: list[Verdict], seconds: float) -> bool:
    """Print the totals against their targets; True when one is missed."""
    launches = [launch for v in verdicts for launch in v.launches]
    rows = [
        ("runs", len(verdicts), None),
        ("bitwise equal to the uninterrupted run", sum(v.equal for v in verdicts), len(verdicts)),
        ("committed steps lost", sum(v.lost for v in verdicts), 0),
        ("unverifiable checkpoints left", sum(len(v.unverifiable) for v in verdicts), 0),
        ("tracebacks seen", sum(v.tracebacks for v in verdicts), 0),
        ("false quarantines", sum(len(v.false_quarantines) for v in verdicts), 0),
        ("hung launches", sum(launch.hung for launch in launches), 0),
        ("processes outliving their launcher", sum(launch.strays for launch in launches), 0),
    ]
    missed = False
    for name, value, target in rows:
        miss = target is not None and value != target
        missed |= miss
        goal = "" if target is None else f" (target {target}){'  MISSED' if miss else ''}"
        print(f"{name}: {value}{goal}")
    injected = sum((v.injected for v in verdicts), Counter())
    roles = ", ".join(f"{role} {n}" for role, n in sorted(injected.items()))
    odd = Counter(code_text(c) for v in verdicts for c in v.odd_stops)
    print(
        f"storage errors injected: {sum(injected.values())} ({roles or 'none'}); stops by "
        f"SIGTERM or notice that exited neither 75 nor 0: {sum(odd.values())} {dict(odd)}"
    )
    print(
        f"launches: {len(launches)}; damaged steps left quarantined: "
        f"{sum(len(v.quarantined) for v in verdicts)}; launches refused after damage: "
        f"{sum(v.refused for v in verdicts)}; elapsed {seconds / 60:.1f} min"
    )
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--error-rate",
        type=float,
        default=STORAGE_ERROR_RATE,
        help="share of storage calls that fail in the runs with storage faults (default 0.1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep every run's folder")
    parser.add_argument(
        "--only", type=int, action="append", metavar="INDEX", help="run only these runs' plans"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.out)
    if not 0 < args.error_rate < 1:
        parser.error(f"--error-rate must be between 0 and 1 (exclusive), got {args.error_rate}")

    began = time.monotonic()
    root = tempfile.mkdtemp(prefix="tlaunch-bench-faults-")
    site = os.path.join(root, "site")
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(_flaky.SITECUSTOMIZE)
    references, startup, training = {}, {}, {}
    for nproc in (1, 2):
        references[nproc], startup[nproc], training[nproc] = reference_run(root, site, nproc)
    shown = ", ".join(
        f"--cpus {n}: {startup[n]:.1f} s start-up + {training[n]:.1f} s for {total_steps(n)} steps"
        for n in (1, 2)
    )
    indices = args.only or range(args.runs)
    print(
        f"faults: seed {args.seed}, {len(indices)} runs; uninterrupted launch {shown}", flush=True
    )
    verdicts = []
    for index in indices:
        plan = make_plan(args.seed, index, startup, args.error_rate)
        started = time.monotonic()
        verdicts.append(
            campaign_run(root, site, plan, args.seed, references[plan.nproc], args.keep)
        )
        print(report_line(plan, verdicts[-1], time.monotonic() - started), flush=True)
    missed = summary(verdicts, time.monotonic() - began)
    if missed or args.keep:
        which = "every run" if args.keep else "the runs that missed a target or stopped oddly"
        print(f"logs and checkpoints of {which}: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
