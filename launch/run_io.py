"""What a run shows and records: the progress bar, the metrics file, and its clock.

Kept apart from :mod:`tlaunch.run` so the training-loop logic there reads on one screen.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tlaunch.config import LaunchConfig
from tlaunch.contract import START_TIME_ENV


class MetricsLog:
    """What ``run.log`` recorded: the latest value of each metric (every rank) and
    ``metrics.jsonl`` in the run directory, one JSON object per ``run.log`` call (rank 0).

    ``run.log`` runs every step, so it only keeps the record: reading a GPU or TPU tensor
    (``.item()``) makes the host wait for the device, a stall per step, and a line per step is
    a write per step. The Run hands over device tensors unread; they are read, and the lines
    written and flushed to the file, together at flush points: every ``FLUSH_RECORDS``
    records or ``FLUSH_SECONDS``, when the progress bar refreshes, when ``latest`` is read
    (``run.metrics``), at each save, on a stop, at finish and at interpreter exit (a script
    that raises). A process killed by SIGKILL (or leaving through ``os._exit``) loses at most
    the records since the last flush. The lines are the same, in the same order, as if each
    had been written at its ``run.log`` call.
    """

    FLUSH_RECORDS = 100
    FLUSH_SECONDS = 2.0

    def __init__(self, run_dir: str | None) -> None:
        """``run_dir=None`` (ranks other than 0): keep the latest values, write no file."""
        self._file = None
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            self.path = os.path.join(run_dir, "metrics.jsonl")
            self._file = open(self.path, "a", buffering=1 << 16)
        self._latest: dict[str, float] = {}
        #: (step, epoch, wall time, {name: float or device tensor}) per run.log call.
        self._pending: list[tuple[int, int, float, dict[str, Any]]] = []
        self._flushed = time.monotonic()

    def add(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        """One ``run.log`` call. ``values`` are floats, or tensors (read at the next flush)
        that nothing modifies in place meanwhile."""
        self._pending.append((step, epoch, time.time(), values))
        if (
            len(self._pending) >= self.FLUSH_RECORDS
            or time.monotonic() - self._flushed >= self.FLUSH_SECONDS
        ):
            self.flush()

    def latest(self) -> dict[str, float]:
        """The last value logged for each metric (waits for pending device values)."""
        if self._pending:
            self.flush()
        return self._latest

    def replace(self, values: dict[str, float]) -> None:
        """Start from these values (a resumed run's saved metrics)."""
        self.flush()
        self._latest = dict(values)

    def flush(self) -> None:
        """Read the pending values, update ``latest``, write their lines and flush the file."""
        self._flushed = time.monotonic()
        pending, self._pending = self._pending, []
        lines = []
        for step, epoch, wall, values in pending:
            # The first device value read waits for the device; the rest are already computed.
            floats = {k: v if type(v) is float else float(v.item()) for k, v in values.items()}
            self._latest.update(floats)
            if self._file is not None:
                lines.append(
                    json.dumps({"step": step, "epoch": epoch, **floats, "time": round(wall, 3)})
                )
        if lines:
            self._file.write("\n".join(lines) + "\n")
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file; safe to call twice (finish, then interpreter exit)."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class _Bar:
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._shown = 0.0

    def update(self, step: int, metrics: MetricsLog) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        # Postfix formatting is not free, and reading the loss flushes the metrics: 2 Hz.
        if now - self._shown > 0.5:
            self._shown = now
            post = {"step": step}
            latest = metrics.latest()
            if "loss" in latest:
                post["loss"] = f"{latest['loss']:.4g}"
            self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Progress:
    """A tqdm bar per epoch on rank 0: epoch, step, it/s, ETA, last loss.

    ``auto`` shows it only on a terminal, so logs of batch jobs stay free of carriage returns.
    """

    def __init__(self, *, enabled: bool, mode: str) -> None:
        self.enabled = enabled and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        self._current: _Bar | None = None

    def bar(self, total: int, start: int, desc: str) -> _Bar:
        if not self.enabled:
            return _Bar(None)
        from tqdm.auto import tqdm

        self._current = _Bar(
            tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr)
        )
        return self._current

    def close(self) -> None:
        if self._current is not None:
            self._current.close()


class StopWatch:
    """Timed saves (--save-every-minutes) and the deadline (--time-limit).

    The margin before the deadline covers what stopping costs, measured on this run: the
    slowest save so far (snapshot + background write) with half again for safety, plus a few
    steps and one poll interval, and never less than 5% of the limit (capped at a minute)
    before any save was seen.
    """

    #: The clocks (and the launcher's STOP file) are looked at on one step per this many
    #: seconds at most: a stop or timed save comes at most this much later, and a step pays
    #: one monotonic clock read instead of a stat and several clock reads.
    POLL_SECONDS = 0.1

    def __init__(self, config: LaunchConfig) -> None:
        self.limit = config.time_limit_seconds
        self.save_every = (
            None if config.save_every_minutes is None else config.save_every_minutes * 60
        )
        self.started = float(os.environ.get(START_TIME_ENV, time.time()))
        self._last_save = time.monotonic()
        self._last_step: float | None = None  # the first step's time includes start-up
        self._next_poll = 0.0
        self._slowest_step = 0.0
        self._slowest_save = 0.0
        self._saves_seen = 0

    def record_save(self, seconds: float) -> None:
        self._last_save = time.monotonic()
        self._slowest_save = max(self._slowest_save, seconds)

    def record_background_saves(self, durations: list[float]) -> None:
        # Called every step with the writer's whole history: look at the new entries only.
        if len(durations) > self._saves_seen:
            self._slowest_save = max(self._slowest_save, *durations[self._saves_seen :])
            self._saves_seen = len(durations)

    def poll_due(self) -> bool:
        """Called once per optimizer step (it times the step); True on the steps where the
        deadline, timed saves and the STOP file are to be looked at."""
        now = time.monotonic()
        if self._last_step is not None:
            self._slowest_step = max(self._slowest_step, now - self._last_step)
        self._last_step = now
        if now < self._next_poll:
            return False
        self._next_poll = now + self.POLL_SECONDS
        return True

    def save_due(self) -> bool:
        return self.save_every is not None and time.monotonic() - self._last_save >= self.save_every

    def margin(self) -> float:
        assert self.limit is not None
        floor = min(60.0, 0.05 * self.limit)
        return max(floor, 1.5 * self._slowest_save + 3 * self._slowest_step + self.POLL_SECONDS)

    def deadline_near(self) -> bool:
        if self.limit is None:
            return False
        return time.time() + self.margin() >= self.started + self.limit
