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

Cost: three Mersenne Twisters are initialised per sample, ~10 us together in a tight loop and
two to three times that between the samples of an epoch, whose work has evicted their code
and state from the caches. So the path is kept short: the generators' own seeding methods
(the public ``np.random.seed`` and ``random.seed`` check their arguments at more cost than
the seeding itself), and a batch's seeds derived in one loop. None is seeded lazily: whether a
sample draws from a stream is known only after it ran, and python's ``getstate``, the only way
to look, costs more than ``seed``. In the training process numpy's state is copied as bytes
(:class:`_NumpyState`), not through ``get_state``.
"""

from __future__ import annotations

import _random
import contextlib
import ctypes
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


#: The objects behind ``torch.rand``..., ``np.random.rand``... and ``random.random``...
_TORCH, _NUMPY, _PYTHON = torch.random.default_generator, np.random.mtrand._rand, random._inst


def _seed_streams(seed: int) -> None:
    # torch's CPU generator and numpy's are both MT19937 initialised from the seed's low 32
    # bits by the same algorithm: from one value they would draw the same words. numpy takes
    # the high half; python's ``random`` mixes all 64 bits by another algorithm.
    _TORCH.manual_seed(seed)
    if type(_NUMPY._bit_generator) is np.random.MT19937:
        _NUMPY.seed(seed >> 32)  # np.random.seed's own path; also drops a cached normal
    else:  # np.random.seed for another bit generator, without leaving a cached normal
        _NUMPY.set_state(type(_NUMPY._bit_generator)(seed >> 32).state)
    # random.seed(seed) without its argument checks, which take more than the seeding itself
    _random.Random.seed(_PYTHON, seed)
    _PYTHON.gauss_next = None


class _NumpyState:
    """Saves and restores numpy's global stream around a batch in the training process.

    ``np.random.get_state``/``set_state`` take ~0.3 ms (MT19937 copies its key one numpy
    scalar at a time). MT19937, numpy's default, is read and written here as the bytes of its
    state struct instead (624 key words and a position, at ``ctypes.state_address``; the
    layout is checked once against the public ``state``). The legacy normal cache
    (``has_gauss``) has no cheap reader: a probe draw takes the cached normal, if any, without
    moving the key, and only that case is put back through ``set_state``. Another bit
    generator takes the public path.
    """

    _SIZE = 624 * 4 + 4  # uint32_t key[624]; int pos

    def __init__(self) -> None:
        self._checked: tuple[Any, memoryview | None] = (None, None)

    def _struct(self) -> memoryview | None:
        """The bytes of the global MT19937's state; None for another bit generator."""
        bits = _NUMPY._bit_generator
        if bits is not self._checked[0]:
            view = None
            if type(bits) is np.random.MT19937:
                state = bits.state["state"]
                layout = state["key"].astype(np.uint32).tobytes() + np.intc(state["pos"]).tobytes()
                raw = (ctypes.c_char * self._SIZE).from_address(bits.ctypes.state_address)
                view = memoryview(raw).cast("B")
                view = view if view.tobytes() == layout else None
            self._checked = (bits, view)
        return self._checked[1]

    def save(self) -> Any:
        view = self._struct()
        if view is None:
            return _NUMPY.get_state(legacy=False)
        key = view.tobytes()
        normal = _NUMPY.standard_normal()  # the cached normal, or one drawn from the key
        return view, key, normal if view.tobytes() == key else None

    def restore(self, saved: Any) -> None:
        if isinstance(saved, dict):
            _NUMPY.set_state(saved)
            return
        view, key, normal = saved
        if normal is None:
            _NUMPY.seed(0)  # drops the normal the probe cached
            view[:] = key
        else:
            words = np.frombuffer(key, dtype=np.uint32, count=624)
            pos = int(np.frombuffer(key, dtype=np.intc, offset=624 * 4)[0])
            _NUMPY.set_state(("MT19937", words, pos, 1, normal))


_NUMPY_STATE = _NumpyState()


@contextlib.contextmanager
def _streams_kept() -> Iterator[None]:
    """The three streams as they were before the block, after it."""
    saved = _TORCH.get_state(), _NUMPY_STATE.save(), random.getstate()
    try:
        yield
    finally:
        _TORCH.set_state(saved[0])
        _NUMPY_STATE.restore(saved[1])
        random.setstate(saved[2])


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
        # are saved and restored once per batch, not per sample.
        if get_worker_info() is not None:
            return self._load(keys)
        with _streams_kept():
            return self._load(keys)

    def _load(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        if self.batched and keys:
            epoch, first = keys[0]
            _seed_streams(sample_seed(self.seed, epoch, first))
            return list(self.dataset.__getitems__([i for _, i in keys]))
        # The seeds first, in one loop: between samples its code would have left the caches.
        seeds = [sample_seed(self.seed, epoch, index) for epoch, index in keys]
        out = []
        for (_, index), seed in zip(keys, seeds, strict=True):
            _seed_streams(seed)
            out.append(self.dataset[index])
        return out
