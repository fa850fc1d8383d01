"""Experiment trackers through Accelerate's own integration: TensorBoard, W&B, MLflow, and a CSV
file (:class:`CSVTracker`, a small ``GeneralTracker`` of ours).

The launch layer decides where logs go and what they hold (:mod:`tlaunch.trackers`); this module
turns tracker names into what ``Accelerator(log_with=...)`` takes, starts them with
``init_trackers``, logs through ``accelerator.log`` and reads back the ids a resumed run needs
(W&B's and MLflow's run ids). ``Accelerator.end_training`` (:meth:`Strategy.end_process_group`)
finishes them. Only rank 0 starts trackers, so only rank 0 writes.
"""

from __future__ import annotations

import os
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

#: The CSV tracker's file, in the run's logs folder: ``step,name,value`` rows.
CSV_FILE = "metrics.csv"
CSV_HEADER = "step,name,value\n"


class CSVTracker(GeneralTracker):
    """One ``step,name,value`` row per logged number, appended to ``path`` (long format: a
    metric logged at some steps only, like ``val_loss``, needs no empty cells, and a resumed run
    appends under the same header). Hyperparameters are not repeated here: they are in the
    checkpoint's ``state.json`` and in the other trackers."""

    name = "csv"
    requires_logging_directory = False

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._file: Any = None
        #: Lines in the file (header included): what a checkpoint records, so that a resumed run
        #: drops the rows written after it.
        self.lines = 0

    @on_main_process
    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a+") as f:
            f.seek(0)
            self.lines = sum(1 for _ in f)
        self._file = open(self.path, "a", buffering=1 << 16)
        if self.lines == 0:
            self._file.write(CSV_HEADER)
            self.lines = 1

    @property
    def tracker(self) -> Any:
        return self._file

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        return None

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.log_records([(step, values)])

    def log_records(self, records: list[tuple[int | None, dict]]) -> None:
        """Several ``(step, values)`` records in one write."""
        rows = [
            f"{step},{k},{v!r}\n"
            for step, values in records
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self._file.write("".join(rows))
        self._file.flush()
        self.lines += len(rows)

    @on_main_process
    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def accelerate_trackers(names: list[str], logging_dir: str) -> list[Any]:
    """What ``Accelerator(log_with=...)`` takes for these names: Accelerate's own names, and a
    :class:`CSVTracker` instance for ``csv``."""
    return [CSVTracker(os.path.join(logging_dir, CSV_FILE)) if n == "csv" else n for n in names]


def start_trackers(
    accelerator: Any,
    project: str,
    *,
    init_kwargs: dict[str, dict[str, Any]],
    hparams: dict[str, Any],
    hparams_for: set[str],
) -> dict[str, str]:
    """Start the accelerator's trackers (call on rank 0 only), give ``hparams`` to those named
    in ``hparams_for`` (a resumed run names none it logged already), and return the run ids a
    resumed run must reuse: ``{"wandb": id, "mlflow": id}`` for those started."""
    if "mlflow" in init_kwargs:
        # MLflow's local store goes beside the other logs unless the user points it elsewhere.
        where = init_kwargs["mlflow"].pop("tracking_dir")
        os.environ.setdefault("MLFLOW_TRACKING_URI", "file:" + os.path.abspath(where))
    accelerator.init_trackers(project, config=None, init_kwargs=init_kwargs)
    values = {k: _hparam(v) for k, v in hparams.items()}
    ids: dict[str, str] = {}
    for tracker in accelerator.trackers:
        if tracker.name in hparams_for and values:
            tracker.store_init_configuration(values)
        if tracker.name == "wandb":
            ids["wandb"] = str(tracker.run.id)
        elif tracker.name == "mlflow":
            ids["mlflow"] = str(tracker.active_run.info.run_id)
    return ids


def log_to_trackers(
    accelerator: Any, records: list[tuple[int, dict[str, float]]], *, only: str | None = None
) -> None:
    """Each ``(step, values)`` record, in order, to every started tracker (or the one named).

    TensorBoard's writer (``get_tracker(unwrap=True)`` hands it out for this) is fed directly:
    Accelerate's tracker flushes it at every ``log``, which waits for its writer thread to
    serialize and write everything queued, a stall per record. Unflushed, the events are
    written by that thread while training goes on, and :func:`flush_trackers` (at every
    checkpoint) puts them on disk."""
    for tracker in accelerator.trackers:
        if only is not None and tracker.name != only:
            continue
        if tracker.name == "tensorboard":
            writer = tracker.tracker
            for step, values in records:
                for key, value in values.items():
                    writer.add_scalar(key, value, global_step=step)
        elif isinstance(tracker, CSVTracker):
            tracker.log_records(records)
        else:
            for step, values in records:
                tracker.log(values, step=step)


def flush_trackers(accelerator: Any) -> None:
    """What the trackers hold, on disk (TensorBoard's queued events)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.tracker.flush()


def csv_lines(accelerator: Any) -> int | None:
    """Lines in the CSV tracker's file so far, or None without one."""
    for tracker in accelerator.trackers:
        if isinstance(tracker, CSVTracker):
            return tracker.lines
    return None


def _hparam(value: Any) -> Any:
    """What TensorBoard's hparams take (bool, str, int, float, None); anything else as text."""
    return value if value is None or isinstance(value, (bool, str, int, float)) else str(value)
