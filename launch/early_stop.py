"""Early stopping: ``--early-stop METRIC --patience P [--min-delta D]`` with ``--mode min|max``.

An evaluation that logs METRIC (a ``run.eval_batches`` pass) is counted: it improves when its
value beats the best so far by more than ``min_delta`` (below it under ``--mode min``, above
under ``max``); otherwise it is a bad evaluation. After ``patience`` bad evaluations in a row the
run ends: ``run.epochs`` and ``run.batches`` stop, and the script's ``run.finish()`` saves and
exits 0. ``--mode`` is the one ``--keep-best`` uses: a run monitors one direction of "better".

Rank 0 counts, and its state goes to every rank in one broadcast after the pass, so all ranks
stop at the same step (a ``break`` on one rank would leave the others waiting in a
collective). The state is saved in every checkpoint (``early_stopping.pt``): a preempted run
resumes with the best value and the bad evaluations it had, and stops where an uninterrupted
run would.
"""

from __future__ import annotations

import math
from typing import Any


class EarlyStopping:
    """Best value, bad evaluations in a row, and whether the run must stop."""

    def __init__(
        self, metric: str, *, patience: int, mode: str = "min", min_delta: float = 0.0
    ) -> None:
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.best_step = self.best_epoch = -1
        self.bad = 0
        self.stopped = False

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float | None, *, step: int, epoch: int) -> None:
        """Count one evaluation. A missing or non-finite value is a bad one."""
        if value is not None and math.isfinite(value) and self.improves(value):
            self.best, self.best_step, self.best_epoch, self.bad = float(value), step, epoch, 0
        else:
            self.bad += 1
        self.stopped = self.bad >= self.patience

    def reason(self) -> str:
        """The one line a stopped run prints."""
        best = "none" if self.best is None else f"{self.best:.6g}"
        delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (
            f"early stopping: {self.metric} did not improve{delta} for {self.bad} evaluations "
            f"(--patience {self.patience}, --mode {self.mode}); best {self.metric} {best} at "
            f"epoch {self.best_epoch}, step {self.best_step}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "best": self.best,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "bad": self.bad,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.metric:  # another metric: its history means nothing
            return
        self.best = state["best"]
        self.best_step, self.best_epoch = int(state["best_step"]), int(state["best_epoch"])
        self.bad, self.stopped = int(state["bad"]), bool(state["stopped"])
