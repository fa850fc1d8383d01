"""Evaluation passes: ``run.eval_batches(loader)`` and what follows each pass.

::

    for epoch in run.epochs(10):
        for x, y in run.batches(train_loader):
            ...
        for x, y in run.eval_batches(val_loader):   # the DataLoader itself, not prepared
            run.log(val_loss=F.cross_entropy(model(x), y), reduce=True)

A pass shards the loader over the ranks without padding: rank ``r`` takes every ``world``-th
sample of the loader's order, so each sample is evaluated once and none twice (torch's
``DistributedSampler`` repeats samples to even the shards, which would count them twice). The
shards may then differ by a sample, and by a batch: nothing in a pass is a collective. (An
IterableDataset or a batch sampler of the script's own has no indices to share: its batches
are dealt out in turn instead, each rank drawing them all.) A
``run.log(..., reduce=True)`` inside the pass is not averaged on the spot but summed on this
rank, weighted by the samples it covers (the batch's samples for a number or a scalar tensor,
one per element for a tensor of per-sample values); at the end of the pass one gather adds the
ranks' sums and logs the average over samples: the value one process would compute over the
whole set. ``reduce=False`` values are logged as they come.

During the pass every prepared model is in eval mode (each gets its own previous mode back
after, also when the loop raises or breaks) and autograd is off through ``torch.no_grad``.
Not ``torch.inference_mode``: tensors made under it can never enter autograd later, so a
script that caches an output, or a module that updates a buffer in place, fails after the
pass with an error far from its cause; the extra speed of inference mode is small on the
models tlaunch trains. A pass counts no optimizer step, and no step-based save or stop happens
inside it. Its loader gets a generator of its own, so a pass draws nothing from the random
streams training uses: evaluating more or less often leaves the training run unchanged.

Cadence: without ``--val-every-*`` every call evaluates. ``--val-every-epochs N`` evaluates in
epochs N-1, 2N-1, ... (the N-th, 2N-th, ...); ``--val-every-steps N`` evaluates when the
step count is a multiple of N, once per step (call it inside the batch loop). A call that is
not an evaluation point yields nothing; ``run.should_evaluate`` tells a script that computes
more than ``run.log`` around the loop. ``--limit-val-batches`` takes the first N batches of
the set (or a fraction of them), counted as one process would batch it.

After each pass (rank 0 decides, every rank follows): ``--early-stop`` counts the evaluation
(:mod:`tlaunch.early_stop`), and when the pass logged the ``--monitor`` metric a checkpoint is
saved at the end of that step's batch (a pass inside the batch loop, after the optimizer step)
or of the epoch (a pass after the batch loop), so the metric it records was measured on its
weights. A checkpoint saved at
another step records no ``--monitor`` value (:meth:`Evaluation.checkpoint_metrics`), so
keep-best and ``best`` never rank weights by a score measured on others.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from tlaunch.early_stop import EarlyStopping
from tlaunch.loader_workers import ShieldedInit
from tlaunch.loop_parts import batch_len
from tlaunch.sampling import _LOADER_ARGS

#: The name the early-stopping state is saved under in a checkpoint.
EARLY_STOP_STATE = "early_stopping"


class _Indices(Sampler[int]):
    """A fixed list of dataset indices, in order: one rank's share of an evaluation set."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_indices(order: list[int], *, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of ``order``: every ``world``-th sample from its own, no padding."""
    return order[rank::world]


def val_batch_limit(total: int, limit: float | None) -> int:
    """Batches evaluated out of ``total`` under ``--limit-val-batches`` (a count, or a fraction)."""
    if limit is None:
        return total
    if limit > 1:
        return min(total, int(limit))
    return max(1, int(total * limit)) if total else 0


class _Sums:
    """The ``reduce=True`` values of one pass on this rank: sum of value x samples, samples."""

    def __init__(self) -> None:
        self.totals: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.logged: set[str] = set()  # every name logged in the pass, reduced or not

    def add(self, name: str, value: Any, samples: int) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.dim():  # per-sample values: each element counts once
                samples = value.numel()
                value = value.to(torch.float64).sum()
            else:
                value = value.to(torch.float64) * samples
        else:
            value = float(value) * samples
        # Device tensors are added on the device and read once, at the end of the pass.
        self.totals[name] = self.totals.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + samples
        self.logged.add(name)

    def local(self) -> tuple[dict[str, tuple[float, int]], list[str]]:
        sums = {k: (float(v), self.counts[k]) for k, v in self.totals.items()}
        return sums, sorted(self.logged)


def _hold_buffer_sync(models: list[Any]) -> list[Any]:
    """Give every rank rank 0's buffers (BatchNorm statistics) now, once, and keep DDP from
    doing it in the pass's first forward: that broadcast is a collective, and a rank whose
    shard is shorter (or empty) would leave the others waiting in it. Returns the models
    whose sync is held until the pass ends (the next training forward syncs as it would have).
    """
    from torch.nn.parallel import DistributedDataParallel

    held = []
    for m in models:
        if (
            isinstance(m, DistributedDataParallel)
            and m.broadcast_buffers
            and m.require_forward_param_sync
        ):
            for buffer in m.module.buffers():
                torch.distributed.broadcast(buffer.data, 0, group=m.process_group)
            m.require_forward_param_sync = False
            held.append(m)
    return held


class Evaluation:
    """The Run's evaluation passes, the ``--monitor`` rule for checkpoints, and early stopping."""

    def __init__(self, run: Any) -> None:
        self.run = run
        config = run.config
        self.config = config
        self._pass: _Sums | None = None
        self._batch_samples = 0
        self._shards: dict[int, tuple[DataLoader, DataLoader]] = {}
        self._evaluated_step: int | None = None
        self._scored_step: int | None = None
        self.passes = 0
        #: The step at which each metric was last logged: a checkpoint records the --monitor
        #: value only when it was measured at the checkpoint's own step.
        self.logged_at: dict[str, int] = dict.fromkeys(run._metrics.latest(), run.step)
        self.early: EarlyStopping | None = None
        if config.early_stop:
            self.early = EarlyStopping(
                config.early_stop, patience=config.patience, mode=config.mode,
                min_delta=config.min_delta,
            )  # fmt: skip
            run.checkpoints.register(EARLY_STOP_STATE, self.early)

    # -- when ------------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether a pass started now evaluates (``--val-every-epochs`` / ``--val-every-steps``)."""
        config, pos = self.config, self.run.position
        if config.val_every_steps:
            return (
                pos.step > 0
                and pos.step % config.val_every_steps == 0
                and pos.step != self._evaluated_step
            )
        if config.val_every_epochs:
            return (pos.epoch + 1) % config.val_every_epochs == 0
        return True

    @property
    def stopped(self) -> bool:
        """Early stopping ended the run (the same on every rank)."""
        return self.early is not None and self.early.stopped

    # -- the pass --------------------------------------------------------------------------
    def batches(self, loader: Any) -> Iterator[Any]:
        """This rank's share of ``loader`` for one evaluation pass (see the module docstring)."""
        run = self.run
        if id(loader) in run._loaders:
            raise ValueError(
                "run.eval_batches(loader) got a loader that was passed to run.prepare, which "
                "makes it a training loader (padded shards, its position saved); pass the "
                "evaluation DataLoader to run.eval_batches without preparing it"
            )
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"run.eval_batches needs a torch DataLoader, got {type(loader).__name__}"
            )
        if self._pass is not None:
            raise RuntimeError("run.eval_batches: a pass is already running; finish it first")
        if not self.due():
            return
        self._evaluated_step = run.position.step
        batches, total = self._rank_batches(loader)
        models = [(m, m.training) for m in run._models]
        self._pass = _Sums()
        finished = False
        bar = run._progress.bar(total, 0, f"eval (step {run.position.step})")
        held = _hold_buffer_sync(run._models)
        try:
            for m, _ in models:
                m.eval()
            with torch.no_grad():
                for batch in batches:
                    self._batch_samples = batch_len(batch)
                    yield run._to_device(batch)
                    bar.update(run.position.step, run._metrics)
            finished = True
        finally:
            bar.close()
            sums, self._pass = self._pass, None
            for m, mode in models:
                m.train(mode)
            for m in held:
                m.require_forward_param_sync = True
        if finished:
            self._end_pass(sums)

    def _rank_batches(self, loader: DataLoader) -> tuple[Iterator[Any], int | None]:
        """This rank's batches of ``loader`` under the batch limit, and how many (if known)."""
        run = self.run
        rank, world, limit = run.rank, run.world_size, self.config.limit_val_batches
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
            # No indices to share (an IterableDataset, a batch sampler of the script's own):
            # whole batches are dealt out in turn; every rank draws them all.
            try:
                total: int | None = val_batch_limit(len(loader), limit)
            except TypeError:
                total = None if limit is None or limit <= 1 else int(limit)

            def dealt() -> Iterator[Any]:
                for i, batch in enumerate(loader):
                    if total is not None and i >= total:
                        return
                    if i % world == rank:
                        yield batch

            mine = None if total is None else len(range(rank, total, world))
            return dealt(), mine
        if id(loader) not in self._shards:  # the loader is kept: its id stays its own
            self._shards[id(loader)] = (loader, self._shard(loader))
        shard = self._shards[id(loader)][1]
        return iter(shard), len(shard)

    def _shard(self, loader: DataLoader) -> DataLoader:
        """A DataLoader with ``loader``'s settings over this rank's share of its samples."""
        run = self.run
        if isinstance(loader.sampler, (SequentialSampler, RandomSampler)):
            order = list(range(len(loader.dataset)))  # a metric does not depend on the order
        else:
            with torch.random.fork_rng(devices=[]):  # the training streams stay untouched
                order = list(loader.sampler)
        size = loader.batch_size
        keep = val_batch_limit(math.ceil(len(order) / size), self.config.limit_val_batches)
        order = order[: keep * size]
        mine = shard_indices(order, rank=run.rank, world=run.world_size)
        kwargs = {k: getattr(loader, k) for k in _LOADER_ARGS if hasattr(loader, k)}
        kwargs["drop_last"] = False  # every sample counts, the last short batch too
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
            kwargs["worker_init_fn"] = ShieldedInit(loader.worker_init_fn)
        else:
            kwargs.pop("persistent_workers", None)
        # Its own generator: a pass draws nothing from the streams training uses.
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=_Indices(mine),
            generator=generator,
            **kwargs,
        )

    def capture(self, reduce: bool, metrics: dict[str, Any]) -> dict[str, Any]:
        """``run.log``'s values: inside a pass the ``reduce=True`` ones are kept for the end of
        the pass; returns the values to log now. Records the step of each logged name."""
        step = self.run.position.step
        if self._pass is None:
            self.logged_at.update(dict.fromkeys(metrics, step))
            return metrics
        self._pass.logged.update(metrics)
        if not reduce:
            self.logged_at.update(dict.fromkeys(metrics, step))
            return metrics
        for name, value in metrics.items():
            self._pass.add(name, value, self._batch_samples)
        return {}

    def _end_pass(self, sums: _Sums) -> None:
        """Every rank: add the ranks' sums and log the averages, then early stopping and the
        save of the scored weights."""
        run = self.run
        self.passes += 1
        mine = sums.local()
        everyone = run.strategy.gather_object(run.accelerator, mine)
        totals: dict[str, list[float]] = {}
        names: set[str] = set()
        for rank_sums, rank_names in everyone:
            names.update(rank_names)
            for name, (total, count) in rank_sums.items():
                acc = totals.setdefault(name, [0.0, 0])
                acc[0] += total
                acc[1] += count
        values = {name: t / c for name, (t, c) in sorted(totals.items()) if c}
        step = run.position.step
        if values:
            run._metrics.add(step, run.position.epoch, values)
            self.logged_at.update(dict.fromkeys(values, step))
        if self.early is not None and self.early.metric in names:
            self._count_evaluation()
        if self.config.monitor in names:
            self._scored_step = step  # saved at this step's boundary: see save_due

    def _count_evaluation(self) -> None:
        """Rank 0 counts this evaluation; every rank takes its decision (one broadcast)."""
        run, early = self.run, self.early
        assert early is not None
        pos = run.position
        if run.is_main:
            value = run._metrics.latest().get(early.metric)
            early.update(value, step=pos.step, epoch=pos.epoch)
        state = run.strategy.broadcast_object(run.accelerator, early.state_dict())
        early.load_state_dict(state)
        if early.stopped and run.is_main:
            import sys

            print(f"tlaunch: {early.reason()}", file=sys.stderr, flush=True)

    # -- what a checkpoint records ---------------------------------------------------------
    def save_due(self) -> bool:
        """A pass logged --monitor at this step: the Run saves at the step's boundary (the end
        of the batch, or of the epoch), where a resume continues exactly, and not inside the
        loop's body, where the batch just trained on would be trained on again. Asked once:
        a pass whose step has passed without a boundary is not saved."""
        due = self._scored_step is not None and self._scored_step == self.run.position.step
        self._scored_step = None
        return due

    def checkpoint_metrics(self, latest: dict[str, float], step: int) -> dict[str, float]:
        """The metrics a checkpoint at ``step`` records: the --monitor value only when it was
        measured at ``step``, on the weights being saved."""
        monitor = self.config.monitor
        if not monitor or monitor not in latest or self.logged_at.get(monitor) == step:
            return latest
        return {k: v for k, v in latest.items() if k != monitor}
