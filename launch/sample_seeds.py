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

Cost: a Mersenne Twister of 624 words is initialised per stream and sample, ~2-5 us each in a
tight loop and several times that between the samples of an epoch, whose work has evicted
their code and 2.5 KB states from the caches; so has it any other code run between samples.
So torch's stream, which torchvision's transforms draw from, is seeded for every sample by its
own method and nothing else runs between two samples; numpy's and python's are seeded only
once a sample has drawn from them (:class:`_Streams`, which looks once per batch): a
torchvision pipeline pays for one stream. With torch's own ``collate_fn`` nothing draws after
a batch, and the other two streams are not seeded at all; another ``collate_fn`` (mixup) finds
them seeded from the batch's last sample. The seeding calls are the generators' own (the
public ``np.random.seed`` and ``random.seed`` check their arguments at more cost than the
seeding itself), and a batch's seeds are derived in one loop. In the training process numpy's
state is copied as bytes (:class:`_NumpyState`), not through ``get_state``.
"""

from __future__ import annotations

import _random
import ctypes
import itertools
import mmap
import random
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    ConcatDataset,
    Dataset,
    Sampler,
    StackDataset,
    Subset,
    TensorDataset,
    get_worker_info,
)

_MASK = (1 << 64) - 1
#: A ``RandomState``'s legacy normal cache when empty: ``has_gauss = 0``, ``gauss = 0.0``.
_NO_NORMAL = bytes(16)


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


def _seed_torch(seed: int) -> None:
    _TORCH.manual_seed(seed)


def _seed_numpy(seed: int) -> None:
    # torch's CPU generator and numpy's are both MT19937 initialised from the seed's low 32
    # bits by the same algorithm: from one value they would draw the same words. numpy takes
    # the high half; python's ``random`` mixes all 64 bits by another algorithm.
    bits = _NUMPY._bit_generator
    if type(bits) is not np.random.MT19937:  # np.random.seed, without a cached normal left
        _NUMPY.set_state(type(bits)(seed >> 32).state)
        return
    cache = _NUMPY_STATE.normal_cache()
    if cache is None:
        _NUMPY.seed(seed >> 32)  # np.random.seed's own path; also drops a cached normal
    else:  # the same, without the checks around it that cost three times the seeding
        bits._legacy_seeding(seed >> 32)
        cache[:] = _NO_NORMAL


def _seed_python(seed: int) -> None:
    # random.seed(seed) without its argument checks, which take more than the seeding itself
    _random.Random.seed(_PYTHON, seed)
    _PYTHON.gauss_next = None


def _seed_streams(seed: int) -> None:
    """Seeds the three streams from a sample's seed, as the public seed functions would."""
    _seed_torch(seed)
    _seed_numpy(seed)
    _seed_python(seed)


def _struct_view(address: int, expected: bytes) -> memoryview | None:
    """The bytes at ``address``, writable, if they read as ``expected`` (a layout check
    against the public state), else None."""
    raw = (ctypes.c_char * len(expected)).from_address(address)
    view = memoryview(raw).cast("B")
    return view if view.tobytes() == expected else None


def _python_struct() -> memoryview | None:
    """The state of python's ``random`` as bytes: CPython's ``RandomObject`` is the object
    header, ``int index``, ``uint32_t state[624]``."""
    _, (*words, index), _ = _PYTHON.getstate()
    expected = struct.pack("=i624I", index, *words)
    return _struct_view(id(_PYTHON) + object.__basicsize__, expected)


def _numpy_struct() -> memoryview | None:
    """The state of numpy's global MT19937 as bytes (``uint32_t key[624]; int pos``); None for
    another bit generator."""
    bits = _NUMPY._bit_generator
    if type(bits) is not np.random.MT19937:
        return None
    state = bits.state["state"]
    expected = state["key"].astype(np.uint32).tobytes() + np.intc(state["pos"]).tobytes()
    return _struct_view(bits.ctypes.state_address, expected)


def _legacy_normal_offset() -> int | None:
    """Where a ``RandomState`` keeps its cached normal (``int has_gauss`` and, 8 bytes on,
    ``double gauss``): the one place in two probe objects that holds the normal each has
    cached, known from a twin drawing it. None if not found once in each."""
    size = np.random.RandomState.__basicsize__
    offsets = set()
    for seed in (7, 8):
        probe, twin = np.random.RandomState(seed), np.random.RandomState(seed)
        probe.standard_normal(), twin.standard_normal()
        pattern = struct.pack("=i4xd", 1, twin.standard_normal())
        raw = ctypes.string_at(id(probe), size)
        found = {o for o in range(0, size - 15, 8) if raw[o : o + 16] == pattern}
        if len(found) != 1:
            return None
        offsets |= found
    return offsets.pop() if len(offsets) == 1 else None


def _word_reader(view: memoryview, first: int, second: int) -> Any:
    """A reader of the 32-bit words at byte offsets ``first`` and ``second`` of ``view``."""
    words = view.cast("I")
    first, second = first // 4, second // 4
    return lambda: (words[first], words[second])


class _Streams:
    """Seeds a sample's streams: torch's always; numpy's and python's once a sample drew from
    them.

    A dataset built on torchvision draws from torch's generator only, and seeding the other
    two would cost twice as much again (their 5 KB of state is cold between samples). So
    numpy's and python's streams are left as they are for a batch's samples, their cached
    normals dropped so that any draw moves their position, and their position is read after
    the batch (two words of their state: python's ``getstate`` would cost more than the
    seeding). A batch that moved one has drawn from a stream not seeded for its samples: the
    stream is seeded for every sample of this dataset from then on, and the batch is loaded
    again (once per dataset and stream). After the batch, for a ``collate_fn`` that may draw,
    a stream no sample drew from is seeded from the last sample's seed: what it draws is what
    it would be were every stream seeded for every sample.

    Each :class:`SeededSamples` has its own: what one dataset draws from says nothing of
    another's. What a worker learns is written to a page shared with the process it was forked
    from (``learned``), and so with the workers forked after it: without ``persistent_workers``
    every epoch starts new workers, and each would otherwise load its first batch twice.
    Workers that are spawned get what the training process knew when it pickled the dataset.
    """

    def __init__(self, numpy_used: bool = False, python_used: bool = False) -> None:
        self.numpy_reader: Any = None  # (the bit generator checked, its reader)
        self.python_reader: Any = None
        self.numpy_used, self.python_used = numpy_used, python_used
        self.marks: tuple[Any, Any] = (None, None)
        # numpy's, python's stream used; anonymous mappings are shared across fork()
        self.learned = mmap.mmap(-1, 2)
        self.learned[:] = bytes((numpy_used, python_used))

    def known(self) -> tuple[bool, bool]:
        """Whether numpy's and python's streams are known to be drawn from, here or by a
        worker forked from here."""
        return self.numpy_used or bool(self.learned[0]), self.python_used or bool(self.learned[1])

    def start(self, seed: int) -> None:
        """Before a batch: the streams not yet known to be used marked, their cached normals
        dropped so that any draw moves their position. Not seeded: should a sample draw from
        one, the batch is loaded again with it seeded, and torch's is seeded per sample."""
        self.numpy_used, self.python_used = self.known()
        if not self.numpy_used:
            bits = _NUMPY._bit_generator
            if self.numpy_reader is None or self.numpy_reader[0] is not bits:
                view = _NUMPY_STATE._struct()  # the key's first word and the position
                self.numpy_reader = (bits, view and _word_reader(view, 0, 624 * 4))
            self.numpy_used = self.numpy_reader[1] is None  # no reader: seeded for every sample
            if not self.numpy_used:
                cache = _NUMPY_STATE.normal_cache()
                if cache is None:
                    _seed_numpy(seed)  # drops the cached normal
                else:
                    cache[:] = _NO_NORMAL
        if not self.python_used:
            if self.python_reader is None:
                view = _python_struct()  # the position and the state's first word
                self.python_reader = view and _word_reader(view, 0, 4) or False
            self.python_used = not self.python_reader
            _PYTHON.gauss_next = None
        self.marks = (
            None if self.numpy_used else self.numpy_reader[1](),
            None if self.python_used else self.python_reader(),
        )

    def seeder(self) -> Any:
        """What seeds a sample's streams: torch's own method while it is the only one used,
        else :func:`_seeder` for the streams used, built for the batch."""
        if self.numpy_used or self.python_used:
            return _seeder(self.numpy_used, self.python_used)
        return _TORCH.manual_seed

    def drew_unseeded(self) -> bool:
        """After a batch: whether a sample drew from a stream not seeded for it (which is
        seeded for every sample from now on)."""
        moved = False
        if not self.numpy_used and self.numpy_reader[1]() != self.marks[0]:
            self.numpy_used = moved = True
            self.learned[0] = 1
        if not self.python_used and (
            self.python_reader() != self.marks[1] or _PYTHON.gauss_next is not None
        ):
            self.python_used = moved = True
            self.learned[1] = 1
        return moved

    def finish(self, seed: int) -> None:
        """After a batch, for a ``collate_fn`` that draws: the streams no sample drew from,
        seeded from the last sample's seed."""
        if not self.numpy_used:
            _seed_numpy(seed)
        if not self.python_used:
            _seed_python(seed)


def _seeder(numpy_used: bool, python_used: bool) -> Any:
    """A function seeding torch's stream and, of numpy's and python's, those used, for one
    batch: what :func:`_seed_streams` does for them, with every lookup done here once.

    It runs between two samples, whose work has evicted from the caches any code and object
    it touches: measured there (medians over samples of 64 and 128 px with numpy noise),
    seeding the three streams through :func:`_seed_streams` costs 22-32 us, this 15-19 us.
    numpy's MT19937 is seeded by its own call and its cached normal cleared as bytes, as long
    as it is the bit generator seen here; any other, or one set by a sample, takes
    :func:`_seed_numpy`.
    """
    torch_seed, python_seed, python = _TORCH.manual_seed, _random.Random.seed, _PYTHON
    bits = _NUMPY._bit_generator
    cache = _NUMPY_STATE.normal_cache() if numpy_used else None
    numpy_fast = type(bits) is np.random.MT19937 and cache is not None
    legacy = bits._legacy_seeding if numpy_fast else None

    def seed(seed: int) -> None:
        torch_seed(seed)
        if numpy_used:
            if numpy_fast and _NUMPY._bit_generator is bits:
                legacy(seed >> 32)
                cache[:] = _NO_NORMAL
            else:
                _seed_numpy(seed)
        if python_used:
            python_seed(python, seed)
            python.gauss_next = None

    return seed


class _NumpyState:
    """Saves and restores numpy's global stream around a batch in the training process.

    ``np.random.get_state``/``set_state`` take ~0.3 ms (MT19937 copies its key one numpy
    scalar at a time). MT19937, numpy's default, is read and written here as the bytes of its
    state struct instead (624 key words and a position, at ``ctypes.state_address``), and the
    legacy normal cache as the 16 bytes ``RandomState`` keeps it in; both layouts are checked
    against the public state once. Should the cache not be found, a probe draw takes the
    cached normal, if any, without moving the key, and only that case is put back through
    ``set_state``. Another bit generator takes the public path.
    """

    def __init__(self) -> None:
        self._checked: tuple[Any, memoryview | None] = (None, None)
        self._normal: memoryview | None | bool = False  # not looked for yet

    def _struct(self) -> memoryview | None:
        """The bytes of the global MT19937's state; None for another bit generator."""
        bits = _NUMPY._bit_generator
        if bits is not self._checked[0]:
            self._checked = (bits, _numpy_struct())
        return self._checked[1]

    def normal_cache(self) -> memoryview | None:
        """The bytes of the global ``RandomState``'s cached normal (``has_gauss``, ``gauss``)."""
        if self._normal is False:
            offset = _legacy_normal_offset()
            raw = offset is not None and (ctypes.c_char * 16).from_address(id(_NUMPY) + offset)
            self._normal = memoryview(raw).cast("B") if raw else None
        return self._normal

    def save(self) -> Any:
        view = self._struct()
        if view is None:
            return _NUMPY.get_state(legacy=False)
        cache = self.normal_cache()
        if cache is not None:
            return view, view.tobytes(), cache, cache.tobytes()
        key = view.tobytes()
        normal = _NUMPY.standard_normal()  # the cached normal, or one drawn from the key
        return view, key, normal if view.tobytes() == key else None

    def restore(self, saved: Any) -> None:
        if isinstance(saved, dict):
            _NUMPY.set_state(saved)
        elif len(saved) == 4:
            view, key, cache, normal = saved
            view[:], cache[:] = key, normal
        elif saved[2] is None:
            _NUMPY.seed(0)  # drops the normal the probe cached
            saved[0][:] = saved[1]
        else:
            view, key, normal = saved
            words = np.frombuffer(key, dtype=np.uint32, count=624)
            pos = int(np.frombuffer(key, dtype=np.intc, offset=624 * 4)[0])
            _NUMPY.set_state(("MT19937", words, pos, 1, normal))


class _PythonState:
    """Saves and restores python's ``random`` as the bytes of its state (``random.getstate``
    builds a tuple of 625 ints, ``setstate`` reads it back: ~50 us a batch with cold
    caches), and its cached normal ``gauss_next``; the public path if the layout differs."""

    def __init__(self) -> None:
        self._view: memoryview | None | bool = False  # not checked yet

    def save(self) -> Any:
        if self._view is False:
            self._view = _python_struct()
        if self._view is None:
            return random.getstate()
        return self._view.tobytes(), _PYTHON.gauss_next

    def restore(self, saved: Any) -> None:
        if self._view is None:
            random.setstate(saved)
        else:
            self._view[:], _PYTHON.gauss_next = saved


_NUMPY_STATE, _PYTHON_STATE = _NumpyState(), _PythonState()


def _save_streams() -> tuple[Any, Any, Any]:
    """The training process's three streams, for :func:`_restore_streams` after a batch."""
    return _TORCH.get_state(), _NUMPY_STATE.save(), _PYTHON_STATE.save()


def _restore_streams(saved: tuple[Any, Any, Any]) -> None:
    _TORCH.set_state(saved[0])
    _NUMPY_STATE.restore(saved[1])
    _PYTHON_STATE.restore(saved[2])


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
        indices = iter(self.sampler)
        for _ in range(self.skip):
            next(indices, None)
        self.skip = 0
        if any(hasattr(indices, name) for name in STATE_METHODS):  # torchdata saves its state
            return _Keys(indices, self.epoch, self.batches)
        # The loader draws every key in the training process: built in C, not one call each
        # (a call a sample costs the training process more than the seeding costs a worker).
        epoch = self.epoch
        if self.batches:
            return ([(epoch, i) for i in batch] for batch in indices)
        return zip(itertools.repeat(epoch), indices)

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


def draws_nothing(dataset: Any) -> bool:
    """Whether ``dataset`` cannot draw random numbers: a ``TensorDataset`` (indexing tensors)
    or ``Subset``/``ConcatDataset``/``StackDataset`` of such. Its samples need no seeds."""
    if type(dataset) is TensorDataset:
        return True
    if type(dataset) is Subset:
        return draws_nothing(dataset.dataset)
    if type(dataset) is ConcatDataset:
        return all(draws_nothing(d) for d in dataset.datasets)
    if type(dataset) is StackDataset:
        parts = dataset.datasets
        return all(draws_nothing(d) for d in (parts.values() if isinstance(parts, dict) else parts))
    return False


class SeededSamples(Dataset):
    """The script's map-style dataset, called with its random streams seeded per sample.

    It takes the keys :class:`EpochKeys` yields; ``dataset`` is the script's own object.
    ``collate_draws``: whether the loader's ``collate_fn`` may draw random numbers after a
    batch in a worker (any but torch's default), so that the streams no sample drew from are
    seeded for it (:meth:`_Streams.finish`).
    """

    def __init__(self, dataset: Any, seed: int, *, collate_draws: bool = True) -> None:
        self.dataset, self.seed = dataset, seed
        self.batched = _batched(dataset)
        self.collate_draws = collate_draws
        self.streams = _Streams()

    def __getstate__(self) -> dict[str, Any]:
        # for spawned workers: what is known of the streams, not the page shared across fork
        return {**self.__dict__, "streams": self.streams.known()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, streams=_Streams(*state["streams"]))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        # DataLoader's fetcher calls this once per batch: in the training process the streams
        # are saved and restored once per batch, not per sample (and the collate_fn, which
        # runs after, draws from the training process's streams).
        if get_worker_info() is not None:
            return self._load(keys, self.collate_draws)
        saved = _save_streams()
        try:
            return self._load(keys, False)
        finally:
            _restore_streams(saved)

    def _load(self, keys: Sequence[tuple[int, int]], collate_draws: bool = True) -> list[Any]:
        if self.batched and keys:
            epoch, first = keys[0]
            _seed_streams(sample_seed(self.seed, epoch, first))
            return list(self.dataset.__getitems__([i for _, i in keys]))
        # The seeds first, in one loop: between samples its code would have left the caches.
        seeds = [sample_seed(self.seed, epoch, index) for epoch, index in keys]
        if not seeds:
            return []
        # Between samples only torch's seeding call, while torch's stream is the only one used:
        # the samples' work evicts from the caches any other code run between them.
        streams, dataset, indices = self.streams, self.dataset, [index for _, index in keys]
        while True:
            streams.start(seeds[0])
            seed_sample, out = streams.seeder(), []
            for index, seed in zip(indices, seeds, strict=True):
                seed_sample(seed)
                out.append(dataset[index])
            if not streams.drew_unseeded():
                break
            # A sample drew from a stream not seeded for it: again, with that stream seeded.
        if collate_draws:
            streams.finish(seeds[-1])
        return out
