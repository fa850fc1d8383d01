"""Getting the model out of a checkpoint: ``best``/``last``, ``load_weights``, ``ckpt export``.

A step is named by its number, ``last`` (the newest committed step that is not quarantined) or
``best`` (the step :class:`~.retention.KeepBest` ranks first by a metric in the COMMIT records,
so ``best`` is the step ``--keep-best`` keeps; a step that records no value for the metric, as
a step saved between evaluations does, is never ``best``). The metric and its direction come from the
caller, else from what the newest step recorded: a tlaunch run saves its flags under
``state.json``'s ``config`` (``monitor``, ``mode``).

Exporting only reads. It never writes a QUARANTINED marker nor deletes anything: a step whose
bytes fail their MANIFEST is refused in one line naming the step and ``tlaunch ckpt verify``,
and the next run's resume decides what to do with it. What is proven is what is exported: the
MANIFEST against its COMMIT seal, the model file against its sha256 in the MANIFEST.

Weights come out under the names of the plain module: the prefixes of the wrappers a model goes
through in training (``module.`` of DDP, DataParallel and DeepSpeed; ``_orig_mod`` of
torch.compile; the FSDP and activation-checkpointing wrappers) are removed, so
``model.load_state_dict(weights, strict=True)`` works on a model built by the same code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tlaunch.storage.checkpoint import serialize
from tlaunch.storage.checkpoint.manifest import STATE, CheckpointError
from tlaunch.storage.checkpoint.reading import CorruptCheckpointError
from tlaunch.storage.checkpoint.retention import KeepBest
from tlaunch.storage.checkpoint.store import CheckpointInfo, CheckpointStore
from tlaunch.storage.localfs import write_atomic
from tlaunch.storage.store import redact, resolve, storage_error

#: What ``--step`` and ``step=`` accept besides a number.
NAMED_STEPS = ("best", "last")
MODES = ("min", "max")

#: Path components only wrappers insert: torch.compile, FSDP, activation checkpointing.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
#: DDP / DataParallel / DeepSpeed put the model under ``module``; a user's module may have a
#: child of that name too, so it goes only when it leads every key.
_LEADING_WRAPPER = "module."
_TENSORS_SUFFIX = ".safetensors"
_NUMBERED = re.compile(r"(.*?)_([0-9]+)")


def parse_step(text: str) -> int | str:
    """``--step`` and ``--resume`` spellings: a step number, ``best`` or ``last``."""
    if text in NAMED_STEPS:
        return text
    if re.fullmatch("[0-9]+", text):  # not isdigit(): it accepts other scripts' digits
        return int(text)
    raise ValueError(f"a step is a number, best or last, got {text!r}")


# -- which step --------------------------------------------------------------------------------


def resolve_step(
    store: CheckpointStore,
    step: int | str | None = None,
    *,
    monitor: str | None = None,
    mode: str | None = None,
) -> CheckpointInfo:
    """The committed step ``step`` names: a number, ``"last"`` (also None) or ``"best"``.

    ``best`` ranks by ``monitor`` in direction ``mode``; either left out is taken from what the
    newest step recorded. CheckpointError (one line) when nothing fits.
    """
    if step is None or step == "last":
        committed = store.committed()
        if not committed:
            raise CheckpointError(f"no committed checkpoints at {redact(store.url)}")
        return committed[-1]
    if step == "best":
        return best_of(store, store.committed(), monitor=monitor, mode=mode)
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"a step is a number, 'best' or 'last', got {step!r}")
    return store.get(step)


def best_of(
    store: CheckpointStore,
    committed: list[CheckpointInfo],
    *,
    monitor: str | None = None,
    mode: str | None = None,
) -> CheckpointInfo:
    """The best of ``committed`` (the store's committed steps, ascending) by ``monitor``."""
    if not committed:
        raise CheckpointError(f"no committed checkpoints at {redact(store.url)}")
    recorded_monitor, recorded_mode = (None, None)
    if not monitor or not mode:
        recorded_monitor, recorded_mode = recorded_ranking(store, committed[-1])
    if not monitor:
        monitor = recorded_monitor
    if not monitor:
        raise CheckpointError(
            f"step 'best' needs the metric that ranks checkpoints and the run at "
            f"{redact(store.url)} recorded none: pass --monitor NAME (e.g. --monitor val_loss)"
        )
    if not mode:
        mode = recorded_mode if monitor == recorded_monitor and recorded_mode in MODES else "min"
    if mode not in MODES:
        raise CheckpointError(f"mode must be 'min' or 'max', got {mode!r}")
    (best,) = KeepBest(1, monitor, mode).keep(committed) or (None,)
    if best is None:
        raise CheckpointError(
            f"no committed step at {redact(store.url)} records {monitor!r} (a finite number); "
            f"steps {committed[0].step}..{committed[-1].step} record: "
            f"{', '.join(sorted({k for i in committed for k in i.metrics})) or 'no metrics'}"
        )
    return next(i for i in committed if i.step == best)


def recorded_ranking(store: CheckpointStore, info: CheckpointInfo) -> tuple[str | None, str | None]:
    """(``--monitor``, ``--mode``) as the run that saved ``info`` recorded them in state.json."""
    reader = store.step_reader(info.step)
    try:
        files = reader.manifest()
        if STATE not in files:
            return None, None
        state = serialize.bytes_to_state(STATE, reader.read(STATE, files[STATE]))
    except (CorruptCheckpointError, serialize.MalformedFile) as e:
        raise _damaged(store, info.step, getattr(e, "detail", str(e))) from None
    config = state.get("config")
    if not isinstance(config, dict):
        return None, None
    monitor, mode = config.get("monitor"), config.get("mode")
    return (
        monitor if isinstance(monitor, str) and monitor else None,
        mode if mode in MODES else None,
    )


def _damaged(store: CheckpointStore, step: int, detail: str) -> CheckpointError:
    url = redact(store.url)
    return CheckpointError(
        f"step {step} at {url} is damaged ({detail}); nothing was changed there; inspect it "
        f"with: tlaunch ckpt verify {url} --step {step}"
    )


# -- the weights --------------------------------------------------------------------------------


def strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` under the plain module's names (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = ".".join(p for p in key.split(".") if p not in _WRAPPER_PARTS)
        if name in out:
            raise CheckpointError(
                f"weights {key!r} and another key both become {name!r} once wrapper prefixes "
                "are removed; load the checkpoint's file as it is (safetensors.torch.load_file)"
            )
        out[name] = value
    while out and all(k.startswith(_LEADING_WRAPPER) for k in out):
        out = {k[len(_LEADING_WRAPPER) :]: v for k, v in out.items()}
    return out


def _model_names(files: Mapping[str, Any]) -> list[str]:
    """The step's tensor files in save order: ``model``, ``model_1``, ..., ``model_10``."""

    def order(name: str) -> tuple[str, int]:
        m = _NUMBERED.fullmatch(name)
        return (m.group(1), int(m.group(2))) if m else (name, 0)

    names = [n[: -len(_TENSORS_SUFFIX)] for n in files if n.endswith(_TENSORS_SUFFIX)]
    return sorted(names, key=order)


def _choose_model(names: list[str], model: int | str | None, step: int) -> str:
    shown = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
    if not names:
        raise CheckpointError(f"step {step} holds no model weights (no .safetensors file)")
    if model is None:
        if len(names) == 1:
            return names[0]
        raise CheckpointError(
            f"step {step} holds {len(names)} models: {shown}; choose one with --model K "
            "(load_weights(..., model=K))"
        )
    if isinstance(model, str) and model in names:
        return model
    if isinstance(model, int) and not isinstance(model, bool) and 0 <= model < len(names):
        return names[model]
    raise CheckpointError(f"step {step} has no model {model!r}; it holds {shown}")


@dataclass(frozen=True, slots=True)
class Weights:
    """One model's weights read from a checkpoint step, wrapper prefixes removed."""

    step: int
    #: The tensors file's name without its suffix: ``model``, ``model_1``, ...
    name: str
    tensors: dict[str, Any]


def read_weights(
    url: str | CheckpointStore,
    step: int | str | None = None,
    *,
    model: int | str | None = None,
    monitor: str | None = None,
    mode: str | None = None,
) -> Weights:
    """One model's weights from a committed step, verified and read-only (module docstring)."""
    store = url if isinstance(url, CheckpointStore) else CheckpointStore(url)
    info = resolve_step(store, step, monitor=monitor, mode=mode)
    reader = store.step_reader(info.step)
    try:
        files = reader.manifest()
        name = _choose_model(_model_names(files), model, info.step)
        filename = f"{name}{_TENSORS_SUFFIX}"
        data = reader.read(filename, files[filename])
    except CorruptCheckpointError as e:
        raise _damaged(store, info.step, e.detail) from None
    label = f"step {info.step} at {redact(store.url)}: {filename}"
    return Weights(info.step, name, strip_wrappers(serialize.bytes_to_tensors(label, data)))


def load_weights(
    url: str,
    step: int | str | None = None,
    *,
    model: int | str | None = None,
    monitor: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """A model's state dict (CPU tensors) from the checkpoints at ``url``; read-only.

    ``step``: a number, ``"last"`` (the default: the newest committed step) or ``"best"`` (by
    ``monitor``/``mode``, by default the ones the run recorded). ``model``: which model when the
    run prepared several (0, 1, ... in ``prepare`` order, or the file's name). The keys are the
    plain module's, so ``model.load_state_dict(load_weights(url), strict=True)`` works on a
    model that was compiled or wrapped in DDP when it was trained.
    """
    return read_weights(url, step, model=model, monitor=monitor, mode=mode).tensors


def write_weights(weights: Weights, out: str) -> int:
    """Write ``weights`` as one safetensors file at ``out`` (a path or URL), whole or not at all;
    returns its size."""
    import safetensors.torch

    metadata = {"format": "pt", "step": str(weights.step), "model": weights.name}
    data = safetensors.torch.save(weights.tensors, metadata=metadata)
    location = resolve(out)
    try:
        if location.local:
            os.makedirs(os.path.dirname(location.path) or ".", exist_ok=True)
            write_atomic(location.path, data)
        else:  # one PUT: an object appears whole or not at all
            location.fs.pipe_file(location.path, data)
    except OSError as e:
        raise storage_error(e, "writing", out) from e
    return len(data)
