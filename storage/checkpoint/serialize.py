"""Bytes in, bytes out: tensors as safetensors, everything else as torch.save read weights_only.

Nothing here ever unpickles arbitrary code. A checkpoint lives in a bucket that other people and
other jobs can write to, so a resume must not be a way to run someone's pickle: ``.pt`` files
are read only with ``torch.load(weights_only=True)``, and on save we check with torch's own
allowlist that what we wrote will load that way — a type the loader would refuse fails the save
now, not the resume after the next preemption.

Saving streams: each file is written from the snapshot's own tensor memory into the file or
upload stream (a safetensors header, then each tensor's bytes; torch.save hands its storages
over as memoryviews), so a save never holds a second full copy of the state. Loading reads a
file into one buffer and builds safetensors tensors as views of it (:func:`bytes_to_tensors`).

torch is imported inside the functions: ``tlaunch --help`` must not pay for it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any, Protocol

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


class Sink(Protocol):
    """Where a file's bytes go: a local file, an upload stream, a hashing wrapper of either."""

    def write(self, data: Any, /) -> Any: ...


#: Writes one whole file into a sink; may run more than once (a retried upload).
FileWriter = Callable[[Sink], None]


def plan_files(
    tensors: Mapping[str, Any], objects: Mapping[str, Any], rng: Mapping[int, Any], state: Mapping
) -> list[tuple[str, FileWriter]]:
    """(file name, writer) for every file of a save, validated before anything is written.

    Writers run later, concurrently, each streaming its file from the snapshot. The suffixes
    keep the kinds apart: no two inputs can map to the same file name. Largest kinds first, so
    the longest uploads start first.
    """
    state_bytes = state_to_bytes(state)
    plan: list[tuple[str, FileWriter]] = []
    for name, obj in objects.items():
        label = f"objects[{_check_name('objects', name)!r}]"
        plan.append((object_file(name), object_writer(label, obj)))
    for name, sd in tensors.items():
        label = f"tensors[{_check_name('tensors', name)!r}]"
        plan.append((tensors_file(name), tensors_writer(label, sd)))
    for rank, obj in sorted(rng.items()):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise CheckpointError(f"rng= keys are ranks (ints >= 0), got {rank!r}")
        plan.append((rng_file(rank), object_writer(f"rng[{rank}]", obj)))
    plan.append((STATE, lambda sink: sink.write(state_bytes)))
    return plan


def to_bytes(writer: FileWriter) -> bytes:
    """What ``writer`` writes, in memory (small files and tests; saves stream instead)."""
    buffer = io.BytesIO()
    writer(buffer)
    return buffer.getvalue()


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


def _dtype_names() -> dict[Any, str]:
    """torch dtype -> safetensors' dtype name, for the dtypes this torch has."""
    import torch

    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
        "BOOL": "bool", "U64": "uint64", "U32": "uint32", "U16": "uint16", "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }  # fmt: skip
    return {getattr(torch, t): n for n, t in names.items() if hasattr(torch, t)}


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


def tensors_writer(label: str, tensors: Mapping[str, Any]) -> FileWriter:
    """A writer of one safetensors file holding ``tensors``, streamed from their memory.

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header
    (padded with spaces to 8 bytes), then the tensors' bytes back to back, widest dtype first
    so that every tensor starts aligned to its element size.
    """
    prepared = _prepare_tensors(label, tensors)
    dtypes = _dtype_names()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    order = sorted(prepared, key=lambda k: (-prepared[k].element_size(), k))
    offset = 0
    for key in order:
        tensor = prepared[key]
        if tensor.dtype not in dtypes:
            raise CheckpointError(
                f"{label}[{key!r}] has dtype {tensor.dtype}, which safetensors cannot store; "
                "convert it (e.g. .float()) or put it in objects="
            )
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": dtypes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    head = struct.pack("<Q", len(encoded)) + encoded

    def write(sink: Sink) -> None:
        import torch

        sink.write(head)
        for key in order:
            tensor = prepared[key]
            if tensor.numel():
                # The tensor's own memory as bytes: no copy (uint8 is numpy-viewable for every
                # dtype, bfloat16 and float8 included).
                sink.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))

    return write


def _skeleton(obj: Any) -> Any:
    """``obj`` with every plain tensor emptied: it pickles with the same globals, cheaply."""
    import torch

    if type(obj) is torch.Tensor:
        return torch.empty(0, dtype=obj.dtype)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the subclass (OrderedDict, defaultdict's factory)
        out.clear()
        out.update((k, _skeleton(v)) for k, v in obj.items())
        return out
    if isinstance(obj, list):
        return [_skeleton(v) for v in obj]
    if isinstance(obj, tuple):
        items = [_skeleton(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def object_writer(label: str, obj: Any) -> FileWriter:
    """A writer of ``torch.save(obj)``, refused now if ``torch.load(weights_only=True)`` could
    not read it back.

    The check pickles a skeleton of ``obj`` (tensors emptied): the same globals, none of the
    bytes, so nothing is serialized twice and a refusal comes before anything is written.
    """
    import torch

    buffer = io.BytesIO()
    try:
        torch.save(_skeleton(obj), buffer)
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

    def write(sink: Sink) -> None:
        # torch.save hands each storage to sink.write as a memoryview of the tensor's memory.
        torch.save(obj, sink)

    return write


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state= must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(dict(state), indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"state= must be plain JSON (numbers, strings, lists, dicts): {one_line(e)}"
        ) from None


def bytes_to_tensors(label: str, data: bytes | bytearray) -> dict[str, Any]:
    """The tensors of a safetensors file held in ``data``.

    From a writable buffer (what a checkpoint read returns) the tensors are views of it, so
    loading costs no copy beyond the read; from ``bytes`` safetensors copies them out.
    """
    if memoryview(data).readonly:
        import safetensors.torch

        try:
            return safetensors.torch.load(bytes(data))
        except Exception as e:  # SafetensorError is not importable from a stable place
            raise CheckpointError(
                f"{label} is not a readable safetensors file: {one_line(e)}"
            ) from None
    try:
        return _tensor_views(data)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise CheckpointError(f"{label} is not a readable safetensors file: {e}") from None


def _tensor_views(data: bytearray) -> dict[str, Any]:
    """Tensors sharing ``data``'s memory, after the checks safetensors' own loader makes: a
    header inside the file, known dtypes, shapes matching their byte ranges, and ranges that
    tile the data exactly."""
    import torch

    if len(data) < 8:
        raise ValueError("shorter than its header length")
    (length,) = struct.unpack_from("<Q", data)
    if length > len(data) - 8:
        raise ValueError(f"header of {length} bytes in a file of {len(data)}")
    header = json.loads(bytes(data[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    dtypes = {name: dtype for dtype, name in _dtype_names().items()}
    base, end = 8 + length, len(data)
    spans, out = [], {}
    for key, entry in header.items():
        dtype, shape = dtypes[entry["dtype"]], entry["shape"]
        begin, stop = entry["data_offsets"]
        ints = [begin, stop, *shape]
        if not all(type(n) is int and n >= 0 for n in ints) or not isinstance(shape, list):
            raise ValueError(f"{key!r} has a malformed shape or offsets")
        numel = math.prod(shape)
        if stop - begin != numel * dtype.itemsize or base + stop > end:
            raise ValueError(f"{key!r}: offsets {begin}..{stop} do not fit its shape {shape}")
        spans.append((begin, stop))
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % dtype.itemsize:  # not aligned: a copy of its own, aligned
            raw = torch.frombuffer(data, dtype=torch.uint8, count=stop - begin, offset=base + begin)
            out[key] = raw.clone().view(dtype).reshape(shape)
        else:
            out[key] = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + begin)
            out[key] = out[key].reshape(shape)
    covered = 0
    for begin, stop in sorted(spans):
        if begin != covered:
            raise ValueError("tensor byte ranges overlap or leave gaps")
        covered = stop
    if base + covered != end:
        raise ValueError(f"{end - base - covered} bytes after the last tensor")
    return out


def bytes_to_object(label: str, data: bytes) -> Any:
    """``torch.load(weights_only=True)``: plain containers and tensors only, no code."""
    import pickle

    import torch

    try:
        return torch.load(_BufferReader(data), weights_only=True, map_location="cpu")
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


class _BufferReader(io.RawIOBase):
    """A seekable reader over a buffer without copying it (``io.BytesIO`` copies a bytearray):
    torch.load copies each record straight from it into its storage."""

    def __init__(self, data: Any) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, start + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


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
