"""What a run shows and records: its run directory, the metrics file and the progress bar.

Kept apart from :mod:`tlaunch.run` so the training-loop logic there reads on one screen.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tlaunch.config import NO_CHECKPOINTS, LaunchConfig
from tlaunch.contract import CONFIG_FILE, METRICS_FILE


def make_run_dir(config: LaunchConfig) -> str:
    """A new folder for one launch's log, config and metrics, under ``--run-dir`` (default:
    ``<checkpoint-dir>/runs`` for a local checkpoint directory, else ``./tlaunch-runs``)."""
    from tlaunch.storage import is_remote

    checkpoints = config.checkpoint_dir
    if checkpoints == NO_CHECKPOINTS:
        checkpoints = None
    elif checkpoints and checkpoints.startswith("file://"):
        checkpoints = checkpoints[len("file://") :]
    if config.run_dir:
        base = config.run_dir
    elif checkpoints and not is_remote(checkpoints):
        base = os.path.join(checkpoints, "runs")
    else:
        base = os.path.join(os.getcwd(), "tlaunch-runs")
    from tlaunch.storage import redact

    name = time.strftime("%Y%m%d-%H%M%S") + f"-node{config.node_rank}-{os.getpid()}"
    path = os.path.join(base, name)
    # Private: the config and the logs name buckets, hosts and paths. A new base is made
    # private too (makedirs' mode does not reach the parents it creates).
    os.makedirs(base, mode=0o700, exist_ok=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)  # whatever the umask
    for file, text in ((CONFIG_FILE, redact(config.to_json())), (METRICS_FILE, "")):
        # metrics.jsonl is created here, empty, so that its writer (which appends) keeps 0600.
        fd = os.open(os.path.join(path, file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(text)
    return path


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
            self.path = os.path.join(run_dir, METRICS_FILE)
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
