"""One writer per checkpoint directory: the lease, its heartbeat, and the fence on commits.

Every behaviour runs on local disk, memory://, fake-gcs-server and moto S3 (``any_store_url``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from ckpt_helpers import NO_WAIT, make_state

from tlaunch.storage import CheckpointStore, Lease, LeaseHeld, LeaseLost
from tlaunch.storage.checkpoint.lease import LEASE

pytestmark = pytest.mark.timeout(120)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def lease(url: str, **kwargs) -> Lease:
    return Lease(url, retry=NO_WAIT, **kwargs)


def committed(url: str) -> list[int]:
    return [i.step for i in CheckpointStore(url, retry=NO_WAIT).committed()]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class TestAcquire:
    def test_the_first_writer_takes_it_and_the_record_names_it(self, any_store_url):
        mine = lease(any_store_url, ttl=30)
        assert mine.acquire() is None  # nothing was there before
        record = mine.read()
        assert record.token == mine.token
        assert (record.host, record.pid) == (socket.gethostname(), os.getpid())
        assert record.expires == pytest.approx(record.heartbeat + 30)
        raw = json.loads(mine.location.fs.cat_file(mine.location.join(LEASE)))
        assert {"token", "host", "pid", "started", "heartbeat", "ttl", "expires"} <= raw.keys()

    def test_a_second_writer_is_refused_with_the_owner_named(self, any_store_url):
        first = lease(any_store_url, ttl=30)
        first.acquire()
        with pytest.raises(LeaseHeld) as caught:
            lease(any_store_url, ttl=30).acquire()
        message = str(caught.value)
        assert f"pid {first.read().pid}" in message and socket.gethostname() in message
        assert "expires in" in message
        assert caught.value.owner.token == first.token
        assert first.read().token == first.token, "the refused writer changed nothing"

    def test_a_stale_lease_is_taken_over(self, any_store_url):
        clock = Clock()
        dead = lease(any_store_url, ttl=5, clock=clock)
        dead.acquire()
        clock.now += 6  # the owner died without releasing; its TTL ran out
        new = lease(any_store_url, ttl=5, clock=clock)
        replaced = new.acquire()
        assert replaced.token == dead.token
        assert new.read().token == new.token

    def test_takeover_replaces_a_live_lease(self, any_store_url):
        old = lease(any_store_url, ttl=30)
        old.acquire()
        new = lease(any_store_url, ttl=30)
        assert new.acquire(takeover=True).token == old.token
        assert new.read().token == new.token
        with pytest.raises(LeaseLost, match=f"pid {new.read().pid}"):
            old.heartbeat()

    def test_a_damaged_lease_counts_as_stale(self, any_store_url):
        mine = lease(any_store_url)
        if mine.location.local:
            os.makedirs(mine.location.path)
        mine.location.fs.pipe_file(mine.location.join(LEASE), b"{not json")
        mine.acquire()
        assert mine.read().token == mine.token


class TestRelease:
    def test_release_removes_only_our_own_lease(self, any_store_url):
        old, new = lease(any_store_url), lease(any_store_url)
        old.acquire()
        new.acquire(takeover=True)
        assert old.release() is False
        assert new.read().token == new.token
        assert new.release() is True
        assert new.read() is None


class TestHeartbeat:
    def test_heartbeat_moves_the_expiry(self, any_store_url):
        clock = Clock()
        mine = lease(any_store_url, ttl=5, clock=clock)
        mine.acquire()
        before = mine.read()
        clock.now += 4
        after = mine.heartbeat()
        assert after.expires == pytest.approx(before.expires + 4)
        assert mine.read().expires == pytest.approx(after.expires)
        assert after.started == before.started

    def test_the_background_heartbeat_keeps_a_long_run_fresh(self, any_store_url):
        ttl = 0.6
        mine = lease(any_store_url, ttl=ttl)
        mine.acquire()
        problems: list[Exception] = []
        beat = mine.keep_alive(problems.append)
        try:
            first = mine.read().heartbeat
            deadline = time.monotonic() + 4 * ttl  # several TTLs: without renewals it expires
            while time.monotonic() < deadline:
                record = mine.read()
                assert not record.stale(time.time()), "the lease expired while its run was alive"
                time.sleep(0.05)
            assert mine.read().heartbeat > first + ttl
        finally:
            beat.stop()
        assert not problems
        stopped_at = mine.read().heartbeat
        time.sleep(ttl)
        assert mine.read().heartbeat == stopped_at, "stop() ends the renewals"

    def test_the_background_heartbeat_reports_a_lost_lease_and_stops(self, any_store_url):
        mine = lease(any_store_url, ttl=0.6)
        mine.acquire()
        problems: list[Exception] = []
        beat = mine.keep_alive(problems.append)
        try:
            thief = lease(any_store_url, ttl=30)
            thief.acquire(takeover=True)
            wait_until(lambda: problems, 10, "the heartbeat to notice")
            assert isinstance(problems[0], LeaseLost)
            assert thief.read().token == thief.token, "the loser never overwrites the winner"
        finally:
            beat.stop()


class TestFence:
    def test_the_holder_saves(self, any_store_url):
        mine = lease(any_store_url)
        mine.acquire()
        store = CheckpointStore(any_store_url, retry=NO_WAIT, fence=mine.check)
        store.save(1, **make_state(1))
        assert committed(any_store_url) == [1]

    def test_a_writer_whose_lease_changed_hands_commits_nothing(self, any_store_url):
        old = lease(any_store_url)
        old.acquire()
        orphan = CheckpointStore(any_store_url, retry=NO_WAIT, fence=old.check)
        orphan.save(1, **make_state(1))
        lease(any_store_url).acquire(takeover=True)
        with pytest.raises(LeaseLost, match="another run"):
            orphan.save(2, **make_state(2))
        assert committed(any_store_url) == [1]

    def test_the_fence_is_checked_right_before_commit(self, any_store_url):
        # The lease changes hands while the step's files are written: no COMMIT follows.
        old, new = lease(any_store_url), lease(any_store_url)
        old.acquire()
        calls = []

        def fence() -> None:
            old.check()
            calls.append(1)
            if len(calls) == 1:  # passed at the start of the save; lost before its COMMIT
                new.acquire(takeover=True)

        orphan = CheckpointStore(any_store_url, retry=NO_WAIT, fence=fence)
        with pytest.raises(LeaseLost):
            orphan.save(3, **make_state(3))
        assert committed(any_store_url) == []

    def test_only_the_holder_cleans_and_applies_retention(self, any_store_url):
        from tlaunch.storage import RetentionPolicy

        holder = lease(any_store_url)
        holder.acquire()
        mine = CheckpointStore(any_store_url, retry=NO_WAIT, fence=holder.check)
        mine.save(1, **make_state(1))
        mine.save(2, **make_state(2))
        in_flight = holder.location.join("step-000000003")
        if holder.location.local:
            os.makedirs(in_flight)
        holder.location.fs.pipe_file(f"{in_flight}/model.safetensors", b"x")
        lease(any_store_url).acquire(takeover=True)  # another run now owns the directory
        with pytest.raises(LeaseLost):
            mine.clean_stale()
        with pytest.raises(LeaseLost):
            mine.apply_retention(RetentionPolicy(keep_last=1))
        steps = {i.step: i.committed for i in CheckpointStore(any_store_url).all_steps()}
        assert steps == {1: True, 2: True, 3: False}, "the new owner's in-flight step survives"


@pytest.mark.parametrize("backend", ["local", "gcs"])
def test_of_writers_racing_for_a_free_lease_exactly_one_wins(backend, tmp_path, request):
    # Where the store can create an object only if absent (a hard link locally, GCS's
    # ifGenerationMatch=0), two writers can never both hold the lease.
    url = str(tmp_path / "ck") if backend == "local" else request.getfixturevalue("gcs_bucket")
    contenders = [lease(url) for _ in range(6)]
    start = threading.Barrier(len(contenders))
    won, refused = [], []

    def race(contender: Lease) -> None:
        start.wait()
        try:
            contender.acquire()
            won.append(contender.token)
        except LeaseHeld:
            refused.append(contender.token)

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == len(contenders) - 1
    assert lease(url).read().token == won[0]
