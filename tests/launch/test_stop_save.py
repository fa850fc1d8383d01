"""A stop's last save serializes the live state, a periodic save a snapshot of it.

A periodic save returns to training at once, so the writer must work on a copy that the next
optimizer step cannot touch. A stop's save is flushed before anything else runs and the
process leaves after it: a copy there would cost the stop time (the kernel handing over fresh
pages for a whole state) and memory, and keep nothing more.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.launch.test_stopping import _Strategy  # the strategy members a one-process save touches
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


def _manager(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0)
    manager = CheckpointManager(
        LaunchConfig(checkpoint_dir=str(tmp_path)), _Strategy(), accelerator, {}
    )
    manager.states.models.append(model)
    manager.states.optimizers.append(optimizer)
    manager.writer = _Recording(CheckpointStore(str(tmp_path)))
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
