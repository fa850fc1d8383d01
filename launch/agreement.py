"""When the ranks of a run agree on a stop and a timed save: a few times a second, not every step.

Stops and timed saves start from things that differ between ranks (a signal to one process,
the launcher's STOP file seen by one node, each rank's clock), yet every rank must stop or
save at the same optimizer step. One all-reduce of the flags settles it; on every step it is
the largest cost the Run API adds to a short step (a collective that DDP's gradient buckets
queue behind, and a wake-up of gloo's threads on a busy machine). So the ranks agree once
every ``every`` optimizer steps, where ``every`` covers about :data:`INTERVAL` seconds::

    step  s                s+1                          s+every
          start the sum    wait for it: act on the      start the next sum
          of the flags     flags; set ``every`` for     ...
          (and step ms)    the next round

``every`` is computed on each rank from the sums themselves (the ranks' mean step time), so it
is the same number everywhere, and every rank acts at the same step. A flag raised between two
agreements waits at most ``every`` steps (about INTERVAL seconds) plus one: the launcher's STOP
file and the clocks were looked at every INTERVAL seconds before this schedule too.

Steps of :data:`SYNC_STEP` seconds or more agree at every step and wait for the sum at once,
on the step that started it: there the step of delay would cost a stop a whole slow step (on
a preempted machine, time out of the notice), and one collective of a few floats costs well
under 1% of such a step. Whether the ranks wait at once is also computed from the sums, so
they all switch at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

#: Seconds of training between two agreements (the stop's and the timed save's added delay).
INTERVAL = 0.1
#: At most this many optimizer steps between two agreements, however short a step is.
MAX_EVERY = 64
#: Steps at least this long (seconds, the ranks' mean) wait for each agreement at once.
SYNC_STEP = 0.5


def next_every(step_ms_sum: float, world: int) -> int:
    """Steps until the next agreement, from the sum over ranks of their mean step time in ms."""
    mean_ms = max(step_ms_sum / world, 1.0)
    return max(1, min(MAX_EVERY, math.floor(INTERVAL * 1000 / mean_ms)))


class StepAgreement:
    """The schedule of one run's agreements, the same on every rank (see the module's text)."""

    def __init__(self, strategy: Any, accelerator: Any) -> None:
        self.strategy, self.accelerator = strategy, accelerator
        self.world = accelerator.num_processes
        #: Optimizer steps from one agreement's start to the next one's.
        self.every = 1
        #: Whether each agreement is waited for on the step that starts it (slow steps).
        self.at_once = False
        self._steps = 0  # since the last start
        self._started: float | None = None  # monotonic time of the last start
        self._pending = False

    def after_step(self, local_flags: Callable[[], list[bool]]) -> list[bool] | None:
        """Called by every rank after every optimizer step. Returns the agreed flags (each True
        if it was on any rank) on the step after an agreement started (slow steps: on the step
        that started it), else None. ``local_flags`` is asked only on the steps that start one."""
        self._steps += 1
        agreed = self._end() if self._pending else None
        if self._steps >= self.every:
            now = time.monotonic()
            # This rank's mean step time since the last start, in whole milliseconds: sums of
            # small integers are exact in float32, so every rank computes the same ``every``.
            step_ms = (
                INTERVAL * 1000
                if self._started is None
                else math.ceil((now - self._started) * 1000 / self._steps)
            )
            values = [1.0 if f else 0.0 for f in local_flags()]
            self.strategy.begin_agreement(self.accelerator, [*values, float(step_ms)])
            self._pending, self._steps, self._started = True, 0, now
            if self.at_once:  # slow steps: on this step (see the module's text)
                rounds = [agreed, self._end()] if agreed else [self._end()]
                agreed = [any(flags) for flags in zip(*rounds, strict=True)]
        return agreed

    def _end(self) -> list[bool]:
        """Wait for the agreement in flight; its flags, and the schedule for the next ones."""
        *flags, step_ms = self.strategy.end_agreement(self.accelerator)
        self._pending = False
        self.every = next_every(step_ms, self.world)
        self.at_once = step_ms / self.world >= SYNC_STEP * 1000
        return [v > 0 for v in flags]
