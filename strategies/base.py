"""The strategy contract: how processes and devices are arranged for one run.

A strategy answers two questions, on two sides of a process boundary:

* in the launcher, before anything starts: is the hardware there (``check``), and how must
  the workers be started (``plan``: which launcher, how many processes per machine, and the
  environment Accelerate reads);
* in each worker: the configured ``Accelerator`` and the few collective and RNG operations the
  Run API needs, so that no code outside ``strategies/`` branches on ``DistributedType``.

Strategies register their names; ``--strategy NAME`` and the hardware flags pick one by name.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from accelerate import Accelerator

DIRECT, ELASTIC, XLA = "direct", "elastic", "xla"

#: Set in every worker's environment unless it is set already (``THP_MEM_ALLOC_ENABLE=0``
#: opts out). torch's CPU allocator then asks the kernel for 2 MB pages (transparent huge
#: pages) for every buffer of 2 MB or more, as NumPy does for its arrays by default; without
#: it, a kernel in THP's ``madvise`` mode (Ubuntu's default) backs tensors with 4 KB pages,
#: and a step that streams large weights and optimizer states through memory spends much of
#: its time on address translation: 1.42x longer for an MLP of 25M parameters with Adam and
#: 1.26x for a small convolutional net on this machine's CPU (``benchmarks/host_memory.py``).
#: It changes where tensors lie, never what is computed. The first touch of a fresh buffer
#: costs more (the kernel zeroes, and may first compact, 2 MB at once), which is why periodic
#: saves copy into their last snapshot's memory (:class:`tlaunch.storage.SnapshotBuffers`).
HOST_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


class StrategyUnavailable(RuntimeError):
    """The requested hardware or precision is not available: one line with the fix."""


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """How the launcher starts the workers of a strategy on one machine."""

    #: ``direct`` (one child process), ``elastic`` (torch's elastic agent) or ``xla``.
    launcher: str
    nproc_per_node: int
    #: Variables every worker gets, on top of the launcher's own (``TLAUNCH_CONFIG`` …).
    env: dict[str, str] = field(default_factory=dict)


class Strategy(ABC):
    """One arrangement of processes and devices. Subclasses stay small: ~50–100 lines.

    Launcher side: :meth:`check` (is the hardware there), :meth:`plan` (how to start the
    workers). Worker side, in the order a run meets them:

    - :meth:`build_accelerator` the configured Accelerator; :meth:`seed_device` its RNG;
    - :meth:`prepare` / :meth:`unwrap` wrap models and optimizers, and find the model again;
      :meth:`to_device` moves a batch where the model is;
    - :meth:`micro_batch`, :meth:`backward`, :meth:`clip_gradients` one micro-batch of an
      accumulation window; :meth:`end_step` after each optimizer step (XLA cuts its graph);
    - :meth:`reduce_mean`, :meth:`any_rank`, :meth:`begin_agreement` /
      :meth:`end_agreement`, :meth:`gather_object`, :meth:`broadcast_object`,
      :meth:`barrier` the few collectives the Run API needs (metrics, the stop agreement,
      RNG gathering, the resume step);
    - :meth:`rng_state` / :meth:`set_rng_state`, :meth:`scaler_state` /
      :meth:`load_scaler_state` what a checkpoint keeps besides the user's objects;
    - :meth:`end_process_group` the clean end of a run.

    A new strategy (FSDP, say) is one file that overrides what differs.
    """

    name: ClassVar[str]
    #: Accelerate's ``mixed_precision`` values this strategy can honour.
    supported_precisions: ClassVar[tuple[str, ...]] = ("no", "bf16", "fp16")

    def __init__(
        self, *, nprocs: int = 1, precision: str = "no", grad_accum: int = 1, device: str = "cpu"
    ) -> None:
        self.nprocs = nprocs
        #: ``cpu`` or ``cuda``: what the processes of a multi-process strategy run on.
        self.device = device
        self.precision = precision
        self.grad_accum = grad_accum

    # -- launcher side ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`StrategyUnavailable` if this machine cannot run the strategy."""
        if self.precision not in self.supported_precisions:
            raise StrategyUnavailable(self.precision_hint())

    def precision_hint(self) -> str:
        return f"--precision {self.precision} is not supported by the {self.name} strategy"

    @abstractmethod
    def plan(self) -> LaunchPlan:
        """The launch plan for this machine."""

    def accelerate_env(self) -> dict[str, str]:
        """The variables an unmodified Accelerate script reads for precision and accumulation."""
        return {
            "ACCELERATE_MIXED_PRECISION": self.precision,
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": str(self.grad_accum),
        }

    # -- worker side -----------------------------------------------------------------------
    def accelerator_kwargs(self) -> dict[str, Any]:
        return {
            "mixed_precision": self.precision,
            "gradient_accumulation_steps": self.grad_accum,
            "step_scheduler_with_optimizer": False,
        }

    def build_accelerator(
        self,
        *,
        own_accumulation: bool = False,
        log_with: list[str] | None = None,
        logging_dir: str | None = None,
    ) -> Accelerator:
        """The configured Accelerator. ``own_accumulation``: the caller divides the loss and
        gates the optimizer itself, so Accelerate must count no micro-batches (an explicit
        plugin is the only way to beat ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``).
        ``log_with``: tracker names (:mod:`tlaunch.strategies.tracking`), writing under
        ``logging_dir``."""
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin

        for key, value in self.plan().env.items():
            os.environ.setdefault(key, value)
        _probe_lomo_once()
        kwargs = self.accelerator_kwargs()
        if own_accumulation:
            del kwargs["gradient_accumulation_steps"]
            kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=1)
        if log_with:
            from tlaunch.strategies.tracking import accelerate_trackers

            kwargs["log_with"] = accelerate_trackers(log_with, logging_dir or ".")
            kwargs["project_dir"] = logging_dir
        return Accelerator(**kwargs)

    def prepare(self, accelerator: Accelerator, *objects: Any) -> list[Any]:
        """Models and optimizers wrapped for this arrangement (DDP, device placement, fp16
        scaling), in the order given. Data loaders are the Run's own business."""
        if not objects:
            return []
        prepared = accelerator.prepare(*objects)
        prepared = list(prepared) if len(objects) > 1 else [prepared]
        for obj in prepared:
            _answer_zero_grad_once(obj)
        return prepared

    def to_device(self, accelerator: Accelerator, batch: Any) -> Any:
        """A batch (tensors in lists, tuples, dicts) moved to this process's device. Called
        per batch: the function is looked up once, not imported each time."""
        send = getattr(self, "_send_to_device", None)
        if send is None:
            from accelerate.utils import send_to_device as send

            self._send_to_device = send
        return send(batch, accelerator.device)

    def unwrap(self, accelerator: Accelerator, model: Any) -> Any:
        """The user's module inside whatever wrapper :meth:`prepare` put around it."""
        return accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def micro_batch(self, accelerator: Accelerator, model: Any, *, sync: bool) -> Iterator[None]:
        """One micro-batch of an accumulation window. ``sync``: the last one, whose backward
        all-reduces gradients and after which the optimizer steps; on the others gradients
        stay local and Accelerate's optimizer wrapper skips its step."""
        accelerator.gradient_state._set_sync_gradients(sync)
        if sync:
            yield
        else:
            with self.no_sync(accelerator, model):
                yield

    def clip_gradients(
        self,
        accelerator: Accelerator,
        params: list[Any],
        *,
        norm: float | None,
        value: float | None,
    ) -> None:
        """Clip after unscaling (fp16) and, under DDP, after the all-reduce: what the optimizer
        sees is clipped."""
        if norm is not None:
            accelerator.clip_grad_norm_(params, norm)
        if value is not None:
            accelerator.clip_grad_value_(params, value)

    def reduce_mean(self, accelerator: Accelerator, tensor: Any) -> Any:
        """``tensor`` averaged over every rank (a collective: every rank must call it)."""
        if accelerator.num_processes == 1:
            return tensor
        return accelerator.reduce(tensor.detach().float().to(accelerator.device), reduction="mean")

    def scaler_state(self, accelerator: Accelerator) -> dict[str, Any] | None:
        """The fp16 gradient scaler's state, or None where no scaler runs."""
        scaler = accelerator.scaler
        return None if scaler is None else scaler.state_dict()

    def load_scaler_state(self, accelerator: Accelerator, state: dict[str, Any]) -> None:
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state)

    def barrier(self, accelerator: Accelerator) -> None:
        """Wait until every rank arrives here."""
        accelerator.wait_for_everyone()

    def backward(self, accelerator: Accelerator, loss: Any) -> None:
        """Backward of a loss the caller has already divided for accumulation. Accelerate's
        own ``backward`` is needed only for fp16's loss scaling; elsewhere it divides by its
        accumulation count, which ``own_accumulation`` keeps at 1 — an extra op and autograd
        node per step that change nothing."""
        if accelerator.scaler is not None:
            accelerator.backward(loss)
        else:
            loss.backward()

    def any_rank(self, accelerator: Accelerator, flags: list[bool]) -> list[bool]:
        """For each flag: True on every rank if it is true on any rank (one tiny all-reduce)."""
        if accelerator.num_processes == 1:
            return list(flags)
        import torch

        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=accelerator.device)
        return [bool(v > 0) for v in accelerator.reduce(t, reduction="sum").tolist()]

    def begin_agreement(self, accelerator: Accelerator, values: list[float]) -> None:
        """Start summing ``values`` over every rank without waiting; :meth:`end_agreement`
        returns the sums. Every rank starts and ends each agreement at the same point of its
        loop, so the sums are the same everywhere; meanwhile the reduce's latency hides behind
        a training step instead of stalling it (measured 4.5 ms a step on 2 gloo processes).
        Callers send small integers (flags, milliseconds): their float sums are exact, so each
        rank derives the same decision from them on any backend."""
        import torch

        t = torch.tensor(values, dtype=torch.float32, device=accelerator.device)
        if accelerator.num_processes == 1:
            self._agreement: Any = (None, t)
            return
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_backend() not in ("gloo", "nccl"):
            self._agreement = (None, accelerator.reduce(t, reduction="sum"))
            return
        self._agreement = (dist.all_reduce(t, async_op=True), t)

    def end_agreement(self, accelerator: Accelerator) -> list[float] | None:
        """The sums of the agreement :meth:`begin_agreement` started (None: none in flight)."""
        pending = getattr(self, "_agreement", None)
        if pending is None:
            return None
        work, t = pending
        if work is not None:
            work.wait()
        self._agreement = None
        return t.tolist()

    def end_process_group(self, accelerator: Accelerator) -> None:
        """Complete the collectives in flight, meet every rank, and end the process group.

        On gloo, then let its worker threads drop the collectives they still hold before this
        process goes on to exit: see :func:`_settle_gloo_threads`.
        """
        import torch.distributed as dist

        self.end_agreement(accelerator)
        gloo = dist.is_initialized() and dist.get_backend() == "gloo"
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if gloo:
            _settle_gloo_threads()

    def gather_object(self, accelerator: Accelerator, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (small objects only: RNG states, positions)."""
        if accelerator.num_processes == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast_object(self, accelerator: Accelerator, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if accelerator.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def rng_state(self) -> dict[str, Any]:
        """Every RNG this process draws from, exactly, as tensors and lists (so the checkpoint
        loads with ``torch.load(weights_only=True)``)."""
        import numpy as np
        import torch

        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": [version, list(internal), gauss],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        state.update(self.device_rng_state())
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        import numpy as np
        import torch

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        self.set_device_rng_state(state)

    def seed_device(self, seed: int) -> None:
        """Seed the device's own generator where ``torch.manual_seed`` does not reach it."""
        return None

    def peak_memory_mb(self, accelerator: Accelerator) -> float:
        """This process's peak memory so far, in MiB, read from counters (no wait for the
        device): the CUDA allocator's peak on a GPU, else the host's peak resident set."""
        if accelerator.device.type == "cuda":
            import torch

            return torch.cuda.max_memory_allocated(accelerator.device) / 2**20
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
        return peak / (2**20 if sys.platform == "darwin" else 2**10)

    def end_step(self, accelerator: Accelerator) -> None:
        """Called by the Run API once per optimizer step, before any collective or save."""
        return None

    def no_sync(self, accelerator: Accelerator, model: Any) -> Any:
        """Context for a micro-batch whose gradients must not be synchronized yet."""
        return accelerator.no_sync(model)

    def device_rng_state(self) -> dict[str, Any]:
        return {}

    def set_device_rng_state(self, state: dict[str, Any]) -> None:
        return None


_GLOO_THREAD = "pt_gloo_runloop"


#: The store key every rank adds 1 to when it reaches its exit hook (see end_default_group).
_AT_EXIT_KEY = "tlaunch/at-exit"


def end_default_group(meet_within: float = 5.0, timeout: float = 10.0) -> bool:
    """End the default process group that a finished script left open, before the interpreter
    finalizes. Called at exit by the hook tlaunch gives each worker (``tlaunch/_site``).

    The ranks first meet through the group's store (not a collective, which could pair with one
    a peer is still blocked in): ending the group closes its connections, and a peer still
    waiting in a collective would then fail and be reported in place of this rank (a script that
    ``sys.exit(3)``s while the others wait). When all ranks have come to exit, within
    ``meet_within`` seconds, ``destroy_process_group`` drops the group; when nothing else holds
    it, gloo's destructor completes the collectives still queued and joins its threads, so every
    tensor they held is freed now, while a thread may still take the GIL. Either way
    :func:`_settle_gloo_threads` then lets the threads drop the collectives they just finished.
    The destroy runs on a helper thread: a collective that never completes costs at most
    ``timeout`` seconds, and then the exit goes on as before (returns False).
    """
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(_AT_EXIT_KEY, 1) < dist.get_world_size():
            store.wait([_AT_EXIT_KEY + "/all"], timedelta(seconds=meet_within))
        else:
            store.set(_AT_EXIT_KEY + "/all", "1")
    except Exception:
        _settle_gloo_threads()  # a peer is busy elsewhere, or gone: keep the group open
        return True
    ended = threading.Event()

    def end() -> None:
        try:
            dist.destroy_process_group()
        except Exception:
            pass  # broken by a peer that died: the exit goes on either way
        finally:
            ended.set()

    threading.Thread(target=end, name="tlaunch-end-group", daemon=True).start()
    if not ended.wait(timeout):
        return False
    _settle_gloo_threads()
    return True


def _settle_gloo_threads(timeout: float = 2.0, poll: float = 0.002, quiet_polls: int = 3) -> None:
    """Sleep (without the GIL) until gloo's worker threads have been idle for a few polls.

    A finished gloo collective is freed by the worker thread that ran it, and a barrier keeps
    earlier collectives alive until it is itself freed, which can be just after the caller
    returned from it. Freeing a tensor Python no longer references needs the GIL; if the
    interpreter is finalizing by then, that thread is ended with pthread_exit, whose unwinding
    through a noexcept destructor aborts the process ("terminate called without an active
    exception", seen about once in 36 resumed 2-process runs under load; 0 in 138 with this
    wait, which took 7-9 ms). The threads' states are read from /proc (Linux); elsewhere
    the wait is ``quiet_polls`` intervals.
    """
    import time

    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        time.sleep(poll)
        quiet = 0 if _gloo_threads_running() else quiet + 1


def _gloo_threads_running() -> bool:
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != _GLOO_THREAD:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        if state not in ("S", "D"):  # running or runnable: it may be about to take the GIL
            return True
    return False


def _probe_lomo_once() -> None:
    """Accelerate's prepared optimizer asks importlib twice per ``step()`` whether the
    ``lomo_optim`` package is installed: a ``find_spec`` over ``sys.path`` and the installed
    metadata, ~30 µs each (measured), about 1% of a 6 ms step. What is installed does not change
    while a run trains, so the answer is computed once; the wrapper still behaves as before."""
    import functools

    import accelerate.optimizer

    probe = getattr(accelerate.optimizer, "is_lomo_available", None)
    if probe is not None and not hasattr(probe, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(probe)


def _answer_zero_grad_once(optimizer: Any) -> None:
    """Accelerate's prepared optimizer asks ``inspect.signature`` on every ``zero_grad()``
    whether the optimizer it wraps takes ``set_to_none``: ~250 µs a call on a busy 2-core
    machine (measured), more than the ``zero_grad`` itself. The answer is fixed once the
    optimizer exists; where it is yes, this optimizer's ``zero_grad`` is Accelerate's own branch
    for it, without the question (nothing while a window accumulates; ``set_to_none`` defaults
    to True)."""
    from accelerate.optimizer import AcceleratedOptimizer

    if not isinstance(optimizer, AcceleratedOptimizer):
        return
    if type(optimizer).zero_grad is not AcceleratedOptimizer.zero_grad:
        return  # a subclass with its own zero_grad: leave it be
    if "set_to_none" not in inspect.signature(optimizer.optimizer.zero_grad).parameters:
        return
    gradient_state = optimizer.gradient_state

    def zero_grad(set_to_none: bool | None = None) -> None:
        if gradient_state.sync_gradients:
            optimizer.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)

    optimizer.zero_grad = zero_grad


_REGISTRY: dict[str, type[Strategy]] = {}


def register(*names: str):
    """Class decorator: make a strategy findable by each of ``names`` (an alias costs one name)."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        for n in names:
            _REGISTRY[n] = cls
        return cls

    return wrap


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise StrategyUnavailable(
            f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}"
        ) from None
    return cls(**kwargs)
