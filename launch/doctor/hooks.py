"""The doctor's instruments, installed in a worker before the script runs.

``tlaunch doctor`` starts the workers with ``TLAUNCH_DOCTOR`` naming a findings folder; the
workers' ``sitecustomize`` then calls :func:`arm`, which waits for the script to import torch
(an import hook: nothing here imports torch on its own) and installs global hooks:

- every ``nn.Module`` forward (torch's global forward pre-/post-hooks): which modules run as
  roots under autograd (the models), Dropout/BatchNorm modes against the phase (autograd on or
  off), BatchNorm batch sizes, fp16 autocast;
- every ``Optimizer.step`` (torch's global step hooks): gradient norms, parameters outside
  every optimizer, parameters that never get a gradient, gradients left from the last step (a
  tensor hook on each parameter reads ``.grad`` when the first gradient of a new step
  arrives), the step time; after ``--steps`` real steps it writes what it saw and ends the
  process (exit 0);
- ``DataLoader`` construction and every batch fetched: loaders, fetch time, input statistics;
- ``GradScaler.scale`` and ``Tensor.backward``: whether a scaler is used, the loss.

The fixed-batch phase (``cannot-overfit``) is :mod:`tlaunch.doctor.fixed_batch`.
Observations go to ``rank-<RANK>.json`` in the findings folder (:data:`OBSERVATIONS`).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import time
import weakref
from typing import Any

from tlaunch.after_import import after_import

#: Settings the command writes into the findings folder for the workers.
SETTINGS_FILE = "settings.json"
#: Per-rank observations: ``rank-<RANK>.json``.
OBSERVATIONS = "rank-{rank}.json"
#: Batches whose inputs are summarised for ``unnormalized-inputs``.
INPUT_BATCHES = 5
#: Keys of a dict batch that hold the model's input.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "features")

_observer: Observer | None = None


class Done(BaseException):
    """Ends a script at its last step when the settings say ``"end": "raise"``: several
    scripts run one after another in one process (the tests' gallery); a worker exits."""


def arm(findings_dir: str) -> None:
    """Install the hooks as soon as torch is imported (at once if it already is). Armed
    again in the same process, the hooks stay and a new record starts in ``findings_dir``."""
    global _observer
    if _observer is not None:
        _observer.__init__(findings_dir)
        return
    _observer = Observer(findings_dir)
    after_import("torch", _observer.install)
    atexit.register(_observer.write)


class Observer:
    """Everything one worker measures, and the hooks that measure it."""

    def __init__(self, findings_dir: str) -> None:
        self.dir = findings_dir
        self.pid = os.getpid()
        with open(os.path.join(findings_dir, SETTINGS_FILE)) as f:
            self.settings = json.load(f)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.modules: weakref.WeakSet = weakref.WeakSet()  # every module constructed
        self.optimizers: list[Any] = []
        self.schedulers: list[Any] = []
        self.loaders: dict[int, dict] = {}  # id(dataset) -> what the loader was built with
        self.roots: dict[int, Any] = {}  # modules run at depth 0 under autograd
        self.ran: set[int] = set()  # modules run under autograd
        self.depth = 0
        self.main_optimizer: Any = None
        self.steps = 0  # optimizer steps of the main optimizer, both phases
        self.real_steps = 0
        self.grad_norms: list[float] = []
        self.with_grad: set[int] = set()
        self.after_step: set[int] = set()
        self.stale_steps: set[int] = set()
        self.hooked: set[int] = set()
        self.mode = {"eval_in_training": {}, "train_in_eval": {}}
        self.batchnorm: dict[str, dict] = {}
        self.fp16_forwards = 0
        self.scaler_calls = 0
        self.inputs: list[dict] = []
        self.fetch_pending = 0.0
        self.step_times: list[tuple[float, float]] = []  # (fetch seconds, step interval)
        self.last_step_end: float | None = None
        self.train_loader: int | None = None
        self.last_fetched: int | None = None
        self.static: dict[str, Any] = {}
        self.checkpoint: dict[str, float] | None = None
        self.fixed: Any = None  # the FixedBatch phase, once a loader gave a batch
        self.written = False

    # -- installation ------------------------------------------------------------------------
    def install(self) -> None:
        import torch
        import torch.nn.modules.module as module_hooks
        import torch.optim.lr_scheduler as lr_scheduler
        import torch.optim.optimizer as optimizer_hooks
        from torch.utils.data import DataLoader
        from torch.utils.data import dataloader as dl

        from tlaunch.doctor.fixed_batch import FixedBatch

        self.torch = torch
        self.fixed_batch_cls = FixedBatch
        module_hooks.register_module_forward_pre_hook(self._before_forward)
        module_hooks.register_module_forward_hook(self._after_forward)
        optimizer_hooks.register_optimizer_step_pre_hook(self._before_step)
        optimizer_hooks.register_optimizer_step_post_hook(self._after_step)
        # Through self at each call: arm() may start a new record with new containers.
        _after_init(torch.nn.Module, lambda m: self.modules.add(m))
        _after_init(torch.optim.Optimizer, lambda o: self.optimizers.append(o))
        _after_init(lr_scheduler.LRScheduler, lambda s: self.schedulers.append(s))
        _after_init(DataLoader, lambda loader: self._loader_built(loader))
        next_batch = dl._BaseDataLoaderIter.__next__
        dl._BaseDataLoaderIter.__next__ = lambda it: self._next(it, next_batch)
        scale = torch.amp.GradScaler.scale

        def counted_scale(scaler, outputs):
            self.scaler_calls += 1
            return scale(scaler, outputs)

        torch.amp.GradScaler.scale = counted_scale
        backward = torch.Tensor.backward

        def recorded_backward(tensor, *args, **kwargs):
            if self.fixed is not None and tensor.numel() == 1:
                self.fixed.record_loss(float(tensor.detach()))
            return backward(tensor, *args, **kwargs)

        torch.Tensor.backward = recorded_backward

    # -- forward ----------------------------------------------------------------------------
    def _before_forward(self, module, args) -> None:
        torch = self.torch
        training = torch.is_grad_enabled()
        if training:
            self.ran.add(id(module))
            if self.depth == 0:
                self.roots.setdefault(id(module), module)
                if any(_fp16_autocast(torch, d) for d in ("cpu", "cuda")):
                    self.fp16_forwards += 1
        self.depth += 1
        nn = torch.nn
        dropout = isinstance(module, nn.modules.dropout._DropoutNd)
        norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if not (dropout or norm):
            return
        if training and not module.training:
            trainable = dropout or any(p.requires_grad for p in module.parameters())
            if trainable:
                _count(self.mode["eval_in_training"], module)
        elif not training and module.training:
            _count(self.mode["train_in_eval"], module)
        if norm and training and module.training and args and hasattr(args[0], "shape"):
            sync = isinstance(module, nn.SyncBatchNorm)
            seen = self.batchnorm.setdefault(
                str(id(module)), {"batch": args[0].shape[0], "sync": sync, "module": module}
            )
            seen["batch"] = min(seen["batch"], int(args[0].shape[0]))

    def _after_forward(self, module, args, output) -> None:
        self.depth = max(0, self.depth - 1)

    # -- optimizer steps --------------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.main_optimizer is None:
            self.main_optimizer, self.train_loader = optimizer, self.last_fetched
            self.static = self._static_checks()
        for p in self._trainable():
            if p.grad is not None and bool(p.grad.ne(0).any()):
                self.with_grad.add(id(p))
        if optimizer is not self.main_optimizer:
            return
        norms = [p.grad.detach().float().norm() for p in _params(optimizer) if p.grad is not None]
        total = float(self.torch.stack(norms).norm()) if norms else 0.0
        self.grad_norms.append(total if math.isfinite(total) else float("inf"))
        for p in _params(optimizer):
            if id(p) not in self.hooked and p.requires_grad:
                self.hooked.add(id(p))
                p.register_hook(lambda grad, p=p: self._first_grad(p, grad))

    def _first_grad(self, p, grad):
        if id(p) in self.after_step:
            self.after_step.discard(id(p))
            if p.grad is not None and bool(p.grad.ne(0).any()):
                self.stale_steps.add(self.steps)
        return grad

    def _after_step(self, optimizer, args, kwargs) -> None:
        if optimizer is not self.main_optimizer:
            return
        self.steps += 1
        self.after_step = {id(p) for p in _params(optimizer)}
        now = time.perf_counter()
        if self.fixed is not None and self.fixed.active:
            self.fixed.step_done()
            self.last_step_end = None
            return
        self.real_steps += 1
        if self.last_step_end is not None:
            self.step_times.append((self.fetch_pending, now - self.last_step_end))
        self.fetch_pending, self.last_step_end = 0.0, now
        if self.real_steps >= self.settings["steps"]:
            self.finish()

    def finish(self) -> None:
        """Enough steps: record, measure a checkpoint (rank 0), leave with exit 0."""
        if self.rank == 0:
            self.checkpoint = self._measure_checkpoint()
        self.write()
        if self.settings.get("end") == "raise":
            raise Done
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    # -- data -------------------------------------------------------------------------------
    def _loader_built(self, loader) -> None:
        self.loaders[id(loader.dataset)] = {
            "num_workers": loader.num_workers,
            "pin_memory": bool(loader.pin_memory),
            "batch_size": loader.batch_size,
            "shuffle": _shuffles(loader),
            "kind": type(loader.dataset).__name__,
        }

    def _next(self, it, next_batch):
        key = self.last_fetched = id(it._dataset)
        if self.fixed is not None and self.fixed.owns(key):
            return self.fixed.next()
        started = time.perf_counter()
        batch = next_batch(it)
        took = time.perf_counter() - started
        if len(self.inputs) < INPUT_BATCHES:
            summary = _input_summary(self.torch, batch)
            if summary:
                self.inputs.append(summary)
        if (
            self.fixed is None
            and self.steps == 0
            and self.settings["overfit_steps"] > 0
            and self.torch.is_grad_enabled()  # an evaluation loop's fetch is not training's
        ):
            self.fixed = self.fixed_batch_cls(self, key, batch, self.settings["overfit_steps"])
            return self.fixed.next()
        self.fetch_pending += took
        return batch

    # -- what is checked once, at the first step --------------------------------------------
    def _trainable(self):
        seen = set()
        for root in self.roots.values():
            for p in root.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _names(self) -> dict[int, str]:
        names = {}
        for root in self.roots.values():
            label = type(root).__name__
            for name, p in root.named_parameters():
                names.setdefault(id(p), f"{label}.{name}")
            for name, m in root.named_modules():
                names.setdefault(id(m), f"{label}.{name}" if name else label)
        return names

    def _static_checks(self) -> dict[str, Any]:
        names = self._names()
        optimized = {id(p) for opt in self.optimizers for p in _params(opt)}
        missing = [p for p in self._trainable() if id(p) not in optimized]
        return {
            "not_optimized": [names.get(id(p), "?") for p in missing],
            "not_optimized_numel": sum(p.numel() for p in missing),
            "unregistered": self._unregistered(names),
        }

    def _unregistered(self, names: dict[int, str]) -> list[dict]:
        """Modules held in a plain list/tuple/dict attribute, run under autograd, and invisible
        to their root's ``parameters()``."""
        nn, found = self.torch.nn, []
        for root in self.roots.values():
            inside = {id(m) for m in root.modules()}
            for owner in root.modules():
                for attr, value in vars(owner).items():
                    if not isinstance(value, (list, tuple, dict)):
                        continue
                    items = value.values() if isinstance(value, dict) else value
                    hidden = [
                        m
                        for m in items
                        if isinstance(m, nn.Module) and id(m) not in inside and id(m) in self.ran
                    ]
                    if hidden:
                        found.append(
                            {
                                "attribute": f"{names.get(id(owner), '?')}.{attr}",
                                "container": type(value).__name__,
                                "modules": len(hidden),
                                "parameters": sum(
                                    p.numel() for m in hidden for p in m.parameters()
                                ),
                            }
                        )
        return found

    def _measure_checkpoint(self) -> dict[str, float] | None:
        if not self.roots:
            return None
        state = {
            "models": [m.state_dict() for m in self.roots.values()],
            "optimizers": [o.state_dict() for o in self.optimizers],
        }
        path = os.path.join(self.dir, "checkpoint-probe.pt")
        started = time.perf_counter()
        with open(path, "wb") as f:
            self.torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - started
        size = os.path.getsize(path)
        os.remove(path)
        return {"bytes": size, "seconds": seconds}

    # -- the record -------------------------------------------------------------------------
    def write(self) -> None:
        """``rank-<RANK>.json``: once, from the worker itself (not its loader workers)."""
        if self.written or os.getpid() != self.pid or not hasattr(self, "torch"):
            return
        self.written = True
        if self.rank == 0 and self.checkpoint is None and self.steps:
            self.checkpoint = self._measure_checkpoint()  # the script ended before --steps
        names = self._names() if self.roots else {}
        trainable = list(self._trainable())
        record = {
            "rank": self.rank,
            "world_size": self.world,
            "steps": self.steps,
            "real_steps": self.real_steps,
            "cuda": bool(self.torch.cuda.is_available()),
            "cpus": os.cpu_count(),
            "models": [type(m).__name__ for m in self.roots.values()],
            "optimizers": len(self.optimizers),
            "grad_norms": self.grad_norms,
            "stale_steps": sorted(self.stale_steps),
            "unused": [names.get(id(p), "?") for p in trainable if id(p) not in self.with_grad]
            if self.steps
            else [],
            "modes": {
                phase: [{"module": names.get(k, n), "forwards": c} for k, (n, c) in seen.items()]
                for phase, seen in self.mode.items()
            },
            "batchnorm": [
                {"module": names.get(id(b["module"]), "?"), "batch": b["batch"], "sync": b["sync"]}
                for b in self.batchnorm.values()
            ],
            "fp16_forwards": self.fp16_forwards,
            "scaler_calls": self.scaler_calls,
            "inputs": self.inputs,
            "step_times": self.step_times,
            "loaders": self.loaders,
            "train_loader": str(self.train_loader) if self.train_loader is not None else None,
            "overfit": self.fixed.record() if self.fixed is not None else None,
            "checkpoint": self.checkpoint,
            **self.static,
        }
        record["loaders"] = {str(k): v for k, v in self.loaders.items()}
        path = os.path.join(self.dir, OBSERVATIONS.format(rank=self.rank))
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)


def _after_init(cls, record) -> None:
    """``record(obj)`` after every ``cls(...)`` (subclasses included: they call this through
    ``super().__init__``) has run ``cls``'s own ``__init__``."""
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        record(self)

    cls.__init__ = __init__


def _params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _count(seen: dict, module) -> None:
    name, count = seen.get(id(module), (type(module).__name__, 0))
    seen[id(module)] = (name, count + 1)


def _fp16_autocast(torch, device: str) -> bool:
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def _shuffles(loader) -> bool | None:
    """Does the loader's sampler shuffle: True, False, or None when a custom one decides."""
    from torch.utils.data import RandomSampler, SequentialSampler

    sampler = loader.sampler
    for _ in range(4):
        if isinstance(sampler, RandomSampler):
            return True
        if isinstance(sampler, SequentialSampler):
            return False
        if isinstance(getattr(sampler, "shuffle", None), bool):
            return sampler.shuffle
        sampler = getattr(sampler, "sampler", None)
        if sampler is None:
            return None
    return None


def _input_summary(torch, batch) -> dict | None:
    """Per-feature mean and std of a batch's input tensor (floating point only)."""
    x = batch
    if isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
    elif isinstance(batch, dict):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        return None
    if x.shape[0] < 2:
        return None
    features = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
    mean, std = features.mean(dim=1), features.std(dim=1)
    return {
        "shape": list(x.shape),
        "max_abs_mean": float(mean.abs().max()),
        "max_std": float(std.max()),
        "min": float(x.min()),
        "max": float(x.max()),
    }
