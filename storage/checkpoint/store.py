"""Checkpoints at a URL: save, discover, verify, load, quarantine, delete.

The layout and records are in :mod:`tlaunch.storage.checkpoint.manifest`, the commit protocol
per backend in :mod:`tlaunch.storage.checkpoint.commit`. The store is single-writer: in a
distributed job rank 0 gathers every rank's RNG state and alone calls
:meth:`CheckpointStore.save`.

"Latest" is the highest step with a COMMIT whose MANIFEST verifies. Discovery checks sizes
against one directory listing (cheap); loading checks every byte against its sha256. A step that
fails either is quarantined (a ``QUARANTINED`` marker, on every backend) and the previous
committed step is used, with a :class:`CheckpointWarning` naming both.

One writer at a time: given a ``fence`` (:meth:`~tlaunch.storage.Lease.check` of the
directory's lease), the store calls it before a save starts, right before its COMMIT, and before
clean-up or retention deletes anything, so a writer whose lease changed hands commits and
deletes nothing (:mod:`tlaunch.storage.checkpoint.lease`).

Only proof quarantines (:mod:`tlaunch.storage.checkpoint.reading` has the rule): a read that
failed is retried and then raised as StorageUnavailable, and a step deleted while it was being
read is passed over as gone. Neither changes anything at the URL, and retention deletes only
steps whose COMMIT it read.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tlaunch.storage.checkpoint import serialize
from tlaunch.storage.checkpoint.commit import build_commit_protocol
from tlaunch.storage.checkpoint.discovery import StepDir, scan
from tlaunch.storage.checkpoint.lease import LeaseLost
from tlaunch.storage.checkpoint.manifest import (
    COMMIT,
    MANIFEST,
    QUARANTINED,
    CheckpointError,
    build_manifest,
    commit_record,
    encode_json,
    step_dir,
)
from tlaunch.storage.checkpoint.reading import CorruptCheckpointError, StepGone, StepReader
from tlaunch.storage.checkpoint.threads import in_parallel
from tlaunch.storage.localfs import LocalFiles
from tlaunch.storage.store import (
    Location,
    RetryPolicy,
    StorageError,
    redact,
    resolve,
    storage_error,
)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStore",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "LoadedCheckpoint",
]

_MAX_STEP = 10**9 - 1
#: Files of one step written at once: every large file of a usual save (model, optimizer).
_FILES_IN_FLIGHT = 4


class CheckpointWarning(UserWarning):
    """A committed checkpoint failed verification and an earlier one is used instead."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One step directory as discovery sees it."""

    step: int
    url: str
    committed: bool
    #: Commit time (seconds since the epoch); 0.0 when not committed.
    time: float
    #: Bytes of all files the MANIFEST lists, plus the MANIFEST.
    size: int
    #: ``state["metrics"]`` at save time (drives keep-best retention).
    metrics: dict[str, Any] = field(default_factory=dict)
    quarantined: bool = False


@dataclass(slots=True)
class LoadedCheckpoint:
    info: CheckpointInfo
    state: dict[str, Any]
    tensors: dict[str, dict[str, Any]]
    objects: dict[str, Any]
    rng: dict[int, Any]


class CheckpointStore:
    """Committed checkpoints under one URL (a path, ``gs://``, ``s3://``, ``drive://``, ``memory://``)."""

    def __init__(
        self,
        url: str | Location,
        *,
        retry: RetryPolicy | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.location = url if isinstance(url, Location) else resolve(url)
        if isinstance(self.location.fs, LocalFiles):  # a lazy one: its saves may run at exit
            self.location.fs.load()
        #: Raises (LeaseLost) when this process may no longer write here; see the module doc.
        self._fence = fence or (lambda: None)
        self.url = self.location.url.rstrip("/")
        self._root = self.location.path.rstrip("/")
        self._retry = retry or RetryPolicy()
        self._protocol = build_commit_protocol(self.location, self._retry)
        # Steps this process found bad, in case writing their QUARANTINED marker failed too.
        self._bad: set[int] = set()

    def __repr__(self) -> str:
        return f"CheckpointStore({redact(self.url)!r})"

    def step_url(self, step: int) -> str:
        return f"{self.url}/{step_dir(step)}"

    def _call(self, fn: Callable, *args: Any, action: str, where: str, **kwargs: Any) -> Any:
        return self._retry.call(fn, *args, action=action, where=where, **kwargs)

    # -- discovery ---------------------------------------------------------------------------

    def _scan(self) -> tuple[dict[int, StepDir], list[str]]:
        return scan(self.location, self._retry)

    def _info(self, s: StepDir) -> CheckpointInfo:
        record = s.record or {}  # checked field by field in records.parse_commit
        return CheckpointInfo(
            step=s.step,
            url=self.step_url(s.step),
            committed=s.committed,
            time=float(record.get("time", 0.0)),
            size=record.get("size", 0),
            metrics=record.get("metrics", {}),
            quarantined=s.quarantined or s.step in self._bad,
        )

    def all_steps(self) -> list[CheckpointInfo]:
        """Every step directory, committed or not, quarantined or not (for ``tlaunch ckpt ls``)."""
        steps, _ = self._scan()
        return [self._info(steps[k]) for k in sorted(steps)]

    def committed(self) -> list[CheckpointInfo]:
        """Committed, unquarantined steps, ascending: one listing plus one read of each COMMIT."""
        return [i for i in self.all_steps() if i.committed and not i.quarantined]

    def get(self, step: int) -> CheckpointInfo:
        """The committed ``step``; CheckpointError naming what exists when it is not."""
        steps, _ = self._scan()
        return self._info(self._require(steps, step))

    def _usable(self, s: StepDir) -> bool:
        return s.committed and not s.quarantined and s.step not in self._bad

    def _candidates(self, steps: dict[int, StepDir]) -> list[StepDir]:
        return [s for _, s in sorted(steps.items()) if self._usable(s)]

    def _require(self, steps: dict[int, StepDir], step: int) -> StepDir:
        s = steps.get(step)
        if s is not None and self._usable(s):
            return s
        if s is not None and s.committed:
            raise CheckpointError(
                f"step {step} at {redact(self.url)} is quarantined (it failed verification); "
                f"inspect it with: tlaunch ckpt verify {redact(self.url)} --step {step}"
            )
        have = ", ".join(str(c.step) for c in self._candidates(steps)) or "none"
        raise CheckpointError(
            f"step {step} is not committed at {redact(self.url)} (committed steps: {have})"
        )

    def latest(self) -> CheckpointInfo | None:
        """The highest committed step whose files have their recorded sizes.

        Steps that fail are quarantined, with a warning naming the step used instead.
        """
        candidates = self._candidates(self._scan()[0])
        for i in range(len(candidates) - 1, -1, -1):
            try:
                problems = self._reader(candidates[i]).problems(full=False)
            except StepGone:
                continue
            if not problems:
                return self._info(candidates[i])
            self._fall_back(candidates[i].step, problems, candidates[i - 1].step if i else None)
        return None

    def _reader(self, s: StepDir) -> StepReader:
        return StepReader(self.location, self._retry, self.url, s)

    def step_reader(self, step: int) -> StepReader:
        """A reader of committed ``step`` that changes nothing: what it proves wrong it raises
        (CorruptCheckpointError) and the caller reports; nothing is quarantined (export)."""
        return self._reader(self._require(self._scan()[0], step))

    # -- quarantine and fallback ------------------------------------------------------------

    def quarantine(self, step: int, reason: str) -> None:
        """Mark ``step`` bad with a QUARANTINED file; it stays for inspection but is never used."""
        self._bad.add(step)
        path = f"{self._protocol.final_path(step)}/{QUARANTINED}"
        try:
            self._protocol.write(path, encode_json({"reason": reason, "time": time.time()}))
        except Exception as e:  # read-only bucket: this process still skips it via _bad
            warnings.warn(
                f"could not mark step {step} at {redact(self.url)} quarantined ({e}); "
                "it will be checked again on the next start",
                CheckpointWarning,
                stacklevel=3,
            )

    def _fall_back(self, bad: int, problems: list[str], fallback: int | None) -> None:
        self.quarantine(bad, "; ".join(problems))
        instead = (
            f"using step {fallback} instead"
            if fallback is not None
            else "no earlier committed step remains"
        )
        warnings.warn(
            f"checkpoint step {bad} at {redact(self.url)} failed verification "
            f"({'; '.join(problems)}); quarantined it, {instead}",
            CheckpointWarning,
            stacklevel=3,
        )

    # -- saving -----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        tensors: Mapping[str, Mapping[str, Any]] | None = None,
        objects: Mapping[str, Any] | None = None,
        rng: Mapping[int, Any] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write and commit ``step`` synchronously; returns it once its COMMIT is durable.

        ``tensors`` {"model": state_dict, "model_1": ...} become ``<name>.safetensors``,
        ``objects`` {"optimizer": sd, ...} ``<name>.pt``, ``rng`` {rank: state}
        ``rng-rankNNNNN.pt`` and ``state`` ``state.json``. Committed steps are immutable: saving
        one again raises CheckpointError (delete it first if a new timeline replaces it).
        """
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_STEP:
            raise CheckpointError(f"step must be an int between 0 and {_MAX_STEP}, got {step!r}")
        state = dict(state or {})
        metrics = state.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise CheckpointError(f"state['metrics'] must be a dict, got {type(metrics).__name__}")
        plan = serialize.plan_files(tensors or {}, objects or {}, rng or {}, state)
        self._fence()
        if self._is_committed(step):
            raise CheckpointError(
                f"step {step} is already committed at {redact(self.url)}; committed checkpoints are "
                "never rewritten: delete it first (CheckpointStore.delete) or save another step"
            )
        staging = None
        try:
            staging = self._protocol.begin(step)
            info = self._write_step(step, staging, plan, metrics)
        except Exception as e:
            # A fenced-off writer leaves a shared step directory (object stores write in place)
            # alone: what is there may be the new owner's. A private temp directory goes.
            fenced = isinstance(e, LeaseLost) and staging == self._protocol.final_path(step)
            if staging is not None and not fenced:
                self._protocol.abort(staging)
            err = self._save_error(e, step)
            if err is e:
                raise
            raise err from e
        finally:
            self.location.fs.invalidate_cache(self._root)
        self._bad.discard(step)
        return info

    def _write_step(
        self, step: int, staging: str, plan: list[tuple[str, serialize.FileWriter]], metrics: dict
    ) -> CheckpointInfo:
        files = self._write_files(staging, plan)
        manifest = build_manifest(files)
        self._protocol.write(f"{staging}/{MANIFEST}", manifest)
        record = commit_record(step, time.time(), files, manifest, metrics)
        self._fence()  # the commit point: only the lease holder gets past it
        self._protocol.commit(staging, step, encode_json(record))
        return CheckpointInfo(
            step, self.step_url(step), True, record["time"], record["size"], dict(metrics)
        )

    def _write_files(
        self, staging: str, plan: list[tuple[str, serialize.FileWriter]]
    ) -> dict[str, dict[str, Any]]:
        """Stream every file from the snapshot, all of them at once; their MANIFEST entries.

        Each file is serialized straight into its local temp file or upload stream and hashed
        on the way (:meth:`CommitProtocol.write_stream`), so memory beyond the snapshot is a
        few upload parts, never a file's bytes. The files go concurrently, as fsspec's own
        bulk put sends them: an object store moves several streams faster than one, and
        hashing and serializing (C code without the GIL) overlap each other's waits.
        """
        files: dict[str, dict[str, Any]] = {}

        def write(item: tuple[str, serialize.FileWriter]) -> None:
            name, produce = item
            files[name] = self._protocol.write_stream(f"{staging}/{name}", produce)

        in_parallel(write, plan, width=_FILES_IN_FLIGHT)
        return dict(sorted(files.items()))

    def _is_committed(self, step: int) -> bool:
        """One listing of the step's own directory: cheaper than a full scan on object stores."""
        path = self._protocol.final_path(step)
        self.location.fs.invalidate_cache(path)
        try:
            names = self._call(
                self.location.fs.ls, path, detail=False, action="listing", where=path
            )
        except FileNotFoundError:
            return False
        names = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
        return COMMIT in names and QUARANTINED not in names and step not in self._bad

    def _save_error(self, e: Exception, step: int) -> Exception:
        """A one-line StorageError for storage faults; anything else (a bug) keeps its type."""
        if isinstance(e, StorageError) and not isinstance(e, CheckpointError):
            detail = str(e)
        elif isinstance(e, OSError):
            detail = str(storage_error(e, "writing", self.step_url(step)))
        else:
            return e
        return StorageError(
            f"saving checkpoint step {step} failed: {detail}; earlier checkpoints are intact"
        )

    # -- loading and verifying ------------------------------------------------------------------

    def load(self, info_or_step: CheckpointInfo | int, *, verify: bool = True) -> LoadedCheckpoint:
        """Read a committed step, checking every file's sha256 first when ``verify``.

        A step that fails is quarantined and CorruptCheckpointError names it.
        """
        step = info_or_step.step if isinstance(info_or_step, CheckpointInfo) else info_or_step
        s = self._require(self._scan()[0], step)
        try:
            return self._load(s, verify)
        except CorruptCheckpointError as e:
            self.quarantine(step, e.detail)
            raise

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest committed step that loads, walking back loudly over corrupt ones.

        Only corruption walks back: a file refused as unsafe, or unreadable by this torch,
        raises CheckpointError, because every older step would very likely fail the same way.
        """
        candidates = self._candidates(self._scan()[0])
        for i in range(len(candidates) - 1, -1, -1):
            try:
                return self._load(candidates[i], verify=True)
            except StepGone:
                continue
            except CorruptCheckpointError as e:
                self._fall_back(e.step, [e.detail], candidates[i - 1].step if i else None)
        return None

    def _load(self, s: StepDir, verify: bool) -> LoadedCheckpoint:
        """Read, check and parse the step's files, several at once.

        Each file is checked against its sha256 before it is parsed, so no parser ever sees
        bytes that fail their checksum; the files overlap one another's reading, hashing and
        parsing (all in C code that drops the GIL). Peak memory is the loaded state plus the
        bytes of the ``.pt`` files being parsed: safetensors tensors are views of the bytes read.
        """
        reader = self._reader(s)
        files = reader.manifest()
        out = LoadedCheckpoint(self._info(s), {}, {}, {}, {})
        slots = {"tensors": out.tensors, "objects": out.objects, "rng": out.rng}
        parsed: dict[str, tuple[str, Any, Any]] = {}

        def load(name: str) -> None:
            # Bytes a prefetch proved to have files[name]'s sha256 serve a load with or without
            # ``verify`` (a rank loading the step rank 0 verified takes them too).
            ready = reader.prefetched(name, files[name])
            if ready is not None:  # parsed ahead
                parsed[name] = ready
                return
            data = reader.read(name, files[name], check=verify)
            label = f"step {s.step} at {redact(self.url)}: {name}"
            try:
                parsed[name] = serialize.load_file(name, data, label)
            except serialize.MalformedFile as e:
                raise reader.corrupt(f"{name} {e.detail}") from None

        # Largest first: the longest read starts first.
        in_parallel(load, sorted(files, key=lambda n: -files[n]["size"]), width=_FILES_IN_FLIGHT)
        for name in sorted(parsed):
            kind, key, value = parsed[name]
            if kind == "state":
                out.state = value
            elif kind in slots:
                slots[kind][key] = value
        return out

    def verify(self, step: int | None = None, *, full: bool = True) -> dict[int, list[str]]:
        """{step: problems} for ``step`` or every committed step (quarantined ones included).

        An empty list means sound. ``full`` reads every byte and checks sha256, otherwise sizes
        only. Never quarantines or deletes: this is what ``tlaunch ckpt`` uses to inspect.
        """
        steps, _ = self._scan()
        if step is not None:
            s = steps.get(step)
            if s is None or not s.committed:
                self._require(steps, step)  # raises, naming the steps that are committed
            return {step: self._reader(s).problems(full=full)}
        found = {}
        for k, s in sorted(steps.items()):
            if s.committed:
                with contextlib.suppress(StepGone):  # deleted meanwhile: nothing to report
                    found[k] = self._reader(s).problems(full=full)
        return found

    # -- deleting ---------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Delete ``step``: COMMIT first, so an interrupted delete leaves nothing committed."""
        path = self._protocol.final_path(step)
        try:
            self._protocol.uncommit(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise storage_error(e, "deleting", path) from e
        try:
            self._protocol.remove(path)
        except FileNotFoundError:
            pass  # deleting is idempotent, so a retry after a half-done delete just finishes it
        self.location.fs.invalidate_cache(self._root)

    def apply_retention(self, policy: Any) -> list[int]:
        """Delete what ``policy.to_delete`` names, never the newest committed step.

        The policy sees only steps whose COMMIT was read and understood: a step that could not
        be read stops the pass (StorageUnavailable, nothing deleted), and a damaged record is
        left for the quarantine, never ranked as a step without metrics.
        """
        infos = [self._info(s) for s in self._candidates(self._scan()[0]) if s.record is not None]
        doomed = [s for s in policy.to_delete(infos) if infos and s != infos[-1].step]
        if doomed:
            self._fence()
        for step in doomed:
            self.delete(step)
        return doomed

    def clean_stale(self) -> list[str]:
        """Remove temp dirs and uncommitted step dirs of killed saves; returns their URLs.

        Call it at start, on rank 0, before any save: a save in flight looks stale too.
        Committed and quarantined steps are never touched.
        """
        steps, stale = self._scan()
        stale += [s.path for s in steps.values() if not s.committed]
        if stale:
            self._fence()  # another live writer's in-flight steps look stale too
        removed = []
        for path in sorted(stale):
            self._protocol.remove(path)
            removed.append(self.url + path[len(self._root) :])
        self.location.fs.invalidate_cache(self._root)
        return removed
