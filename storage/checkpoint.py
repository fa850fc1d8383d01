"""Checkpoints at a URL: save, discover, verify, load, quarantine, delete.

The layout and records are in :mod:`tlaunch.storage.manifest`, the commit protocol per backend
in :mod:`tlaunch.storage.commit`. The store is single-writer: in a distributed job rank 0 gathers
every rank's RNG state and alone calls :meth:`CheckpointStore.save`.

"Latest" is the highest step with a COMMIT whose MANIFEST verifies. Discovery checks sizes
against one directory listing (cheap); loading checks every byte against its sha256. A step that
fails either is quarantined (a ``QUARANTINED`` marker, on every backend) and the previous
committed step is used, with a :class:`CheckpointWarning` naming both.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tlaunch.storage import serialize
from tlaunch.storage.commit import build_commit_protocol
from tlaunch.storage.manifest import (
    COMMIT,
    MANIFEST,
    QUARANTINED,
    STATE,
    TMP_PREFIX,
    CheckpointError,
    build_commit,
    build_manifest,
    encode_json,
    hash_problems,
    manifest_files,
    object_file,
    parse_record,
    parse_step_dir,
    read_chunks,
    rng_file,
    sha256,
    sha256_stream,
    size_problems,
    step_dir,
    tensors_file,
)
from tlaunch.storage.snapshot import cpu_snapshot
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
    "cpu_snapshot",
]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_MAX_STEP = 10**9 - 1


class CorruptCheckpointError(CheckpointError):
    """A committed step whose bytes do not match its MANIFEST (it has been quarantined)."""


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


@dataclass(slots=True)
class _Step:
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


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CheckpointError(
            f"{kind} name {name!r} cannot be a file name; use letters, digits, '_', '-', '.'"
        )
    return name


def _file_plan(
    tensors: Mapping[str, Any], objects: Mapping[str, Any], rng: Mapping[int, Any], state: Mapping
) -> list[tuple[str, Callable[[], bytes]]]:
    """(file name, serializer) for every file of a save, validated before anything is written."""
    plan: list[tuple[str, Callable[[], bytes]]] = []
    for name, sd in tensors.items():
        label = f"tensors[{_check_name('tensors', name)!r}]"
        plan.append((tensors_file(name), lambda label=label, sd=sd: serialize.tensors_to_bytes(label, sd)))
    for name, obj in objects.items():
        label = f"objects[{_check_name('objects', name)!r}]"
        plan.append((object_file(name), lambda label=label, obj=obj: serialize.object_to_bytes(label, obj)))
    for rank, obj in sorted(rng.items()):
        if not isinstance(rank, int) or rank < 0:
            raise CheckpointError(f"rng= keys are ranks (ints >= 0), got {rank!r}")
        plan.append((rng_file(rank), lambda rank=rank, obj=obj: serialize.object_to_bytes(f"rng[{rank}]", obj)))
    state_bytes = serialize.state_to_bytes(state)
    plan.append((STATE, lambda: state_bytes))
    names = [name for name, _ in plan]
    clash = {n for n in names if names.count(n) > 1} | ({MANIFEST, COMMIT, QUARANTINED} & set(names))
    if clash:
        raise CheckpointError(f"two things would be saved as {sorted(clash)[0]}; rename one of them")
    return plan


class CheckpointStore:
    """Committed checkpoints under one URL (a path, ``gs://``, ``s3://``, ``drive://``, ``memory://``)."""

    def __init__(self, url: str | Location, *, retry: RetryPolicy | None = None) -> None:
        self.location = url if isinstance(url, Location) else resolve(url)
        self.url = self.location.url.rstrip("/")
        self._root = self.location.path.rstrip("/")
        self._retry = retry or RetryPolicy()
        self._protocol = build_commit_protocol(self.location, self._retry)
        self._hasher: ThreadPoolExecutor | None = None
        # Steps this process found bad, in case writing their QUARANTINED marker failed too.
        self._bad: set[int] = set()

    def __repr__(self) -> str:
        return f"CheckpointStore({redact(self.url)!r})"

    def step_url(self, step: int) -> str:
        return f"{self.url}/{step_dir(step)}"

    def _call(self, fn: Callable, *args: Any, action: str, where: str, **kwargs: Any) -> Any:
        return self._retry.call(fn, *args, action=action, where=where, **kwargs)

    # -- discovery ---------------------------------------------------------------------------

    def _scan(self) -> tuple[dict[int, _Step], list[str]]:
        """Step directories (by step) and stale temp directories, from one recursive listing."""
        fs = self.location.fs
        fs.invalidate_cache(self._root)  # gcsfs/s3fs cache listings; another process may have saved
        try:
            listing = self._call(fs.find, self._root, withdirs=True, detail=True, action="listing", where=self.url)
        except FileNotFoundError:
            return {}, []
        steps: dict[int, _Step] = {}
        stale: set[str] = set()
        for path, meta in listing.items():
            if not path.startswith(self._root + "/"):
                continue
            top, _, rest = path[len(self._root) + 1 :].partition("/")
            if top.startswith(TMP_PREFIX):
                stale.add(f"{self._root}/{top}")
            elif (step := parse_step_dir(top)) is not None:
                entry = steps.setdefault(step, _Step(step, f"{self._root}/{top}"))
                if rest and "/" not in rest and meta.get("type") == "file":
                    entry.files[rest] = meta["size"]
        self._read_records([s for s in steps.values() if s.committed])
        return steps, sorted(stale)

    def _read_records(self, steps: list[_Step]) -> None:
        """Fill in COMMIT records; ``fs.cat`` of a list fetches them concurrently on object stores."""
        if not steps:
            return
        paths = {f"{s.path}/{COMMIT}": s for s in steps}
        found = self._call(self.location.fs.cat, list(paths), on_error="return", action="reading", where=self.url)
        for path, s in paths.items():
            data = found.get(path, FileNotFoundError(path))
            try:
                if isinstance(data, BaseException):
                    raise ValueError(f"{COMMIT} cannot be read ({type(data).__name__})")
                s.record = parse_record(data, COMMIT)
            except ValueError as e:
                s.problem = str(e)

    def _info(self, s: _Step) -> CheckpointInfo:
        record = s.record or {}
        metrics = record.get("metrics")
        return CheckpointInfo(
            step=s.step,
            url=self.step_url(s.step),
            committed=s.committed,
            time=float(record.get("time", 0.0)),
            size=int(record.get("size", 0)),
            metrics=metrics if isinstance(metrics, dict) else {},
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
        infos = self.all_steps()
        match = [i for i in infos if i.step == step]
        if match and match[0].quarantined:
            raise CheckpointError(
                f"step {step} at {redact(self.url)} is quarantined (it failed verification); "
                f"inspect it with: tlaunch ckpt verify {redact(self.url)} --step {step}"
            )
        if not match or not match[0].committed:
            have = ", ".join(str(i.step) for i in infos if i.committed and not i.quarantined)
            raise CheckpointError(
                f"step {step} is not committed at {redact(self.url)} (committed steps: {have or 'none'})"
            )
        return match[0]

    def latest(self) -> CheckpointInfo | None:
        """The highest committed step whose files have their recorded sizes.

        Steps that fail are quarantined, with a warning naming the step used instead.
        """
        steps, _ = self._scan()
        candidates = [s for _, s in sorted(steps.items()) if s.committed and not s.quarantined and s.step not in self._bad]
        for i in range(len(candidates) - 1, -1, -1):
            problems = self._cheap_problems(candidates[i])
            if not problems:
                return self._info(candidates[i])
            self._fall_back(candidates[i].step, problems, candidates[i - 1].step if i else None)
        return None

    def _cheap_problems(self, s: _Step) -> list[str]:
        if s.problem:
            return [s.problem]
        try:
            files = self._manifest(s)
        except CheckpointError as e:
            return [str(e)]
        return size_problems(files, s.files)

    def _manifest(self, s: _Step) -> dict[str, dict[str, Any]]:
        path = f"{s.path}/{MANIFEST}"
        try:
            data = self._call(self.location.fs.cat_file, path, action="reading", where=path)
            return manifest_files(s.record or {}, data)
        except FileNotFoundError:
            raise CheckpointError(f"{MANIFEST} is missing") from None
        except ValueError as e:
            raise CheckpointError(str(e)) from None

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
        instead = f"using step {fallback} instead" if fallback is not None else "no earlier committed step remains"
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
        plan = _file_plan(tensors or {}, objects or {}, rng or {}, state)
        steps, _ = self._scan()
        if step in steps and steps[step].committed and not steps[step].quarantined:
            raise CheckpointError(
                f"step {step} is already committed at {redact(self.url)}; committed checkpoints are "
                "never rewritten: delete it first (CheckpointStore.delete) or save another step"
            )
        staging = None
        try:
            staging = self._protocol.begin(step)
            info = self._write_step(step, staging, plan, metrics)
        except Exception as e:
            if staging is not None:
                self._protocol.abort(staging)
            raise self._save_error(e, step) from e
        finally:
            self.location.fs.invalidate_cache(self._root)
        self._bad.discard(step)
        return info

    def _write_step(
        self, step: int, staging: str, plan: list[tuple[str, Callable[[], bytes]]], metrics: dict
    ) -> CheckpointInfo:
        files = {name: self._write_hashed(f"{staging}/{name}", make()) for name, make in plan}
        manifest = build_manifest(files)
        self._protocol.write(f"{staging}/{MANIFEST}", manifest)
        when = time.time()
        record = build_commit(step, when, files, manifest, metrics)
        self._protocol.commit(staging, step, record)
        size = parse_record(record, COMMIT)["size"]
        return CheckpointInfo(step, self.step_url(step), True, when, size, dict(metrics))

    def _write_hashed(self, path: str, data: bytes) -> dict[str, Any]:
        """Write ``data`` while a helper thread hashes it: the hash costs no wall time."""
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="tlaunch-ckpt-hash")
        digest = self._hasher.submit(sha256, data)
        self._protocol.write(path, data)
        return {"size": len(data), "sha256": digest.result()}

    def _save_error(self, e: Exception, step: int) -> Exception:
        if isinstance(e, CheckpointError):
            return e
        err = e if isinstance(e, StorageError) else storage_error(e, "writing checkpoint to", self.step_url(step))
        if not isinstance(e, (StorageError, OSError)):
            return e  # a bug, not a storage fault: keep its type and traceback
        return StorageError(f"saving step {step} failed: {err}; earlier checkpoints are intact")

    # -- loading and verifying ------------------------------------------------------------------

    def _committed_step(self, step: int) -> _Step:
        self.get(step)  # raises with the list of what exists
        steps, _ = self._scan()
        return steps[step]

    def load(self, info_or_step: CheckpointInfo | int, *, verify: bool = True) -> LoadedCheckpoint:
        """Read a committed step, checking every file's sha256 first when ``verify``.

        A step that fails is quarantined and CorruptCheckpointError names it.
        """
        step = info_or_step.step if isinstance(info_or_step, CheckpointInfo) else info_or_step
        s = self._committed_step(step)
        try:
            return self._load(s, verify)
        except CorruptCheckpointError as e:
            self.quarantine(step, str(e))
            raise

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest committed step that loads, walking back loudly over corrupt ones."""
        steps, _ = self._scan()
        candidates = [s for _, s in sorted(steps.items()) if s.committed and not s.quarantined and s.step not in self._bad]
        for i in range(len(candidates) - 1, -1, -1):
            try:
                return self._load(candidates[i], verify=True)
            except CorruptCheckpointError as e:
                self._fall_back(candidates[i].step, [e.args[0]], candidates[i - 1].step if i else None)
        return None

    def _load(self, s: _Step, verify: bool) -> LoadedCheckpoint:
        where = f"step {s.step} at {redact(self.url)}"
        try:
            files = self._manifest(s) if s.problem is None else None
        except CheckpointError as e:
            raise CorruptCheckpointError(f"{where}: {e}") from None
        if files is None:
            raise CorruptCheckpointError(f"{where}: {s.problem}")
        out = LoadedCheckpoint(self._info(s), {}, {}, {}, {})
        for name in sorted(files):
            data = self._read_file(s, name, files[name] if verify else None, where)
            _place(out, name, data, f"{where}: {name}")
        return out

    def _read_file(self, s: _Step, name: str, expect: dict | None, where: str) -> bytes:
        path = f"{s.path}/{name}"
        try:
            data = self._call(self.location.fs.cat_file, path, action="reading", where=path)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where}: {name} is missing") from None
        if expect is not None:
            if len(data) != expect["size"]:
                raise CorruptCheckpointError(f"{where}: {name} has {len(data)} bytes, expected {expect['size']}")
            if sha256(data) != expect["sha256"]:
                raise CorruptCheckpointError(f"{where}: {name} fails its sha256 check")
        return data

    def verify(self, step: int, *, full: bool = True) -> list[str]:
        """Problems with committed ``step`` (empty when sound); never quarantines or deletes.

        ``full`` reads every byte and checks sha256; otherwise sizes only.
        """
        steps, _ = self._scan()
        s = steps.get(step)
        if s is None or not s.committed:
            return [f"step {step} is not committed"]
        problems = self._cheap_problems(s)
        if problems or not full:
            return problems
        files = self._manifest(s)
        fs = self.location.fs
        return hash_problems(files, lambda name: sha256_stream(read_chunks(fs, f"{s.path}/{name}")))

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
        self._protocol.remove(path)
        self.location.fs.invalidate_cache(self._root)

    def apply_retention(self, policy: Any) -> list[int]:
        """Delete what ``policy.to_delete`` names, never the newest committed step."""
        infos = self.committed()
        doomed = [s for s in policy.to_delete(infos) if infos and s != infos[-1].step]
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
        removed = []
        for path in sorted(stale):
            self._protocol.remove(path)
            removed.append(self.url + path[len(self._root) :])
        self.location.fs.invalidate_cache(self._root)
        return removed


def _place(out: LoadedCheckpoint, name: str, data: bytes, label: str) -> None:
    """Deserialize file ``name`` into the slot of ``out`` its name says it belongs to."""
    if name == STATE:
        out.state = serialize.bytes_to_state(label, data)
    elif name.endswith(".safetensors"):
        out.tensors[name[: -len(".safetensors")]] = serialize.bytes_to_tensors(label, data)
    elif name.startswith("rng-rank") and name.endswith(".pt"):
        out.rng[int(name[len("rng-rank") : -3])] = serialize.bytes_to_object(label, data)
    elif name.endswith(".pt"):
        out.objects[name[:-3]] = serialize.bytes_to_object(label, data)
