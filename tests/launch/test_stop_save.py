"""A stop's last save serializes the live state, a periodic save a snapshot of it.

A periodic save returns to training at once, so the writer must work on a copy that the next
optimizer step cannot touch. A stop's save is flushed before anything else runs and the
process leaves after it: a copy there would cost the stop time (the kernel handing over fresh
pages for a whole state) and memory, and keep nothing more. Saves close together copy into
the memory of the last one once its save has settled, never while it is still being written.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from tests.launch.test_stopping import _Strategy  # the strategy members a one-process save touches
from tlaunch import checkpointing
from tlaunch.checkpointing import CheckpointManager, Position
from tlaunch.config import LaunchConfig
from tlaunch.storage import AsyncCheckpointWriter, CheckpointStore


class _Recording(AsyncCheckpointWriter):
    """The real writer; it also notes the memory of every tensor it was handed."""

    handed: list[set[int]]

    def submit(self, step, **parts):
        self.handed.append(
            {t.data_ptr() for t in parts["tensors"]["model"].values()}
            | {
                t.data_ptr()
                for s in parts["objects"]["optimizer"]["state"].values()
                for t in s.values()
                if t.dim()
            }
        )
        super().submit(step, **parts)


class _GatedStore(CheckpointStore):
    """A real local store whose save of a gated step waits until the test opens the gate."""

    gates: dict[int, threading.Event]

    def save(self, step, **kwargs):
        gate = self.gates.get(step)
        if gate is not None:
            assert gate.wait(30), f"the test never opened the gate of step {step}"
        return super().save(step, **kwargs)


def _manager(tmp_path, store=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0)
    manager = CheckpointManager(
        LaunchConfig(checkpoint_dir=str(tmp_path)), _Strategy(), accelerator, {}
    )
    manager.states.models.append(model)
    manager.states.optimizers.append(optimizer)
    manager.writer = _Recording(store or CheckpointStore(str(tmp_path)))
    manager.writer.handed = []
    return manager, model, optimizer


def _step(model, optimizer) -> None:
    model(torch.randn(8, 64)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _live(model, optimizer) -> set[int]:
    moments = {t.data_ptr() for s in optimizer.state.values() for t in s.values() if t.dim()}
    return {p.data_ptr() for p in model.parameters()} | moments


def test_a_periodic_save_writes_a_copy_the_next_step_cannot_touch(tmp_path):
    manager, model, optimizer = _manager(tmp_path)
    _step(model, optimizer)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    manager.save(Position(step=1), {})
    (handed,) = manager.writer.handed
    assert not handed & _live(model, optimizer)
    _step(model, optimizer)  # may run while the writer serializes
    manager.flush()
    committed = CheckpointStore(str(tmp_path)).load(1).tensors["model"]
    assert all(torch.equal(committed[k], v) for k, v in saved.items())


def test_a_stops_save_writes_the_live_state_without_a_copy(tmp_path):
    manager, model, optimizer = _manager(tmp_path)
    _step(model, optimizer)
    manager.save(Position(step=1), {}, force=True, stopping=True)
    (handed,) = manager.writer.handed
    assert handed == _live(model, optimizer)  # every tensor as it lies: none copied
    manager.flush(stopping=True)
    loaded = CheckpointStore(str(tmp_path)).load(1)
    model_state = loaded.tensors["model"]
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    moments = loaded.objects["optimizer"]["state"]
    for i, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(moments[i][k], v) for k, v in state.items())


def _states(model, optimizer):
    """Copies of the model's and the optimizer's tensors, to compare a checkpoint with."""
    moments = {
        i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()
    }
    return {k: v.clone() for k, v in model.state_dict().items()}, moments


def _assert_committed(tmp_path, step, expected) -> None:
    model_state, moments = expected
    loaded = CheckpointStore(str(tmp_path)).load(step)
    assert all(torch.equal(loaded.tensors["model"][k], v) for k, v in model_state.items())
    saved = loaded.objects["optimizer"]["state"]
    assert all(torch.equal(saved[i][k], v) for i, s in moments.items() for k, v in s.items())


def test_a_save_after_a_settled_one_copies_into_its_memory(tmp_path):
    manager, model, optimizer = _manager(tmp_path)
    expected = {}
    for step in (1, 2, 3):
        _step(model, optimizer)
        expected[step] = _states(model, optimizer)
        manager.save(Position(step=step), {})
        manager.flush()
    first, second, third = manager.writer.handed
    assert second == first and third == first  # the first save's memory, taken again
    assert not first & _live(model, optimizer)
    for step, states in expected.items():  # each file holds its own step's values
        _assert_committed(tmp_path, step, states)


def test_a_save_still_being_written_is_not_copied_over(tmp_path):
    store = _GatedStore(str(tmp_path))
    gate = threading.Event()
    store.gates = {1: gate}
    manager, model, optimizer = _manager(tmp_path, store)
    _step(model, optimizer)
    expected_1 = _states(model, optimizer)
    manager.save(Position(step=1), {})  # its writer now waits at the gate
    _step(model, optimizer)
    expected_2 = _states(model, optimizer)
    second = threading.Thread(target=manager.save, args=(Position(step=2), {}), daemon=True)
    second.start()  # snapshots, then waits in submit for step 1
    try:
        for _ in range(3000):
            if len(manager.writer.handed) == 2 or not second.is_alive():
                break
            threading.Event().wait(0.01)
        first_memory, second_memory = manager.writer.handed
        assert not first_memory & second_memory  # step 1's snapshot was still being written
    finally:
        gate.set()
    second.join(30)
    assert not second.is_alive()
    manager.flush()
    _assert_committed(tmp_path, 1, expected_1)
    _assert_committed(tmp_path, 2, expected_2)


def test_saves_far_apart_give_their_memory_back(tmp_path, monkeypatch):
    manager, model, optimizer = _manager(tmp_path)
    _step(model, optimizer)
    manager.save(Position(step=1), {})
    manager.flush()
    state_bytes = sum(t.nbytes for t in model.state_dict().values()) * 3  # + Adam's moments
    assert manager.buffers.held_bytes >= state_bytes  # within a minute: kept for the next
    monkeypatch.setattr(checkpointing, "RECYCLE_WITHIN_S", 0.0)
    _step(model, optimizer)
    manager.save(Position(step=2), {})
    manager.flush()
    assert manager.buffers.held_bytes == 0
    _step(model, optimizer)
    manager.save(Position(step=3), {}, force=True, stopping=True)  # a stop's: nothing copied
    assert manager.buffers.held_bytes == 0
