"""The async writer: one save in flight, failures surface, flush and exit commit; cpu_snapshot,
cpu_view and the snapshot memory the next save copies into."""

from __future__ import annotations

import collections
import pathlib
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from ckpt_helpers import make_state

from tlaunch.storage import (
    AsyncCheckpointWriter,
    CheckpointInfo,
    CheckpointStore,
    RetentionPolicy,
    SnapshotBuffers,
    StorageError,
    cpu_snapshot,
    cpu_view,
)


class GatedStore:
    """A fake store whose save of step N blocks until the test opens gate N."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = collections.defaultdict(threading.Event)
        self.entered: dict[int, threading.Event] = collections.defaultdict(threading.Event)
        self.failures: dict[int, BaseException] = {}
        self.retention_calls: list[object] = []
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def save(self, step, **kwargs) -> CheckpointInfo:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered[step].set()
        try:
            assert self.gates[step].wait(10), f"test never opened gate {step}"
            if step in self.failures:
                raise self.failures[step]
            return CheckpointInfo(step, f"memory://fake/step-{step:09d}", True, 1.0, 1)
        finally:
            with self._lock:
                self.active -= 1

    def apply_retention(self, policy) -> list[int]:
        self.retention_calls.append(policy)
        if policy == "broken":
            raise StorageError("retention exploded")
        return []


@pytest.fixture
def gated():
    store = GatedStore()
    writer = AsyncCheckpointWriter(store)
    yield store, writer
    for gate in list(store.gates.values()):
        gate.set()
    writer.close() if writer._error is None else None


def _submit_in_thread(writer, step) -> threading.Event:
    returned = threading.Event()

    def run():
        writer.submit(step)
        returned.set()

    threading.Thread(target=run, daemon=True).start()
    return returned


def test_second_submit_blocks_until_the_first_commits(gated):
    store, writer = gated
    writer.submit(1)
    assert store.entered[1].wait(5)
    assert writer.in_flight == 1
    second = _submit_in_thread(writer, 2)
    assert not second.wait(0.2), "submit(2) returned while step 1 was still in flight"
    assert not store.entered[2].is_set()
    store.gates[1].set()
    assert second.wait(5) and store.entered[2].wait(5)
    store.gates[2].set()
    writer.flush(5)
    assert store.max_active == 1
    assert writer.last_committed.step == 2 and len(writer.save_durations) == 2


def test_a_failure_is_raised_by_the_next_submit_and_only_once(gated):
    store, writer = gated
    store.failures[1] = StorageError("disk full while writing x; free space")
    writer.submit(1)
    store.gates[1].set()
    with pytest.raises(StorageError, match="disk full"):
        writer.submit(2)
    assert not store.entered[2].is_set()  # the failed save's error stopped this one
    store.gates[2].set()
    writer.submit(2)
    writer.flush(5)
    assert writer.last_committed.step == 2 and len(writer.save_durations) == 1


def test_flush_and_check_raise_a_failure(gated):
    store, writer = gated
    store.failures[1] = StorageError("boom")
    writer.submit(1)
    writer.check()  # still in flight: nothing to report yet, and no blocking
    store.gates[1].set()
    with pytest.raises(StorageError, match="boom"):
        writer.flush(5)
    writer.flush(5)  # reported once
    store.failures[2] = StorageError("bang")
    store.gates[2].set()
    writer.submit(2)
    writer._thread.join(5)
    with pytest.raises(StorageError, match="bang"):
        writer.check()


def test_flush_times_out_naming_the_step(gated):
    store, writer = gated
    writer.submit(7)
    with pytest.raises(TimeoutError, match="step 7 still running after 0.05 s"):
        writer.flush(0.05)
    store.gates[7].set()
    writer.flush(5)


def test_retention_runs_after_each_commit_and_its_failure_is_not_fatal(caplog):
    store = GatedStore()
    writer = AsyncCheckpointWriter(store, retention="broken")
    store.gates[1].set()
    writer.submit(1)
    writer.flush(5)
    assert store.retention_calls == ["broken"]
    assert "retention after step 1 failed" in caplog.text
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(2)


def test_flush_waits_for_the_commit_and_retention_but_not_for_the_snapshot_to_be_freed():
    # Freeing a snapshot of a large state gives every page back to the kernel (0.1-0.2 s for
    # 500 MB); a stop's exit need not wait for that, the next save does.
    freeing, freed = threading.Event(), threading.Event()

    class Snapshot:
        def __del__(self):
            freeing.wait(10)
            freed.set()

    store = GatedStore()
    writer = AsyncCheckpointWriter(store, RetentionPolicy(keep_last=1))
    writer.submit(1, objects={"big": Snapshot()})  # the writer's thread holds the last reference
    store.gates[1].set()
    writer.flush(5)  # settled: committed, retention applied
    assert writer.last_committed.step == 1 and len(store.retention_calls) == 1
    assert writer.in_flight is None and not freed.is_set()
    freeing.set()
    store.gates[2].set()
    writer.submit(2)  # one snapshot at a time: the previous one is gone before this save
    assert freed.is_set()
    writer.close()
    assert len(store.retention_calls) == 2


def test_the_exit_waits_for_a_snapshot_to_be_freed_only_when_the_teardown_follows(monkeypatch):
    from tlaunch.storage.checkpoint import writer as writers

    release, freed = threading.Event(), threading.Event()

    class Snapshot:
        def __del__(self):
            release.wait(10)
            freed.set()

    store = GatedStore()
    writer = AsyncCheckpointWriter(store)
    writer.submit(1, objects={"big": Snapshot()})  # the writer's thread holds the last reference
    store.gates[1].set()
    writer.flush(5)
    monkeypatch.setattr(writers, "_teardown_follows", False)  # os._exit follows the exit functions
    writers._wait_at_exit()  # returns at once
    assert not freed.is_set()
    monkeypatch.setattr(writers, "_teardown_follows", True)
    waiting = threading.Thread(target=writers._wait_at_exit)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive(), "the exit went on while the snapshot was being freed"
    release.set()
    waiting.join(10)
    assert freed.is_set() and not waiting.is_alive()
    writer.close()


def test_a_policy_without_rules_never_lists_the_directory():
    store = GatedStore()
    writer = AsyncCheckpointWriter(store, RetentionPolicy())
    store.gates[1].set()
    writer.submit(1)
    writer.close()
    assert store.retention_calls == []


def test_real_store_with_retention(memory_url):
    store = CheckpointStore(memory_url)
    writer = AsyncCheckpointWriter(store, RetentionPolicy(keep_last=2))
    for step in (1, 2, 3, 4):
        writer.submit(step, **cpu_snapshot(make_state(step)))
    writer.close()
    assert [i.step for i in store.committed()] == [3, 4]
    assert writer.last_committed.step == 4 and len(writer.save_durations) == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lazy", [False, True])
def test_a_save_in_flight_at_exit_still_commits(tmp_path, lazy):
    # lazy: the store is given a Location whose file system (fsspec's) was never imported;
    # its first use in the writer's thread while the interpreter exits could not import it.
    script = textwrap.dedent(
        f"""
        import time
        from tlaunch.storage import AsyncCheckpointWriter, CheckpointStore, resolve

        class Slow(CheckpointStore):
            def save(self, step, **kw):
                time.sleep(0.5)  # still running when the main thread returns
                return super().save(step, **kw)

        url = {str(tmp_path)!r}
        writer = AsyncCheckpointWriter(Slow(resolve(url, lazy=True) if {lazy} else url))
        writer.submit(5, state={{"step": 5}})
        print("submitted", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    assert [i.step for i in CheckpointStore(str(tmp_path)).committed()] == [5]


EXIT_AFTER_A_SAVE = str(pathlib.Path(__file__).with_name("exit_after_save.py"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit", "close"])
def test_a_script_that_ends_while_the_snapshot_is_freed_exits_cleanly(how):
    # The writer's thread frees the snapshot after the commit. The interpreter's teardown ends
    # a daemon thread that takes the GIL back with pthread_exit, and the unwinding through
    # torch's noexcept destructors aborted the process ("terminate called without an active
    # exception", 8 times in 10 here): the exit waits for the freeing when a teardown follows.
    for _ in range(4):
        done = subprocess.run(
            [sys.executable, EXIT_AFTER_A_SAVE, how],
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr


class TestCpuSnapshot:
    def test_tensors_are_detached_contiguous_copies(self):
        param = torch.randn(3, 4, requires_grad=True)
        view = torch.randn(4, 3).t()
        snap = cpu_snapshot({"p": param, "v": view, "bf": param.detach().bfloat16()})
        assert not snap["p"].requires_grad and snap["v"].is_contiguous()
        assert torch.equal(snap["p"], param.detach()) and torch.equal(snap["v"], view)
        assert snap["bf"].dtype == torch.bfloat16
        with torch.no_grad():
            param.add_(1)
        assert not torch.equal(snap["p"], param.detach())  # a copy, not a view

    def test_containers_keep_their_types_and_other_leaves_stay(self):
        Pair = collections.namedtuple("Pair", "a b")
        marker = object()
        tree = {
            "od": collections.OrderedDict(x=torch.ones(1)),
            "dd": collections.defaultdict(list, {"k": [torch.zeros(2)]}),
            "pair": Pair(torch.ones(2), 3),
            "tuple": (torch.ones(1), "s"),
            "leaf": marker,
        }
        snap = cpu_snapshot(tree)
        assert (
            type(snap["od"]) is collections.OrderedDict
            and type(snap["dd"]) is collections.defaultdict
        )
        assert snap["dd"]["missing"] == []
        assert isinstance(snap["pair"], Pair) and snap["pair"].b == 3
        assert isinstance(snap["tuple"], tuple) and snap["tuple"][1] == "s"
        assert snap["leaf"] is marker
        assert snap["od"]["x"] is not tree["od"]["x"]


class TestCpuView:
    def test_cpu_contiguous_tensors_are_shared_and_the_rest_copied(self):
        param = torch.randn(3, 4, requires_grad=True)
        moment = torch.randn(3, 4)
        view = torch.randn(4, 3).t()  # not contiguous: safetensors needs a contiguous copy
        Pair = collections.namedtuple("Pair", "a b")
        tree = {"p": param, "state": collections.OrderedDict(m=[moment]), "v": view,
                "pair": Pair(moment, 3)}  # fmt: skip
        got = cpu_view(tree)
        assert not got["p"].requires_grad
        assert got["p"].data_ptr() == param.data_ptr()  # no copy: the live memory itself
        assert type(got["state"]) is collections.OrderedDict
        assert got["state"]["m"][0].data_ptr() == moment.data_ptr()
        assert isinstance(got["pair"], Pair) and got["pair"].a.data_ptr() == moment.data_ptr()
        assert got["v"].is_contiguous() and got["v"].data_ptr() != view.data_ptr()
        assert torch.equal(got["v"], view)


def _memory(tree) -> list[int]:
    return [t.data_ptr() for t in (tree["w"], tree["m"][0], tree["m"][1])]


class TestSnapshotBuffers:
    def test_a_recycled_snapshot_is_copied_into_with_the_new_values(self):
        live = {"w": torch.randn(4, 4), "m": [torch.randn(8), torch.randn(8)]}
        buffers = SnapshotBuffers()
        first = buffers.snapshot(live)
        buffers.settle()
        before = _memory(first)
        assert buffers.held_bytes == (16 + 8 + 8) * 4
        live["w"].add_(1)
        live["m"][1].mul_(3)
        buffers.recycle()  # the first save has settled
        second = buffers.snapshot(live)
        buffers.settle()
        assert sorted(_memory(second)) == sorted(before)  # no new memory
        assert not set(_memory(second)) & set(_memory(live))  # still copies of the live state
        assert torch.equal(second["w"], live["w"]) and torch.equal(second["m"][1], live["m"][1])
        assert buffers.held_bytes == (16 + 8 + 8) * 4

    def test_a_snapshot_still_lent_to_a_save_is_never_written_over(self):
        live = {"w": torch.randn(4, 4), "m": [torch.randn(8), torch.randn(8)]}
        buffers = SnapshotBuffers()
        first = buffers.snapshot(live)
        buffers.settle()
        kept = {"w": first["w"].clone(), "m": [t.clone() for t in first["m"]]}
        live["w"].add_(1)
        second = buffers.snapshot(live)  # no recycle: the first save may still be reading
        buffers.settle()
        assert not set(_memory(second)) & set(_memory(first))
        assert torch.equal(first["w"], kept["w"]) and torch.equal(first["m"][0], kept["m"][0])
        assert torch.equal(second["w"], live["w"])

    def test_tensors_that_no_longer_fit_are_let_go(self):
        buffers = SnapshotBuffers()
        buffers.snapshot({"a": torch.zeros(100), "b": torch.zeros(10, dtype=torch.float64)})
        buffers.settle()
        buffers.recycle()
        got = buffers.snapshot({"a": torch.ones(100), "b": torch.ones(10)})  # b's dtype changed
        buffers.settle()
        assert got["b"].dtype == torch.float32 and torch.equal(got["b"], torch.ones(10))
        assert buffers.held_bytes == 100 * 4 + 10 * 4  # the float64 buffer was dropped
        buffers.release()
        assert buffers.held_bytes == 0

    def test_sparse_tensors_are_copied_and_not_held(self):
        sparse = torch.eye(3).to_sparse()
        buffers = SnapshotBuffers()
        got = buffers.snapshot({"s": sparse})
        buffers.settle()
        assert got["s"].is_sparse and torch.equal(got["s"].to_dense(), torch.eye(3))
        assert buffers.held_bytes == 0
