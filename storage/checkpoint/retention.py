"""Which committed checkpoints to delete: small rules, combined by union.

A step survives if ANY rule keeps it, and the newest committed step always survives, whatever the
rules say: it is the one a resume needs. Rules only choose; :meth:`CheckpointStore.apply_retention`
deletes, and the async writer calls it only after the new step's COMMIT is durable.

CLI flags map one to one: ``--keep-last N``, ``--keep-every K``, ``--keep-best N --monitor M
--mode min|max``. With no rule configured nothing is ever deleted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class RetentionRule(Protocol):
    def keep(self, infos: Sequence[Any]) -> set[int]:
        """Steps this rule keeps, given committed checkpoints in ascending step order."""
        ...


@dataclass(frozen=True, slots=True)
class KeepLast:
    """The ``n`` newest steps."""

    n: int

    def keep(self, infos: Sequence[Any]) -> set[int]:
        return {info.step for info in infos[-self.n :]}


@dataclass(frozen=True, slots=True)
class KeepEvery:
    """Every step that is a multiple of ``k`` (a sparse history for later comparisons)."""

    k: int

    def keep(self, infos: Sequence[Any]) -> set[int]:
        return {info.step for info in infos if info.step % self.k == 0}


@dataclass(frozen=True, slots=True)
class KeepBest:
    """The ``n`` steps with the best ``monitor`` metric from ``state["metrics"]``.

    A step without a finite number for the metric is never among the best; ties keep the
    newer step. A step's metric must have been measured on that step's weights: a tlaunch run
    records the ``--monitor`` value only in the checkpoint saved right after the evaluation
    that measured it, and none in a checkpoint saved between evaluations, which is then never
    ranked (``tlaunch.evaluation``). ``best`` (:mod:`.export`) is this rule's first step.
    """

    n: int
    monitor: str
    mode: str = "min"

    def keep(self, infos: Sequence[Any]) -> set[int]:
        scored = []
        for info in infos:
            value = info.metrics.get(self.monitor)
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                scored.append((value if self.mode == "min" else -value, -info.step))
        return {-neg_step for _, neg_step in sorted(scored)[: self.n]}


def _positive(name: str, flag: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a whole number >= 1 (e.g. {flag} 3), got {value!r}")
    return value


class RetentionPolicy:
    """Keep last N, every K steps and best N by a metric; a step survives if any rule keeps it.

    >>> RetentionPolicy(keep_last=2, keep_best=1, monitor="val_loss").to_delete(infos)
    """

    def __init__(
        self,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
    ) -> None:
        _positive("keep_last", "--keep-last", keep_last)
        _positive("keep_every", "--keep-every", keep_every)
        _positive("keep_best", "--keep-best", keep_best)
        if mode not in ("min", "max"):
            raise ValueError(
                f"mode must be 'min' or 'max' (e.g. --mode max for accuracy), got {mode!r}"
            )
        if keep_best is not None and not monitor:
            raise ValueError(
                "keep_best needs the metric to rank by, e.g. --keep-best 3 --monitor val_loss"
            )
        self.rules: list[RetentionRule] = []
        if keep_last is not None:
            self.rules.append(KeepLast(keep_last))
        if keep_every is not None:
            self.rules.append(KeepEvery(keep_every))
        if keep_best is not None:
            self.rules.append(KeepBest(keep_best, str(monitor), mode))

    @classmethod
    def of(cls, *rules: RetentionRule) -> RetentionPolicy:
        """A policy from rule objects, including rules of your own."""
        policy = cls()
        policy.rules = list(rules)
        return policy

    def __repr__(self) -> str:
        return f"RetentionPolicy.of({', '.join(map(repr, self.rules))})"

    def to_delete(self, infos: Sequence[Any]) -> list[int]:
        """Steps to delete among ``infos`` (committed checkpoints), ascending; never the newest."""
        committed = sorted(
            (i for i in infos if i.committed and not i.quarantined), key=lambda i: i.step
        )
        if not self.rules or not committed:
            return []
        keep = {committed[-1].step}
        for rule in self.rules:
            keep |= rule.keep(committed)
        return [info.step for info in committed if info.step not in keep]
