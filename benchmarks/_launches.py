"""One launch of the fault campaign: the command, its faults at their moments, the checkpoint
folder watched from outside (``benchmarks/faults.py`` says what is measured and why)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import _flaky  # benchmarks/, on sys.path when a script here runs

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for:
from tests.e2e.helpers import clean_env, processes_mentioning  # noqa: E402

#: What the job prints once prepared: the step it trains from.
START = re.compile(r"^FAULTS start step=(\d+)$", re.MULTILINE)
#: Beside the job's output file, the file its rank 0 writes its step to after each step.
PROGRESS_SUFFIX = ".step"
LAUNCH_TIMEOUT = 300.0
STRAY_WAIT = 5.0
STEP_DIR = re.compile(r"step-([0-9]+)")


@dataclass(frozen=True)
class Fault:
    """One launch's fault: ``actions`` fired in turn, the first at its moment, each next one
    ``gap`` seconds after the one before. The moment is ``at`` optimizer steps after the
    launch's first step (``steps``), or ``at`` seconds after the launch started (start-up)."""

    actions: tuple[str, ...]  # kill | term | term-all | notice | second
    at: float
    steps: bool
    gap: float = 0.0

    def __str__(self) -> str:
        when = f"step+{self.at:.0f}" if self.steps else f"{self.at:.1f}s"
        then = f",+{self.gap:.1f}s" if len(self.actions) > 1 else ""
        return f"{'/'.join(self.actions)}@{when}{then}"


@dataclass
class Job:
    """One run's command and the world around it: its folder, environment, notice switch."""

    command: list[str]
    folder: str
    out: str  # the model file the job writes when done; also names its processes
    ckpt: str  # the checkpoint folder on this disk (the flaky:// URL's path)
    env: dict[str, str]
    preempted: object  # threading.Event: the metadata server says "preempted" while set

    @property
    def progress(self) -> str:
        """The file the job's rank 0 writes its step to after each optimizer step."""
        return self.out + PROGRESS_SUFFIX


@dataclass
class Launch:
    """What one launch did: exit codes and output of each command it started (the second
    one when a second launcher was started), the step it trained from, steps it lost."""

    codes: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    start_step: int | None = None
    lost: int = 0
    fired: int = 0  # actions of the fault fired
    hung: bool = False
    strays: int = 0
    seconds: float = 0.0
    #: Seconds from the launch's start to its first training step (None: it took none).
    training_at: float | None = None


class Ledger:
    """The committed steps of a run's checkpoint folder, as a listing from outside sees them,
    and the steps the campaign damaged, known by their COMMIT file's identity: a step
    committed again under the same number is a new one."""

    def __init__(self, ckpt: str) -> None:
        self.ckpt = ckpt
        self.damaged: dict[int, tuple[int, int] | None] = {}

    def step_path(self, step: int) -> str:
        return os.path.join(self.ckpt, f"step-{step:09d}")

    def commit_id(self, step: int) -> tuple[int, int] | None:
        try:
            st = os.stat(os.path.join(self.step_path(step), "COMMIT"))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def newest_committed(self) -> int:
        """The newest step with a COMMIT, not quarantined nor damaged by the campaign (-1: none)."""
        try:
            names = os.listdir(self.ckpt)
        except FileNotFoundError:
            return -1
        steps = sorted(
            (int(m.group(1)) for n in names if (m := STEP_DIR.fullmatch(n))), reverse=True
        )
        for step in steps:
            ident = self.commit_id(step)
            quarantined = os.path.exists(os.path.join(self.step_path(step), "QUARANTINED"))
            if ident is not None and not quarantined and self.damaged.get(step) != ident:
                return step
        return -1

    def store(self):
        from tlaunch.storage import CheckpointStore

        return CheckpointStore(self.ckpt)  # read-only use, the local path, no faults

    def newest_sound(self) -> int:
        """The newest committed step, not quarantined, whose every byte verifies (-1: none)."""
        store = self.store()
        quarantined = {i.step for i in store.all_steps() if i.quarantined}
        sound = [s for s, problems in store.verify(full=True).items() if not problems]
        return max((s for s in sound if s not in quarantined), default=-1)

    def damage(self, rng: random.Random) -> str:
        """Flip 1-4 bytes of one file of the newest sound step; says what it did."""
        step = self.newest_sound()
        if step < 0:
            return "no committed step to damage"
        path = self.step_path(step)
        name = rng.choice(sorted(os.listdir(path)))
        with open(os.path.join(path, name), "r+b") as f:
            data = bytearray(f.read())
            for offset in rng.sample(range(len(data)), min(len(data), rng.randint(1, 4))):
                data[offset] ^= 0xFF
            f.seek(0)
            f.write(data)
        self.damaged[step] = self.commit_id(step)
        return f"damaged {name} of step {step}"


def run_launch(job: Job, ledger: Ledger, fault: Fault | None, tag: str, expected: int) -> Launch:
    """Start the command, fire ``fault`` at its moment while it runs, watch the folder.

    ``expected``: the newest sound committed step before the launch, the one it must resume
    from. The folder is listed every 0.05 s: the newest committed step must never fall below
    the highest seen since the launch began (see ``Launch.lost``).
    """
    result, procs, logs = Launch(), [], []

    def start(suffix: str) -> None:
        logs.append(os.path.join(job.folder, f"launch-{tag}{suffix}.log"))
        with open(logs[-1], "w") as f:
            procs.append(
                subprocess.Popen(
                    job.command, cwd=job.folder, env=job.env, stdout=f,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            )  # fmt: skip

    with contextlib.suppress(FileNotFoundError):
        os.remove(job.progress)
    peak, began, last_fired, first_step = expected, time.monotonic(), 0.0, None
    start("")
    while True:
        now = time.monotonic() - began
        if first_step is None and (found := START.search(_read(logs[0]))):
            first_step, result.training_at = int(found.group(1)), now
        armed = fault and result.fired < len(fault.actions) and procs[0].poll() is None
        if armed and _due(fault, result.fired, now, last_fired, first_step, job.progress):
            fire(fault.actions[result.fired], job, procs[0].pid, lambda: start("b"))
            result.fired, last_fired = result.fired + 1, now
        newest = ledger.newest_committed()
        peak = max(peak, newest)
        result.lost = max(result.lost, peak - newest)
        if all(p.poll() is not None for p in procs):
            break
        if now > LAUNCH_TIMEOUT and not result.hung:
            result.hung = True
            for p in procs:
                signal_everyone(job, p.pid, signal.SIGKILL)
        time.sleep(0.05)
    result.seconds = time.monotonic() - began
    job.preempted.clear()
    result.strays = reap_strays(job)
    result.lost = max(result.lost, peak - ledger.newest_committed())
    result.codes = [p.returncode for p in procs]
    result.outputs = [_read(log) for log in logs]
    starts = [int(m) for out in result.outputs for m in START.findall(out)]
    if starts:
        result.start_step = min(starts)
        result.lost = max(result.lost, expected - result.start_step)
    return result


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _due(fault: Fault, fired: int, now: float, last: float, first: int | None, progress: str):
    if fired:
        return now - last >= fault.gap
    if not fault.steps:
        return now >= fault.at
    step = _read(progress).strip()
    return first is not None and step.isdigit() and int(step) - first >= fault.at


def fire(action: str, job: Job, launcher: int, start_second) -> None:
    if action == "kill":
        signal_group(launcher, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
    elif action == "term":
        os.kill(launcher, signal.SIGTERM)
    elif action == "term-all":
        signal_everyone(job, launcher, signal.SIGTERM)
    elif action == "notice":
        job.preempted.set()
    elif action == "second":
        start_second()


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def signal_everyone(job: Job, launcher: int, sig: int) -> None:
    """``sig`` to the launcher's group and to every worker of the job (each in a session of
    its own), as a machine's shutdown sends it."""
    signal_group(launcher, sig)
    for pid in job_processes(job):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def job_processes(job: Job) -> list[int]:
    """The job's processes: those whose command line names its output file (never this one)."""
    return [pid for pid in processes_mentioning(job.out) if pid != os.getpid()]


def reap_strays(job: Job) -> int:
    """Wait for the job's workers to be gone once its launchers are; kill and count those
    still alive after STRAY_WAIT."""
    deadline = time.monotonic() + STRAY_WAIT
    while (strays := job_processes(job)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(strays)


def build_env(folder: str, site: str, storage_seed: str, rate: float, **extra: str) -> dict:
    """A campaign launch's environment: none of this shell's TLAUNCH_, ACCELERATE_ or
    torch.distributed settings; ``site`` (holding the flaky:// sitecustomize.py) on PYTHONPATH."""
    partial = os.path.join(folder, "partial")
    os.makedirs(partial, exist_ok=True)
    path = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    flaky = {
        _flaky.RATE_ENV: str(rate),
        _flaky.SEED_ENV: storage_seed,
        _flaky.PARTIAL_DIR_ENV: partial,
        _flaky.INJECTED_LOG_ENV: os.path.join(folder, "injected.log"),
    }
    return clean_env(PYTHONPATH=path, **flaky, **extra)
