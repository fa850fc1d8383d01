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
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import send_to_device

from tlaunch.config import LaunchConfig
from tlaunch.contract import (
    CONTROL_DIR_ENV,
    EXIT_PREEMPTED,
    LAUNCH_DIR_ENV,
    PREEMPTED_REPORT,
    STOP_FILE,
    WORKERS_STOPPING,
)
from tlaunch.resume import ResumeState, apply_checkpoint, check_drift, open_resume
from tlaunch.run_io import MetricsLog, Progress, StopWatch
from tlaunch.sampling import ResumableLoader

_CURRENT: Run | None = None


class Run:
    """One training run in this process. Create it with :func:`tlaunch.init`."""

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
        self.accelerator = self.strategy.build_accelerator(own_accumulation=True)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        _seed_everything(config.seed + self.rank)
        self.strategy.seed_device(config.seed + self.rank)
        #: Optimizer steps taken (global, identical on every rank).
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples_seen = 0
        self._models: list[torch.nn.Module] = []
        self._optimizers: list[Any] = []
        self._schedulers: list[Any] = []
        self._registered: dict[str, Any] = {}
        self._loaders: dict[int, ResumableLoader] = {}
        self._sync_now = True
        self._step_counted = False
        self._window = 1
        #: Agreed by every rank; ``_stop_requested`` is this rank's own (signal) request.
        self._stop_flag = False
        self._stop_requested = False
        self._first_signal_at: float | None = None
        self._saved_step = -1
        self._started = time.monotonic()
        self._control_dir = os.environ.get(CONTROL_DIR_ENV)
        self.run_dir = os.environ.get(LAUNCH_DIR_ENV) or os.path.join(
            os.getcwd(), "tlaunch-runs", "local"
        )
        self._metrics = MetricsLog(self.run_dir if self.is_main else None)
        atexit.register(self._metrics.close)  # a script that dies of an exception keeps its log
        self._stop_file = os.path.join(self._control_dir, STOP_FILE) if self._control_dir else None
        # Batches from a DataLoader are on the CPU already: moving them there is a no-op.
        self._move_batches = self.accelerator.device.type != "cpu"
        self._progress = Progress(enabled=self.is_main, mode=config.progress)
        self._clock = StopWatch(config)
        self._install_signal_handlers()
        if self._control_dir:
            _die_with_launcher()
        self.resume: ResumeState = open_resume(self)
        if self.resume.loaded is not None:
            check_drift(self, self.resume.loaded)

    # -- preparing objects ---------------------------------------------------------------------
    def prepare(self, *objects: Any) -> Any:
        """Wrap models, optimizers, loaders and schedulers for this strategy; restore them on resume.

        Returns the objects in the same order (a single object when given one).
        """
        from torch.utils.data import DataLoader

        to_accelerate = [
            o for o in objects if isinstance(o, (torch.nn.Module, torch.optim.Optimizer))
        ]
        prepared = self.accelerator.prepare(*to_accelerate) if to_accelerate else ()
        accelerated = iter(prepared if len(to_accelerate) > 1 else (prepared,))
        out: list[Any] = []
        for obj in objects:
            if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
                wrapped = next(accelerated)
                (self._models if isinstance(obj, torch.nn.Module) else self._optimizers).append(
                    wrapped
                )
                out.append(wrapped)
            elif isinstance(obj, DataLoader):
                resumable = ResumableLoader(
                    obj, seed=self.config.seed, rank=self.rank, world=self.world_size
                )
                self._loaders[id(resumable.original)] = resumable
                out.append(resumable.original)
            elif hasattr(obj, "step") and hasattr(obj, "state_dict") and hasattr(obj, "optimizer"):
                gated = _StepGatedScheduler(obj, self)
                self._schedulers.append(gated)
                out.append(gated)
            else:
                out.append(obj)
        if self.resume.loaded is not None:
            apply_checkpoint(self, self.resume.loaded)
        return out[0] if len(out) == 1 else tuple(out)

    def register(self, obj: Any, name: str | None = None) -> Any:
        """Save and restore ``obj`` (anything with ``state_dict``/``load_state_dict``) too."""
        name = name or f"extra_{len(self._registered)}"
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"run.register needs an object with state_dict/load_state_dict, got {type(obj).__name__}"
            )
        self._registered[name] = obj
        if self.resume.loaded is not None and name in self.resume.loaded.objects:
            obj.load_state_dict(self.resume.loaded.objects[name])
        return obj

    # -- the loop ------------------------------------------------------------------------------
    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers from the resumed epoch up to ``n`` (capped by --max-epochs)."""
        last = min(n, self.config.max_epochs or n)
        if self.config.fast_dev_run:
            last = min(last, self.resume.epoch + 1)
        epoch = self.resume.epoch
        while epoch < last and not self._done():
            self.epoch = epoch
            if self.resume.restore_rng_at_epoch_start(epoch):
                self.strategy.set_rng_state(self.resume.rng)
            yield epoch
            if self._stop_flag:
                return
            epoch += 1
            self.epoch, self.batch_in_epoch = epoch, 0
            every = self.config.save_every_epochs
            if every and epoch % every == 0 and not self._done():
                self.save()

    def batches(self, loader: Any) -> Iterator[Any]:
        """This rank's batches of the current epoch, from the resumed position; a progress bar
        on rank 0; stops cleanly (committed checkpoint, exit) when a stop is requested."""
        resumable = self._loaders.get(id(loader))
        if resumable is None:
            raise ValueError("run.batches(loader) needs a DataLoader returned by run.prepare(...)")
        epoch = self.epoch
        total = self._batches_per_epoch(resumable)
        start = self.resume.start_batch(epoch)
        if start and self.resume.restore_rng_mid_epoch(epoch):
            self.strategy.set_rng_state(self.resume.rng)
        data_epoch = 0 if self.config.overfit_batches else epoch
        it = resumable.iterate(data_epoch, start)
        K = self.config.grad_accum
        bar = self._progress.bar(total, start, f"epoch {epoch}")
        for i in range(start, total):
            batch = next(it, None)
            if batch is None:
                break
            window_start = (i // K) * K
            self._window = min(K, total - window_start)
            self._sync_now = (i + 1 - window_start) == self._window
            self.batch_in_epoch = i
            yield self._to_device(batch)
            self.batch_in_epoch = i + 1
            self.samples_seen += _batch_len(batch) * self.world_size
            bar.update(self.step, self._metrics)
            if self._sync_now:
                if not self._step_counted:  # a loop without run.accumulate
                    self.step += 1
                self._step_counted = False
                if self._after_step():
                    break
        bar.close()

    @contextlib.contextmanager
    def accumulate(self, model: torch.nn.Module) -> Iterator[None]:
        """One micro-batch: gradients are synchronized across ranks, and the optimizer and
        scheduler step, only on the last micro-batch of a --grad-accum window."""
        self.accelerator.gradient_state._set_sync_gradients(self._sync_now)
        ctx = (
            contextlib.nullcontext()
            if self._sync_now
            else self.strategy.no_sync(self.accelerator, model)
        )
        with ctx:
            yield
        if self._sync_now:  # the optimizer stepped inside: metrics logged next carry the new step
            self.step += 1
            self._step_counted = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backward with scaling (fp16), accumulation averaging and clipping (after unscaling)."""
        self.strategy.backward(self.accelerator, loss / self._window if self._window > 1 else loss)
        clip_norm, clip_value = self.config.clip_grad_norm, self.config.clip_grad_value
        if not self._sync_now or (clip_norm is None and clip_value is None):
            return
        params = [p for m in self._models for p in m.parameters()]
        if clip_norm is not None:
            self.accelerator.clip_grad_norm_(params, clip_norm)
        if clip_value is not None:
            self.accelerator.clip_grad_value_(params, clip_value)

    def log(self, reduce: bool = False, **metrics: Any) -> None:
        """Record metrics (numbers or tensors); ``reduce=True`` averages them over ranks first.

        A tensor on a GPU or TPU is not read here, which would make every step wait for the
        device: it is read at the next flush of the metrics (:class:`tlaunch.run_io.MetricsLog`),
        at the latest when ``run.metrics`` is next read.
        """
        values: dict[str, Any] = {}
        for key, value in metrics.items():
            values[key] = (
                self._metric_value(value, reduce)
                if isinstance(value, torch.Tensor)
                else float(value)
            )
        self._metrics.add(self.step, self.epoch, values)

    def _metric_value(self, value: torch.Tensor, reduce: bool) -> Any:
        if reduce and self.world_size > 1:
            value = self.accelerator.reduce(
                value.detach().float().to(self.accelerator.device), reduction="mean"
            )
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
        return self._stop_flag or (self.world_size == 1 and self._stop_requested)

    # -- saving --------------------------------------------------------------------------------
    def save(self) -> None:
        """Commit a checkpoint of everything prepared or registered, at the current position."""
        from tlaunch.resume import snapshot_and_submit

        if not self.resume.enabled or self._saved_step == self.step:
            return
        self._metrics.flush()  # the lines logged so far are on disk when the checkpoint is
        started = time.monotonic()
        snapshot_and_submit(self)
        self._clock.record_save(time.monotonic() - started)
        self._saved_step = self.step

    def finish(self) -> None:
        """Flush pending saves, close the progress bar and logs, and end the process group.

        Call it once, after training; collectives are no longer possible afterwards.
        """
        global _CURRENT
        if self.resume.enabled:
            self.save()
            self.resume.flush(self)
            if self.resume.writer is not None:
                self.resume.writer.close()
        self._metrics.close()
        atexit.unregister(self._metrics.close)
        self.strategy.end_process_group(self.accelerator)
        _CURRENT = None

    # -- internals -----------------------------------------------------------------------------
    def _to_device(self, batch: Any) -> Any:
        return send_to_device(batch, self.accelerator.device) if self._move_batches else batch

    def _batches_per_epoch(self, resumable: ResumableLoader) -> int:
        total = len(resumable)
        limit = self.config.limit_train_batches
        if limit is not None:  # above 1: a count of batches; up to 1: a fraction of the epoch
            total = min(total, int(limit) if limit > 1 else max(1, int(total * limit)))
        for cap in (self.config.fast_dev_run, self.config.overfit_batches):
            if cap:
                total = min(total, cap)
        return total

    def _done(self) -> bool:
        return self._stop_flag or (
            self.config.max_steps is not None and self.step >= self.config.max_steps
        )

    def _after_step(self) -> bool:
        """Runs after each optimizer step. Returns True when the epoch loop must end."""
        self.strategy.end_step(self.accelerator)
        self.resume.check_writer(self)
        local_stop, save_due = self._stop_requested, False
        if self._clock.poll_due():  # a stat and clock reads: a few times a second, not every step
            local_stop = (
                local_stop
                or self._clock.deadline_near()
                or (self._stop_file is not None and os.path.exists(self._stop_file))
            )
            save_due = self._clock.save_due()
        # Stop and timed saves depend on clocks and signals that differ between ranks; every
        # rank must take the same decision before anyone saves: one tiny all-reduce per step.
        stop, save_due = self.strategy.any_rank_lagged(self.accelerator, [local_stop, save_due])
        if stop:
            self._stop_flag = True
            self._stop_with_checkpoint()
        every = self.config.save_every
        if (every and self.step % every == 0) or save_due:
            self.save()
        return self._done()

    def _stop_with_checkpoint(self) -> None:
        """Commit a checkpoint at this step, flush it, report, and leave the script."""
        import json

        if self._control_dir and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            open(os.path.join(self._control_dir, WORKERS_STOPPING), "w").close()
        self._metrics.close()  # everything logged is on disk before the process leaves
        if self.resume.enabled:
            self._saved_step = -1
            self.save()
            self.resume.flush(self)  # rank 0 waits for the commit; the others wait for rank 0
        self._progress.close()
        committed = self.resume.enabled
        if committed and self._control_dir and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            with open(os.path.join(self._control_dir, PREEMPTED_REPORT), "w") as f:
                json.dump({"step": self.step, "epoch": self.epoch, "batch": self.batch_in_epoch}, f)
        if self.is_main:
            what = (
                f"checkpoint committed at step {self.step}"
                if committed
                else "no --checkpoint-dir, nothing saved"
            )
            print(f"tlaunch: stop requested; {what}", file=sys.stderr, flush=True)
        self.strategy.end_process_group(self.accelerator)
        # Under the launcher the report file carries "preempted"; exit 0 keeps torch's elastic
        # agent from treating the stop as a failure to restart from.
        raise SystemExit(0 if self._control_dir else (EXIT_PREEMPTED if committed else 1))

    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, frame: Any) -> None:
            now = time.monotonic()
            # A terminal's Ctrl-C reaches us twice (directly and forwarded by the agent): a
            # repeat within a second is the same request. A later one forces the exit; the
            # commit protocol guarantees no partial checkpoint is ever taken for a complete one.
            if self._first_signal_at is not None and now - self._first_signal_at > 1.0:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._first_signal_at = self._first_signal_at or now
            self._stop_requested = True

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(s, handle)


class _StepGatedScheduler:
    """A scheduler that steps only when the optimizer really stepped (end of an accumulation
    window, and not skipped by the fp16 scaler), whatever the script calls."""

    def __init__(self, scheduler: Any, run: Run) -> None:
        self.scheduler, self._run = scheduler, run

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._run._sync_now:
            return
        if any(getattr(o, "step_was_skipped", False) for o in self._run._optimizers):
            return
        self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


def _die_with_launcher() -> None:
    """Ask Linux to SIGKILL this worker when the launcher dies (torch's elastic agent starts
    workers in sessions of their own, so a hard kill of the launcher would leave them training
    on, and writing checkpoints beside the next launch). Elsewhere this is a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 1


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _torchrun_strategy() -> str | None:
    """Under plain ``torchrun`` (no tlaunch launcher), several processes mean DDP, or XLA
    when ``PJRT_DEVICE`` names the device (torch_xla's documented torchrun setup)."""
    if os.environ.get(CONTROL_DIR_ENV) is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "xla" if os.environ.get("PJRT_DEVICE") else "ddp"
    return None


def init(*, hparams: dict[str, Any] | None = None, **overrides: Any) -> Run:
    """Start or resume the run of this process.

    Under ``tlaunch`` the launcher's configuration applies; under ``python`` or ``torchrun``
    the defaults do, and ``overrides`` (any ``LaunchConfig`` field, e.g. ``checkpoint_dir=``)
    set them from the script. Flags from the launcher win over overrides, with a warning.
    """
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError(
            "tlaunch.init() was already called in this process; reuse the Run it returned"
        )
    config = LaunchConfig.from_env()
    if config is None:
        config = LaunchConfig(**overrides)
    else:
        for key, value in overrides.items():
            if getattr(config, key) != value:
                warnings.warn(
                    f"your code has tlaunch.init({key}={value!r}) but the launcher set "
                    f"--{key.replace('_', '-')} {getattr(config, key)!r}; the launcher's value is used. "
                    "Remove it from one of the two.",
                    stacklevel=2,
                )
    _CURRENT = Run(config, hparams)
    return _CURRENT
