"""The script-side Run API: three lines buy exact resume, atomic checkpoints and clean stops.

::

    run = tlaunch.init(hparams={"lr": 3e-4})
    model, optimizer, loader, scheduler = run.prepare(model, optimizer, loader, scheduler)
    for epoch in run.epochs(10):
        for x, y in run.batches(loader):
            with run.accumulate(model):
                run.backward(loss_fn(model(x), y))
                optimizer.step(); scheduler.step(); optimizer.zero_grad()
            run.log(loss=loss)
    run.finish()

Rules that make resume exact (bitwise, on the same machine):

* checkpoints are taken only at optimizer-step boundaries (the end of an accumulation
  window), so no partial gradient ever needs saving;
* the data order of each epoch is a function of (seed, epoch), and a resumed epoch starts at
  the saved sample index without loading the skipped batches (:mod:`tlaunch.sampling`);
* every rank's python, numpy, torch and device RNG is saved and restored at the point where
  training continues.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tlaunch.checkpointing import MODEL, OPTIMIZER, SCHEDULER, CheckpointManager, Position
from tlaunch.config import DEFAULT_KEEP_LAST, DEFAULT_SAVE_MINUTES, LaunchConfig
from tlaunch.contract import CONTROL_DIR_ENV, DEFAULT_CHECKPOINT_DIR_ENV, LAUNCH_DIR_ENV
from tlaunch.evaluation import Evaluation
from tlaunch.goodput import WorkerRecord
from tlaunch.loader_workers import install_worker_hook
from tlaunch.loop_parts import ReplayBar, StepGatedScheduler, batch_len
from tlaunch.run_io import MetricsLog, Progress, make_run_dir
from tlaunch.sampling import ResumableLoader
from tlaunch.stopping import StopController
from tlaunch.trackers import RunLogs

_CURRENT: Run | None = None


class Run:
    """One training run in this process. Create it with :func:`tlaunch.init`.

    The Run is the training loop's side of tlaunch: it arranges epochs, batches, accumulation
    windows and logging, and asks two owners for the rest: ``self.checkpoints``
    (:class:`~tlaunch.checkpointing.CheckpointManager`: what is saved, when, and where a run
    resumes) and ``self.stops`` (:class:`~tlaunch.stopping.StopController`: signals, the
    launcher's STOP file, the deadline and the ranks' agreement). Everything that depends on
    the hardware goes through ``self.strategy``.
    """

    def __init__(self, config: LaunchConfig, hparams: dict[str, Any] | None = None) -> None:
        from tlaunch.strategies import choose

        self.config = config
        self.hparams = dict(hparams or {})
        self.strategy = choose(
            gpus=config.gpus,
            cpus=config.cpus,
            tpus=config.tpus,
            nnodes=config.nnodes,
            override=config.strategy or _torchrun_strategy(),
            precision=config.precision,
            grad_accum=config.grad_accum,
        )
        # The Run does accumulation itself (it knows where an epoch's last, partial window
        # ends and where a resumed run re-enters one), so Accelerate must neither divide the
        # loss nor count micro-batches.
        self.logs = RunLogs(config)  # trackers, the run-wide metrics.jsonl, the figures
        self.accelerator = self.strategy.build_accelerator(
            own_accumulation=True, **self.logs.accelerator_kwargs()
        )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        _seed_everything(config.seed + self.rank)
        self.strategy.seed_device(config.seed + self.rank)
        self.position = Position()
        self._models: list[torch.nn.Module] = []
        self._optimizers: list[Any] = []
        self._loaders: dict[int, ResumableLoader] = {}
        self._sync_now = True
        self._step_counted = False
        self._window = 1
        self.run_dir = _run_dir(config, self.is_main)
        self._metrics = MetricsLog(self.run_dir if self.is_main else None)
        atexit.register(self._metrics.close)  # a script that dies of an exception keeps its log
        # Batches from a DataLoader are on the CPU already: moving them there is a no-op.
        self._move_batches = self.accelerator.device.type != "cpu"
        self._progress = Progress(enabled=self.is_main, mode=config.progress)
        self.stops = StopController(config, self.strategy, self.accelerator)
        self.stops.install()
        install_worker_hook()  # a stop never kills a DataLoader's workers, prepared or not
        self.checkpoints = CheckpointManager(config, self.strategy, self.accelerator, self.hparams)
        opened = time.monotonic()
        self.resume = self.checkpoints.open(self.position, self._metrics)
        self._restore_s = time.monotonic() - opened if self.checkpoints.loaded is not None else 0.0
        self._goodput = WorkerRecord.for_run(config, self.is_main, self.checkpoints.enabled)
        self.logs.start(
            strategy=self.strategy,
            accelerator=self.accelerator,
            checkpoints=self.checkpoints,
            metrics=self._metrics,
            position=self.position,
            optimizers=self._optimizers,
            hparams=self.hparams,
        )
        self.evaluation = Evaluation(self)  # eval passes, early stopping, the --monitor rule

    # -- where the run is ----------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken (global, identical on every rank)."""
        return self.position.step

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.position.batch_in_epoch

    @property
    def samples_seen(self) -> int:
        return self.position.samples_seen

    # -- preparing objects ---------------------------------------------------------------------
    def prepare(self, *objects: Any) -> Any:
        """Wrap models, optimizers, loaders and schedulers for this strategy; restore them on resume.

        Returns the objects in the same order (a single object when given one).
        """
        from torch.utils.data import DataLoader

        accelerated = (torch.nn.Module, torch.optim.Optimizer)
        prepared = iter(
            self.strategy.prepare(
                self.accelerator, *[o for o in objects if isinstance(o, accelerated)]
            )
        )
        out: list[Any] = []
        for obj in objects:
            if isinstance(obj, accelerated):
                wrapped = next(prepared)
                is_model = isinstance(obj, torch.nn.Module)
                (self._models if is_model else self._optimizers).append(wrapped)
                self.checkpoints.track(MODEL if is_model else OPTIMIZER, wrapped)
            elif isinstance(obj, DataLoader):
                resumable = ResumableLoader(
                    obj, seed=self.config.seed, rank=self.rank, world=self.world_size
                )
                self._loaders[id(resumable.original)] = resumable
                self.checkpoints.track("loader", resumable)
                wrapped = resumable.original
            elif hasattr(obj, "step") and hasattr(obj, "state_dict") and hasattr(obj, "optimizer"):
                wrapped = StepGatedScheduler(obj, self)
                self.checkpoints.track(SCHEDULER, wrapped)
            else:
                wrapped = obj
            out.append(wrapped)
        restoring = time.monotonic()
        self.checkpoints.restore_prepared()
        if self.checkpoints.loaded is not None:
            self._restore_s += time.monotonic() - restoring
        self._goodput.ready(self.position.step, self._restore_s)
        return out[0] if len(out) == 1 else tuple(out)

    def register(self, obj: Any, name: str | None = None) -> Any:
        """Save and restore ``obj`` (anything with ``state_dict``/``load_state_dict``) too."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"run.register needs an object with state_dict/load_state_dict, got {type(obj).__name__}"
            )
        extra = sum(n.startswith("extra_") for n in self.checkpoints.states.extra)
        self.checkpoints.register(name or f"extra_{extra}", obj)
        return obj

    # -- the loop ------------------------------------------------------------------------------
    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers from the resumed epoch up to ``n`` (capped by --max-epochs)."""
        last = min(n, self.config.max_epochs or n)
        if self.config.fast_dev_run:
            last = min(last, self.resume.epoch + 1)
        epoch = self.resume.epoch
        pos = self.position
        if self.stops.agree_before_start():  # a stop that came while the workers started
            self._stop_with_checkpoint()
        while epoch < last and not self._done():
            pos.epoch = epoch
            self._maybe_restore_rng(epoch, at_epoch_start=True)
            yield epoch
            if self.stops.agreed:
                return
            epoch += 1
            pos.epoch, pos.batch_in_epoch = epoch, 0
            scored = self.evaluation.save_due()  # an epoch-end pass logged --monitor
            if (self.checkpoints.due_at_epoch_end(epoch) or scored) and not self._done():
                self.save()

    def batches(self, loader: Any) -> Iterator[Any]:
        """This rank's batches of the current epoch, from the resumed position; a progress bar
        on rank 0; stops cleanly (committed checkpoint, exit) when a stop is requested."""
        resumable = self._loaders.get(id(loader))
        if resumable is None:
            raise ValueError("run.batches(loader) needs a DataLoader returned by run.prepare(...)")
        pos = self.position
        epoch = pos.epoch
        total = self._batches_per_epoch(resumable)  # None: an iterable of unknown length
        start = self.resume.start_batch(epoch)
        data_epoch = 0 if self.config.overfit_batches else epoch
        replay = ReplayBar(self._progress, epoch, start, pos, self._metrics)
        it = resumable.iterate(data_epoch, start, replayed=replay.tick)
        replay.close()
        if start:  # after a replay: the saved streams already include the replayed batches
            self._maybe_restore_rng(epoch, at_epoch_start=False)
        K = self.config.grad_accum
        bar = self._progress.bar(total, start, f"epoch {epoch}")
        for i, (batch, last) in enumerate(it, start):
            if total is not None and i >= total:
                break
            window_start = (i // K) * K
            # A window's size is known where the epoch's length is; elsewhere the last batch
            # closes a shorter window (scaled like a whole one).
            self._window = K if total is None else min(K, total - window_start)
            self._sync_now = (i + 1 - window_start) == self._window or last
            pos.batch_in_epoch = i
            yield self._to_device(batch)
            pos.batch_in_epoch = i + 1
            pos.samples_seen += batch_len(batch) * self.world_size
            bar.update(pos.step, self._metrics)
            if self._sync_now:
                if not self._step_counted:  # a loop without run.accumulate
                    pos.step += 1
                self._step_counted = False
                if self._after_step():
                    break
        bar.close()

    def eval_batches(self, loader: Any) -> Iterator[Any]:
        """One evaluation pass over ``loader`` (a DataLoader not given to ``prepare``): this
        rank's share, no padding, models in eval mode under ``no_grad``, no step counted;
        nothing at a point ``--val-every-*`` skips. See :mod:`tlaunch.evaluation`."""
        return self.evaluation.batches(loader)

    @property
    def should_evaluate(self) -> bool:
        """Whether ``run.eval_batches`` called now evaluates (``--val-every-*``)."""
        return self.evaluation.due()

    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module) -> Iterator[None]:
        """One micro-batch: gradients are synchronized across ranks, and the optimizer and
        scheduler step, only on the last micro-batch of a --grad-accum window."""
        with self.strategy.micro_batch(self.accelerator, model, sync=self._sync_now):
            yield
        if self._sync_now:  # the optimizer stepped inside: metrics logged next carry the new step
            self.position.step += 1
            self._step_counted = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backward with scaling (fp16), accumulation averaging and clipping (after unscaling)."""
        self.strategy.backward(self.accelerator, loss / self._window if self._window > 1 else loss)
        norm, value = self.config.clip_grad_norm, self.config.clip_grad_value
        if self._sync_now and (norm is not None or value is not None):
            params = [p for m in self._models for p in m.parameters()]
            self.strategy.clip_gradients(self.accelerator, params, norm=norm, value=value)

    def log(self, reduce: bool = False, **metrics: Any) -> None:
        """Record metrics (numbers or tensors); ``reduce=True`` averages them over ranks first.

        A tensor on a GPU or TPU is not read here, which would make every step wait for the
        device: it is read at the next flush of the metrics (:class:`tlaunch.run_io.MetricsLog`),
        at the latest when ``run.metrics`` is next read. ``tokens=n`` (this rank's tokens in
        the batch) is a count for the ``tokens_per_sec`` figure (:mod:`tlaunch.trackers`).
        """
        values: dict[str, Any] = {}
        metrics = self.evaluation.capture(reduce, metrics)  # in a pass: averaged at its end
        for key, value in metrics.items():
            values[key] = (
                self._metric_value(value, reduce)
                if isinstance(value, torch.Tensor)
                else float(value)
            )
        self._metrics.add(self.position.step, self.position.epoch, values)

    def _metric_value(self, value: torch.Tensor, reduce: bool) -> Any:
        if reduce:
            value = self.strategy.reduce_mean(self.accelerator, value)
        if value.dim():
            value = value.detach().float().mean()
        if value.device.type == "cpu":  # read without waiting for anything
            return float(value.item())
        # Kept unread; a copy, since the script may change its tensor in place before the flush.
        return value.detach().clone()

    @property
    def metrics(self) -> dict[str, float]:
        """The last value logged for each metric (reading it waits for logged device values)."""
        return self._metrics.latest()

    @metrics.setter
    def metrics(self, values: dict[str, float]) -> None:
        self._metrics.replace(values)

    @property
    def should_stop(self) -> bool:
        """True once a stop was requested (signal, cloud notice, deadline) on any rank."""
        return self.stops.should_stop

    # -- saving --------------------------------------------------------------------------------
    def save(self) -> None:
        """Commit a checkpoint of everything prepared or registered, at the current position."""
        if not self.checkpoints.enabled or self.checkpoints.saved_step == self.position.step:
            return
        started = time.monotonic()
        self._metrics.flush()  # the lines logged so far are on disk when the checkpoint is
        self.checkpoints.save(self.position, self._saved_metrics())
        self._goodput.saved(self.position.step, time.monotonic() - started)

    def finish(self) -> None:
        """Flush pending saves, close the progress bar and logs, and end the process group.

        Call it once, after training; collectives are no longer possible afterwards.
        """
        self._goodput.stopping(self.position.step)
        if self.checkpoints.enabled:
            self.save()
            self.checkpoints.flush()
            self.checkpoints.close()
        self._metrics.close()
        self.strategy.end_process_group(self.accelerator)
        self.stops.restore()
        self.stops.finished(self.position.step, checkpoint=self.checkpoints.enabled)
        self._unregister()

    def _unregister(self) -> None:
        """This process has no current run any more: ``tlaunch.init()`` may start the next."""
        global _CURRENT
        atexit.unregister(self._metrics.close)
        if _CURRENT is self:
            _CURRENT = None

    # -- internals -----------------------------------------------------------------------------
    def _to_device(self, batch: Any) -> Any:
        return self.strategy.to_device(self.accelerator, batch) if self._move_batches else batch

    def _maybe_restore_rng(self, epoch: int, *, at_epoch_start: bool) -> None:
        rng = self.resume.take_rng(epoch, at_epoch_start=at_epoch_start)
        if rng is not None:
            self.strategy.set_rng_state(rng)

    def _batches_per_epoch(self, resumable: ResumableLoader) -> int | None:
        try:
            total: int | None = len(resumable)
        except TypeError:  # an IterableDataset without a length
            total = None
        limit = self.config.limit_train_batches
        if limit is not None:  # above 1: a count of batches; up to 1: a fraction of the epoch
            if limit > 1:
                total = int(limit) if total is None else min(total, int(limit))
            elif total is not None:
                total = max(1, int(total * limit))
        for cap in (self.config.fast_dev_run, self.config.overfit_batches):
            if cap:
                total = cap if total is None else min(total, cap)
        return total

    def _saved_metrics(self) -> dict[str, float]:
        return self.evaluation.checkpoint_metrics(self._metrics.latest(), self.position.step)

    def _done(self) -> bool:
        return (
            self.stops.agreed
            or self.evaluation.stopped
            or (self.config.max_steps is not None and self.position.step >= self.config.max_steps)
        )

    def _after_step(self) -> bool:
        """Runs after each optimizer step. Returns True when the epoch loop must end."""
        self._goodput.after_step(self.position.step)
        self.strategy.end_step(self.accelerator)
        ckpt = self.checkpoints
        ckpt.check_writer()
        stop, save_due = self.stops.after_step(
            timed_save_due=ckpt.timed_save_due, slowest_save=lambda: ckpt.slowest_save
        )
        if stop:
            self._stop_with_checkpoint()
        if ckpt.due_after_step(self.position.step) or save_due or self.evaluation.save_due():
            self.save()
        return self._done()

    def _stop_with_checkpoint(self) -> None:
        """Commit a checkpoint at this step, flush it, report, and leave the script."""
        self._goodput.stopping(self.position.step)
        self.stops.announce()
        self._metrics.close()  # everything logged is on disk before the process leaves
        ckpt, pos = self.checkpoints, self.position
        # No step since the last commit (or since a fresh start): nothing to lose, nothing to save.
        nothing_new = ckpt.saved_step == pos.step or (pos.step == 0 and ckpt.loaded is None)
        if ckpt.enabled:
            if not nothing_new:
                ckpt.save(pos, self._saved_metrics(), force=True, stopping=True)
            ckpt.flush(stopping=True)  # rank 0 waits for the commit, the others for rank 0
            ckpt.close()  # the lease too: a notebook may init() again in this process
        self._progress.close()
        self._unregister()
        self.stops.exit(
            kept=nothing_new or ckpt.enabled,
            nothing_new=nothing_new,
            step=pos.step,
            epoch=pos.epoch,
            batch=pos.batch_in_epoch,
            is_main=self.is_main,
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir(config: LaunchConfig, is_main: bool) -> str:
    """This launch's run directory: the launcher's, or under plain ``python``/``torchrun`` a
    new one under ``--run-dir`` (rank 0 creates it; the others write nothing there)."""
    launched = os.environ.get(LAUNCH_DIR_ENV)
    if launched:
        return launched
    return make_run_dir(config) if is_main else ""


def _torchrun_strategy() -> str | None:
    """Under plain ``torchrun`` (no tlaunch launcher), several processes mean DDP, or XLA
    when ``PJRT_DEVICE`` names the device (torch_xla's documented torchrun setup)."""
    if os.environ.get(CONTROL_DIR_ENV) is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "xla" if os.environ.get("PJRT_DEVICE") else "ddp"
    return None


def init(*, hparams: dict[str, Any] | None = None, **overrides: Any) -> Run:
    """Start or resume the run of this process.

    Under ``tlaunch`` the launcher's configuration applies; under ``python``, ``torchrun`` or
    in a notebook, ``TLAUNCH_<FLAG>`` variables are read exactly as the CLI reads them, and
    ``overrides`` (any ``LaunchConfig`` field, e.g. ``checkpoint_dir=``) win over them. Flags
    from the launcher win over overrides, with a warning.
    """
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError(
            "tlaunch.init() was already called in this process; reuse the Run it returned"
        )
    config = LaunchConfig.from_env()
    if config is None:
        config = LaunchConfig(**{**LaunchConfig.env_defaults(), **overrides})
    else:
        launched = config
        config, lost = launched.with_overrides(overrides)
        for key in lost:
            warnings.warn(
                f"your code has tlaunch.init({key}={overrides[key]!r}) but the launcher was given "
                f"--{key.replace('_', '-')} {getattr(launched, key)!r}; the launcher's value is "
                "used. Remove it from one of the two.",
                stacklevel=2,
            )
    default = os.environ.get(DEFAULT_CHECKPOINT_DIR_ENV)
    settled = config.with_checkpoint_default(default)
    if default and settled.checkpoint_dir == default and os.environ.get("RANK", "0") == "0":
        _say_default_checkpoints(settled)
    _CURRENT = Run(settled, hparams)
    return _CURRENT


def _say_default_checkpoints(config: LaunchConfig) -> None:
    where = os.path.relpath(config.checkpoint_dir)
    where = config.checkpoint_dir if where.startswith("..") else where
    policy = "saved at every stop"
    if config.save_every_minutes == DEFAULT_SAVE_MINUTES:
        policy += f" and every {DEFAULT_SAVE_MINUTES:g} min"
    if config.keep_last == DEFAULT_KEEP_LAST:
        policy += f", the last {DEFAULT_KEEP_LAST} kept"
    print(
        f"tlaunch: checkpoints go to {where} (no --checkpoint-dir given: {policy}; the same "
        "command resumes from them; --checkpoint-dir none turns this off)",
        file=sys.stderr,
        flush=True,
    )
