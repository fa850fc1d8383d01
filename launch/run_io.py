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

#: Set by the launcher: wall time (epoch seconds) when this launch began, for --time-limit.
START_TIME_ENV = "TLAUNCH_START_TIME"


class MetricsLog:
    """``metrics.jsonl`` in the run directory: one JSON object per ``run.log`` call (rank 0)."""

    FLUSH_EVERY = 2.0  # seconds; a line per step must not cost a syscall per step

    def __init__(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1 << 16)
        self._flushed = time.monotonic()

    def write(self, **record: Any) -> None:
        record["time"] = round(time.time(), 3)
        self._file.write(json.dumps(record) + "\n")
        now = time.monotonic()
        if now - self._flushed > self.FLUSH_EVERY:
            self._file.flush()
            self._flushed = now

    def close(self) -> None:
        self._file.close()


class _Bar:
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._shown = 0.0

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        if now - self._shown > 0.5:  # postfix formatting is not free; refresh at 2 Hz
            self._shown = now
            post = {"step": step}
            if "loss" in metrics:
                post["loss"] = f"{metrics['loss']:.4g}"
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
    steps, and never less than 5% of the limit (capped at a minute) before any save was seen.
    """

    def __init__(self, config: LaunchConfig) -> None:
        self.limit = config.time_limit_seconds
        self.save_every = (
            None if config.save_every_minutes is None else config.save_every_minutes * 60
        )
        self.started = float(os.environ.get(START_TIME_ENV, time.time()))
        self._last_save = time.monotonic()
        self._last_step: float | None = None  # the first step's time includes start-up
        self._slowest_step = 0.0
        self._slowest_save = 0.0

    def record_save(self, seconds: float) -> None:
        self._last_save = time.monotonic()
        self._slowest_save = max(self._slowest_save, seconds)

    def record_background_saves(self, durations: list[float]) -> None:
        if durations:
            self._slowest_save = max(self._slowest_save, max(durations))

    def save_due(self) -> bool:
        return self.save_every is not None and time.monotonic() - self._last_save >= self.save_every

    def margin(self) -> float:
        assert self.limit is not None
        floor = min(60.0, 0.05 * self.limit)
        return max(floor, 1.5 * self._slowest_save + 3 * self._slowest_step)

    def deadline_near(self) -> bool:
        now = time.monotonic()
        if self._last_step is not None:
            self._slowest_step = max(self._slowest_step, now - self._last_step)
        self._last_step = now
        if self.limit is None:
            return False
        return time.time() + self.margin() >= self.started + self.limit
