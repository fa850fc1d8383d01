"""The one owner of what a run saves, when it saves, and where it resumes from.

The Run hands every prepared or registered object to a :class:`CheckpointManager` and asks
it three things: at start, where to resume (:meth:`CheckpointManager.open`: rank 0 picks and
verifies the checkpoint and broadcasts its step, every rank loads it, the drift check refuses
changed settings that break the run); as objects are prepared, to put the saved state into
them; after each optimizer step and epoch, whether a save is due, and to save. Nothing else
reads or writes checkpoint contents, and the manager never reaches into the Run: the Run
passes it the position (:class:`Position`) and metrics to save.

A save is two-phase: :meth:`CheckpointManager.save` snapshots state into CPU memory (the
only part training waits for) and hands it to the background writer on rank 0, which
serializes, uploads and commits while training continues (:mod:`tlaunch.storage`).
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from tlaunch.config import LaunchConfig
from tlaunch.contract import EXIT_FAILED, EXIT_UNAVAILABLE, fail
from tlaunch.drift import (
    check_drift,
    checked_state,
    config_hash,
    refuse_existing,
    refuse_older_timeline,
    refuse_tensor_changes,
    tensor_differences,
)
from tlaunch.run_io import drive_quota_warning

#: Names of the saved states. The i-th object of a kind past the first is ``<kind>_<i>``.
MODEL, OPTIMIZER, SCHEDULER, SCALER = "model", "optimizer", "scheduler", "scaler"
#: The prepared loaders' own states (a stateful sampler or dataset): ``{"ranks": [[state of
#: loader 0, ...] of rank 0, ...]}``, present only when one of them has a state.
LOADERS = "loaders"


#: Saves at most this many seconds apart keep their snapshot's memory for the next one
#: (:class:`tlaunch.storage.SnapshotBuffers`): ~0.1 s less per save of 300 MB. Further apart,
#: the memory goes back after each save, as the time saved no longer counts.
RECYCLE_WITHIN_S = 60.0


def state_name(kind: str, index: int) -> str:
    return kind if index == 0 else f"{kind}_{index}"


@dataclass(slots=True)
class Position:
    """Where a run is: what a checkpoint records and a resume continues from."""

    #: Optimizer steps taken (global, identical on every rank).
    step: int = 0
    epoch: int = 0
    #: Batches of ``epoch`` this rank has consumed.
    batch_in_epoch: int = 0
    #: Samples consumed by all ranks together.
    samples_seen: int = 0


@dataclass
class ResumePoint:
    """The saved position a resumed run re-enters, consumed once: the first epoch and batch
    loop that reach it take the saved batch and RNG state."""

    epoch: int = 0
    batch: int = 0
    rng: dict | None = None
    #: This rank's saved loader states, in the order the loaders were prepared.
    loaders: list | None = None
    _rng_pending: bool = False
    _batch_pending: bool = False

    def start_batch(self, epoch: int) -> int:
        if self._batch_pending and epoch == self.epoch:
            self._batch_pending = False
            return self.batch
        return 0

    def take_rng(self, epoch: int, *, at_epoch_start: bool) -> dict | None:
        """The saved RNG state if ``epoch`` (at its start, or mid-way) is where it was saved."""
        if (
            not self._rng_pending
            or epoch != self.epoch
            or (self.batch == 0) != at_epoch_start
            or self.rng is None
        ):
            return None
        self._rng_pending = False
        return self.rng


@dataclass
class _States:
    """Everything a checkpoint holds besides the position, in the order it was prepared."""

    models: list[Any] = field(default_factory=list)
    optimizers: list[Any] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    loaders: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """What is saved (the tracked states), when (``--save-every*``), and how a run resumes.

    Disabled (every method a no-op, :meth:`open` resumes nothing) without
    ``--checkpoint-dir`` and under ``--fast-dev-run``.
    """

    def __init__(
        self, config: LaunchConfig, strategy: Any, accelerator: Any, hparams: dict
    ) -> None:
        self.config, self.strategy, self.accelerator = config, strategy, accelerator
        self.hparams = hparams
        self.is_main = accelerator.is_main_process
        self.world_size = accelerator.num_processes
        self.enabled = bool(config.checkpoint_dir) and not config.fast_dev_run
        self.states = _States()
        self.store: Any = None
        self.writer: Any = None
        #: The checkpoint directory's lease, when rank 0 took it itself (no launcher).
        self.lease: Any = None
        self.loaded: Any = None
        #: Where the data and RNG streams re-enter (set by :meth:`open`).
        self.point = ResumePoint()
        self.saved_step = -1
        #: Slowest save so far (snapshot, or the background write): the deadline's margin.
        self.slowest_save = 0.0
        self._last_save = time.monotonic()
        self._save_every_s = (
            None if config.save_every_minutes is None else config.save_every_minutes * 60
        )
        self._durations_seen = 0
        self._loaders_restored = 0
        #: The last snapshot's memory, copied into again by the next save (rank 0, once saving).
        self.buffers: Any = None

    # -- where to resume -------------------------------------------------------------------
    def open(self, position: Position, metrics: Any) -> ResumePoint:
        """Open the store, pick and load the checkpoint to resume from, and move ``position``
        and ``metrics`` there. Returns where the data and RNG streams re-enter."""
        point = self.point
        if not self.enabled:
            return point
        from tlaunch.storage import StorageUnavailable

        try:
            loaded = self._open_store()
        except StorageUnavailable as e:
            fail(
                f"storage unreachable; nothing was changed; run again later ({e})", EXIT_UNAVAILABLE
            )
        if loaded is None:
            return point
        saved = checked_state(loaded)
        self.loaded = loaded
        point.epoch, point.batch = saved["epoch"], saved["batch_in_epoch"]
        point._batch_pending = point._rng_pending = True
        position.step, position.epoch = saved["step"], saved["epoch"]
        position.samples_seen = saved["samples_seen"]
        metrics.replace(dict(saved.get("metrics", {})))
        self.saved_step = position.step
        rank = self.accelerator.process_index
        point.rng = loaded.rng.get(rank)
        ranks = (loaded.objects.get(LOADERS) or {}).get("ranks", [])
        point.loaders = ranks[rank] if rank < len(ranks) else None
        if saved["world_size"] != self.world_size:
            self._adapt_world_size(point, saved["world_size"])
        if self.is_main:
            print(
                f"tlaunch: resuming from step {position.step} (epoch {point.epoch}, batch "
                f"{point.batch}; {position.samples_seen} samples already seen) from {loaded.info.url}",
                file=sys.stderr,
                flush=True,
            )
        check_drift(loaded, self.hparams, self.config, warn=self.is_main)
        return point

    def _open_store(self) -> Any:
        """The store, the writer and lease on rank 0, and the checkpoint to resume (or None)."""
        from tlaunch.storage import AsyncCheckpointWriter, CheckpointStore, RetentionPolicy

        config = self.config
        fence = None
        if self.is_main:  # the one writer: fenced by the launcher's lease, or takes its own
            from tlaunch.lease import worker_fence

            fence, self.lease = worker_fence(config)
        self.store = CheckpointStore(config.checkpoint_dir, fence=fence)
        if self.is_main:
            self.store.clean_stale()
            advice = drive_quota_warning(config)  # here, where the retention rules are final
            if advice:
                print(f"tlaunch: warning: {advice}", file=sys.stderr, flush=True)
            retention = RetentionPolicy(
                keep_last=config.keep_last,
                keep_every=config.keep_every,
                keep_best=config.keep_best,
                monitor=config.monitor,
                mode=config.mode,
            )
            self.writer = AsyncCheckpointWriter(self.store, retention=retention)
        return self._load_target()

    def _load_target(self) -> Any:
        """Rank 0 picks the checkpoint (verifying it, quarantining bad ones) and broadcasts its
        step; the other ranks load that step and never rescan to decide."""
        from tlaunch.storage import CheckpointError, CheckpointStore, resolve_step

        config, store = self.config, self.store
        choice = config.resume
        if choice == "never":
            if self.is_main:
                refuse_existing(store, config)
            return None
        source, step = store, None
        named = choice in ("best", "last")  # resolved by rank 0 alone, below
        if choice != "auto" and not named:
            # [0-9], not \d or isdigit(): those accept other scripts' digits ("٣").
            m = re.fullmatch(r"(?:(.*?)/+)?step-([0-9]+)/?", choice)
            if re.fullmatch("[0-9]+", choice):
                step = int(choice)
            elif m:
                source, step = CheckpointStore(m.group(1) or "."), int(m.group(2))
            else:
                source = CheckpointStore(choice)
        try:
            loaded = chosen = None
            if self.is_main:
                if named:
                    info = resolve_step(store, choice, monitor=config.monitor, mode=config.mode)
                    step = info.step
                loaded = source.load(step) if step is not None else source.load_latest()
                chosen = None if loaded is None else loaded.info.step
            chosen = self.strategy.broadcast_object(self.accelerator, chosen)
            if chosen is None:
                if step is not None or choice != "auto":
                    fail(
                        f"--resume {choice}: no committed checkpoint there; use --resume auto "
                        "or --resume never"
                    )
                return None
            if self.is_main and choice != "auto":
                refuse_older_timeline(store, config, chosen, loaded)
            return loaded if self.is_main else source.load(chosen, verify=False)
        except CheckpointError as e:
            fail(f"--resume {choice}: {e}")
        return None

    def _adapt_world_size(self, point: ResumePoint, old: int) -> None:
        new = self.world_size
        # The data position is kept by samples seen: each rank starts its shard where an even
        # split of the samples already seen in this epoch ends.
        point.batch = (point.batch * old) // new
        point.rng = None  # another rank's stream would be no more exact than a fresh one
        point.loaders = None  # nor its loader's state: those re-enter by drawing again
        if self.is_main:
            warnings.warn(
                f"resuming a checkpoint saved with {old} processes on {new}: per-rank random "
                f"numbers cannot continue exactly (fresh seeds are used), and each rank resumes "
                f"its data at batch {point.batch} of this epoch so that the samples already "
                "seen are skipped",
                stacklevel=4,
            )

    # -- what is saved -----------------------------------------------------------------------
    def track(self, kind: str, obj: Any) -> None:
        """Save and restore ``obj``, a prepared model, optimizer, scheduler or loader."""
        {
            MODEL: self.states.models,
            OPTIMIZER: self.states.optimizers,
            SCHEDULER: self.states.schedulers,
            "loader": self.states.loaders,
        }[kind].append(obj)

    def register(self, name: str, obj: Any) -> None:
        """Save and restore ``obj`` (``state_dict``/``load_state_dict``) under ``name``."""
        self.states.extra[name] = obj
        if self.loaded is not None and name in self.loaded.objects:
            obj.load_state_dict(self.loaded.objects[name])

    def restore_prepared(self) -> None:
        """Put the loaded checkpoint into everything tracked so far (at each ``prepare``),
        after checking that the edited script still fits it: the models' tensors, the
        optimizers' kinds, the loaders' batch size and dataset length."""
        loaded = self.loaded
        if loaded is None:
            return
        step = loaded.info.step
        for i, model in enumerate(self.states.models):
            weights = loaded.tensors.get(state_name(MODEL, i))
            if weights is not None:
                module = self.strategy.unwrap(self.accelerator, model)
                changes = tensor_differences(weights, module.state_dict())
                refuse_tensor_changes(state_name(MODEL, i), changes, step)
                module.load_state_dict(weights)
        saved_kinds = loaded.state.get("optimizers") or []
        for i, opt in enumerate(self.states.optimizers):
            state = loaded.objects.get(state_name(OPTIMIZER, i))
            if state is not None and self._same_optimizer(i, opt, saved_kinds, step):
                opt.load_state_dict(state)
        for i, sched in enumerate(self.states.schedulers):
            state = loaded.objects.get(state_name(SCHEDULER, i))
            if state is not None:
                sched.load_state_dict(state)
        if SCALER in loaded.objects:
            self.strategy.load_scaler_state(self.accelerator, loaded.objects[SCALER])
        states = self.point.loaders or []
        for i, loader in enumerate(self.states.loaders):
            self._check_loader(loader, loaded)
            if i < len(states) and states[i] is not None and i >= self._loaders_restored:
                loader.resume_from(states[i])
        self._loaders_restored = len(self.states.loaders)

    def _same_optimizer(self, i: int, opt: Any, saved_kinds: list[str], step: int) -> bool:
        """Whether the i-th optimizer's saved state can be loaded (same kind of optimizer)."""
        kind = _optimizer_kind(opt)
        if i >= len(saved_kinds) or saved_kinds[i] == kind:
            return True
        what = (
            f"the checkpoint at step {step} was trained with {saved_kinds[i]}, this run uses {kind}"
        )
        if not self.config.resume_force:
            fail(f"{what}; restore it, or pass --resume-force to continue with a fresh {kind}")
        if self.is_main:
            warnings.warn(
                f"{what}: its optimizer state is not restored (--resume-force)", stacklevel=4
            )
        return False

    def _check_loader(self, loader: Any, loaded: Any) -> None:
        step, force = loaded.info.step, self.config.resume_force
        saved_bs = loaded.state.get("batch_size")
        if saved_bs is not None and loader.batch_size != saved_bs and not force:
            fail(
                f"the checkpoint at step {step} was trained with batch size {saved_bs}, this "
                f"run uses {loader.batch_size}; restore it, or pass --resume-force"
            )
        saved_len, length = loaded.state.get("dataset_length"), _dataset_length(loader)
        if saved_len is None or length is None or saved_len == length:
            return
        what = (
            f"the checkpoint at step {step} was trained on a dataset of {saved_len} samples, "
            f"this run's has {length}"
        )
        if not force:
            # Another length is another permutation: the saved position means nothing there.
            fail(f"{what}; restore it, or pass --resume-force to redo the interrupted epoch")
        if self.point.batch:
            if self.is_main:
                warnings.warn(
                    f"{what}: resuming from the start of epoch {self.point.epoch} (--resume-force)",
                    stacklevel=4,
                )
            self.point.batch = 0

    # -- when ----------------------------------------------------------------------------------
    def timed_save_due(self) -> bool:
        """``--save-every-minutes`` elapsed on this rank's clock (the ranks agree before saving)."""
        return (
            self._save_every_s is not None
            and time.monotonic() - self._last_save >= self._save_every_s
        )

    def due_after_step(self, step: int) -> bool:
        every = self.config.save_every
        return bool(every and step % every == 0)

    def due_at_epoch_end(self, next_epoch: int) -> bool:
        every = self.config.save_every_epochs
        return bool(every and next_epoch % every == 0)

    # -- saving --------------------------------------------------------------------------------
    def save(
        self,
        position: Position,
        metrics: dict[str, float],
        *,
        force: bool = False,
        stopping: bool = False,
    ) -> bool:
        """Commit a checkpoint at ``position`` (every rank calls it). Phase one runs here:
        state into CPU memory, the ranks' RNG and loader states gathered to rank 0, handed to
        the writer there.
        ``stopping``: a stop's last save, which the caller flushes before anything else runs:
        the writer serializes the state from where it lies (:func:`tlaunch.storage.cpu_view`),
        without copying what is in CPU memory already.
        Returns whether a save was taken (not when disabled, or already saved at this step
        unless ``force``)."""
        if not self.enabled or (self.saved_step == position.step and not force):
            return False
        started = time.monotonic()
        mine = (self.strategy.rng_state(), [loader.state_dict() for loader in self.states.loaders])
        rngs, loader_states = zip(*self.strategy.gather_object(self.accelerator, mine), strict=True)
        if self.is_main:
            from tlaunch.storage import cpu_snapshot

            tensors, objects = self._snapshot(copy=not stopping)
            if any(state is not None for states in loader_states for state in states):
                objects[LOADERS] = cpu_snapshot({"ranks": list(loader_states)})
            state = self._state_record(position, metrics)
            parts = {"tensors": tensors, "objects": objects, "rng": dict(enumerate(rngs))}
            try:  # submit raises the previous save's failure, and starts nothing then
                self.writer.submit(position.step, state=state, **parts)
            except Exception as e:
                self._save_failed(e)  # ends the run, or (--on-save-error continue) warns
                self.writer.submit(position.step, state=state, **parts)
            if started - self._last_save > RECYCLE_WITHIN_S:
                self.buffers.release()  # saves this far apart: the memory is worth more
        self._last_save = time.monotonic()
        self.slowest_save = max(self.slowest_save, self._last_save - started)
        self.saved_step = position.step
        return True

    def _snapshot(self, *, copy: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """The tracked states, copied into the last snapshot's memory where its save has
        settled (``copy``), else as they lie (:func:`tlaunch.storage.cpu_view`)."""
        from tlaunch.storage import SnapshotBuffers, cpu_view

        if self.buffers is None:
            self.buffers = SnapshotBuffers()
        if copy and self.writer.in_flight is None:
            self.buffers.recycle()
        else:  # a save still reads them (or a stop's save reads the live state): never reuse
            self.buffers.release()
        try:
            return self._take_states(self.buffers.snapshot if copy else cpu_view)
        finally:
            self.buffers.settle()

    def _take_states(self, take: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        s, acc = self.states, self.accelerator
        tensors = {
            state_name(MODEL, i): take(self.strategy.unwrap(acc, m).state_dict())
            for i, m in enumerate(s.models)
        }
        objects: dict[str, Any] = {}
        for kind, objs in ((OPTIMIZER, s.optimizers), (SCHEDULER, s.schedulers)):
            for i, obj in enumerate(objs):
                objects[state_name(kind, i)] = take(obj.state_dict())
        scaler = self.strategy.scaler_state(acc)
        if scaler is not None:
            objects[SCALER] = take(scaler)
        for name, obj in s.extra.items():
            objects[name] = take(obj.state_dict())
        return tensors, objects

    def _state_record(self, position: Position, metrics: dict[str, float]) -> dict[str, Any]:
        import json

        from tlaunch.storage import redact

        config = asdict(self.config)
        # state.json goes to the bucket: URLs in flags (--sync-dir, --data, script arguments)
        # may carry credentials. The hashed settings hold no URL, so the hash is unchanged.
        redacted = json.loads(redact(json.dumps(config)))
        loaders = self.states.loaders
        return {
            "step": position.step,
            "epoch": position.epoch,
            "batch_in_epoch": position.batch_in_epoch,
            "samples_seen": position.samples_seen,
            "world_size": self.world_size,
            "hparams": self.hparams,
            "metrics": dict(metrics),  # the writer serializes it while training logs on
            "config": redacted,
            "config_hash": config_hash(config),
            "batch_size": loaders[0].batch_size if loaders else None,
            "dataset_length": _dataset_length(loaders[0]) if loaders else None,
            "optimizers": [_optimizer_kind(o) for o in self.states.optimizers],
            "versions": _versions(),
            "time": time.time(),
        }

    def check_writer(self) -> None:
        """Surface a failed background save on the step after it failed."""
        if self.writer is None:
            return
        durations = self.writer.save_durations
        if len(durations) > self._durations_seen:  # the writer's whole history: new ones only
            self.slowest_save = max(self.slowest_save, *durations[self._durations_seen :])
            self._durations_seen = len(durations)
        try:
            self.writer.check()
        except Exception as e:
            self._save_failed(e)

    def _save_failed(self, e: Exception, *, stopping: bool = False) -> None:
        """Report a failed background save in one line: the run ends, or with
        ``--on-save-error continue`` training goes on after a warning (never at a stop: a
        stop reports everything kept only when its checkpoint committed)."""
        from tlaunch.storage import LeaseLost

        if isinstance(e, LeaseLost):
            # Another run owns the directory now: training on could never be saved.
            fail(f"{e}; this run stops; its last committed checkpoint is intact", EXIT_FAILED)
        if self.config.on_save_error == "continue" and not stopping:
            warnings.warn(
                f"checkpoint save failed, training continues (--on-save-error continue): {e}",
                stacklevel=3,
            )
            committed = self.writer.last_committed
            self.saved_step = committed.step if committed is not None else -1  # not saved yet
            return
        fail(
            f"checkpoint save failed: {e}; the previous checkpoint is intact. Fix the storage "
            "problem and run the same command again, or pass --on-save-error continue",
            EXIT_FAILED,
        )

    def flush(self, *, stopping: bool = False) -> None:
        """Wait until the save in flight is committed (rank 0); the other ranks wait for it.
        ``stopping``: a failed save ends the run even under ``--on-save-error continue``."""
        if not self.enabled:
            return
        if self.writer is not None:
            try:
                self.writer.flush()
            except Exception as e:
                self._save_failed(e, stopping=stopping)
            self.check_writer()
        self.strategy.barrier(self.accelerator)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.lease is not None:
            self.lease.release()


def _optimizer_kind(optimizer: Any) -> str:
    """The class of the user's optimizer inside Accelerate's wrapper: ``Adam``, ``SGD``."""
    return type(getattr(optimizer, "optimizer", optimizer)).__name__


def _dataset_length(loader: Any) -> int | None:
    try:
        return len(loader.original.dataset)
    except TypeError:  # an IterableDataset without a length
        return None


def _versions() -> dict[str, str]:
    import accelerate
    import torch

    import tlaunch

    return {
        "tlaunch": tlaunch.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
    }
