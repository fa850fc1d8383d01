"""Loader worker processes outlive stop signals from anyone but their parent, and still end
with their loader."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils import signal_handling

from tests.e2e.helpers import wait_for
from tlaunch.loader_workers import ShieldedInit, install_worker_hook, stops_held
from tlaunch.stopping import STOP_SIGNALS

pytestmark = pytest.mark.timeout(120)


_init_ran = 0


def mark_init(worker_id: int) -> None:
    global _init_ran
    _init_ran = 1


class Pids(Dataset):
    """Sample i is (i, the pid of the process that loaded it, whether mark_init ran there)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        return i, os.getpid(), _init_ran


@pytest.fixture
def hook(monkeypatch):
    """The Run's hook on torch, undone after the test."""
    current = signal_handling._set_worker_signal_handlers
    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", current)
    install_worker_hook()


def status(pid: int) -> dict[str, str] | None:
    """``/proc/<pid>/status``, or None once the process has exited (a zombie included)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except FileNotFoundError:
        return None
    return None if fields["State"].split()[0] in ("Z", "X") else fields


def settled(pid: int) -> bool:
    """No signal of ``pid``'s is waiting to be handled any more (or it has exited)."""
    fields = status(pid)
    return fields is None or int(fields["SigPnd"], 16) == int(fields["ShdPnd"], 16) == 0


def signal_from_elsewhere(pid: int, signum: int) -> None:
    """As systemd or a terminal would: from a process that is not the worker's parent."""
    subprocess.run(["kill", f"-{signum}", str(pid)], check=True, timeout=30)


def worker_pids(it, count: int) -> tuple[set[int], set[int]]:
    """The pids of the first ``count`` batches' workers, and their mark_init marks."""
    pids: set[int] = set()
    marks: set[int] = set()
    for _ in range(count):
        _, p, m = next(it)
        pids |= set(p.tolist())
        marks |= set(m.tolist())
    return pids, marks


def survive_and_finish(workers: int, *, held: bool = False, **loader_args) -> set[int]:
    loader = DataLoader(Pids(), batch_size=4, num_workers=workers, timeout=60, **loader_args)
    with stops_held() if held else contextlib.nullcontext():
        it = iter(loader)
    pids, marks = worker_pids(it, workers)  # in-order loading: one batch from each worker
    assert len(pids) == workers and os.getpid() not in pids
    for pid in pids:
        for s in STOP_SIGNALS:
            signal_from_elsewhere(pid, s)
    for pid in pids:
        wait_for(lambda pid=pid: settled(pid), 30, f"worker {pid} to take its signals")
    rest = [int(i) for batch, _, _ in it for i in batch]
    assert rest == list(range(4 * workers, 32)), "every worker kept loading"
    del it, loader  # the loader's own shutdown still ends its workers
    for pid in pids:
        wait_for(lambda pid=pid: status(pid) is None, 30, f"worker {pid} to end")
    return marks


@pytest.mark.parametrize("persistent", [False, True])
def test_forked_workers_of_any_loader_survive_stop_signals(hook, persistent):
    survive_and_finish(2, persistent_workers=persistent)


def test_without_the_hook_prepared_loaders_shield_their_workers_in_worker_init():
    # A torch without the function the hook wraps: the worker_init_fn of prepared loaders,
    # which chains the script's own, and workers started with the stop signals blocked.
    marks = survive_and_finish(2, held=True, worker_init_fn=ShieldedInit(mark_init))
    assert marks == {1}, "the script's worker_init_fn ran too"


def test_the_parents_sigterm_still_ends_a_shielded_worker(hook):
    loader = DataLoader(Pids(), batch_size=4, num_workers=1, timeout=60)
    it = iter(loader)
    (pid,), _ = worker_pids(it, 1)
    signal_from_elsewhere(pid, signal.SIGTERM)
    wait_for(lambda: settled(pid), 30, "the worker to drop a stranger's SIGTERM")
    assert status(pid) is not None
    os.kill(pid, signal.SIGTERM)  # from this process: its parent
    wait_for(lambda: status(pid) is None, 30, "the worker to end on its parent's SIGTERM")
    # Its loader fails on the missing worker (or on a batch that worker still held).
    with pytest.raises((RuntimeError, ConnectionError)):
        list(it)


#: A rank whose loader worker is busy in a long sample when the rank dies without shutting its
#: loader down (SIGKILL, a crash, SIGTERM's default action in a script without a handler).
_ORPHANED_WORKER = """
import os, signal, sys, time
from torch.utils.data import DataLoader, Dataset
from tlaunch.loader_workers import install_worker_hook

class Endless(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        time.sleep(600)  # torch's own check of the parent comes only between samples

install_worker_hook()
it = iter(DataLoader(Endless(), batch_size=1, num_workers=1))
print(it._workers[0].pid, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_shielded_worker_ends_with_its_rank_even_in_the_middle_of_a_sample():
    rank = subprocess.Popen(
        [sys.executable, "-c", _ORPHANED_WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = None
    try:
        worker = int(rank.stdout.readline())
        wait_for(lambda: _sampling(worker), 60, "the worker to start its sample")
        rank.stdin.write("\n")
        rank.stdin.flush()
        assert rank.wait(timeout=60) == -signal.SIGKILL
        wait_for(lambda: status(worker) is None, 30, "the orphaned worker to end")
    finally:
        rank.kill()
        rank.wait(timeout=60)
        if worker is not None and status(worker) is not None:
            os.kill(worker, signal.SIGKILL)


def _sampling(pid: int) -> bool:
    """Whether ``pid`` sleeps in ``time.sleep`` (its main thread in a timed wait)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read() in ("hrtimer_nanosleep", "do_nanosleep", "clock_nanosleep")
    except FileNotFoundError:
        return False
