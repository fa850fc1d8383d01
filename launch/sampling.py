"""Data order that a resumed run can reproduce exactly.

Exact resume needs the order of an epoch to be a function of ``(seed, epoch)`` alone, skipping
to be done on sample indices (no batch is loaded to be thrown away), and the DataLoader to own
its ``generator``: creating a DataLoader iterator draws the workers' base seed from the global
torch RNG unless the loader has a generator of its own, and a resumed run creates its iterator
mid-epoch, so without one every later random number (dropout masks, augmentations) shifts.
The random numbers a dataset draws in ``__getitem__`` are seeded per sample on top of that
(:mod:`tlaunch.sample_seeds`), so that they do not depend on the loader's workers either.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from tlaunch.loader_workers import ShieldedInit, stops_held
from tlaunch.sample_seeds import EpochKeys, SeededSamples

_LOADER_ARGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "drop_last",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def _mix(seed: int, epoch: int) -> int:
    # Distinct, stable streams per (seed, epoch); the constant keeps seed+1/epoch-1 apart.
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63 - 1)


class ResumableSampler(Sampler[int]):
    """This rank's indices for one epoch, shuffled from ``(seed, epoch)``, starting at ``start``.

    Sharding follows ``DistributedSampler`` (pad to a multiple of the world size, rank ``r``
    takes every ``world``-th index), so a run keeps its order when moved onto this sampler.
    """

    def __init__(
        self, size: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(size / world) if size else 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        pad = self.num_samples * self.world - self.size
        if pad and order:
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _shuffle_and_seed(loader: DataLoader, seed: int) -> tuple[bool, int] | None:
    """(shuffle, seed) of a loader whose order we can reproduce, or None for a custom sampler."""
    if loader.batch_sampler is not None and type(loader.batch_sampler).__name__ != "BatchSampler":
        return None
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        return True, seed
    if isinstance(sampler, SequentialSampler):
        return False, seed
    if isinstance(sampler, DistributedSampler):
        return sampler.shuffle, sampler.seed
    return None


class ResumableLoader:
    """A DataLoader rebuilt on a :class:`ResumableSampler` with its own generator, whose
    samples are loaded with random streams seeded per sample (:mod:`tlaunch.sample_seeds`).

    ``iterate(epoch, start_batch)`` yields the epoch's batches from ``start_batch`` without
    loading the skipped ones. A loader with a custom sampler is iterated as given, and the
    skipped batches are drawn and dropped (exact only if that sampler is deterministic).
    """

    def __init__(self, loader: DataLoader, *, seed: int, rank: int, world: int) -> None:
        self.original = loader
        self.batch_size = loader.batch_size
        spec = _shuffle_and_seed(loader, seed)
        self.sampler: ResumableSampler | None = None
        if spec is None:
            warnings.warn(
                "this DataLoader has a custom sampler: a resumed run replays the skipped batches "
                "through it, and resume is exact only if its order is deterministic",
                stacklevel=3,
            )
            self.loader = loader
            return
        shuffle, data_seed = spec
        self.sampler = ResumableSampler(
            len(loader.dataset), shuffle=shuffle, seed=data_seed, rank=rank, world=world
        )
        self.generator = torch.Generator()
        kwargs = {k: getattr(loader, k) for k in _LOADER_ARGS if hasattr(loader, k)}
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
            kwargs["worker_init_fn"] = ShieldedInit(loader.worker_init_fn)
        else:
            kwargs.pop("persistent_workers", None)
        self.loader = DataLoader(
            SeededSamples(loader.dataset, seed),
            batch_size=loader.batch_size,
            sampler=EpochKeys(self.sampler),
            generator=self.generator,
            **kwargs,
        )

    def __len__(self) -> int:
        if self.sampler is None:
            return len(self.loader)
        n, b = self.sampler.num_samples, self.batch_size or 1
        return n // b if self.loader.drop_last else math.ceil(n / b)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator:
        if self.sampler is None:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(epoch)
            it = iter(self.loader)
            for _ in range(start_batch):
                next(it, None)
            return it
        self.sampler.set_epoch(epoch, start=start_batch * (self.batch_size or 1))
        # Worker seeds come from this generator: same (seed, epoch) -> same seeds, mid-epoch too.
        self.generator.manual_seed(_mix(self.sampler.seed, epoch) ^ 0x5EED)
        with stops_held():  # workers start shielded (tlaunch.loader_workers)
            return iter(self.loader)
