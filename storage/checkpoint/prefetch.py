"""A step's files read, verified and parsed before the restore asks for them.

A resumed process spends its first seconds importing and building things that do not need the
checkpoint. :func:`start` reads the step a resume will very likely load (the newest committed
one, or the step named) in background threads meanwhile, each file in ranged parts and checked
against its MANIFEST sha256 as it arrives (:meth:`.reading.StepReader.read`); once
:func:`parse_ahead` says torch is imported, it parses the files that passed, too. The restore
then takes the parsed files (:meth:`.reading.StepReader.prefetched`) or the bytes
(:meth:`.reading.StepReader.read`) instead of reading them again.

Why a wrong guess is harmless: bytes are handed over by content, never by name alone. The
restore asks with the MANIFEST entry it read and checked against COMMIT itself, and gets
prefetched bytes only when they were read whole and their sha256 is the one that entry names.
Anything else gives None and the restore reads as it always did, so its retries, its errors
and its quarantine are exactly those of a restore without a prefetch: a step the restore does
not use, a file whose read failed (the prefetch does not retry: the restore's own read does),
bytes that failed their digest, a scan that found nothing. The prefetch changes nothing at the
URL: it never quarantines, cleans or deletes, and takes no lease.

Importing this module imports nothing else of the store: the thread does, while the caller
goes on. Memory: a parsed ``.pt`` file's bytes are dropped (its tensors are copies), so the
peak is the restore's own; what the restore does not take is held until :func:`discard`, which
the caller runs as soon as the restore is done.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

#: Files of one step read at once (the restore's own width).
_FILES_IN_FLIGHT = 4


def _readers(on_disk: bool) -> int:
    """Threads reading at once. On this machine's disk a read is CPU (the page cache's copy,
    the sha256), so one core is left to the script, whose imports the prefetch overlaps: on
    2 cores, two files hashed at once slowed ``import torch`` by ~0.1 s more than one. A store
    or a FUSE mount (Drive) is waited on, mostly: all files at once there."""
    if not on_disk:
        return _FILES_IN_FLIGHT
    return max(1, min(_FILES_IN_FLIGHT, (os.cpu_count() or 1) - 1))


@dataclass
class _File:
    """One file being prefetched: ``data`` and its MANIFEST ``sha256`` and ``size`` once read
    and verified; ``value``, what :func:`.serialize.load_file` made of them, once parsed."""

    done: threading.Event = field(default_factory=threading.Event)
    data: bytearray | None = None
    sha256: str | None = None
    size: int | None = None
    parsed: threading.Event = field(default_factory=threading.Event)
    value: tuple[str, Any, Any] | None = None

    def proven(self, expect: dict[str, Any]) -> bool:
        return self.sha256 == expect.get("sha256") and self.size == expect.get("size")


class _Prefetch:
    def __init__(self, target: tuple[str, int | None]) -> None:
        self.target = target
        #: Set once the files to read are known (or the prefetch gave up): a restore that gets
        #: there first waits for the plan rather than reading the same bytes twice.
        self.planned = threading.Event()
        self.files: dict[str, _File] = {}
        self.lock = threading.Lock()
        #: Set by :func:`parse_ahead` (torch is imported) or :func:`discard` (parse nothing).
        self.parse_ok = threading.Event()
        self.dropped = False


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
    return entry.data if entry.data is not None and entry.proven(expect) else None


def parse_ahead() -> None:
    """Let the prefetch parse what it read (once torch is imported: parsing imports it, which
    must not start in a thread while the main one may import it too)."""
    prefetch = _current
    if prefetch is not None:
        prefetch.parse_ok.set()


def take_parsed(path: str, expect: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """:func:`.serialize.load_file`'s result for ``path``, parsed from bytes that :func:`take`
    would hand over; else None (and the bytes, if any, stay for :func:`take`)."""
    prefetch = _current
    if prefetch is None or not prefetch.parse_ok.is_set():
        return None
    prefetch.planned.wait()
    with prefetch.lock:
        entry = prefetch.files.get(path)
    if entry is None:
        return None
    entry.parsed.wait()
    if entry.value is None or not entry.proven(expect):
        return None
    with prefetch.lock:
        prefetch.files.pop(path, None)
    # Handed over: the parsing thread keeps no reference, so it never frees the tensors (a
    # daemon thread freeing tensors while the interpreter tears down aborts the process).
    value, entry.value = entry.value, None
    return value


def discard() -> None:
    """Drop the prefetch and whatever the restore did not take (reads in flight finish unseen)."""
    global _current
    prefetch, _current = _current, None
    if prefetch is not None:
        prefetch.dropped = True
        prefetch.parse_ok.set()  # the parser leaves
        with prefetch.lock:
            prefetch.files.clear()


def _run(prefetch: _Prefetch, url: str, step: int | None) -> None:
    try:
        reader, files, width = _plan(url, step)
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
                    entry.sha256, entry.size = files[name]["sha256"], files[name]["size"]
            except Exception:
                pass  # not taken: the restore reads this file itself, with its retries
            finally:
                entry.done.set()

    in_order = [(name, entries[f"{reader.s.path}/{name}"]) for name in names]
    label = f"step {reader.s.step} at {reader.url}"
    threading.Thread(
        target=_parse, args=(prefetch, in_order, label), name="tlaunch-prefetch", daemon=True
    ).start()
    for _ in range(min(width, len(names))):
        threading.Thread(target=work, name="tlaunch-prefetch", daemon=True).start()


def _parse(prefetch: _Prefetch, entries: list[tuple[str, _File]], label: str) -> None:
    """Parse each file read and verified, largest first, once :func:`parse_ahead` allows it.

    Only bytes whose sha256 matched are parsed, as in the restore. What fails to parse is left
    unparsed: the restore parses it again and reports. A parsed ``.pt`` file's bytes are
    dropped (its tensors are copies); a ``.safetensors`` file's tensors are views of them.
    """
    try:
        from tlaunch.storage.checkpoint import serialize

        prefetch.parse_ok.wait()
        for name, entry in entries:
            entry.done.wait()
            if entry.data is not None and not prefetch.dropped:
                try:
                    entry.value = serialize.load_file(name, entry.data, f"{label}: {name}")
                    entry.data = None
                except Exception:
                    pass
            entry.parsed.set()
    finally:  # whatever happened, nobody waits for a parse that will not come
        for _, entry in entries:
            entry.parsed.set()


def _plan(url: str, step: int | None) -> tuple[Any, dict[str, dict[str, Any]], int]:
    """The reader of the step to read, its MANIFEST's file table and how many files to read at
    once; (None, {}, 0) when there is nothing to read."""
    from tlaunch.storage.checkpoint.reading import StepReader
    from tlaunch.storage.checkpoint.store import CheckpointStore
    from tlaunch.storage.store import RetryPolicy

    once = RetryPolicy(attempts=1)  # a failed read is the restore's to retry and report
    store = CheckpointStore(url, retry=once)
    steps = store._candidates(store._scan()[0])
    if step is not None:
        steps = [s for s in steps if s.step == step]
    if not steps:
        return None, {}, 0
    reader = StepReader(store.location, once, store.url, steps[-1])
    reader.takes = False  # it is the prefetch
    return reader, reader.manifest(), _readers(on_disk=store.location.atomic_rename)
