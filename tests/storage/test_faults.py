"""Storage faults: full disks and denied writes fail in one line; transient errors are retried."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from ckpt_helpers import NO_WAIT, enospc, faulty_store, injected, make_state

from tlaunch.storage import CheckpointStore
from tlaunch.storage.store import RetryPolicy, StorageError, is_transient, storage_error


@pytest.fixture(params=["local", "memory"])
def base_url(request, tmp_path, memory_url) -> str:
    """A place with one good checkpoint (step 1) in it."""
    url = str(tmp_path / "ckpt") if request.param == "local" else memory_url
    CheckpointStore(url).save(1, **make_state(1))
    return url


def _previous_is_intact(url: str) -> None:
    store = CheckpointStore(url)
    assert [i.step for i in store.committed()] == [1]
    assert store.load_latest().state["step"] == 1
    store.clean_stale()
    assert [i.step for i in store.all_steps()] == [1]  # nothing of the failed save remains


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(base_url):
    store = faulty_store(base_url, enospc(), match="optimizer.pt")
    with pytest.raises(StorageError) as err:
        store.save(2, **make_state(2))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("saving checkpoint step 2 failed: disk full while writing")
    assert "optimizer.pt" in message and "free space" in message
    assert message.endswith("earlier checkpoints are intact")
    _previous_is_intact(base_url)


def test_permission_denied_names_the_fix(base_url):
    store = faulty_store(
        base_url, PermissionError(errno.EACCES, "Permission denied"), match="model"
    )
    with pytest.raises(
        StorageError, match=r"permission denied while writing .*step-000000002.*write access"
    ) as err:
        store.save(2, **make_state(2))
    assert "\n" not in str(err.value)
    _previous_is_intact(base_url)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    url = str(tmp_path / "ckpt")
    CheckpointStore(url).save(1, **make_state(1))
    os.chmod(url, 0o555)
    try:
        with pytest.raises(StorageError, match="permission denied while writing"):
            CheckpointStore(url).save(2, **make_state(2))
    finally:
        os.chmod(url, 0o755)
    _previous_is_intact(url)


def test_transient_errors_are_retried_with_backoff(memory_url):
    CheckpointStore(memory_url).save(1, **make_state(1))
    delays: list[float] = []
    retry = RetryPolicy(attempts=5, base_delay=0.1, max_delay=0.3, sleep=delays.append)
    store = faulty_store(
        memory_url,
        ConnectionResetError(errno.ECONNRESET, "reset"),
        "state.json",
        times=3,
        retry=retry,
    )
    info = store.save(2, **make_state(2))
    assert info.step == 2 and injected(store) == 3
    assert len(delays) == 3
    assert [round(d / b, 1) for d, b in zip(delays, [0.1, 0.2, 0.3], strict=True)] == pytest.approx(
        [1, 1, 1], abs=0.21
    )
    assert CheckpointStore(memory_url).load(2).state["step"] == 2


def test_retry_bound_exhausted_is_an_error(memory_url):
    CheckpointStore(memory_url).save(1, **make_state(1))

    class ServiceUnavailable(Exception):
        code = 503

    store = faulty_store(
        memory_url, ServiceUnavailable("503 Service Unavailable\n<html>"), "COMMIT"
    )
    with pytest.raises(
        StorageError,
        match=r"still failing after 4 attempts in 0 s \(503 Service Unavailable <html>\)",
    ) as err:
        store.save(2, **make_state(2))
    assert "\n" not in str(err.value) and injected(store) == NO_WAIT.attempts
    _previous_is_intact(memory_url)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (asyncio.TimeoutError(), True),  # a class of its own in 3.10
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (type("HttpError", (Exception,), {"code": 429})(), True),
        (
            type(
                "ClientError",
                (Exception,),
                {"response": {"ResponseMetadata": {"HTTPStatusCode": 502}}},
            )(),
            True,
        ),
        (enospc(), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (FileNotFoundError(), False),
        (type("HttpError", (Exception,), {"code": 404})(), False),
        (ValueError("bug"), False),
    ],
)
def test_what_counts_as_transient(error, transient):
    assert is_transient(error) is transient


def test_wrapped_transient_errors_count_too():
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_storage_errors_redact_credentials():
    err = storage_error(enospc(), "writing", "s3://AKIA:secret@bucket/run/step-000000002")
    assert "secret" not in str(err) and "s3://***@bucket/run" in str(err)
