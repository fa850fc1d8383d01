"""Reading a committed step back, and when what was read quarantines it.

The quarantine rule: only bytes that were read completely and proven wrong mark a step
QUARANTINED. Proof is

* a COMMIT or MANIFEST.json record that is malformed (see :mod:`.manifest`),
* a MANIFEST.json whose sha256 is not the one its COMMIT sealed,
* a file MANIFEST names that the step's listing lacks, or lists with another size,
* a file whose bytes fail their sha256,
* a state.json that is not a JSON object (:class:`.serialize.MalformedFile`).

A ``.pt`` or ``.safetensors`` file that passes its sha256 but will not load (refused as
unsafe, or from a newer torch) is not proof of damage: CheckpointError, no quarantine, since
every older step would very likely fail the same way.

Nothing else is proof, and none of it changes what is in the bucket:

* A read that failed is retried with the store's RetryPolicy (a read shorter than the listed
  size counts as failed); then StorageUnavailable (or, for a refusal such as a denied read, a
  StorageError) stops the caller, who reports "storage unreachable; nothing was changed".
* A file that vanished after the listing, in a step whose COMMIT is gone as well, belongs to a
  step being deleted (a concurrent retention; deletes remove COMMIT first): :class:`StepGone`,
  and whoever was looking for the newest step looks at the one before.

Every path read is ``<step dir>/<name>`` with ``name`` from the step's own listing or a
MANIFEST whose names :func:`.manifest.manifest_files` checked, so nothing outside the step
directory is ever read.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tlaunch.storage.checkpoint import prefetch
from tlaunch.storage.checkpoint.discovery import StepDir, read_complete
from tlaunch.storage.checkpoint.manifest import (
    COMMIT,
    HASH_NAME,
    MANIFEST,
    STATE,
    CheckpointError,
    hash_problems,
    read_chunks,
    sha256,
    sha256_stream,
    size_problems,
)
from tlaunch.storage.checkpoint.records import manifest_files
from tlaunch.storage.checkpoint.serialize import MalformedFile, bytes_to_state
from tlaunch.storage.store import Location, RetryPolicy, redact

#: Bytes one ranged read of a large file asks for.
READ_PART = 16 << 20


class CorruptCheckpointError(CheckpointError):
    """A committed step whose bytes do not match its MANIFEST; it is quarantined."""

    def __init__(self, step: int, url: str, detail: str) -> None:
        super().__init__(
            f"checkpoint step {step} at {redact(url)} failed verification ({detail}); quarantined it"
        )
        self.step = step
        self.detail = detail


class StepGone(CheckpointError):
    """The step was deleted while it was being read: not damaged, just no longer there."""

    def __init__(self, step: int, url: str) -> None:
        super().__init__(
            f"checkpoint step {step} at {redact(url)} was deleted while it was being read "
            "(another process's retention?)"
        )
        self.step = step


class StepReader:
    """Reads the files of one committed step from a scan; judges only what it read whole."""

    #: Whether :meth:`read` takes bytes a prefetch read and verified (:mod:`.prefetch`).
    takes = True

    def __init__(self, location: Location, retry: RetryPolicy, url: str, s: StepDir) -> None:
        self.fs, self.retry, self.url, self.s = location.fs, retry, url, s
        self.local = location.local

    def corrupt(self, detail: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.s.step, self.url, detail)

    def manifest(self) -> dict[str, dict[str, Any]]:
        """MANIFEST's file table, after checking it is the one COMMIT sealed."""
        if self.s.problem:
            raise self.corrupt(self.s.problem)
        if MANIFEST not in self.s.files:
            raise self.corrupt(f"{MANIFEST} is missing")
        data = self._read_listed(MANIFEST)
        try:
            return manifest_files(self.s.record or {}, data)
        except ValueError as e:
            raise self.corrupt(str(e)) from None

    def prefetched(self, name: str, expect: dict[str, Any]) -> tuple[str, Any, Any] | None:
        """File ``name`` as a prefetch parsed it from bytes proven to match ``expect``, or None
        (then :meth:`read` reads, checks and reports as ever)."""
        if not self.takes or size_problems({name: expect}, self.s.files):
            return None
        return prefetch.take_parsed(f"{self.s.path}/{name}", expect)

    def read(self, name: str, expect: dict[str, Any] | None, *, check: bool = True) -> bytearray:
        """The bytes of file ``name``, checked against its MANIFEST entry ``expect`` if given
        and ``check`` (without ``check``, ``expect`` only lets prefetched bytes proven to match
        it be taken: a rank that loads the step rank 0 verified).

        One buffer the size of the file, filled in ranged reads of :data:`READ_PART` bytes and
        hashed as they arrive: no second copy of the file and no second pass over it (on this
        machine's file system each part is read straight into the buffer). Each part is
        retried on its own (a reset late in a 2 GB file costs one part again), and a part
        shorter than asked counts as a failed read, never as damage.
        """
        if name not in self.s.files:
            raise self.corrupt(f"{name} is missing")
        listed = self.s.files[name]
        judged = expect if check else None  # what the bytes are checked against
        if judged is not None:
            problems = size_problems({name: judged}, {name: listed})
            if problems:
                raise self.corrupt(problems[0])
        size = listed if listed is not None else (judged or {}).get("size")
        path = f"{self.s.path}/{name}"
        ready = prefetch.take(path, expect) if expect is not None and self.takes else None
        if ready is not None:  # read whole and proven to have expect's sha256 already
            return ready
        try:
            if size is None or size <= READ_PART:
                data = bytearray(read_complete(self.fs, self.retry, path, size))
                digest = sha256(data)
            else:
                data, digest = self._read_parts(path, size)
        except FileNotFoundError:
            raise self._vanished(name) from None
        if judged is not None:
            problems = hash_problems({name: judged}, lambda _: (len(data), digest))
            if problems:
                raise self.corrupt(problems[0])
        return data

    def _read_parts(self, path: str, size: int) -> tuple[bytearray, str]:
        data, digest = bytearray(size), hashlib.new(HASH_NAME)
        view = memoryview(data)
        for start in range(0, size, READ_PART):
            end = min(size, start + READ_PART)

            def part(start: int = start, end: int = end) -> None:
                if self.local:  # into the buffer, the GIL released: nothing to copy after
                    with open(path, "rb", buffering=0) as f:
                        f.seek(start)
                        got = f.readinto(view[start:end])
                else:
                    piece = self.fs.cat_file(path, start=start, end=end)
                    got = len(piece)
                    if got == end - start:
                        view[start:end] = piece
                if got != end - start:
                    raise ConnectionError(f"read {got} of bytes {start}..{end} listed")

            self.retry.call(part, action="reading", where=path)
            digest.update(view[start:end])
        return data, digest.hexdigest()

    def problems(self, *, full: bool) -> list[str]:
        """What is proven wrong: sizes against the listing, with ``full`` every byte against its
        sha256 too. Empty when sound; StepGone or a StorageError when nothing can be told."""
        try:
            files = self.manifest()
        except CorruptCheckpointError as e:
            return [e.detail]
        problems = size_problems(files, self.s.files)
        if problems or not full:
            return problems
        problems = hash_problems(files, self._digest)
        if not problems and STATE in files:  # what load would refuse: report it now
            try:
                bytes_to_state(STATE, self.read(STATE, files[STATE]))
            except MalformedFile as e:
                problems.append(str(e))
        return problems

    def _digest(self, name: str) -> tuple[int, str]:
        path = f"{self.s.path}/{name}"
        return self.retry.call(
            lambda: sha256_stream(read_chunks(self.fs, path)), action="reading", where=path
        )

    def _read_listed(self, name: str) -> bytes:
        try:
            return read_complete(
                self.fs, self.retry, f"{self.s.path}/{name}", self.s.files.get(name)
            )
        except FileNotFoundError:
            raise self._vanished(name) from None

    def _vanished(self, name: str) -> CheckpointError:
        """The listing had ``name`` and now it is gone: a delete in progress removed COMMIT
        first, so with COMMIT gone too the step is going; with COMMIT still there, the step
        lost a file: damage."""
        commit = f"{self.s.path}/{COMMIT}"
        self.fs.invalidate_cache(self.s.path)
        if self.retry.call(self.fs.exists, commit, action="checking", where=commit):
            return self.corrupt(f"{name} is missing")
        return StepGone(self.s.step, self.url)
