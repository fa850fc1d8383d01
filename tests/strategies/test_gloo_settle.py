"""Ending a gloo process group: the wait that keeps its worker threads from aborting the exit.

gloo's worker threads free finished collectives after the caller has moved on; a free that
needs the GIL after interpreter finalization began aborts the process. The strategy waits,
without the GIL, until those threads are idle. These tests check that the wait can see the
threads (by the name torch gives them) and tell running from idle.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.helpers import wait_for
from tlaunch.strategies import base

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PROBE = r"""
import json, os, tempfile, time
import torch.distributed as dist
from tests.e2e.helpers import wait_for
from tlaunch.strategies import base

store = tempfile.mktemp()
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
out = [None]
dist.all_gather_object(out, {"rng": list(range(100))})
dist.barrier()
names = set()
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{tid}/comm") as f:
        names.add(f.read().strip())
dist.destroy_process_group()
started = time.monotonic()
base._settle_gloo_threads()
print(json.dumps({"named": base._GLOO_THREAD in names, "waited": time.monotonic() - started}))
"""


def test_the_wait_sees_gloos_worker_threads_and_ends_once_they_are_idle():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["named"], f"no thread named {base._GLOO_THREAD}: torch renamed gloo's threads"
    assert result["waited"] < 1.0  # idle threads: a few polls, not the 2 s bound


def _named(name: bytes, work) -> None:
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME, this thread
    work()


def test_a_running_thread_of_that_name_is_waited_for_and_a_blocked_one_is_not():
    stop, release = threading.Event(), threading.Event()
    data = bytes(8 << 20)

    def work() -> None:
        while not stop.is_set():
            hashlib.sha256(data).digest()  # releases the GIL: the thread is on a CPU
        release.wait(30)  # blocked: as a gloo worker waiting for work

    thread = threading.Thread(target=_named, args=(base._GLOO_THREAD.encode(), work))
    thread.start()
    try:
        wait_for(base._gloo_threads_running, 10, "the hashing thread to be seen running")
        started = time.monotonic()
        base._settle_gloo_threads(timeout=0.3)  # busy throughout: waits out its bound
        assert time.monotonic() - started >= 0.3
        stop.set()
        wait_for(lambda: not base._gloo_threads_running(), 10, "it to be seen blocked")
        started = time.monotonic()
        base._settle_gloo_threads()
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        release.set()
        thread.join(10)
