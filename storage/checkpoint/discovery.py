"""What is at a checkpoint URL, from one recursive listing plus one read of each COMMIT.

Discovery must see what other processes wrote (a killed run, another machine), so every scan
drops the backend's listing cache first: gcsfs and s3fs cache listings per process.

What a COMMIT read can tell, and what it cannot (the quarantine rule, see
:mod:`tlaunch.storage.checkpoint.reading`):

* A record read completely and proven wrong (not JSON, a field missing or of the wrong type or
  size, see :mod:`.records`) is evidence: ``StepDir.problem`` is set, and the store quarantines
  the step when it next meets it. So is a COMMIT listed larger than any record: it is not read.
* A read that failed (a reset, a timeout, 429, 5xx) proves nothing. It is retried with the
  store's RetryPolicy; if storage stays down, StorageUnavailable is raised out of the scan and
  nothing is decided. A read shorter than the size the listing gave counts as failed.
* A COMMIT that the listing showed but that is gone when read belongs to a step being deleted
  (a delete removes COMMIT first): the step is uncommitted from then on, which is what the
  next listing will say too. Never corruption.

URLs are literal paths: ``find`` and ``cat_file`` never expand ``[``, ``*`` or ``?`` (fsspec's
``cat``, ``rm`` and ``expand_path`` do, so the checkpoint store never calls them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tlaunch.storage.checkpoint.manifest import COMMIT, QUARANTINED, TMP_PREFIX, parse_step_dir
from tlaunch.storage.checkpoint.records import MAX_COMMIT_BYTES, parse_commit
from tlaunch.storage.checkpoint.threads import in_parallel
from tlaunch.storage.store import Location, RetryPolicy


@dataclass(slots=True)
class StepDir:
    """A step directory from one listing: its files (name -> size) and its COMMIT record."""

    step: int
    path: str
    files: dict[str, int | None] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    problem: str | None = None  # what is proven wrong with the COMMIT record

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
                size = meta.get("size")  # None where a backend lists no sizes
                entry.files[rest] = size if isinstance(size, int) else None
    in_parallel(
        lambda s: _read_record(location, retry, s), [s for s in steps.values() if s.committed]
    )
    return steps, sorted(stale)


def read_complete(fs: Any, retry: RetryPolicy, path: str, size: int | None) -> bytes:
    """The bytes of ``path``, retried while transient and proven complete against ``size``
    (the listing's; None when the backend gave none). FileNotFoundError passes through."""

    def read() -> bytes:
        data = fs.cat_file(path)
        if size is not None and len(data) != size:
            # Cut off in transit (or replaced since the listing): not evidence, try again.
            raise ConnectionError(f"read {len(data)} of the {size} bytes listed")
        return data

    return retry.call(read, action="reading", where=path)


def _read_record(location: Location, retry: RetryPolicy, s: StepDir) -> None:
    """Fill in ``s.record`` (or ``s.problem``) from its COMMIT."""
    size = s.files[COMMIT]
    if size is not None and size > MAX_COMMIT_BYTES:
        s.problem = f"{COMMIT} is {size} bytes, more than any record"
        return
    try:
        data = read_complete(location.fs, retry, f"{s.path}/{COMMIT}", size)
    except FileNotFoundError:
        del s.files[COMMIT]  # deleted since the listing: the step is going, not damaged
        return
    try:
        s.record = parse_commit(data, s.step)
    except ValueError as e:
        s.problem = str(e)
