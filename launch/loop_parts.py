"""Small pieces of the Run's loop, kept out of :mod:`tlaunch.run` so that it reads on a few
screens: the scheduler that steps only with the optimizer, the progress of a replayed epoch
start, and how many samples a batch holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tlaunch.checkpointing import Position
    from tlaunch.run import Run
    from tlaunch.run_io import Progress


class StepGatedScheduler:
    """A scheduler that steps only when the optimizer really stepped (end of an accumulation
    window, and not skipped by the fp16 scaler), whatever the script calls."""

    def __init__(self, scheduler: Any, run: Run) -> None:
        self.scheduler, self._run = scheduler, run

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._run._sync_now:
            return
        if any(getattr(o, "step_was_skipped", False) for o in self._run._optimizers):
            return
        self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class ReplayBar:
    """The progress of a resumed epoch that draws its skipped batches again: a bar of its own,
    shown from the first batch drawn."""

    def __init__(self, progress: Progress, epoch: int, count: int, pos: Position, metrics) -> None:
        self._progress, self._epoch, self._count = progress, epoch, count
        self._pos, self._metrics = pos, metrics
        self._bar: Any = None

    def tick(self) -> None:
        if self._bar is None:
            desc = f"epoch {self._epoch}: replaying {self._count} batches"
            self._bar = self._progress.bar(self._count, 0, desc)
        self._bar.update(self._pos.step, self._metrics)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def batch_len(batch: Any) -> int:
    """Samples in ``batch``: the length of its first tensor (in a tuple, list or dict)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    return 1
