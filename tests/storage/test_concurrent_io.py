"""A step's files are written and read concurrently, streamed, and every guarantee still holds.

Concurrency is proven, not timed: two files' first calls meet at a barrier, which a store that
wrote (or read) one file after the other could never pass. Memory is proven with tracemalloc:
a save that held a file's bytes in a Python object would show them.
"""

from __future__ import annotations

import threading
import tracemalloc

import pytest
import torch
from ckpt_helpers import NO_WAIT, faulty_location, make_state
from test_checkpoint_conformance import _assert_same

from tests.faultfs import Fault, torn
from tlaunch.storage import CheckpointStore, StorageError
from tlaunch.storage.checkpoint import reading
from tlaunch.storage.checkpoint.manifest import COMMIT

BIG = ("*optimizer.pt*", "*model.safetensors*")


def _store(url: str, *rules: Fault) -> CheckpointStore:
    return CheckpointStore(faulty_location(url, *rules), retry=NO_WAIT)


def _meeting(op: str) -> list[Fault]:
    """The first ``op`` call of each big file waits for the other's (10 s at most)."""
    barrier = threading.Barrier(len(BIG), timeout=10)
    return [Fault(op, path, error=None, action=barrier.wait) for path in BIG]


def test_the_files_of_a_step_are_written_at_the_same_time(memory_url):
    store = _store(memory_url, *_meeting("open"))
    saved = make_state(1)
    store.save(1, **saved)  # a BrokenBarrierError if one file waited for the other
    assert all(rule.calls for rule in store.location.fs.rules)
    _assert_same(CheckpointStore(memory_url).load(1), saved)


def test_the_files_of_a_step_are_read_at_the_same_time(memory_url):
    saved = make_state(1)
    CheckpointStore(memory_url).save(1, **saved)
    store = _store(memory_url, *_meeting("cat_file"))
    _assert_same(store.load_latest(), saved)
    assert all(rule.calls for rule in store.location.fs.rules)


def test_a_reset_on_the_third_ranged_read_is_retried_and_the_step_loads_bitwise(
    memory_url, monkeypatch
):
    monkeypatch.setattr(reading, "READ_PART", 256)  # every big file in several ranged reads
    saved = make_state(1)
    CheckpointStore(memory_url).save(1, **saved)
    reads = []

    def third_fails() -> None:
        reads.append(1)
        if len(reads) == 3:
            raise ConnectionResetError("injected reset on the third read")

    rule = Fault("cat_file", "*optimizer.pt", error=None, times=None, action=third_fails)
    store = _store(memory_url, rule)
    _assert_same(store.load_latest(), saved)
    parts = -(-store.location.fs.fs.info(rule.calls[0])["size"] // 256)
    assert parts >= 3 and len(reads) == parts + 1  # the third part once more, nothing else
    assert not store.verify(1)[1]  # nothing quarantined, nothing changed


def test_a_torn_upload_of_one_of_several_concurrent_files_never_yields_a_commit(memory_url):
    CheckpointStore(memory_url).save(1, **make_state(1))
    tear = torn("open", "*optimizer.pt", keep=0.5, times=None)
    store = _store(memory_url, tear)
    with pytest.raises(StorageError, match="saving checkpoint step 2 failed"):
        store.save(2, **make_state(2))
    assert len(tear.calls) == NO_WAIT.attempts  # retried whole, every attempt torn
    fresh = CheckpointStore(memory_url)
    assert [i.step for i in fresh.all_steps()] == [1]  # step 2 removed, never committed
    assert not fresh.location.fs.exists(fresh.location.join("step-000000002", COMMIT))


def test_a_torn_upload_retried_lands_whole(memory_url):
    """The torn attempt is cancelled before the retry: its prefix never replaces the file."""
    tear = torn("open", "*optimizer.pt", keep=0.5, times=1)
    store = _store(memory_url, tear)
    saved = make_state(2)
    store.save(2, **saved)
    assert tear.calls
    _assert_same(CheckpointStore(memory_url).load(2), saved)


def test_a_save_streams_its_files_without_holding_their_bytes(tmp_path):
    """8 MB of weights and 16 MB of Adam moments reach the disk with under 2 MB of Python
    memory: no file's bytes are ever built in memory (torch's own memory is not counted by
    tracemalloc, so what is measured is exactly the serialized bytes a save would hold)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 2048)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.save(1, tensors={"model": model.state_dict()})  # imports and first-call caches
    tracemalloc.start()
    try:
        store.save(
            2, tensors={"model": model.state_dict()}, objects={"optimizer": optimizer.state_dict()}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"a save held {peak / 2**20:.1f} MB of Python memory"
    loaded = store.load(2)
    assert torch.equal(loaded.tensors["model"]["weight"], model.weight.detach())
    assert torch.equal(
        loaded.objects["optimizer"]["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"]
    )


def test_a_local_file_is_read_into_its_buffer_part_by_part(tmp_path, monkeypatch):
    """On this machine's disk each ranged read lands in the file's buffer itself: the Python
    memory a read holds is the file's size, with no part's copy beside it; a byte changed in
    a late part still fails the file's sha256."""
    from tlaunch.storage.checkpoint.manifest import CheckpointError

    monkeypatch.setattr(reading, "READ_PART", 1 << 20)
    url = str(tmp_path / "ckpt")
    weights = {"w": torch.randn(1 << 21)}  # 8 MB: eight parts
    CheckpointStore(url).save(1, tensors={"model": weights})
    store = CheckpointStore(url, retry=NO_WAIT)
    reader = reading.StepReader(store.location, NO_WAIT, url, store._scan()[0][1])
    files = reader.manifest()
    name = next(n for n in files if n.startswith("model"))
    tracemalloc.start()
    try:
        data = reader.read(name, files[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == files[name]["size"] > 8 << 20
    assert peak < len(data) + (256 << 10), f"{(peak - len(data)) / 2**20:.2f} MB beside the file"
    assert torch.equal(store.load(1).tensors["model"]["w"], weights["w"])
    path = f"{reader.s.path}/{name}"
    with open(path, "r+b") as f:  # a byte of the seventh part
        f.seek(6 * (1 << 20) + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256"):
        reader.read(name, files[name])
