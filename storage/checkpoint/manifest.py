"""What a checkpoint directory contains, and how its contents are proven whole.

::

    step-000001200/
      model.safetensors, model_1.safetensors   tensors (safetensors, never pickle)
      optimizer.pt, scheduler.pt, ...          objects (torch.save; loaded weights_only=True)
      rng-rank00000.pt, ...                    per-rank RNG state
      state.json                               the caller's JSON dict (step, epoch, metrics, ...)
      MANIFEST.json                            every file above: size + sha256
      COMMIT                                   written last: step, time, size, metrics, MANIFEST's sha256
      QUARANTINED                              only on a step that failed verification

Why sha256: it is in the standard library, it releases the GIL on large buffers so files hashed
as they stream (:class:`HashingWriter`, :func:`read_verified`) run side by side, and with SHA-NI it hashes ~1.7 GB/s on our 2-core CI
box, so 500 MB costs ~0.3 s that the upload hides. crc32c would be faster but is only present
when gcsfs happens to be installed, and a manifest must be checkable everywhere. The COMMIT
record carries the MANIFEST's own hash, so a damaged MANIFEST is caught too.

Records read back from a bucket are parsed and checked in :mod:`.records`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from tlaunch.storage.store import StorageError

FORMAT_VERSION = 1
HASH_NAME = "sha256"
MANIFEST = "MANIFEST.json"
COMMIT = "COMMIT"
QUARANTINED = "QUARANTINED"
STATE = "state.json"
TMP_PREFIX = ".tmp-step-"

_STEP_DIR = re.compile(r"^step-([0-9]{9})$")  # not \d: it also takes other scripts' digits
#: A file name in a step directory, and a name a caller gives save(): one path component.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_READ_CHUNK = 8 << 20
#: Largest piece handed to a sink at once: buffered upload streams copy what they are given, so
#: a 2 GB tensor must not reach them in one write.
WRITE_CHUNK = 8 << 20


class CheckpointError(StorageError):
    """A checkpoint that is not committed, fails verification, or holds what we refuse to load."""


def step_dir(step: int) -> str:
    """``step-000001200``: nine digits, so names sort like numbers up to a billion steps."""
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


RNG_PREFIX = "rng-rank"


def rng_file(rank: int) -> str:
    return f"{RNG_PREFIX}{rank:05d}.pt"


def tensors_file(name: str) -> str:
    return f"{name}.safetensors"


def object_file(name: str) -> str:
    return f"{name}.pt"


def sha256(data: Any) -> str:
    """Hex sha256 of a bytes-like object (hashlib drops the GIL while it hashes)."""
    return hashlib.new(HASH_NAME, data).hexdigest()


def sha256_stream(chunks: Iterable[bytes]) -> tuple[int, str]:
    """(size, hex sha256) of a stream of chunks, so verifying a 5 GB file needs 8 MB of memory."""
    digest, size = hashlib.new(HASH_NAME), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


class HashingWriter:
    """Passes writes on to ``target`` in pieces of at most :data:`WRITE_CHUNK` bytes, hashing
    and counting them on the way: a file's MANIFEST entry costs no second pass over it."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._digest = hashlib.new(HASH_NAME)
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            piece = view[start : start + WRITE_CHUNK]
            self._digest.update(piece)
            self._target.write(piece)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        """torch.save flushes its stream; durability is the commit protocol's business."""

    def entry(self) -> dict[str, Any]:
        """This file's MANIFEST entry."""
        return {"size": self.size, HASH_NAME: self._digest.hexdigest()}


def read_chunks(fs: Any, path: str) -> Iterable[bytes]:
    with fs.open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            yield chunk


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def build_manifest(files: dict[str, dict[str, Any]]) -> bytes:
    """MANIFEST.json bytes for ``{name: {"size": n, "sha256": hex}}``."""
    return encode_json({"format": FORMAT_VERSION, "hash": HASH_NAME, "files": files})


def commit_record(
    step: int, when: float, files: dict[str, dict[str, Any]], manifest: bytes, metrics: dict
) -> dict[str, Any]:
    """The COMMIT record: everything discovery needs, so listing N steps reads N tiny files."""
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "time": when,
        "size": sum(entry["size"] for entry in files.values()) + len(manifest),
        "metrics": metrics,
        "manifest_sha256": sha256(manifest),
    }


def size_problems(files: dict[str, dict[str, Any]], listed: dict[str, int | None]) -> list[str]:
    """Cheap check against a directory listing: every file present with its recorded size
    (a listing without sizes, None, leaves sizes to the full check)."""
    problems = []
    for name, entry in sorted(files.items()):
        if name not in listed:
            problems.append(f"{name} is missing")
        elif listed[name] is not None and listed[name] != entry["size"]:
            problems.append(f"{name} has {listed[name]} bytes, expected {entry['size']}")
    return problems


def hash_problems(
    files: dict[str, dict[str, Any]], checksum: Callable[[str], tuple[int, str]]
) -> list[str]:
    """Full check: ``checksum(name) -> (size, sha256)`` must match the manifest for every file."""
    problems = []
    for name, entry in sorted(files.items()):
        try:
            size, digest = checksum(name)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != entry["size"]:
            problems.append(f"{name} has {size} bytes, expected {entry['size']}")
        elif digest != entry[HASH_NAME]:
            problems.append(f"{name} fails its {HASH_NAME} check")
    return problems
