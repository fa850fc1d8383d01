"""``LaunchConfig``: every launcher flag, documented once, validated once.

The CLI builds one ``LaunchConfig``; the launcher hands it to each worker as the JSON in
``TLAUNCH_CONFIG``; ``tlaunch.init()`` reads it back. Each field's docstring is its ``--help``
text. This module must stay importable without torch (``tlaunch --help`` uses it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from tlaunch.contract import CONFIG_ENV

PRECISION_ALIASES = {
    "no": "no",
    "32": "no",
    "fp32": "no",
    "32-true": "no",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "fp16": "fp16",
    "16": "fp16",
    "16-mixed": "fp16",
}


class UsageError(ValueError):
    """Bad input from the user: one line naming the problem and the fix. Exit code 2."""


def parse_duration(text: str) -> float:
    """``"11h30m"``, ``"90s"``, ``"45m"``, ``"1.5h"`` or plain seconds → seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(
            f"--time-limit {text!r} is not a duration; write it like 11h30m, 45m or 90s"
        )
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _doc(text: str, **kw: Any) -> Any:
    """A dataclass field whose help text travels in its metadata (read by the CLI)."""
    return field(metadata={"help": text}, **kw)


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """Everything one ``tlaunch`` invocation decided. Serialized to workers as JSON."""

    # -- what to run -------------------------------------------------------------------
    script: str | None = _doc("Path of the training script.", default=None)
    module: str | None = _doc("Run a module (python -m MODULE) instead of a script.", default=None)
    script_args: list[str] = _doc("Arguments passed to the script verbatim.", default_factory=list)

    # -- hardware and processes ----------------------------------------------------------
    gpus: str | None = _doc(
        "GPUs on this machine: a number or 'all'. Default: all GPUs if any.", default=None
    )
    cpus: int | None = _doc("Run N CPU processes over gloo.", default=None)
    tpus: int | None = _doc("TPU cores to use through torch_xla.", default=None)
    strategy: str | None = _doc(
        "Override the strategy the hardware flags imply: cpu, gpu, ddp or xla.", default=None
    )
    nnodes: int = _doc("Number of machines in the job.", default=1)
    node_rank: int = _doc("Rank of this machine, 0..nnodes-1.", default=0)
    rdzv_endpoint: str | None = _doc(
        "HOST:PORT of the rendezvous (c10d) store; required with --nnodes > 1.", default=None
    )
    max_restarts: int = _doc("Restart the job this many times after a worker failure.", default=0)
    seed: int = _doc("Seed for python, numpy and torch on every rank (offset by rank).", default=0)

    # -- numerics ------------------------------------------------------------------------
    precision: str = _doc(
        "no (fp32), bf16 or fp16; Lightning names like bf16-mixed work too.", default="no"
    )
    grad_accum: int = _doc("Micro-batches per optimizer step (gradient accumulation).", default=1)
    clip_grad_norm: float | None = _doc(
        "Clip the gradient norm to this value before each step.", default=None
    )
    clip_grad_value: float | None = _doc(
        "Clip each gradient to [-X, X] before each step.", default=None
    )

    # -- loop limits and debugging -------------------------------------------------------
    max_steps: int | None = _doc("Stop after this many optimizer steps.", default=None)
    max_epochs: int | None = _doc("Stop after this many epochs (caps run.epochs(n)).", default=None)
    limit_train_batches: float | None = _doc(
        "Batches per epoch: a count (e.g. 50) or a fraction of the loader (e.g. 0.1).", default=None
    )
    fast_dev_run: int = _doc("Run N batches of one epoch, save nothing (a smoke test).", default=0)
    overfit_batches: int = _doc(
        "Repeat the first N batches every epoch (overfit sanity check).", default=0
    )
    progress: str = _doc("Progress bar on rank 0: auto (only on a TTY), on or off.", default="auto")

    # -- checkpoints ---------------------------------------------------------------------
    checkpoint_dir: str | None = _doc(
        "Where checkpoints go: a path, gs://, s3://, drive:// or memory:// URL.", default=None
    )
    save_every: int | None = _doc("Save every N optimizer steps.", default=None)
    save_every_epochs: int | None = _doc("Save every N epochs.", default=None)
    save_every_minutes: float | None = _doc("Save every M minutes of training.", default=None)
    keep_last: int | None = _doc("Keep only the N newest checkpoints.", default=None)
    keep_every: int | None = _doc(
        "Also keep every checkpoint whose step is a multiple of K.", default=None
    )
    keep_best: int | None = _doc("Also keep the N best checkpoints by --monitor.", default=None)
    monitor: str | None = _doc(
        "Metric (from run.log) that ranks checkpoints for --keep-best.", default=None
    )
    mode: str = _doc("min or max: which --monitor values are best.", default="min")
    on_save_error: str = _doc(
        "stop (default) or continue with a warning when a save fails.", default="stop"
    )
    resume: str = _doc(
        "auto (latest committed checkpoint), never, or a step number or URL.", default="auto"
    )
    resume_force: bool = _doc(
        "Resume even when hyperparameters changed in ways that break the run.", default=False
    )

    # -- preemption and deadlines ----------------------------------------------------------
    preemption_watch: str = _doc(
        "Poll a cloud preemption notice: auto, gce, aws or off.", default="auto"
    )
    time_limit: str | None = _doc(
        "Stop with a checkpoint before this much wall time (e.g. 11h30m).", default=None
    )
    grace: float = _doc(
        "Seconds workers get to save and exit after a stop before being killed.", default=25.0
    )

    # -- data and folders ------------------------------------------------------------------
    data: list[str] = _doc(
        "URL[=DEST] of a packed data archive to stage before start (repeatable).",
        default_factory=list,
    )
    sync_dir: list[str] = _doc(
        "LOCAL=URL: restore LOCAL from URL, mirror it back while running (repeatable).",
        default_factory=list,
    )
    run_dir: str | None = _doc(
        "Folder for logs and metrics. Default: <checkpoint-dir>/runs or ./tlaunch-runs.",
        default=None,
    )

    def __post_init__(self) -> None:
        self.precision = self._normalize_precision(self.precision)
        if self.cpus is not None and self.cpus < 1:
            raise UsageError(self._fix("--cpus must be at least 1", drop="--cpus", add="--cpus 1"))
        if self.tpus is not None and self.tpus < 1:
            raise UsageError(self._fix("--tpus must be at least 1", drop="--tpus", add="--tpus 1"))
        if (
            self.gpus is not None
            and self.gpus != "all"
            and not (self.gpus.isdigit() and int(self.gpus) >= 1)
        ):
            raise UsageError(
                self._fix(
                    f"--gpus {self.gpus} is neither a count >= 1 nor 'all'",
                    drop="--gpus",
                    add="--gpus 1",
                )
            )
        if sum(x is not None for x in (self.gpus, self.cpus, self.tpus)) > 1:
            raise UsageError("choose one of --gpus, --cpus and --tpus, not several")
        if self.nnodes < 1:
            raise UsageError(
                self._fix("--nnodes must be at least 1", drop="--nnodes", add="--nnodes 1")
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(
                f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} for --nnodes {self.nnodes}"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UsageError(
                f"--nnodes {self.nnodes} needs a rendezvous address every machine can reach; run: "
                f"{self._command(add=f'--rdzv-endpoint HOST:29400 --node-rank {self.node_rank}')}"
            )
        if self.rdzv_endpoint and not re.fullmatch(r"[^:\s]+:\d+", self.rdzv_endpoint):
            raise UsageError(
                f"--rdzv-endpoint {self.rdzv_endpoint!r} must be HOST:PORT, e.g. 10.0.0.2:29400"
            )
        if self.grad_accum < 1:
            raise UsageError(
                self._fix(
                    "--grad-accum must be at least 1", drop="--grad-accum", add="--grad-accum 1"
                )
            )
        for name in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_restarts < 0:
            raise UsageError("--max-restarts must be 0 or more")
        if self.limit_train_batches is not None and self.limit_train_batches <= 0:
            raise UsageError("--limit-train-batches must be a count >= 1 or a fraction in (0, 1]")
        if self.limit_train_batches is not None and 1 < self.limit_train_batches != int(
            self.limit_train_batches
        ):
            raise UsageError(
                "--limit-train-batches is a whole count (e.g. 50) or a fraction <= 1 (e.g. 0.1)"
            )
        for name in (
            "max_steps",
            "max_epochs",
            "save_every",
            "save_every_epochs",
            "keep_last",
            "keep_every",
            "keep_best",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.fast_dev_run < 0 or self.overfit_batches < 0:
            raise UsageError("--fast-dev-run and --overfit-batches take a count >= 1")
        if self.mode not in ("min", "max"):
            raise UsageError(f"--mode {self.mode!r}: use --mode min or --mode max")
        if self.keep_best and not self.monitor:
            raise UsageError(
                self._fix("--keep-best needs the metric to rank by", add="--monitor val_loss")
            )
        if self.on_save_error not in ("stop", "continue"):
            raise UsageError(f"--on-save-error {self.on_save_error!r}: use stop or continue")
        if self.progress not in ("auto", "on", "off"):
            raise UsageError(f"--progress {self.progress!r}: use auto, on or off")
        if self.preemption_watch not in ("auto", "gce", "aws", "off"):
            raise UsageError(
                f"--preemption-watch {self.preemption_watch!r}: use auto, gce, aws or off"
            )
        if self.time_limit is not None:
            parse_duration(self.time_limit)
        for spec in self.sync_dir:
            if "=" not in spec or not all(spec.split("=", 1)):
                raise UsageError(
                    f"--sync-dir {spec!r} must be LOCAL=URL, e.g. --sync-dir ckpts=gs://bucket/run1"
                )
        if self.strategy is not None:
            self.strategy = self.strategy.lower()

    # -- helpers ---------------------------------------------------------------------------
    def _normalize_precision(self, value: str) -> str:
        key = str(value).lower()
        if key not in PRECISION_ALIASES:
            known = ", ".join(sorted(set(PRECISION_ALIASES)))
            raise UsageError(f"--precision {value!r} is unknown; use one of: {known}")
        return PRECISION_ALIASES[key]

    def _command(self, *, drop: str | None = None, add: str = "") -> str:
        """The command line this config came from, with one flag replaced: for error messages."""
        words = ["tlaunch"]
        if self.module:
            words += ["-m", self.module]
        elif self.script:
            words.append(self.script)
        for f in dataclasses.fields(self):
            if f.name in ("script", "module", "script_args"):
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if (
                value == f.default
                or (f.default is dataclasses.MISSING and not value)
                or flag == drop
            ):
                continue
            if isinstance(value, list):
                words += [w for v in value for w in (flag, v)]
            elif value is True:
                words.append(flag)
            elif value not in (None, False, []):
                words += [flag, str(value)]
        if add:
            words += add.split()
        return shlex.join(words)

    def _fix(self, problem: str, *, drop: str | None = None, add: str = "") -> str:
        return f"{problem}; run: {self._command(drop=drop, add=add)}"

    @property
    def time_limit_seconds(self) -> float | None:
        return None if self.time_limit is None else parse_duration(self.time_limit)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LaunchConfig:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_env(cls) -> LaunchConfig | None:
        text = os.environ.get(CONFIG_ENV)
        return cls.from_json(text) if text else None
