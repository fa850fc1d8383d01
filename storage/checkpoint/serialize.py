"""Bytes in, bytes out: tensors as safetensors, everything else as torch.save read weights_only.

Nothing here ever unpickles arbitrary code. A checkpoint lives in a bucket that other people and
other jobs can write to, so a resume must not be a way to run someone's pickle: ``.pt`` files
are read only with ``torch.load(weights_only=True)``, and on save we check with torch's own
allowlist that what we wrote will load that way — a type the loader would refuse fails the save
now, not the resume after the next preemption.

torch is imported inside the functions: ``tlaunch --help`` must not pay for it.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from tlaunch.storage.checkpoint.manifest import (
    NAME_PATTERN,
    RNG_PREFIX,
    STATE,
    CheckpointError,
    object_file,
    rng_file,
    tensors_file,
)
from tlaunch.storage.store import one_line

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_TENSORS_SUFFIX = ".safetensors"


class MalformedFile(CheckpointError):
    """A file that passed its checksum but is not what its name says we wrote (state.json that
    is not a JSON object, say): written that way, so the step is quarantined."""

    def __init__(self, label: str, detail: str) -> None:
        super().__init__(f"{label} {detail}")
        self.detail = detail


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or len(name) > 200:
        raise CheckpointError(
            f"{kind} name {name!r} cannot be a file name; use letters, digits, '_', '-', '.'"
        )
    if name.startswith(RNG_PREFIX):
        raise CheckpointError(f"{kind} name {name!r} is reserved for rng= files; rename it")
    return name


def plan_files(
    tensors: Mapping[str, Any], objects: Mapping[str, Any], rng: Mapping[int, Any], state: Mapping
) -> list[tuple[str, Callable[[], bytes]]]:
    """(file name, serializer) for every file of a save, validated before anything is written.

    Serializers run later, one at a time, while the previous file uploads. The suffixes keep
    the kinds apart: no two inputs can map to the same file name.
    """
    # Smallest kinds first: the save pipeline hides each file's serialization behind earlier
    # files' uploads, and tiny files hide nothing.
    state_bytes = state_to_bytes(state)
    plan: list[tuple[str, Callable[[], bytes]]] = [(STATE, lambda: state_bytes)]
    for rank, obj in sorted(rng.items()):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise CheckpointError(f"rng= keys are ranks (ints >= 0), got {rank!r}")
        label = f"rng[{rank}]"
        plan.append((rng_file(rank), lambda label=label, obj=obj: object_to_bytes(label, obj)))
    for name, sd in tensors.items():
        label = f"tensors[{_check_name('tensors', name)!r}]"
        plan.append((tensors_file(name), lambda label=label, sd=sd: tensors_to_bytes(label, sd)))
    for name, obj in objects.items():
        label = f"objects[{_check_name('objects', name)!r}]"
        plan.append((object_file(name), lambda label=label, obj=obj: object_to_bytes(label, obj)))
    return plan


def load_file(name: str, data: bytes, label: str) -> tuple[str, Any, Any]:
    """(kind, key, value) for one checkpoint file: the inverse of :func:`plan_files`.

    kind is "tensors", "objects", "rng" or "state"; files of another kind give ("other", ...).
    """
    if name == STATE:
        return "state", None, bytes_to_state(label, data)
    if name.endswith(_TENSORS_SUFFIX):
        return "tensors", name[: -len(_TENSORS_SUFFIX)], bytes_to_tensors(label, data)
    if name.startswith(RNG_PREFIX) and name.endswith(".pt"):
        rank = name[len(RNG_PREFIX) : -3]
        if not rank.isdigit():
            raise MalformedFile(label, "is not a rank's RNG file name")
        return "rng", int(rank), bytes_to_object(label, data)
    if name.endswith(".pt"):
        return "objects", name[:-3], bytes_to_object(label, data)
    return "other", name, data


def _prepare_tensors(label: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """CPU, contiguous, unshared tensors: what safetensors accepts."""
    import torch

    prepared: dict[str, Any] = {}
    storages: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{label}[{key!r}] is a {type(tensor).__name__}; tensors= takes str -> Tensor "
                "state dicts, put other state in objects="
            )
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and ptr in storages:
            # Tied weights share storage and safetensors refuses that; the loader copies values
            # into the live model, where the tie still holds, so a copy on disk is harmless.
            tensor = tensor.clone()
        storages.add(ptr)
        prepared[key] = tensor
    return prepared


def tensors_to_bytes(label: str, tensors: Mapping[str, Any]) -> bytes:
    """One safetensors file holding ``tensors``."""
    import safetensors.torch

    return safetensors.torch.save(_prepare_tensors(label, tensors), metadata={"format": "pt"})


def object_to_bytes(label: str, obj: Any) -> bytes:
    """``torch.save(obj)``, refused if ``torch.load(weights_only=True)`` could not read it back."""
    import torch

    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except Exception as e:  # pickling errors come as AttributeError, TypeError, PicklingError
        raise CheckpointError(f"{label} cannot be saved with torch.save: {one_line(e)}") from None
    buffer.seek(0)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(buffer)
    if unsafe:
        raise CheckpointError(
            f"{label} contains {', '.join(sorted(unsafe)[:3])}, which torch.load(weights_only=True) "
            "refuses, so it could never be resumed; store tensors, numbers, strings and "
            "lists/dicts of them (e.g. torch.from_numpy(array)) or allow the type with "
            "torch.serialization.add_safe_globals"
        )
    return buffer.getvalue()


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state= must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(dict(state), indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"state= must be plain JSON (numbers, strings, lists, dicts): {one_line(e)}"
        ) from None


def bytes_to_tensors(label: str, data: bytes) -> dict[str, Any]:
    import safetensors.torch

    try:
        return safetensors.torch.load(data)
    except Exception as e:  # SafetensorError is not importable from a stable place
        raise CheckpointError(
            f"{label} is not a readable safetensors file: {one_line(e)}"
        ) from None


def bytes_to_object(label: str, data: bytes) -> Any:
    """``torch.load(weights_only=True)``: plain containers and tensors only, no code."""
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise CheckpointError(
                f"refusing to load {label}: it holds the Python object {refused.group(1)}, "
                "which could run code; tlaunch loads .pt files with weights_only=True only — "
                "re-save it with tensors and plain containers"
            ) from None
        raise CheckpointError(f"{label} is not a readable torch file: {one_line(e)}") from None
    except Exception as e:
        raise CheckpointError(f"{label} is not a readable torch file: {one_line(e)}") from None


def bytes_to_state(label: str, data: bytes) -> dict[str, Any]:
    """state.json's object; MalformedFile when it is not one (or its metrics are not)."""
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5000-digit int, [[[[...]]]]
        raise MalformedFile(label, "is not valid JSON") from None
    if not isinstance(state, dict):
        raise MalformedFile(label, f"holds a {type(state).__name__}, expected a JSON object")
    if not isinstance(state.get("metrics", {}), dict):
        raise MalformedFile(label, "has 'metrics' that is not a JSON object")
    return state
