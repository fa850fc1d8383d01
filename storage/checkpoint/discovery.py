"""What is at a checkpoint URL, from one recursive listing plus one read of each COMMIT.

Discovery must see what other processes wrote (a killed run, another machine), so every scan
drops the backend's listing cache first: gcsfs and s3fs cache listings per process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tlaunch.storage.checkpoint.manifest import (
    COMMIT,
    QUARANTINED,
    TMP_PREFIX,
    parse_record,
    parse_step_dir,
)
from tlaunch.storage.store import Location, RetryPolicy


@dataclass(slots=True)
class StepDir:
    """A step directory from one listing: its files (name -> size) and its COMMIT record."""

    step: int
    path: str
    files: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    problem: str | None = None  # why the COMMIT could not be read

    @property
    def committed(self) -> bool:
        return COMMIT in self.files

    @property
    def quarantined(self) -> bool:
        return QUARANTINED in self.files


def scan(location: Location, retry: RetryPolicy) -> tuple[dict[int, StepDir], list[str]]:
    """Step directories by step, and stale temp directories (paths), under ``location``."""
    fs, root = location.fs, location.path.rstrip("/")
    fs.invalidate_cache(root)
    try:
        listing = retry.call(
            fs.find, root, withdirs=True, detail=True, action="listing", where=location.url
        )
    except FileNotFoundError:
        return {}, []
    steps: dict[int, StepDir] = {}
    stale: set[str] = set()
    for path, meta in listing.items():
        if not path.startswith(root + "/"):
            continue
        top, _, rest = path[len(root) + 1 :].partition("/")
        if top.startswith(TMP_PREFIX):
            stale.add(f"{root}/{top}")
        elif (step := parse_step_dir(top)) is not None:
            entry = steps.setdefault(step, StepDir(step, f"{root}/{top}"))
            if rest and "/" not in rest and meta.get("type") == "file":
                entry.files[rest] = meta["size"]
    _read_records(location, retry, [s for s in steps.values() if s.committed])
    return steps, sorted(stale)


def _read_records(location: Location, retry: RetryPolicy, steps: list[StepDir]) -> None:
    """Fill in COMMIT records; ``fs.cat`` of a list fetches them concurrently on object stores."""
    if not steps:
        return
    paths = {f"{s.path}/{COMMIT}": s for s in steps}
    found = retry.call(
        location.fs.cat, list(paths), on_error="return", action="reading", where=location.url
    )
    for path, s in paths.items():
        data = found.get(path, FileNotFoundError(path))
        try:
            if isinstance(data, BaseException):
                raise ValueError(f"{COMMIT} cannot be read ({type(data).__name__})")
            s.record = parse_record(data, COMMIT)
        except ValueError as e:
            s.problem = str(e)
