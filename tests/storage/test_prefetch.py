"""A resume's checkpoint read ahead of the restore: taken only when proven, harmless otherwise.

The prefetch (``tlaunch.storage.checkpoint.prefetch``) reads (and, once allowed, parses) the step a
restore will very likely load while the process still starts; the restore takes those bytes only
when they were read whole and carry the sha256 its own MANIFEST names. Each test runs the real store on ``faulty://`` and
compares with what the restore does without a prefetch.
"""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch
from ckpt_helpers import NO_WAIT, make_state, rewrite

from tests import faultfs
from tlaunch.storage import CheckpointStore
from tlaunch.storage.checkpoint import prefetch, serialize
from tlaunch.storage.checkpoint.manifest import CheckpointError
from tlaunch.storage.checkpoint.store import CheckpointWarning

pytestmark = pytest.mark.timeout(60)
URL = "faulty://prefetch/run"


@pytest.fixture(autouse=True)
def fresh():
    faultfs.clear()
    yield
    prefetch.discard()
    faultfs.clear()


def saved(*steps: int) -> CheckpointStore:
    store = CheckpointStore(URL, retry=NO_WAIT)
    for step in steps:
        store.save(step, **make_state(step))
    return store


def reads(store: CheckpointStore, name: str) -> list[str]:
    return store.location.fs.calls("cat_file", f"*/{name}")


def read_by_thread(name: str, threads: list[str]) -> faultfs.Fault:
    """Lets every read of ``name`` through, recording which thread made it."""

    def record() -> None:
        threads.append(threading.current_thread().name)

    return faultfs.Fault("cat_file", f"*/{name}", error=None, times=None, action=record)


def assert_same_state(loaded, step: int) -> None:
    expected = make_state(step)
    for key, tensors in expected["tensors"].items():
        for k, t in tensors.items():
            assert torch.equal(loaded.tensors[key][k], t), (key, k)
    assert loaded.state["step"] == step


def test_prefetched_files_are_read_once_by_the_prefetch_and_taken_by_the_restore():
    store = saved(1, 2)
    threads: list[str] = []
    with faultfs.faults(read_by_thread("model.safetensors", threads)):
        prefetch.start(URL)
        loaded = store.load_latest()
    assert_same_state(loaded, 2)
    assert threads == ["tlaunch-prefetch"], "the restore read the file again"


def test_files_parsed_ahead_are_taken_parsed(monkeypatch):
    store = saved(1, 2)
    parsers: list[str] = []
    load_file = serialize.load_file

    def spy(*args):
        parsers.append(threading.current_thread().name)
        return load_file(*args)

    monkeypatch.setattr(serialize, "load_file", spy)
    prefetch.start(URL)
    prefetch.parse_ahead()
    loaded = store.load_latest()
    assert_same_state(loaded, 2)
    assert parsers and set(parsers) == {"tlaunch-prefetch"}, parsers


def test_a_read_error_in_the_prefetch_is_the_restores_to_retry_and_resume_is_exact():
    store = saved(1, 2)
    failed: list[str] = []
    threads: list[str] = []
    reset = faultfs.Fault(
        "cat_file",
        "*/step-000000002/optimizer.pt",
        ConnectionResetError,
        action=lambda: failed.append(threading.current_thread().name),
    )
    with faultfs.faults(reset, read_by_thread("optimizer.pt", threads)):
        prefetch.start(URL)
        prefetch.parse_ahead()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing quarantined, no fallback
            loaded = store.load_latest()
    # The prefetch's read failed (it does not retry); the restore read the file itself.
    assert failed == ["tlaunch-prefetch"]
    assert len(threads) == 1 and threads[0] != "tlaunch-prefetch"
    assert_same_state(loaded, 2)
    expected = make_state(2)["objects"]["optimizer"]["state"]
    for key, value in expected[0].items():
        assert torch.equal(loaded.objects["optimizer"]["state"][0][key], value), key
    assert [i.step for i in store.committed()] == [1, 2]


@pytest.mark.parametrize("parsed", [False, True], ids=["bytes", "parsed"])
def test_a_rank_loading_the_step_rank_0_verified_takes_the_prefetch_too(parsed):
    # The other ranks load rank 0's step with verify=False; proven bytes serve them as well,
    # so that their read overlaps their start-up instead of following rank 0's broadcast.
    saved(1, 2)
    threads: list[str] = []
    with faultfs.faults(read_by_thread("model.safetensors", threads)):
        prefetch.start(URL)
        if parsed:
            prefetch.parse_ahead()
        loaded = CheckpointStore(URL, retry=NO_WAIT).load(2, verify=False)
    assert_same_state(loaded, 2)
    assert threads == ["tlaunch-prefetch"], "the unverified load read the file again"


def test_a_step_the_restore_does_not_load_is_not_taken():
    store = saved(1, 2)
    threads: list[str] = []
    with faultfs.faults(read_by_thread("step-000000001/model.safetensors", threads)):
        prefetch.start(URL)  # the newest: step 2
        loaded = store.load(1)  # as --resume 1 under a launcher that guessed otherwise
    assert_same_state(loaded, 1)
    assert threads and "tlaunch-prefetch" not in threads


@pytest.mark.parametrize("verify", [True, False], ids=["rank 0", "another rank"])
def test_prefetched_bytes_whose_digest_is_not_the_manifests_are_not_taken(verify):
    store = saved(1, 2)
    prefetch.start(URL)
    prefetch.take("nothing", {})  # waits for the plan
    for entry in list(prefetch._current.files.values()):
        entry.done.wait(30)
    # The same paths, other bytes: step 2 deleted and saved again from another state.
    store.delete(2)
    store.save(2, **make_state(7))
    loaded = store.load_latest() if verify else store.load(2, verify=False)
    expected = make_state(7)["tensors"]["model"]
    assert all(torch.equal(loaded.tensors["model"][k], t) for k, t in expected.items())


def test_a_corrupt_file_found_by_the_prefetch_quarantines_and_falls_back_as_without_one():
    store = saved(1, 2)
    rewrite(store, 2, "model.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    prefetch.start(URL)
    prefetch.parse_ahead()
    with pytest.warns(CheckpointWarning, match="step 2 .*quarantined it, using step 1 instead"):
        loaded = store.load_latest()
    assert_same_state(loaded, 1)
    assert [i.step for i in store.committed()] == [1]
    assert [i.step for i in store.all_steps() if i.quarantined] == [2]
    with pytest.raises(CheckpointError, match="step 2 .* is quarantined"):
        CheckpointStore(URL, retry=NO_WAIT).load(2)


@pytest.mark.parametrize(
    "cpus, mount, at_once",
    [(2, "ext4", "one"), (8, "ext4", "several"), (2, "fuse.drive", "several")],
)
def test_on_a_local_disk_the_prefetch_leaves_a_core_to_the_script(
    tmp_path, monkeypatch, cpus, mount, at_once
):
    # A read from a local disk is CPU (the page cache's copy, the sha256): with 2 cores, files
    # read at once would take the core the script's imports run on. A FUSE mount (Drive) is
    # waited on, so all files are read at once there. Each read waits (boundedly) for another
    # to start beside it, so overlapping reads are seen, not hoped for.
    from tlaunch.storage import localfs
    from tlaunch.storage.checkpoint.reading import StepReader

    url = str(tmp_path / "ckpt")
    table = tmp_path / "mounts"
    table.write_text(f"/dev/root / ext4 rw 0 0\ndrive {url} {mount} rw 0 0\n")
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(table))
    store = CheckpointStore(url, retry=NO_WAIT)
    store.save(1, **make_state(1))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    lock, in_flight, widest, arrived = threading.Lock(), [0], [0], threading.Condition()
    read = StepReader.read

    def counted(self, name, expect, **kw):
        with lock:
            in_flight[0] += 1
            widest[0] = max(widest[0], in_flight[0])
        with arrived:
            arrived.notify_all()
            arrived.wait_for(lambda: in_flight[0] > 1, timeout=0.5)
        try:
            return read(self, name, expect, **kw)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(StepReader, "read", counted)
    prefetch.start(url)
    prefetch.parse_ahead()
    assert_same_state(CheckpointStore(url, retry=NO_WAIT).load_latest(), 1)
    assert ("one" if widest[0] == 1 else "several") == at_once, widest
