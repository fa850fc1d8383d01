"""What a run shows and records: its run directory, the metrics file and the progress bar.

Kept apart from :mod:`tlaunch.run` so the training-loop logic there reads on one screen.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from tlaunch.config import NO_CHECKPOINTS, LaunchConfig
from tlaunch.contract import CONFIG_FILE, METRICS_FILE

#: ``run.log(tokens=n)``: this rank's tokens in the batch, counted for ``tokens_per_sec``.
TOKENS = "tokens"


def make_run_dir(config: LaunchConfig) -> str:
    """A new folder for one launch's log, config and metrics, under ``--run-dir`` (default:
    ``<checkpoint-dir>/runs`` when the checkpoints are on this machine's file system -- a local
    disk, or Google Drive's mount, where the logs then outlive a Colab runtime as the
    checkpoints do -- else ``./tlaunch-runs``)."""
    from tlaunch.storage import local_path, redact

    checkpoints = config.checkpoint_dir
    local = local_path(checkpoints) if checkpoints and checkpoints != NO_CHECKPOINTS else None
    if config.run_dir:
        base = config.run_dir
    elif local:
        base = os.path.join(local, "runs")
    else:
        base = os.path.join(os.getcwd(), "tlaunch-runs")
    name = time.strftime("%Y%m%d-%H%M%S") + f"-node{config.node_rank}-{os.getpid()}"
    path = os.path.join(base, name)
    # Private: the config and the logs name buckets, hosts and paths. A new base is made
    # private too (makedirs' mode does not reach the parents it creates).
    os.makedirs(base, mode=0o700, exist_ok=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):  # a cloud mount (Drive) may refuse mode bits
        os.chmod(path, 0o700)  # whatever the umask
    for file, text in ((CONFIG_FILE, redact(config.to_json())), (METRICS_FILE, "")):
        # metrics.jsonl is created here, empty, so that its writer (which appends) keeps 0600.
        fd = os.open(os.path.join(path, file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(text)
    return path


def drive_quota_warning(config: LaunchConfig) -> str | None:
    """What to tell a run that saves to Google Drive with no retention rule, or None.

    Every checkpoint then stays, against a quota of 15 GB on a free account; and a file
    deleted through Colab's Drive mount goes to Drive's bin, where it still counts until the
    bin is emptied or 30 days pass (nothing deletes permanently through the mount).
    """
    url = config.checkpoint_dir
    if not url or url == NO_CHECKPOINTS or config.fast_dev_run:
        return None
    if (config.keep_last, config.keep_every, config.keep_best) != (None, None, None):
        return None
    from tlaunch.storage import on_drive, redact

    if not on_drive(url):
        return None
    return (
        f"checkpoints go to Google Drive ({redact(url)}) and no --keep-last, --keep-every or "
        "--keep-best was given: all of them are kept, each counting against the Drive quota, "
        "and any deleted later stays in Drive's bin, still counted, for 30 days; add "
        "--keep-last 2 to keep only the newest two"
    )


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
        #: ``run.log(tokens=n)`` counts since the last flush (floats or device tensors).
        self._tokens: list[Any] = []
        self._flushed = time.monotonic()
        #: Rank 0's :class:`tlaunch.trackers.RunLogs`: gets each flush's records.
        self.sink: Any = None

    def add(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        """One ``run.log`` call. ``values`` are floats, or tensors (read at the next flush)
        that nothing modifies in place meanwhile. ``tokens`` is a count, not a metric: it is
        summed into the ``tokens_per_sec`` figure (:mod:`tlaunch.trackers`)."""
        if TOKENS in values:
            values = dict(values)
            self._tokens.append(values.pop(TOKENS))
        if values:
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
        records = []
        for step, epoch, wall, values in pending:
            # The first device value read waits for the device; the rest are already computed.
            floats = {k: v if type(v) is float else float(v.item()) for k, v in values.items()}
            self._latest.update(floats)
            records.append((step, epoch, wall, floats))
        if self._file is not None:
            if records:
                self._file.write("".join(metrics_line(*r) + "\n" for r in records))
            self._file.flush()
        tokens, self._tokens = self._tokens, []
        if self.sink is not None:
            self.sink.write(records, sum(t if type(t) is float else float(t) for t in tokens))

    def close(self) -> None:
        """Flush and close the file; safe to call twice (finish, then interpreter exit)."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.sink is not None:
            self.sink.close()


def metrics_line(step: int, epoch: int, wall: float, values: dict[str, float]) -> str:
    """One record as a ``metrics.jsonl`` line."""
    return json.dumps({"step": step, "epoch": epoch, **values, "time": round(wall, 3)})


class _Bar:
    """One epoch's bar. Its postfix (step, the latest logged loss) is refreshed at most
    ``POSTFIX_HZ`` times a second, the rate a person can read, and once more at the end: reading
    the loss flushes the metrics (a device sync), which must not happen per step."""

    POSTFIX_HZ = 4

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._shown = -1.0
        self._step: int | None = None
        self._metrics: MetricsLog | None = None

    def update(self, step: int, metrics: MetricsLog) -> None:
        if self._bar is None:
            return
        self._step, self._metrics = step, metrics
        now = time.monotonic()
        if now - self._shown >= 1 / self.POSTFIX_HZ:
            self._shown = now
            self._show(refresh=False)  # drawn with the next update, at tqdm's own rate
        self._bar.update(1)

    def _show(self, *, refresh: bool) -> None:
        if self._step is None or self._metrics is None:
            return
        post = {"step": self._step}
        latest = self._metrics.latest()
        if "loss" in latest:
            post["loss"] = f"{latest['loss']:.4g}"
        self._bar.set_postfix(post, refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._show(refresh=True)  # the bar left on screen shows the epoch's last values
            self._bar.close()
            self._bar = None


class Progress:
    """A tqdm bar per epoch on rank 0: epoch, step, it/s, ETA, last loss.

    ``auto`` shows it on a terminal and in a Jupyter kernel (Colab's too), and keeps the logs
    of batch jobs free of carriage returns. In the kernel's own process the bar is
    ``tqdm.auto``'s (a widget where ipywidgets is installed); in a worker forked from the
    kernel it is tqdm's text bar on the stderr the kernel forwards to the cell: a widget needs
    the kernel's connection to the front end, which a forked process does not have.
    """

    def __init__(self, *, enabled: bool, mode: str) -> None:
        shown = mode == "on" or (mode == "auto" and (sys.stderr.isatty() or in_kernel()))
        self.enabled = enabled and shown
        self._current: _Bar | None = None

    def bar(self, total: int, start: int, desc: str) -> _Bar:
        if not self.enabled:
            return _Bar(None)
        if _kernel_stream(sys.stderr):
            from tqdm.auto import tqdm
        else:
            from tqdm.std import tqdm

        self._current = _Bar(
            tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr)
        )
        return self._current

    def close(self) -> None:
        if self._current is not None:
            self._current.close()


def in_kernel() -> bool:
    """True in a Jupyter kernel (Colab's, VS Code's, JupyterLab's), or in a process forked
    from one; False at a terminal IPython, in qtconsole's parent, in plain Python.

    Looks only at modules already imported: deciding must not import IPython. A kernel is
    ipykernel's ``ZMQInteractiveShell`` (Colab's shell is a subclass) as the running shell.
    """
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    ipython = sys.modules.get("IPython")
    if zmqshell is None or ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a half-torn-down interpreter: not a kernel to draw in
        return False
    return isinstance(shell, zmqshell.ZMQInteractiveShell)


def _kernel_stream(stream: Any) -> bool:
    """True when ``stream`` is the kernel's own output stream to the front end."""
    iostream = sys.modules.get("ipykernel.iostream")
    return iostream is not None and isinstance(stream, iostream.OutStream)
