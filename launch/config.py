"""``LaunchConfig``: every launcher flag, documented once, validated once.

The CLI builds one ``LaunchConfig``; the launcher hands it to each worker as the JSON in
``TLAUNCH_CONFIG``; ``tlaunch.init()`` reads it back. Each field carries, in its metadata (see
``_doc``), its ``--help`` text and its checks (bounds, choices, a parser): the CLI builds its flags
from that table and ``__post_init__`` validates from it, so help and validation never drift.
Rules across fields, and a few on a value's shape, are written out by hand. This module must stay
importable without torch (``tlaunch --help`` uses it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from tlaunch.contract import CONFIG_ENV, flag_env

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

#: ``--checkpoint-dir none``: no checkpoints, not even the default folder.
NO_CHECKPOINTS = "none"
#: The default checkpoint folder's parent, in the launch's working directory.
DEFAULT_CHECKPOINT_ROOT = "tlaunch-checkpoints"
#: The default folder's save policy: a checkpoint at every stop, and every 15 minutes so that
#: a hard kill (SIGKILL, a Colab disconnect) loses at most that; the last two kept.
DEFAULT_SAVE_MINUTES = 15.0
DEFAULT_KEEP_LAST = 2

#: Fields filled from the positional words of the command line: never a flag, never a variable.
POSITIONAL = ("script", "module", "script_args")

_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True}
_BOOL_WORDS |= {"0": False, "false": False, "no": False, "off": False, "": False}


class UsageError(ValueError):
    """Bad input from the user: one line naming the problem and the fix. Exit code 2."""


def parse_duration(text: str) -> float:
    """``"11h30m"``, ``"90s"``, ``"45m"``, ``"1.5h"`` or plain seconds → seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(
            f"--time-limit {text!r} is not a duration; write it like 11h30m, 45m or 90s"
        )
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_time_limit(text: str) -> tuple[bool, float]:
    """A ``--time-limit`` value → (counted from the runtime's start?, seconds).

    ``11h30m`` is counted from the launch; ``runtime+11h30m`` from the runtime's start (the
    machine's boot: :func:`tlaunch.preemption.runtime_start`), so a Colab user can say "save
    before the 12 h limit" whenever the cell is run.
    """
    word = text.strip().lower()
    if not word.startswith("runtime"):
        return False, parse_duration(word)
    rest = word[len("runtime") :].strip()
    if not rest.startswith("+") or not rest[1:].strip():
        raise UsageError(
            f"--time-limit {text!r}: a limit counted from the runtime's start is "
            "runtime+DURATION, e.g. runtime+11h30m"
        )
    try:
        return True, parse_duration(rest[1:])
    except UsageError:
        raise UsageError(
            f"--time-limit {text!r} has no duration after runtime+; write it like runtime+11h30m"
        ) from None


def parse_precision(value: str) -> str:
    """Any accepted spelling (``bf16-mixed``, ``32``, ``FP16``) → ``no``, ``bf16`` or ``fp16``."""
    key = str(value).lower()
    if key not in PRECISION_ALIASES:
        known = ", ".join(sorted(set(PRECISION_ALIASES)))
        raise UsageError(f"--precision {value!r} is unknown; use one of: {known}")
    return PRECISION_ALIASES[key]


def _time_limit(text: str) -> str:
    """Refuse a bad ``--time-limit`` now; keep the text the user wrote (shown back in commands).
    Whether a ``runtime+`` limit has already passed is the launcher's check: this config is
    validated again in every worker, later."""
    from_runtime, seconds = parse_time_limit(text)
    if seconds <= 0:
        example = "runtime+11h30m" if from_runtime else "11h30m"
        raise UsageError(f"--time-limit {text!r} leaves no time to train; give e.g. {example}")
    return text


def _gpu_count(value: str | int) -> str:
    value = str(value)
    if value != "all" and not (re.fullmatch("[0-9]+", value) and int(value) >= 1):
        raise UsageError(f"--gpus {value} is neither a count >= 1 nor 'all'")
    return value


def _trackers() -> Any:
    import tlaunch.trackers  # on first use: that module imports this one

    return tlaunch.trackers


def _host_port(value: str) -> str:
    if not re.fullmatch(r"[^:\s]+:[0-9]+", value):
        raise UsageError(f"--rdzv-endpoint {value!r} must be HOST:PORT, e.g. 10.0.0.2:29400")
    return value


def _doc(
    text: str,
    *,
    min: float | None = None,
    positive: bool = False,
    choices: tuple[str, ...] = (),
    parse: Callable[[Any], Any] | None = None,
    fix: object = None,
    const: object = None,
    **kw: Any,
) -> Any:
    """A dataclass field whose help text and checks travel in its metadata.

    One table drives both the CLI and validation. ``help``: the ``--help`` text. ``choices``:
    the accepted words (argparse lists and enforces them). ``parse``: normalizes the value or
    raises UsageError. ``min``: inclusive lower bound; ``positive``: must be > 0. ``fix``: the
    value a corrected command suggests when a check fails (without it the message shows the
    value given). ``const``: what the bare flag means (``--fast-dev-run`` = ``--fast-dev-run 1``).
    """
    checks = {"min": min, "positive": positive, "choices": choices, "parse": parse, "fix": fix}
    return field(metadata={"help": text, "const": const, **checks}, **kw)


def _checked(flag: str, value: Any, meta: Mapping[str, Any]) -> Any:
    """One field's value after its metadata checks: normalized, or a UsageError naming the flag."""
    if meta["parse"] is not None:
        value = meta["parse"](value)
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if meta["choices"] and value not in meta["choices"]:
        *rest, last = meta["choices"]
        raise UsageError(f"{flag} {value!r}: use {', '.join(rest)} or {last}")
    if meta["min"] is not None and value < meta["min"]:
        got = "" if meta["fix"] is not None else f", got {value}"
        raise UsageError(f"{flag} must be at least {meta['min']}{got}")
    if meta["positive"] and value <= 0:
        raise UsageError(f"{flag} must be positive, got {value}")
    return value


def cli_flag(name: str) -> str:
    """The command-line flag of a field: ``grad_accum`` → ``--grad-accum``."""
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """Everything one ``tlaunch`` invocation decided. Serialized to workers as JSON."""

    # -- what to run -------------------------------------------------------------------
    script: str | None = _doc("Path of the training script.", default=None)
    module: str | None = _doc("Run a module (python -m MODULE) instead of a script.", default=None)
    script_args: list[str] = _doc("Arguments passed to the script verbatim.", default_factory=list)

    # -- hardware and processes ----------------------------------------------------------
    gpus: str | None = _doc(
        "GPUs on this machine: a number or 'all'. Default: all GPUs if any.",
        default=None,
        parse=_gpu_count,
        fix=1,
    )
    cpus: int | None = _doc("Run N CPU processes over gloo.", default=None, min=1, fix=1)
    tpus: int | None = _doc("TPU cores to use through torch_xla.", default=None, min=1, fix=1)
    strategy: str | None = _doc(
        "Override the strategy the hardware flags imply: cpu, gpu, ddp or xla.",
        default=None,
        parse=str.lower,
    )
    nnodes: int = _doc("Number of machines in the job.", default=1, min=1, fix=1)
    node_rank: int = _doc("Rank of this machine, 0..nnodes-1.", default=0)
    rdzv_endpoint: str | None = _doc(
        "HOST:PORT of the rendezvous (c10d) store; required with --nnodes > 1.",
        default=None,
        parse=_host_port,
    )
    max_restarts: int = _doc(
        "Restart the job this many times after a worker failure.", default=0, min=0
    )
    seed: int = _doc("Seed for python, numpy and torch on every rank (offset by rank).", default=0)

    # -- numerics ------------------------------------------------------------------------
    precision: str = _doc(
        "no (fp32), bf16 or fp16; Lightning names like bf16-mixed work too.",
        default="no",
        parse=parse_precision,
    )
    grad_accum: int = _doc(
        "Micro-batches per optimizer step (gradient accumulation).", default=1, min=1, fix=1
    )
    clip_grad_norm: float | None = _doc(
        "Clip the gradient norm to this value before each step.", default=None, positive=True
    )
    clip_grad_value: float | None = _doc(
        "Clip each gradient to [-X, X] before each step.", default=None, positive=True
    )

    # -- loop limits and debugging -------------------------------------------------------
    max_steps: int | None = _doc("Stop after this many optimizer steps.", default=None, min=1)
    max_epochs: int | None = _doc(
        "Stop after this many epochs (caps run.epochs(n)).", default=None, min=1
    )
    limit_train_batches: float | None = _doc(
        "Batches per epoch: a count (e.g. 50) or a fraction of the loader (e.g. 0.1).", default=None
    )
    fast_dev_run: int = _doc(
        "Run N batches of one epoch, save nothing (a smoke test).", default=0, min=0, const=1
    )
    overfit_batches: int = _doc(
        "Repeat the first N batches every epoch (overfit sanity check).", default=0, min=0
    )
    limit_val_batches: float | None = _doc(
        "Batches per evaluation pass: a count or a fraction of the set.", default=None
    )
    val_every_epochs: int | None = _doc(
        "run.eval_batches runs every N epochs.", default=None, min=1
    )
    val_every_steps: int | None = _doc("run.eval_batches runs every N steps.", default=None, min=1)
    early_stop: str | None = _doc(
        "Stop when this metric (logged in run.eval_batches) stops improving (--mode).", default=None
    )
    patience: int | None = _doc("Evaluations without improvement to wait.", default=None, min=1)
    min_delta: float = _doc("Smallest change that counts as an improvement.", default=0.0, min=0)
    progress: str = _doc(
        "Progress bar on rank 0: auto (only on a TTY), on or off.",
        default="auto",
        choices=("auto", "on", "off"),
    )

    # -- checkpoints ---------------------------------------------------------------------
    checkpoint_dir: str | None = _doc(
        "Where checkpoints go: a path, gs://, s3://, drive:// or memory:// URL.", default=None
    )
    save_every: int | None = _doc("Save every N optimizer steps.", default=None, min=1)
    save_every_epochs: int | None = _doc("Save every N epochs.", default=None, min=1)
    save_every_minutes: float | None = _doc(
        "Save every M minutes of training.", default=None, positive=True
    )
    keep_last: int | None = _doc("Keep only the N newest checkpoints.", default=None, min=1)
    keep_every: int | None = _doc(
        "Also keep every checkpoint whose step is a multiple of N.", default=None, min=1
    )
    keep_best: int | None = _doc(
        "Also keep the N best checkpoints by --monitor.", default=None, min=1
    )
    monitor: str | None = _doc(
        "Metric (from run.log) that ranks checkpoints for --keep-best.", default=None
    )
    mode: str = _doc(
        "min or max: which --monitor values are best.", default="min", choices=("min", "max")
    )
    on_save_error: str = _doc(
        "stop (default) or continue with a warning when a save fails.",
        default="stop",
        choices=("stop", "continue"),
    )
    resume: str = _doc(
        "auto (the latest committed checkpoint that verifies), last (the newest committed one), "
        "best (by --monitor), never, a step number, or a URL.",
        default="auto",
    )
    resume_force: bool = _doc(
        "Resume even when hyperparameters changed in ways that break the run.", default=False
    )
    takeover: bool = _doc(
        "Take the --checkpoint-dir lease from the run holding it (one that is gone but whose "
        "lease has not expired yet); that run, if alive, can commit nothing more.",
        default=False,
    )

    # -- preemption and deadlines ----------------------------------------------------------
    preemption_watch: str = _doc(
        "Poll a cloud preemption notice: auto, gce, aws or off.",
        default="auto",
        choices=("auto", "gce", "aws", "off"),
    )
    time_limit: str | None = _doc(
        "Stop with a checkpoint before this much wall time (e.g. 11h30m), or before this long "
        "after the runtime (the machine) started: runtime+11h30m for Colab's 12 h.",
        default=None,
        parse=_time_limit,
    )
    grace: float = _doc(
        "Seconds workers get to save and exit after a stop before being killed.",
        default=25.0,
        positive=True,
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
    log_with: str | None = _doc(
        "Trackers, a comma list of tensorboard, csv, wandb, mlflow (in <checkpoint-dir>/logs).",
        default=None,
        parse=lambda names: _trackers().parse_log_with(names),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in POSITIONAL:
                continue
            flag, fix = cli_flag(f.name), f.metadata["fix"]
            try:
                setattr(self, f.name, _checked(flag, value, f.metadata))
            except UsageError as e:
                if fix is None:
                    raise
                raise UsageError(self._fix(str(e), drop=flag, add=f"{flag} {fix}")) from None
        # What the table cannot say: rules across fields, or on a value's shape.
        if sum(x is not None for x in (self.gpus, self.cpus, self.tpus)) > 1:
            raise UsageError("choose one of --gpus, --cpus and --tpus, not several")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(
                f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} for --nnodes {self.nnodes}"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UsageError(
                self._fix(
                    f"--nnodes {self.nnodes} needs a rendezvous address every machine can reach",
                    drop="--node-rank",
                    add=f"--rdzv-endpoint HOST:29400 --node-rank {self.node_rank}",
                )
            )
        if self.keep_best and not self.monitor:
            raise UsageError(
                self._fix("--keep-best needs the metric to rank by", add="--monitor val_loss")
            )
        if self.resume == "best" and not self.monitor:
            raise UsageError(
                self._fix("--resume best needs the metric to rank by", add="--monitor val_loss")
            )
        for flag, limit in (("train", self.limit_train_batches), ("val", self.limit_val_batches)):
            if limit is not None and (limit <= 0 or 1 < limit != int(limit)):
                raise UsageError(
                    f"--limit-{flag}-batches is a whole count >= 1 (e.g. 50) or a fraction in "
                    f"(0, 1] (e.g. 0.1), got {limit}"
                )
        if self.val_every_epochs and self.val_every_steps:
            raise UsageError(
                self._fix(
                    "--val-every-epochs or --val-every-steps: choose one", drop="--val-every-epochs"
                )
            )
        if bool(self.early_stop) != (self.patience is not None):
            missing = "--patience 3" if self.early_stop else "--early-stop val_loss"
            raise UsageError(self._fix("--early-stop and --patience go together", add=missing))
        for spec in self.sync_dir:
            if "=" not in spec or not all(spec.split("=", 1)):
                raise UsageError(
                    f"--sync-dir {spec!r} must be LOCAL=URL, e.g. --sync-dir ckpts=gs://bucket/run1"
                )

    # -- helpers ---------------------------------------------------------------------------
    def _command(self, *, drop: str | None = None, add: str = "") -> str:
        """The command line this config came from, with one flag replaced: for error messages."""
        words = ["tlaunch"]
        if self.module:
            words += ["-m", self.module]
        elif self.script:
            words.append(self.script)
        for f in dataclasses.fields(self):
            if f.name in POSITIONAL:
                continue
            value = getattr(self, f.name)
            flag = cli_flag(f.name)
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

    def with_overrides(self, overrides: Mapping[str, Any]) -> tuple[LaunchConfig, list[str]]:
        """This (the launcher's) configuration with ``tlaunch.init(**overrides)`` applied where
        the launch left the flag at its default; returns it and the names of the overrides that
        lost to a flag the launch did give (the launcher's value wins there)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        applied, lost = {}, []
        for key, value in overrides.items():
            if key not in defaults:
                raise TypeError(f"tlaunch.init() got an unknown flag {key!r}")
            current = getattr(self, key)
            if current == value:
                continue
            if current == defaults[key]:
                applied[key] = value
            else:
                lost.append(key)
        return (dataclasses.replace(self, **applied) if applied else self), lost

    def with_checkpoint_default(self, default: str | None) -> LaunchConfig:
        """Where this run's checkpoints go, settled: ``--checkpoint-dir none`` becomes None
        (no checkpoints); no ``--checkpoint-dir`` becomes ``default`` (the launcher's
        :func:`default_checkpoint_dir`, None outside the launcher) with its save policy: every
        stop, every :data:`DEFAULT_SAVE_MINUTES` minutes unless a ``--save-every*`` flag says
        otherwise, and the last :data:`DEFAULT_KEEP_LAST` kept unless a ``--keep-*`` flag does."""
        if self.checkpoint_dir == NO_CHECKPOINTS:
            return dataclasses.replace(self, checkpoint_dir=None)
        if self.checkpoint_dir or not default or self.fast_dev_run:
            return self
        changes: dict[str, Any] = {"checkpoint_dir": default}
        if (self.save_every, self.save_every_epochs, self.save_every_minutes) == (None,) * 3:
            changes["save_every_minutes"] = DEFAULT_SAVE_MINUTES
        if (self.keep_last, self.keep_every, self.keep_best) == (None,) * 3:
            changes["keep_last"] = DEFAULT_KEEP_LAST
        return dataclasses.replace(self, **changes)

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

    @classmethod
    def env_defaults(cls, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Flag defaults from ``TLAUNCH_<FLAG>`` variables, each converted to its field's type.

        What to run (script, module, its arguments) always comes from the command line, never
        from a variable: a stale ``TLAUNCH_MODULE`` must not replace the script the user typed.
        A value that does not convert is a one-line UsageError naming the variable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            variable = flag_env(f.name)
            if f.name not in POSITIONAL and variable in environ:
                values[f.name] = _from_text(variable, environ[variable], field_kind(f))
        return values


def default_checkpoint_dir(config: LaunchConfig, cwd: str | None = None) -> str:
    """Where a Run API script launched without ``--checkpoint-dir`` saves:
    ``<cwd>/tlaunch-checkpoints/<script>-<key>``, the key a hash of the script's absolute path
    (or module name) and its arguments. Keyed by what the command runs, not by the launcher's
    flags: the same command resumes, a changed ``--cpus`` or ``--precision`` resumes too (or is
    refused with the reason), and other script arguments (``--lr 0.1``) start a run of their own.
    """
    cwd = cwd or os.getcwd()
    target = config.module or os.path.abspath(os.path.join(cwd, config.script or ""))
    key = hashlib.sha256(json.dumps([target, config.script_args]).encode()).hexdigest()[:8]
    stem = config.module or os.path.splitext(os.path.basename(config.script or "run"))[0]
    return os.path.join(cwd, DEFAULT_CHECKPOINT_ROOT, f"{stem}-{key}")


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(LaunchConfig)  # evaluates every annotation: once, not once a flag


def field_kind(f: dataclasses.Field) -> type:
    """What a flag's or variable's text becomes: ``int | None`` → ``int``; ``list[str]`` → ``list``."""
    hint = _hints()[f.name]
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if args and get_origin(hint) is not list else hint
    return get_origin(base) or base


def _from_text(variable: str, raw: str, kind: type) -> Any:
    if kind is list:
        return [v for v in raw.split(",") if v]
    if kind is bool:
        word = raw.strip().lower()
        if word not in _BOOL_WORDS:
            raise UsageError(f"{variable}={raw!r} is not a valid bool; use 1 or 0, true or false")
        return _BOOL_WORDS[word]
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise UsageError(f"{variable}={raw!r} is not a valid {kind.__name__}") from None
    return raw
