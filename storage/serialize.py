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
from collections.abc import Mapping
from typing import Any

from tlaunch.storage.manifest import CheckpointError
from tlaunch.storage.store import one_line

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


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
        raise CheckpointError(f"{label} is not a readable safetensors file: {one_line(e)}") from None


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
    try:
        state = json.loads(data)
    except ValueError:
        raise CheckpointError(f"{label} is not valid JSON") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{label} holds a {type(state).__name__}, expected a JSON object")
    return state
