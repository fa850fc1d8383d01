"""Where a run starts from, what it saves, and whether a checkpoint still fits the run.

The Run calls into this module at three moments: at ``init`` (find and load the checkpoint
to resume from, check it against the current hyperparameters), at ``prepare``/``register``
(put the saved state into the objects), and at each save (snapshot state into CPU memory and
hand it to the background writer on rank 0).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tlaunch.contract import EXIT_USAGE

if TYPE_CHECKING:
    from tlaunch.run import Run

#: hparams whose change alters what the run computes: refused on resume unless --resume-force.
_MEANING_KEYS = re.compile(r"batch|(^|_)lr($|_)|learning_rate|schedul|warmup|accum", re.IGNORECASE)
#: Launch settings whose change alters the run; a changed world size is only warned about.
_MEANING_CONFIG = ("grad_accum", "seed")


@dataclass
class ResumeState:
    """The checkpoint this process resumes from (if any) and the writer it saves through."""

    enabled: bool = False
    store: Any = None
    writer: Any = None
    loaded: Any = None
    epoch: int = 0
    batch: int = 0
    rng: dict | None = None
    _rng_pending: bool = False
    _batch_pending: bool = False
    notes: list[str] = field(default_factory=list)

    def start_batch(self, epoch: int) -> int:
        if self._batch_pending and epoch == self.epoch:
            self._batch_pending = False
            return self.batch
        return 0

    def restore_rng_at_epoch_start(self, epoch: int) -> bool:
        return self._take_rng(epoch, at_start=True)

    def restore_rng_mid_epoch(self, epoch: int) -> bool:
        return self._take_rng(epoch, at_start=False)

    def _take_rng(self, epoch: int, *, at_start: bool) -> bool:
        if (
            not self._rng_pending
            or epoch != self.epoch
            or (self.batch == 0) != at_start
            or self.rng is None
        ):
            return False
        self._rng_pending = False
        return True

    def check_writer(self, run: Run) -> None:
        """Surface a failed background save on the step after it failed."""
        if self.writer is None:
            return
        run._clock.record_background_saves(self.writer.save_durations)
        try:
            self.writer.check()
        except Exception as e:  # a storage failure of any kind: report it in one line
            if run.config.on_save_error == "continue":
                warnings.warn(
                    f"checkpoint save failed, training continues (--on-save-error continue): {e}",
                    stacklevel=2,
                )
                return
            print(
                f"tlaunch: error: checkpoint save failed: {e}; the previous checkpoint is intact. "
                "Fix the storage problem and run the same command again, or pass --on-save-error continue",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from None

    def flush(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.check_writer(run)
        run.accelerator.wait_for_everyone()


def _fail(message: str) -> None:
    print(f"tlaunch: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def _load_target(run: Run) -> Any:
    """Rank 0 picks the checkpoint (verifying it, quarantining bad ones); all ranks load it."""
    from tlaunch.storage import CheckpointError, CheckpointStore

    config, store = run.config, run.resume.store
    choice = config.resume
    if choice == "never":
        existing = store.committed() if run.is_main else []
        if existing:
            # Saving over another run's committed steps would destroy them: refuse instead.
            _fail(
                f"--resume never, but {config.checkpoint_dir} already holds committed checkpoints "
                f"(steps {existing[0].step}..{existing[-1].step}); use a new --checkpoint-dir, "
                "or --resume auto to continue them"
            )
        return None
    source, step = store, None
    if choice != "auto":
        m = re.fullmatch(r"(?:(.*?)/+)?step-(\d+)/?", choice)
        if choice.isdigit():
            step = int(choice)
        elif m:
            source, step = CheckpointStore(m.group(1) or "."), int(m.group(2))
        else:
            source = CheckpointStore(choice)
    try:
        if run.is_main:
            loaded = source.load(step) if step is not None else source.load_latest()
            chosen = None if loaded is None else loaded.info.step
        chosen = run.strategy.broadcast_object(run.accelerator, chosen if run.is_main else None)
        if chosen is None:
            if step is not None or choice != "auto":
                _fail(
                    f"--resume {choice}: no committed checkpoint there; use --resume auto or --resume never"
                )
            return None
        if run.is_main and choice != "auto":
            later = [i.step for i in store.committed() if i.step > chosen]
            if later:
                # Continuing from an older step here would collide with (and could never
                # overwrite) the newer steps of the other timeline.
                _fail(
                    f"--resume {choice}: {config.checkpoint_dir} holds newer committed steps "
                    f"({later[0]}..{later[-1]}); resume into a new directory: --resume "
                    f"{loaded.info.url} --checkpoint-dir NEW_DIR"
                )
        return loaded if run.is_main else source.load(chosen, verify=False)
    except CheckpointError as e:
        _fail(f"--resume {choice}: {e}")
    return None


def open_resume(run: Run) -> ResumeState:
    config = run.config
    state = ResumeState()
    if not config.checkpoint_dir or config.fast_dev_run:
        return state
    from tlaunch.storage import AsyncCheckpointWriter, CheckpointStore, RetentionPolicy

    state.enabled = True
    state.store = CheckpointStore(config.checkpoint_dir)
    run.resume = state  # _load_target reads it
    if run.is_main:
        state.store.clean_stale()
        retention = RetentionPolicy(
            keep_last=config.keep_last,
            keep_every=config.keep_every,
            keep_best=config.keep_best,
            monitor=config.monitor,
            mode=config.mode,
        )
        state.writer = AsyncCheckpointWriter(state.store, retention=retention)
    loaded = _load_target(run)
    if loaded is None:
        return state
    saved = loaded.state
    state.loaded = loaded
    state.epoch, state.batch = saved["epoch"], saved["batch_in_epoch"]
    state._batch_pending = state._rng_pending = True
    run.step, run.epoch, run.samples_seen = saved["step"], saved["epoch"], saved["samples_seen"]
    run.metrics = dict(saved.get("metrics", {}))
    run._saved_step = run.step
    state.rng = loaded.rng.get(run.rank)
    if saved["world_size"] != run.world_size:
        _adapt_world_size(run, state, saved)
    if run.is_main:
        print(
            f"tlaunch: resuming from step {run.step} (epoch {state.epoch}, batch {state.batch}; "
            f"{run.samples_seen} samples already seen) from {loaded.info.url}",
            file=sys.stderr,
            flush=True,
        )
    return state


def _adapt_world_size(run: Run, state: ResumeState, saved: dict) -> None:
    old, new = saved["world_size"], run.world_size
    # The data position is kept by samples seen: each rank starts its shard where an even
    # split of the samples already seen in this epoch ends.
    per_rank_old = state.batch
    state.batch = (per_rank_old * old) // new
    state.rng = None  # another rank's stream would be no more exact than a fresh one
    if run.is_main:
        warnings.warn(
            f"resuming a checkpoint saved with {old} processes on {new}: per-rank random numbers "
            f"cannot continue exactly (fresh seeds are used), and each rank resumes its data at "
            f"batch {state.batch} of this epoch so that the samples already seen are skipped",
            stacklevel=3,
        )


def check_drift(run: Run, loaded: Any) -> None:
    """List hyperparameter and config changes since the checkpoint; refuse the ones that change
    the meaning of the run unless --resume-force."""
    saved_h = loaded.state.get("hparams", {})
    saved_c = loaded.state.get("config", {})
    changes, breaking = [], []
    for key in sorted(set(saved_h) | set(run.hparams)):
        before, after = saved_h.get(key, "<unset>"), run.hparams.get(key, "<unset>")
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
            if _MEANING_KEYS.search(key):
                breaking.append(key)
    current = asdict(run.config)
    for key in _MEANING_CONFIG:
        if key in saved_c and saved_c[key] != current[key]:
            changes.append(f"--{key.replace('_', '-')}: {saved_c[key]!r} -> {current[key]!r}")
            breaking.append("--" + key.replace("_", "-"))
    if not changes:
        return
    listing = "; ".join(changes)
    if breaking and not run.config.resume_force:
        _fail(
            f"the checkpoint at step {loaded.info.step} was made with different settings ({listing}); "
            f"{', '.join(breaking)} change what the run computes. Restore them, start fresh with "
            "--resume never or another --checkpoint-dir, or pass --resume-force"
        )
    if run.is_main:
        warnings.warn(f"resuming with changed settings: {listing}", stacklevel=3)


def apply_checkpoint(run: Run, loaded: Any) -> None:
    """Load saved state into everything prepared so far (called at each ``prepare``)."""
    for i, model in enumerate(run._models):
        weights = loaded.tensors.get("model" if i == 0 else f"model_{i}")
        if weights is not None:
            run.accelerator.unwrap_model(model).load_state_dict(weights)
    for i, opt in enumerate(run._optimizers):
        sd = loaded.objects.get("optimizer" if i == 0 else f"optimizer_{i}")
        if sd is not None:
            opt.load_state_dict(sd)
    for i, sched in enumerate(run._schedulers):
        sd = loaded.objects.get("scheduler" if i == 0 else f"scheduler_{i}")
        if sd is not None:
            sched.load_state_dict(sd)
    if run.accelerator.scaler is not None and "scaler" in loaded.objects:
        run.accelerator.scaler.load_state_dict(loaded.objects["scaler"])
    saved_bs = loaded.state.get("batch_size")
    for loader in run._loaders.values():
        if saved_bs is not None and loader.batch_size != saved_bs and not run.config.resume_force:
            _fail(
                f"the checkpoint at step {loaded.info.step} was trained with batch size {saved_bs}, "
                f"this run uses {loader.batch_size}; restore it, or pass --resume-force"
            )


def _config_hash(config_dict: dict) -> str:
    keys = ("precision", "grad_accum", "seed", "clip_grad_norm", "clip_grad_value")
    blob = json.dumps({k: config_dict.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    import accelerate
    import torch

    import tlaunch

    return {
        "tlaunch": tlaunch.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
    }


def snapshot_and_submit(run: Run) -> None:
    """Phase one of a save (what training waits for): copy state into CPU memory, gather the
    ranks' RNG states to rank 0, and hand everything to the background writer there."""
    from tlaunch.storage import cpu_snapshot

    rngs = run.strategy.gather_object(run.accelerator, run.strategy.rng_state())
    if not run.is_main:
        return
    acc = run.accelerator
    tensors = {
        ("model" if i == 0 else f"model_{i}"): cpu_snapshot(acc.unwrap_model(m).state_dict())
        for i, m in enumerate(run._models)
    }
    objects: dict[str, Any] = {}
    for prefix, items in (("optimizer", run._optimizers), ("scheduler", run._schedulers)):
        for i, obj in enumerate(items):
            objects[prefix if i == 0 else f"{prefix}_{i}"] = cpu_snapshot(obj.state_dict())
    if acc.scaler is not None:
        objects["scaler"] = cpu_snapshot(acc.scaler.state_dict())
    for name, obj in run._registered.items():
        objects[name] = cpu_snapshot(obj.state_dict())
    config = asdict(run.config)
    loaders = list(run._loaders.values())
    state = {
        "step": run.step,
        "epoch": run.epoch,
        "batch_in_epoch": run.batch_in_epoch,
        "samples_seen": run.samples_seen,
        "world_size": run.world_size,
        "hparams": run.hparams,
        "metrics": dict(run.metrics),  # the writer serializes it while training logs on
        "config": config,
        "config_hash": _config_hash(config),
        "batch_size": loaders[0].batch_size if loaders else None,
        "versions": _versions(),
        "time": time.time(),
    }
    run.resume.writer.submit(
        run.step, tensors=tensors, objects=objects, rng=dict(enumerate(rngs)), state=state
    )
