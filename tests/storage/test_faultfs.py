"""The fault-injection layer itself (tests/faultfs.py), on every backend it wraps."""

from __future__ import annotations

import time

import fsspec
import pytest

from tests.faultfs import PERMANENT, TRANSIENT, Fault, FaultyFS, http, slow, torn
from tlaunch.storage import resolve
from tlaunch.storage.store import is_transient


@pytest.fixture
def wrapped(any_store_url):
    """(FaultyFS over the backend's filesystem, a directory path in it)."""
    loc = resolve(any_store_url)
    loc.fs.makedirs(loc.path, exist_ok=True)
    return FaultyFS(loc.fs), loc.path


@pytest.mark.timeout(60)
def test_passes_through_and_logs(wrapped):
    fs, root = wrapped
    fs.pipe_file(f"{root}/a", b"hello")
    assert fs.cat_file(f"{root}/a") == b"hello"
    assert fs.cat(f"{root}/a") == b"hello"  # a composite call, through cat_file
    with fs.open(f"{root}/a", "rb") as f:
        assert f.read() == b"hello"
    assert [p.rsplit("/", 1)[-1] for p in fs.find(root)] == ["a"]
    fs.rm_file(f"{root}/a")
    assert not fs.exists(f"{root}/a")
    assert fs.calls("cat_file") == [f"{root}/a", f"{root}/a"]
    assert [op for op, _ in fs.log][:2] == ["pipe_file", "cat_file"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", TRANSIENT + PERMANENT, ids=lambda e: e.__name__)
def test_errors_on_chosen_op_and_path(wrapped, error):
    fs, root = wrapped
    fs.pipe_file(f"{root}/COMMIT", b"c")
    fs.pipe_file(f"{root}/other", b"o")
    rule = Fault("cat_file", "*/COMMIT", error, times=2)
    fs.rules.append(rule)
    assert fs.cat_file(f"{root}/other") == b"o"
    for _ in range(2):
        with pytest.raises(error) as err:
            fs.cat_file(f"{root}/COMMIT")
        assert is_transient(err.value) is (error in TRANSIENT)
    assert fs.cat_file(f"{root}/COMMIT") == b"c"  # times=2: the third call works
    assert rule.calls == [f"{root}/COMMIT"] * 2


def test_http_errors_carry_their_status():
    err = http(429)("slow down")
    assert err.status == err.code == 429 and is_transient(err)
    assert not is_transient(http(404)("gone"))


@pytest.mark.timeout(60)
def test_each_path_fails_once(wrapped):
    fs, root = wrapped
    for name in "abc":
        fs.pipe_file(f"{root}/{name}", name.encode())
    fs.rules.append(Fault("cat_file", each_path=True))
    for name in "abc":
        with pytest.raises(ConnectionResetError):
            fs.cat_file(f"{root}/{name}")
        assert fs.cat_file(f"{root}/{name}") == name.encode()


@pytest.mark.timeout(60)
def test_torn_upload_leaves_a_prefix_then_fails(wrapped):
    fs, root = wrapped
    fs.rules.append(torn("pipe_file", "*/f", keep=3, error=PermissionError))
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{root}/f", b"abcdef")
    fs.invalidate_cache(root)
    assert fs.cat_file(f"{root}/f") == b"abc"


@pytest.mark.timeout(60)
def test_silent_torn_write_reports_success(wrapped):
    fs, root = wrapped
    fs.rules.append(torn("pipe_file", keep=0.5, error=None))
    fs.pipe_file(f"{root}/f", b"abcdef")
    assert fs.cat_file(f"{root}/f") == b"abc"


@pytest.mark.timeout(60)
def test_torn_streamed_write(wrapped):
    fs, root = wrapped
    fs.rules.append(torn("open", "*/f", keep=4, error=ConnectionResetError))
    f = fs.open(f"{root}/f", "wb")
    f.write(b"ab")
    with pytest.raises(ConnectionResetError):
        f.write(b"cdef")
    f.close()
    fs.invalidate_cache(root)
    assert fs.cat_file(f"{root}/f") == b"abcd"
    with fs.open(f"{root}/f", "rb") as r:  # a tear rule never touches reads
        assert r.read() == b"abcd"


def test_slow_calls_stall_then_work(memory_url):
    fs = FaultyFS(fsspec.filesystem("memory"), slow("pipe_file", seconds=0.2))
    started = time.monotonic()
    fs.pipe_file(f"/{memory_url[9:]}/x", b"1")
    assert time.monotonic() - started >= 0.2
    assert fs.cat_file(f"/{memory_url[9:]}/x") == b"1"


def test_rules_can_be_scoped(memory_url):
    fs = FaultyFS(fsspec.filesystem("memory"))
    path = f"/{memory_url[9:]}/x"
    fs.pipe_file(path, b"1")
    with fs.faults(Fault("cat_file", times=None)), pytest.raises(ConnectionResetError):
        fs.cat_file(path)
    assert fs.cat_file(path) == b"1" and fs.rules == []


def test_glob_semantics_are_the_wrapped_filesystems(memory_url):
    # The layer must not hide what the backend does with '[': composite calls expand like it.
    inner = fsspec.filesystem("memory")
    base = f"/{memory_url[9:]}"
    inner.pipe_file(f"{base}/exp[1]/f", b"literal")
    inner.pipe_file(f"{base}/exp1/f", b"sibling")
    fs = FaultyFS(inner)
    assert fs.cat([f"{base}/exp[1]/f"]) == inner.cat([f"{base}/exp[1]/f"])
    assert fs.cat_file(f"{base}/exp[1]/f") == b"literal"


def test_a_rule_must_name_a_real_call():
    with pytest.raises(ValueError, match="matches none"):
        Fault("cat")
    with pytest.raises(ValueError, match="names no write"):
        torn("cat_file")
