"""Rerunning after a hard kill: a lease whose owner is gone is taken without --takeover."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading

import pytest

from tlaunch import lease as launch_lease
from tlaunch.storage import Lease, LeaseHeld

pytestmark = pytest.mark.timeout(60)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: nothing runs under it now (reuse within the test is negligible)


def _rewrite(url: str, **changes) -> None:
    path = f"{url}/LEASE.json"
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def test_a_lease_left_by_a_killed_process_on_this_host_is_taken_at_once(tmp_path):
    url = str(tmp_path / "ckpt")
    Lease(url).acquire()
    _rewrite(url, pid=_dead_pid())  # the owner was SIGKILLed: its process is gone
    replaced = Lease(url).acquire()
    assert replaced is not None and replaced.host == socket.gethostname()


def test_a_live_owner_on_this_host_still_refuses(tmp_path):
    url = str(tmp_path / "ckpt")
    Lease(url).acquire()  # this very process: alive
    with pytest.raises(LeaseHeld):
        Lease(url).acquire()


def _held_from_elsewhere(url: str, ttl: float) -> None:
    Lease(url, ttl=ttl).acquire()
    _rewrite(url, host="another-vm", pid=4242)


def test_a_stopped_lease_from_another_machine_is_waited_out(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_lease, "LEASE_POLL", 0.05)
    url = str(tmp_path / "ckpt")
    _held_from_elsewhere(url, ttl=0.6)  # a reclaimed VM: no more heartbeats
    hold = launch_lease.take_lease(url, takeover=False)
    assert hold is not None and hold.lease.read().token == hold.lease.token
    hold.release()


def test_a_lease_renewed_from_another_machine_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_lease, "LEASE_POLL", 0.05)
    url = str(tmp_path / "ckpt")
    _held_from_elsewhere(url, ttl=2.0)
    with open(f"{url}/LEASE.json") as f:
        before = json.load(f)
    renew = threading.Timer(
        0.3, _rewrite, args=(url,), kwargs={"heartbeat": before["heartbeat"] + 0.3}
    )
    renew.start()
    with pytest.raises(LeaseHeld):
        launch_lease.take_lease(url, takeover=False)
    renew.join()
    assert dataclasses.is_dataclass(Lease(url).read())
