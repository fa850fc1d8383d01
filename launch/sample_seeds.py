"""Random augmentation as a function of the sample, not of the worker that loads it.

A loader worker's random streams (torch, numpy, python ``random``) start from a per-worker
seed and advance with every sample it loads. A resumed epoch starts at a later sample, and the
samples land on other workers than before, so every augmentation after the resume point
differs; so does every augmentation of a run with another ``num_workers``. Here the sampler
yields keys ``(epoch, index)`` (:class:`EpochKeys`), and :class:`SeededSamples` seeds the three
streams from ``(seed, epoch, index)`` before it calls the dataset's ``__getitem__``: a sample's
crop, flip and noise are the same whichever worker loads it, at whatever point the epoch was
resumed, for any ``num_workers`` and any number of ranks. ``torch.initial_seed()`` inside
``__getitem__`` is the sample's seed, for code that builds generators of its own.

A dataset with a batched ``__getitems__`` (Hugging Face ``datasets``) is called once per batch,
seeded from the batch's first key: the batch is itself a function of ``(seed, epoch)``.

With ``num_workers=0`` the dataset runs in the training process: the streams are saved before
a batch's samples and put back after them, so dropout and everything else the training loop
draws is what it would have been without augmentation. Only the CPU generator is seeded: a
GPU's stream is never touched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, get_worker_info

_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed, distinct and well mixed for each ``(seed, epoch, index)`` (splitmix64)."""
    x = (
        seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index + 0x632BE59BD9B4E019
    ) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _seed_streams(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


#: The torchdata protocol a sampler (or its iterator) offers to have its position saved.
STATE_METHODS = ("state_dict", "load_state_dict")


class EpochKeys(Sampler):
    """``(epoch, index)`` for each index ``sampler`` yields (with ``batches``: a list of keys
    for each list of indices a batch sampler yields). ``epoch`` is set before each epoch; the
    first ``skip`` items of the next iteration are drawn from ``sampler`` and dropped.

    ``state_dict``/``load_state_dict`` of the sampler and of its iterator pass through, so that
    torchdata's ``StatefulDataLoader`` saves and restores them as it would without the keys.
    """

    def __init__(self, sampler: Any, *, batches: bool = False) -> None:
        self.sampler, self.batches = sampler, batches
        self.epoch = 0
        self.skip = 0

    def __iter__(self) -> Iterator:
        keys = _Keys(iter(self.sampler), self.epoch, self.batches)
        for _ in range(self.skip):
            next(keys.indices, None)
        self.skip = 0
        return keys

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        return _passed_through(self, "sampler", name)


class _Keys:
    """The iterator of :class:`EpochKeys`."""

    def __init__(self, indices: Iterator, epoch: int, batches: bool) -> None:
        self.indices, self.epoch, self.batches = indices, epoch, batches

    def __iter__(self) -> _Keys:
        return self

    def __next__(self) -> Any:
        item = next(self.indices)
        return [(self.epoch, i) for i in item] if self.batches else (self.epoch, item)

    def __getattr__(self, name: str) -> Any:
        return _passed_through(self, "indices", name)


def _passed_through(wrapper: Any, inner: str, name: str) -> Any:
    if name in STATE_METHODS and inner in wrapper.__dict__:
        return getattr(wrapper.__dict__[inner], name)
    raise AttributeError(name)


def _batched(dataset: Any) -> bool:
    """Whether ``dataset`` loads a batch in one call of its own (``Subset`` only passes the
    call through to the dataset it wraps)."""
    if isinstance(dataset, Subset):
        return _batched(dataset.dataset)
    return callable(getattr(dataset, "__getitems__", None))


class SeededSamples(Dataset):
    """The script's map-style dataset, called with its random streams seeded per sample.

    It takes the keys :class:`EpochKeys` yields; ``dataset`` is the script's own object.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self.batched = _batched(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        # DataLoader's fetcher calls this once per batch: in the training process the streams
        # are saved and restored once per batch, not per sample (numpy's take ~0.2 ms each).
        if get_worker_info() is not None:
            return self._load(keys)
        saved = torch.random.default_generator.get_state(), np.random.get_state(), random.getstate()
        try:
            return self._load(keys)
        finally:
            torch.random.default_generator.set_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])

    def _load(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        if self.batched and keys:
            epoch, first = keys[0]
            _seed_streams(sample_seed(self.seed, epoch, first))
            return list(self.dataset.__getitems__([i for _, i in keys]))
        out = []
        for epoch, index in keys:
            _seed_streams(sample_seed(self.seed, epoch, index))
            out.append(self.dataset[index])
        return out
