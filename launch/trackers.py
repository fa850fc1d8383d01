"""Where a run's logs go and what reaches them: the trackers of ``--log-with``, the run-wide
``metrics.jsonl``, and the throughput, learning-rate and memory figures.

A run (everything one checkpoint directory holds, over any number of launches) logs into one
folder, :func:`logs_dir`: ``<checkpoint-dir>/logs`` when the checkpoints are on this machine's
file system (a local disk, or Google Drive's mount), so that the logs follow the checkpoints;
for a bucket, a folder on this machine keyed by the bucket URL (printed at start; ``--sync-dir
THAT_FOLDER=gs://bucket/run/logs`` carries it to the next machine). There:

- ``metrics.jsonl``: every ``run.log`` record of the run, each step once. A resumed run first
  drops the lines written after its checkpoint (the checkpoint records how many lines the file
  had), so steps redone after a preemption are not there twice;
- ``metrics.csv`` (``--log-with csv``): ``step,name,value`` rows, trimmed the same way;
- TensorBoard's event files (``--log-with tensorboard``) under ``<project>/``, the project being
  the checkpoint folder's name. TensorBoard can only drop events by step: a resumed run at step
  S opens its writer with ``purge_step=S``, which hides every event from step S on, then logs
  again the records of step S that ``metrics.jsonl`` kept (those before the checkpoint), so that
  a metric logged at step S after the save (an epoch-end evaluation), redone by the resumed run,
  is not shown twice;
- W&B and MLflow keep their own stores; their run ids are saved in each checkpoint, and a
  resumed run continues the same run (W&B ``resume="allow"``).

Hyperparameters are logged once per run: at a fresh start, never again on a resume. Everything
here runs on rank 0 only, at the points where :class:`~tlaunch.run_io.MetricsLog` flushes
(every ``FLUSH_RECORDS`` records or ``FLUSH_SECONDS``, at saves, stops and finish): nothing per
step, and no device sync. Without checkpoints a run is one launch: its trackers log under the
launch's run directory, and that directory's ``metrics.jsonl`` is the run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from tlaunch.config import NO_CHECKPOINTS, LaunchConfig, UsageError
from tlaunch.contract import LAUNCH_DIR_ENV, LOGS_DIR, METRICS_FILE

#: Each ``--log-with`` name and the module it needs (None: nothing beyond tlaunch's own).
TRACKERS = {"tensorboard": "tensorboard", "csv": None, "wandb": "wandb", "mlflow": "mlflow"}
#: The name under which a checkpoint keeps this module's state (line counts, run ids).
STATE_NAME = "trackers"


def parse_log_with(value: Any) -> str:
    """``--log-with`` → its names, comma-joined, each known and installed; else a UsageError
    naming the fix. Imports nothing (the launcher checks this before any worker starts)."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if not names:
        raise UsageError("--log-with needs tracker names, e.g. --log-with tensorboard,csv")
    for name in names:
        if name not in TRACKERS:
            raise UsageError(
                f"--log-with {name!r} is unknown; use a comma list of tensorboard, csv, wandb "
                "and mlflow, e.g. --log-with tensorboard,csv"
            )
        module = TRACKERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise UsageError(
                f"--log-with {name} needs the {module} package, which is not installed: "
                f"pip install 'tlaunch[{name}]'"
            )
    return ",".join(dict.fromkeys(names))


def logs_dir(config: LaunchConfig) -> str | None:
    """The run's logs folder on this machine, or None when the run has no checkpoints (then
    its logs are the launch's, in the run directory)."""
    url = config.checkpoint_dir
    if not url or url == NO_CHECKPOINTS or config.fast_dev_run:
        return None
    from tlaunch.storage import local_path, redact

    local = local_path(url)
    if local:
        return os.path.join(local, LOGS_DIR)
    # A bucket: tracker files are appended to and rewritten, which object stores do not do.
    base = config.run_dir or os.path.join(os.getcwd(), "tlaunch-runs")
    name = os.path.basename(redact(url).rstrip("/")) or "run"
    key = hashlib.sha256(url.encode()).hexdigest()[:8]
    return os.path.join(base, LOGS_DIR, f"{name}-{key}")


def project_name(config: LaunchConfig) -> str:
    """The trackers' project (TensorBoard's subfolder, W&B's project, MLflow's experiment):
    the checkpoint folder's name, else the script's."""
    url = config.checkpoint_dir
    if url and url != NO_CHECKPOINTS:
        from tlaunch.storage import redact

        name = os.path.basename(redact(url).rstrip("/"))
        if name:
            return name
    target = config.module or os.path.splitext(os.path.basename(config.script or ""))[0]
    return target or "tlaunch"


def keep_lines(path: str, count: int | None, *, after_step: int | None = None) -> int:
    """Cut ``path`` to its first ``count`` lines; with ``count`` None, to the lines whose step
    (a JSON ``"step"`` or a CSV's first field) is at most ``after_step``. A torn last line (a
    killed writer) and lines that do not parse are dropped. Rewritten atomically (a temporary
    file renamed over it). Returns the lines kept."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return 0
    if count is not None:
        kept = lines[:count]
    else:
        kept = [line for line in lines if _step_of(line, after_step)]
    if len(kept) == len(lines) and os.path.getsize(path) == sum(len(x.encode()) for x in kept):
        return len(kept)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".trim-")
    try:
        with open(fd, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(kept)


def _records_at(path: str, step: int) -> list[tuple[int, dict[str, float]]]:
    """The records of ``step`` at the end of a ``metrics.jsonl``, in order."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    found = []
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record.get("step") != step:
            break
        values = {k: v for k, v in record.items() if k not in ("step", "epoch", "time")}
        found.append((step, values))
    return found[::-1]


def _step_of(line: str, most: int | None) -> bool:
    try:
        if line.startswith("{"):
            step = int(json.loads(line)["step"])
        else:
            first = line.split(",", 1)[0]
            if first == "step":  # the CSV header
                return True
            step = int(first)
    except (ValueError, KeyError, TypeError):
        return False
    return most is None or step <= most


class RunLogs:
    """The run's logs: the run-wide ``metrics.jsonl``, the trackers and the figures.

    Built before the Accelerator (which takes the trackers), started after the checkpoint is
    opened (:meth:`start`: the resumed step and the saved state are known then), fed by
    :class:`~tlaunch.run_io.MetricsLog` at each flush (:meth:`write`), and saved in every
    checkpoint (``state_dict``).
    """

    #: Figures (lr, samples/s, step time, memory) at most this often, in seconds.
    FIGURES_SECONDS = 2.0

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.names = config.log_with.split(",") if config.log_with else []
        self.dir = logs_dir(config)
        self._file: Any = None
        #: Lines in the run-wide metrics.jsonl (None: this run writes none).
        self._lines: int | None = None
        #: The kept records of the resumed step, logged again to TensorBoard after its purge.
        self._replay: list[tuple[int, dict[str, float]]] = []
        #: Without checkpoints the trackers log under the launch's run directory.
        self._launch_only = False
        self._state: dict[str, Any] = {}
        self._ids: dict[str, str] = {}
        self._hparams_logged: list[str] = []
        self._started = False
        self._figures_from: tuple[float, int, int] | None = None
        self._first_step = 0
        self._tokens = 0.0

    def accelerator_kwargs(self) -> dict[str, Any]:
        """What :meth:`Strategy.build_accelerator` takes to set up the trackers."""
        if not self.names:
            return {}
        if self.dir is None:  # no checkpoints: the run is this launch
            launch = os.environ.get(LAUNCH_DIR_ENV) or self.config.run_dir or "tlaunch-runs"
            self.dir = os.path.abspath(os.path.join(launch, LOGS_DIR))
            self._launch_only = True
        return {"log_with": self.names, "logging_dir": self.dir}

    # -- saved with each checkpoint ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Called at every checkpoint: the trackers' files are on disk up to it."""
        from tlaunch.strategies.tracking import csv_lines, flush_trackers

        csv = None
        if self._started:
            flush_trackers(self._accelerator)
            csv = csv_lines(self._accelerator)
        return {
            "jsonl_lines": self._lines,
            "csv_lines": csv,
            "hparams_logged": list(self._hparams_logged),
            "ids": dict(self._ids),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state)

    # -- start -----------------------------------------------------------------------------
    def start(
        self,
        *,
        strategy: Any,
        accelerator: Any,
        checkpoints: Any,
        metrics: Any,
        position: Any,
        optimizers: list[Any],
        hparams: dict[str, Any],
    ) -> None:
        """Trim the run's files to the resumed checkpoint, start the trackers and feed them
        from ``metrics`` (rank 0); every rank registers the state a checkpoint keeps."""
        self._strategy, self._accelerator = strategy, accelerator
        self._first_step = position.step
        self._position, self._optimizers = position, optimizers
        if checkpoints.enabled:
            checkpoints.register(STATE_NAME, self)
        if not accelerator.is_main_process:
            return
        resumed = checkpoints.loaded is not None
        step = position.step if resumed else 0
        if self.dir is not None and not self._launch_only:
            self._open_jsonl(resumed, step)
        if self.names:
            self._start_trackers(resumed, step, hparams)
        metrics.sink = self

    def _open_jsonl(self, resumed: bool, step: int) -> None:
        from tlaunch.strategies.tracking import CSV_FILE

        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.dir, METRICS_FILE)
        csv = os.path.join(self.dir, CSV_FILE)
        if resumed:
            state = self._state
            self._lines = keep_lines(path, state.get("jsonl_lines"), after_step=step)
            self._replay = _records_at(path, step)
            keep_lines(csv, state.get("csv_lines"), after_step=step)
        else:  # a fresh start: what an earlier attempt logged was never committed
            self._lines = keep_lines(path, 0)
            keep_lines(csv, 0)
            shutil.rmtree(os.path.join(self.dir, project_name(self.config)), ignore_errors=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = open(fd, "a", buffering=1 << 16)

    def _start_trackers(self, resumed: bool, step: int, hparams: dict[str, Any]) -> None:
        from tlaunch.strategies.tracking import start_trackers

        os.makedirs(self.dir, mode=0o700, exist_ok=True)  # W&B's dir= must exist
        saved_ids = self._state.get("ids") or {}
        logged = list(self._state.get("hparams_logged") or []) if resumed else []
        init: dict[str, dict[str, Any]] = {}
        if "tensorboard" in self.names:
            # Events queue for the writer's thread instead of stalling the step (its default
            # queue holds 10); on disk at each checkpoint and every few seconds.
            init["tensorboard"] = {"max_queue": 100_000, "flush_secs": 5}
            if resumed:  # from the checkpoint's step on, hidden; its kept records: replayed below
                init["tensorboard"]["purge_step"] = step
        if "wandb" in self.names:
            run_id = saved_ids.get("wandb") if resumed else None
            init["wandb"] = {
                "id": run_id or os.urandom(8).hex(),
                "resume": "allow",
                "dir": self.dir,
                "name": project_name(self.config),
            }
        if "mlflow" in self.names:
            init["mlflow"] = {
                "run_id": saved_ids.get("mlflow") if resumed else None,
                "tracking_dir": os.path.join(self.dir, "mlruns"),
            }
        self._ids = start_trackers(
            self._accelerator,
            project_name(self.config),
            init_kwargs=init,
            hparams=hparams,
            hparams_for=set(self.names) - set(logged),
        )
        if "tensorboard" in self.names and self._replay:
            from tlaunch.strategies.tracking import log_to_trackers

            log_to_trackers(self._accelerator, self._replay, only="tensorboard")
        self._hparams_logged = sorted(set(logged) | set(self.names))
        self._started = True
        where = self.dir
        print(f"tlaunch: {', '.join(self.names)} log to {where}", file=sys.stderr, flush=True)

    # -- fed at each flush of the metrics ------------------------------------------------------
    def write(self, records: list[tuple[int, int, float, dict[str, float]]], tokens: float) -> None:
        """The records of one flush (rank 0), with the figures merged into the last one when
        they are due: to the run-wide ``metrics.jsonl`` and to every tracker."""
        self._tokens += tokens
        if records:
            figures = self._figures()
            if figures:
                step, epoch, wall, values = records[-1]
                records[-1] = (step, epoch, wall, {**values, **figures})
        if self._file is not None and records:
            from tlaunch.run_io import metrics_line

            self._file.write("".join(metrics_line(*r) + "\n" for r in records))
            self._file.flush()
            self._lines = (self._lines or 0) + len(records)
        if self._started and records:
            from tlaunch.strategies.tracking import log_to_trackers

            log_to_trackers(self._accelerator, [(r[0], r[3]) for r in records])

    def _figures(self) -> dict[str, float]:
        """Learning rates, samples (and tokens) per second, seconds per step and peak memory
        since the last figures, if ``FIGURES_SECONDS`` have passed and a step was taken.

        The clock starts at the first flush after a launch's first step: the time before it is
        start-up, not training. Flushes come from ``run.log`` calls, mostly in the batch loop,
        where the batch being trained is not yet in ``samples_seen``: both ends of a window lag
        by that one batch, so their difference counts the window's batches, as the tokens logged
        in it do (off by a batch where one end is a log outside the loop, at an epoch's end)."""
        now, pos = time.monotonic(), self._position
        if self._figures_from is None:
            if pos.step > self._first_step:
                self._figures_from = (now, pos.step, pos.samples_seen)
            self._tokens = 0.0
            return {}
        since, step0, samples0 = self._figures_from
        elapsed, steps = now - since, pos.step - step0
        if elapsed < self.FIGURES_SECONDS or steps <= 0 or elapsed <= 0:
            return {}
        self._figures_from = (now, pos.step, pos.samples_seen)
        figures = {
            "samples_per_sec": (pos.samples_seen - samples0) / elapsed,
            "step_time_s": elapsed / steps,
            "peak_memory_mb": self._strategy.peak_memory_mb(self._accelerator),
        }
        if self._tokens:
            world = self._accelerator.num_processes
            figures["tokens_per_sec"] = self._tokens * world / elapsed
            self._tokens = 0.0
        for i, optimizer in enumerate(self._optimizers):
            for g, group in enumerate(optimizer.param_groups):
                key = "lr" if (i, g) == (0, 0) else f"lr_{i}_{g}"
                figures[key] = float(group["lr"])
        return figures

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
