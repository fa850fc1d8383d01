"""What a run records of its own goodput, and the launcher's report of it.

The launcher and the workers' rank 0 append records to ``goodput.jsonl`` in the checkpoint
directory (its format and the arithmetic: :mod:`tlaunch.storage.checkpoint.goodput`, which
``tlaunch ckpt ls`` reads too). Only a checkpoint directory on this machine's file system (a
local disk, Drive's mount) gets one: appending a line per event is not something an object
store does. Recording never fails a run: a record that cannot be written is skipped.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from tlaunch.config import NO_CHECKPOINTS, LaunchConfig, default_checkpoint_dir
from tlaunch.contract import LAUNCH_DIR_ENV, START_TIME_ENV


def _local_dir(url: str | None) -> str | None:
    if not url or url == NO_CHECKPOINTS:
        return None
    from tlaunch.storage import local_path

    return local_path(url)


def _append(directory: str | None, record: dict) -> None:
    if directory is None:
        return
    from tlaunch.storage import append_goodput

    with contextlib.suppress(OSError):
        append_goodput(directory, record)


class WorkerRecord:
    """Rank 0's records under the launcher: ready, progress, saves, stop. A no-op on the other
    ranks, without checkpoints, under plain ``python`` (no launch to attribute them to) and
    for a checkpoint directory that is not on this machine's file system."""

    def __init__(self, directory: str | None, launch: str, started: float | None) -> None:
        self.directory, self.launch, self.started = directory, launch, started
        self._next = float("inf") if directory is None else 0.0
        if directory is not None:
            from tlaunch.storage import GOODPUT_PROGRESS_SECONDS

            self._every = GOODPUT_PROGRESS_SECONDS

    @classmethod
    def for_run(cls, config: LaunchConfig, is_main: bool, enabled: bool) -> WorkerRecord:
        launch_dir = os.environ.get(LAUNCH_DIR_ENV)
        directory = _local_dir(config.checkpoint_dir) if is_main and enabled else None
        if directory is None or not launch_dir:
            return cls(None, "", None)
        with contextlib.suppress(OSError):
            os.makedirs(directory, exist_ok=True)  # the store makes it at the first save anyway
        try:
            started = float(os.environ.get(START_TIME_ENV, ""))
        except ValueError:
            started = None
        return cls(directory, os.path.basename(launch_dir.rstrip(os.sep)), started)

    def _record(self, event: str, **fields: Any) -> None:
        _append(self.directory, {"event": event, "launch": self.launch, "t": time.time(), **fields})

    def ready(self, step: int, restore_seconds: float) -> None:
        """Prepared and restored: training begins at ``step``."""
        if self.directory is not None:
            self._record("ready", step=step, restore_s=round(restore_seconds, 4))
            if self.started is not None:  # the launch's own start, should its record be missing
                _append(
                    self.directory, {"event": "start", "launch": self.launch, "t": self.started}
                )
            self._next = time.monotonic() + self._every

    def after_step(self, step: int) -> None:
        """Every optimizer step; writes at most every GOODPUT_PROGRESS_SECONDS."""
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self._every
            self._record("progress", step=step)

    def saved(self, step: int, seconds: float) -> None:
        """Training waited ``seconds`` for a save at ``step``."""
        if self.directory is not None:
            self._record("save", step=step, seconds=round(seconds, 4))

    def stopping(self, step: int) -> None:
        """The stop (or ``run.finish``) begins at ``step``; what follows is not training."""
        if self.directory is not None:
            self._record("stop", step=step)
            self.directory = None  # a finish after a stop records nothing twice
            self._next = float("inf")


class LaunchRecord:
    """The launcher's records: its start, its exit, and the run's goodput at its end."""

    def __init__(self, config: LaunchConfig, run_dir: str, started: float) -> None:
        url = config.checkpoint_dir or default_checkpoint_dir(config)
        directory = _local_dir(url) if config.node_rank == 0 else None
        # A script's default folder exists only once a Run API script made it: a script that
        # never saves gets no folder from the launcher.
        self.directory = directory if directory and os.path.isdir(directory) else None
        self.path = directory
        self.launch, self.started = os.path.basename(run_dir.rstrip(os.sep)), started
        _append(self.directory, {"event": "start", "launch": self.launch, "t": started})

    def finish(self, code: int) -> list[str]:
        """Record the exit; return the lines that report the run's goodput so far (none when
        the run recorded nothing of its training)."""
        if self.directory is None and self.path and os.path.isdir(self.path):
            self.directory = self.path  # made by this launch's workers
            _append(self.directory, {"event": "start", "launch": self.launch, "t": self.started})
        if self.directory is None:
            return []
        _append(
            self.directory, {"event": "exit", "launch": self.launch, "t": time.time(), "code": code}
        )
        from tlaunch.storage import read_goodput

        try:
            summary = read_goodput(self.directory)
        except OSError:
            return []
        if not any(launch.ready is not None for launch in summary.launches):
            return []
        return summary.lines()
