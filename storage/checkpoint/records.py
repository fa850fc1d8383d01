"""COMMIT and MANIFEST.json as they come back from a bucket: parsed, never trusted.

A bucket is writable by other jobs and other people, and bytes get damaged, so every record is
checked field by field before anything uses it. A record that fails raises ValueError with one
line naming the field; the store turns that into a quarantine (the record was read whole and
is malformed: proof, in the sense of :mod:`tlaunch.storage.checkpoint.reading`).

What a well-formed record is (what :func:`.manifest.commit_record` and
:func:`.manifest.build_manifest` write):

* COMMIT: a JSON object, ``format`` 1, ``step`` the int of its directory, ``time`` finite
  seconds >= 0, ``size`` an int >= 0 equal to the files MANIFEST lists plus MANIFEST itself,
  ``metrics`` an object, ``manifest_sha256`` 64 lowercase hex digits. At most
  :data:`MAX_COMMIT_BYTES`, a bound checked against the listing before reading.
* MANIFEST.json: sealed by COMMIT's ``manifest_sha256``; a JSON object, ``format`` 1, ``hash``
  "sha256", ``files`` an object mapping file names to ``{"size": int >= 0, "sha256": hex}``.
  A file name is one path component as :mod:`.serialize` writes them (letters, digits, ``_``,
  ``-``, ``.``; not starting with ``.``; at most 255 bytes): never ``..``, ``/``, an absolute
  path or a NUL, so nothing a MANIFEST names is outside its step directory. COMMIT, MANIFEST and
  QUARANTINED themselves cannot be listed.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tlaunch.storage.checkpoint.manifest import (
    COMMIT,
    FORMAT_VERSION,
    HASH_NAME,
    MANIFEST,
    NAME_PATTERN,
    QUARANTINED,
    RNG_PREFIX,
    sha256,
)

#: A COMMIT is a few hundred bytes plus the metrics; anything larger is not one of ours.
MAX_COMMIT_BYTES = 1 << 20
_MAX_FILE_BYTES = 1 << 62
# Seconds since the epoch up to the year 5138: a bound that keeps float() and time formatting safe.
_MAX_TIME = 1e11
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_RNG_FILE = re.compile(rf"{re.escape(RNG_PREFIX)}[0-9]+\.pt")
_RESERVED = frozenset({COMMIT, MANIFEST, QUARANTINED})


def _show(value: Any) -> str:
    """A hostile value, short and on one line (repr escapes NUL and newlines)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_size(value: Any) -> bool:
    return _is_int(value) and 0 <= value < _MAX_FILE_BYTES


def _is_time(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value) and 0 <= value <= _MAX_TIME
    return _is_int(value) and 0 <= value <= _MAX_TIME  # compared as int: no float overflow


def is_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


def parse_record(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object of our format; ValueError with one line when ``data`` is not one."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5000-digit int, [[[[...]]]]
        raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{what} has an unknown format (expected format {FORMAT_VERSION})")
    return record


def _require(record: dict[str, Any], what: str, key: str, ok: bool, expected: str) -> None:
    if key not in record:
        raise ValueError(f"{what} has no {key!r} (expected {expected})")
    if not ok:
        raise ValueError(f"{what} has {key!r} = {_show(record[key])}, expected {expected}")


def parse_commit(data: bytes, step: int) -> dict[str, Any]:
    """The COMMIT record of directory ``step-<step>``, every field checked."""
    record = parse_record(data, COMMIT)
    get = record.get
    _require(record, COMMIT, "step", _is_int(get("step")) and get("step") == step, str(step))
    _require(record, COMMIT, "time", _is_time(get("time")), "seconds since the epoch")
    _require(record, COMMIT, "size", is_size(get("size")), "a byte count")
    _require(record, COMMIT, "metrics", isinstance(get("metrics"), dict), "an object")
    _require(record, COMMIT, "manifest_sha256", is_digest(get("manifest_sha256")), "a sha256")
    return record


def check_file_name(name: Any) -> str:
    """``name`` if a step directory can hold it as one of its files; ValueError otherwise."""
    if (
        not isinstance(name, str)
        or len(name.encode()) > 255
        or not NAME_PATTERN.fullmatch(name)
        or name in _RESERVED
        or (name.startswith(RNG_PREFIX) and not _RNG_FILE.fullmatch(name))
    ):
        raise ValueError(f"{MANIFEST} names a file {_show(name)} that no step directory holds")
    return name


def manifest_files(commit: dict[str, Any], manifest: bytes) -> dict[str, dict[str, Any]]:
    """The file table of ``manifest``, after checking it is the one ``commit`` sealed."""
    if sha256(manifest) != commit.get("manifest_sha256"):
        raise ValueError(f"{MANIFEST} does not match the sha256 recorded in {COMMIT}")
    record = parse_record(manifest, MANIFEST)
    _require(record, MANIFEST, "hash", record.get("hash") == HASH_NAME, repr(HASH_NAME))
    files = record.get("files")
    _require(record, MANIFEST, "files", isinstance(files, dict), "an object of files")
    total = len(manifest)
    for name, entry in files.items():
        check_file_name(name)
        if not (
            isinstance(entry, dict)
            and is_size(entry.get("size"))
            and is_digest(entry.get(HASH_NAME))
        ):
            raise ValueError(
                f"{MANIFEST} entry {name} is {_show(entry)}, expected a size and a sha256"
            )
        total += entry["size"]
    if total != commit.get("size"):
        raise ValueError(
            f"{MANIFEST} adds up to {total} bytes, {COMMIT} recorded {commit.get('size')}"
        )
    return files
