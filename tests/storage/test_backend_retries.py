"""Retries around backends that retry themselves: bounded in time, and quiet.

gcsfs retries each request 6 times, sleeping 1+2+4+8+16 s plus jitter (~33 s a call), and logs a
full traceback at ERROR when it gives up. Wrapped in five attempts of ours that made
``tlaunch data fetch`` on a dead endpoint take 2 min 55 s and print several tracebacks before
the one-line error. The RetryPolicy's deadline bounds the total instead, and backend loggers
never print tracebacks to the terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tlaunch.storage.store import RetryPolicy, StorageUnavailable


class _Clock:
    """A fake monotonic clock; ``sleep`` advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _slow_failure(clock: _Clock, seconds: float, calls: list[int]):
    def call() -> None:
        calls.append(1)
        clock.now += seconds  # a backend that retried inside for this long, then gave up
        raise ConnectionResetError("reset by peer")

    return call


def test_the_deadline_bounds_attempts_that_each_took_long():
    clock, calls = _Clock(), []
    policy = RetryPolicy(attempts=5, deadline=30.0, sleep=clock.sleep, clock=clock)
    with pytest.raises(StorageUnavailable, match=r"still failing after 3 attempts in 37 s") as err:
        policy.call(_slow_failure(clock, 12.0, calls), action="reading", where="gs://b/x")
    assert len(calls) == 3  # at 0, ~12.25 and ~24.75 s: a fourth would start past 30 s
    assert "\n" not in str(err.value)


def test_a_call_slower_than_the_deadline_is_not_retried():
    clock, calls = _Clock(), []
    policy = RetryPolicy(attempts=5, deadline=30.0, sleep=clock.sleep, clock=clock)
    with pytest.raises(StorageUnavailable, match="after 1 attempt in 33 s"):
        policy.call(_slow_failure(clock, 33.0, calls), action="reading", where="gs://b/x")
    assert len(calls) == 1 and clock.sleeps == []


def test_fast_failures_get_every_attempt_within_the_deadline():
    clock, calls = _Clock(), []
    policy = RetryPolicy(attempts=5, base_delay=0.25, deadline=30.0, sleep=clock.sleep, clock=clock)
    with pytest.raises(StorageUnavailable, match="after 5 attempts"):
        policy.call(_slow_failure(clock, 0.0, calls), action="reading", where="/x")
    assert len(calls) == 5 and len(clock.sleeps) == 4


def test_no_backoff_sleeps_past_the_deadline():
    clock, calls = _Clock(), []
    policy = RetryPolicy(
        attempts=10, base_delay=4.0, max_delay=8.0, deadline=10.0, sleep=clock.sleep, clock=clock
    )
    with pytest.raises(StorageUnavailable):
        policy.call(_slow_failure(clock, 0.0, calls), action="reading", where="/x")
    assert clock.now <= 10.0


def test_a_success_after_retries_is_returned():
    clock, calls = _Clock(), []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow")
        return "ok"

    policy = RetryPolicy(deadline=30.0, sleep=clock.sleep, clock=clock)
    assert policy.call(flaky, action="reading", where="/x") == "ok"


# The same as a user meets it: gcsfs on a dead loopback port, in a fresh interpreter whose
# logging nobody configured (so Python's last-resort handler would print to the terminal).
# gcsfs's own backoff is scaled down 100x so that one of its calls takes ~0.3 s, not ~33 s:
# what is under test is our bound around it, and what reaches stderr.
_DEAD_PORT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time, types
    import gcsfs.retry
    real_sleep = asyncio.sleep
    gcsfs.retry.asyncio = types.SimpleNamespace(sleep=lambda s: real_sleep(s / 100))

    from tlaunch.storage import CheckpointStore, StorageError
    from tlaunch.storage.store import RetryPolicy

    store = CheckpointStore(
        "gs://nob/run", retry=RetryPolicy(attempts=5, base_delay=0.01, deadline=float(sys.argv[1]))
    )
    started = time.monotonic()
    try:
        store.all_steps()
    except StorageError as e:
        print(json.dumps({"seconds": time.monotonic() - started, "error": str(e)}))
    """
)


@pytest.mark.timeout(60)
def test_gcsfs_on_a_dead_port_is_bounded_and_prints_no_traceback(tmp_path):
    from tests.conftest import free_port

    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    script = tmp_path / "dead_port.py"
    script.write_text(_DEAD_PORT_SCRIPT)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(script), "0.5"], env=env, capture_output=True, text=True, timeout=50
    )
    assert time.monotonic() - started < 30
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    # One gcsfs call (6 tries inside) takes ~0.3 s here: a 0.5 s deadline allows two, not five.
    assert "still failing after 2 attempts" in result["error"], result
    assert result["seconds"] < 5, result
    assert "Traceback" not in out.stderr and "out of retries" not in out.stderr, out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_configured_logging_gets_backend_records_as_one_line(caplog, monkeypatch):
    # An application that set up logging still sees what gcsfs says, without the traceback.
    import logging

    from tlaunch.storage import resolve

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    resolve("gs://nob/run")  # imports gcsfs: the first resolve of a backend quiets its logs
    try:
        raise ConnectionRefusedError("Connect call failed\n('127.0.0.1', 9)")
    except ConnectionRefusedError as e:
        logging.getLogger("gcsfs").exception(f"_request out of retries on exception: {e}")
    (record,) = [r for r in caplog.records if r.name == "gcsfs"]
    assert record.exc_info is None and record.levelno == logging.ERROR
    assert record.getMessage() == (
        "_request out of retries on exception: Connect call failed ('127.0.0.1', 9)"
    )
    assert "Traceback" not in caplog.text
