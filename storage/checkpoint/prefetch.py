"""A step's files read and verified before the restore asks for them.

A resumed process spends its first seconds importing and building things that do not need the
checkpoint. :func:`start` reads the step a resume will very likely load (the newest committed
one, or the step named) in background threads meanwhile, each file in ranged parts and checked
against its MANIFEST sha256 as it arrives (:meth:`.reading.StepReader.read`), and
:meth:`.reading.StepReader.read` then takes those bytes instead of reading them again.

Why a wrong guess is harmless: bytes are handed over by content, never by name alone. The
restore asks with the MANIFEST entry it read and checked against COMMIT itself, and gets
prefetched bytes only when they were read whole and their sha256 is the one that entry names.
Anything else gives None and the restore reads as it always did, so its retries, its errors
and its quarantine are exactly those of a restore without a prefetch: a step the restore does
not use, a file whose read failed (the prefetch does not retry: the restore's own read does),
bytes that failed their digest, a scan that found nothing. The prefetch changes nothing at the
URL: it never quarantines, cleans or deletes, and takes no lease.

Importing this module imports nothing else of the store: the thread does, while the caller
goes on. Memory: what the restore does not take is held until :func:`discard`, which the caller runs as
soon as the restore is done.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

#: Files of one step read at once (the restore's own width).
_FILES_IN_FLIGHT = 4


@dataclass
class _File:
    """One file being prefetched: ``data`` and its MANIFEST ``sha256`` once read and verified."""

    done: threading.Event = field(default_factory=threading.Event)
    data: bytearray | None = None
    sha256: str | None = None


class _Prefetch:
    def __init__(self, target: tuple[str, int | None]) -> None:
        self.target = target
        #: Set once the files to read are known (or the prefetch gave up): a restore that gets
        #: there first waits for the plan rather than reading the same bytes twice.
        self.planned = threading.Event()
        self.files: dict[str, _File] = {}
        self.lock = threading.Lock()


_current: _Prefetch | None = None


def start(url: str, step: int | None = None) -> None:
    """Read committed ``step`` at ``url`` (the newest committed one if None) in the background.

    Returns at once; never raises. One prefetch per process: the same target again keeps the
    one under way, another replaces it.
    """
    global _current
    if _current is not None and _current.target == (url, step):
        return
    discard()
    prefetch = _current = _Prefetch((url, step))
    threading.Thread(
        target=_run, args=(prefetch, url, step), name="tlaunch-prefetch", daemon=True
    ).start()


def take(path: str, expect: dict[str, Any]) -> bytearray | None:
    """The prefetched bytes of ``path`` if they are whole and have ``expect``'s sha256 and size,
    else None. Waits for a read in flight; each file is handed over once."""
    prefetch = _current
    if prefetch is None:
        return None
    prefetch.planned.wait()
    with prefetch.lock:
        entry = prefetch.files.pop(path, None)
    if entry is None:
        return None
    entry.done.wait()
    data, digest = entry.data, entry.sha256
    if data is None or digest != expect.get("sha256") or len(data) != expect.get("size"):
        return None
    return data


def discard() -> None:
    """Drop the prefetch and whatever the restore did not take (reads in flight finish unseen)."""
    global _current
    prefetch, _current = _current, None
    if prefetch is not None:
        with prefetch.lock:
            prefetch.files.clear()


def _run(prefetch: _Prefetch, url: str, step: int | None) -> None:
    try:
        reader, files = _plan(url, step)
        if reader is None:
            return
        with prefetch.lock:
            for name in files:
                prefetch.files[f"{reader.s.path}/{name}"] = _File()
            entries = dict(prefetch.files)
    except Exception:
        return  # the restore meets the same storage and reports it
    finally:
        prefetch.planned.set()
    names = sorted(files, key=lambda n: -files[n]["size"])  # the longest read starts first
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not names:
                    return
                name = names.pop(0)
            entry = entries[f"{reader.s.path}/{name}"]
            try:
                if prefetch is _current:  # discarded meanwhile: read no more
                    entry.data = reader.read(name, files[name])
                    entry.sha256 = files[name]["sha256"]
            except Exception:
                pass  # not taken: the restore reads this file itself, with its retries
            finally:
                entry.done.set()

    for _ in range(min(_FILES_IN_FLIGHT, len(names))):
        threading.Thread(target=work, name="tlaunch-prefetch", daemon=True).start()


def _plan(url: str, step: int | None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The reader of the step to read and its MANIFEST's file table, or (None, {})."""
    from tlaunch.storage.checkpoint.reading import StepReader
    from tlaunch.storage.checkpoint.store import CheckpointStore
    from tlaunch.storage.store import RetryPolicy

    once = RetryPolicy(attempts=1)  # a failed read is the restore's to retry and report
    store = CheckpointStore(url, retry=once)
    steps = store._candidates(store._scan()[0])
    if step is not None:
        steps = [s for s in steps if s.step == step]
    if not steps:
        return None, {}
    reader = StepReader(store.location, once, store.url, steps[-1])
    reader.takes = False  # it is the prefetch
    return reader, reader.manifest()
