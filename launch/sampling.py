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

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
    default_convert,
)

from tlaunch.loader_workers import ShieldedInit, stops_held
from tlaunch.sample_seeds import STATE_METHODS, EpochKeys, SeededSamples, draws_nothing

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


#: torch's own collate functions, which draw no random numbers.
_QUIET_COLLATE = (default_collate, default_convert)


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
    if isinstance(loader.dataset, IterableDataset) or _custom_batches(loader):
        return None
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler) or _torchdata_shuffle(sampler):
        return True, seed
    if isinstance(sampler, SequentialSampler):
        return False, seed
    if isinstance(sampler, DistributedSampler):
        return sampler.shuffle, sampler.seed
    return None


def _custom_batches(loader: DataLoader) -> bool:
    """A batch sampler of the script's own (torch's and torchdata's are both BatchSampler)."""
    return (
        loader.batch_sampler is not None and type(loader.batch_sampler).__name__ != "BatchSampler"
    )


def _torchdata_shuffle(sampler: Any) -> bool:
    """torchdata's stand-in for RandomSampler (``StatefulDataLoader(shuffle=True)``)."""
    kind = type(sampler)
    return (
        kind.__name__ == "RandomSampler"
        and kind.__module__.startswith("torchdata.")
        and not sampler.replacement
        and sampler._num_samples is None
    )


def _has_state(obj: Any) -> bool:
    return all(callable(getattr(obj, name, None)) for name in STATE_METHODS)


def _stateful_loader_class() -> type | None:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return None
    return StatefulDataLoader


def _describe(loader: DataLoader) -> str:
    data = type(loader.dataset).__name__
    if isinstance(loader.dataset, IterableDataset):
        return f"the {type(loader).__name__} over {data} (an IterableDataset)"
    source = loader.batch_sampler if _custom_batches(loader) else loader.sampler
    return f"the {type(loader).__name__} over {data} with the sampler {type(source).__name__}"


def _rebuild(loader: DataLoader, cls: type, dataset: Any, **chosen: Any) -> DataLoader:
    """``loader``'s settings on a new ``cls`` over ``dataset``; workers start shielded."""
    kwargs = {k: getattr(loader, k) for k in _LOADER_ARGS if hasattr(loader, k)}
    if cls is not DataLoader:  # torchdata's: a snapshot at every batch, unless the script chose
        kwargs["snapshot_every_n_steps"] = getattr(loader, "snapshot_every_n_steps", 1)
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["worker_init_fn"] = ShieldedInit(loader.worker_init_fn)
    else:
        kwargs.pop("persistent_workers", None)
    if "batch_sampler" in chosen:
        kwargs.pop("drop_last", None)
    else:
        chosen.setdefault("batch_size", loader.batch_size)
    return cls(dataset, **chosen, **kwargs)


#: How a loader re-enters an epoch mid-way: by sample index (its order is a function of
#: (seed, epoch)), from the state its sampler or dataset saved, or by drawing the skipped
#: batches again.
BY_INDEX, BY_STATE, BY_REPLAY = "index", "state", "replay"
_END = object()


class ResumableLoader:
    """The script's DataLoader, rebuilt so that a resumed run re-enters an epoch exactly.

    * Map-style data: samples are loaded with random streams seeded per sample
      (:mod:`tlaunch.sample_seeds`), whatever the sampler, unless the dataset cannot draw
      (a ``TensorDataset``: :func:`~tlaunch.sample_seeds.draws_nothing`). With torch's random, sequential or
      distributed sampler the order comes from a :class:`ResumableSampler` and a resumed epoch
      starts at its sample index, loading nothing it skips (``BY_INDEX``).
    * A sampler of the script's own, or an IterableDataset, with ``state_dict`` and
      ``load_state_dict`` (torchdata's protocol): the loader becomes torchdata's
      ``StatefulDataLoader``, whose state after the batches consumed so far is saved with the
      checkpoint and restored (``BY_STATE``). Nothing prefetched counts: the state is read
      before the next batch is fetched.
    * Otherwise (``BY_REPLAY``), a warning at start says what a resumed epoch draws again:
      a custom sampler's indices (no sample is loaded), or an IterableDataset's batches.
    """

    def __init__(self, loader: DataLoader, *, seed: int, rank: int, world: int) -> None:
        self.original = loader
        self.batch_size = loader.batch_size
        self.sampler: ResumableSampler | None = None
        self.keys: EpochKeys | None = None
        self.generator = torch.Generator()
        self.seed = seed
        self._pending: Any = None  # a saved state, loaded when the next epoch starts
        self._consumed: Any = None  # the state after the batches consumed so far
        spec = _shuffle_and_seed(loader, seed)
        if spec is not None:
            self.mode = BY_INDEX
            shuffle, self.seed = spec
            self.sampler = ResumableSampler(
                len(loader.dataset), shuffle=shuffle, seed=self.seed, rank=rank, world=world
            )
            if draws_nothing(loader.dataset):  # nothing to seed: plain indices, as it is
                self.loader = _rebuild(
                    loader,
                    DataLoader,
                    loader.dataset,
                    generator=self.generator,
                    sampler=self.sampler,
                )
                return
            self.keys = EpochKeys(self.sampler)
            self.loader = self._build(loader, DataLoader, seed, sampler=self.keys)
            return
        iterable = isinstance(loader.dataset, IterableDataset)
        owner = loader.dataset if iterable else self._custom_source(loader)
        stateful_cls = _stateful_loader_class()
        self.mode = BY_STATE if _has_state(owner) and stateful_cls else BY_REPLAY
        cls = stateful_cls if self.mode == BY_STATE else DataLoader
        if iterable:
            self.loader = _rebuild(loader, cls, loader.dataset, generator=self.generator)
        else:
            key = "batch_sampler" if self.keys.batches else "sampler"
            self.loader = self._build(loader, cls, seed, **{key: self.keys})
        if self.mode == BY_REPLAY and rank == 0:
            warnings.warn(_replay_warning(loader, iterable, _has_state(owner)), stacklevel=3)

    def _custom_source(self, loader: DataLoader) -> Any:
        batches = _custom_batches(loader)
        source = loader.batch_sampler if batches else loader.sampler
        self.keys = EpochKeys(source, batches=batches)
        return source

    def _build(self, loader: DataLoader, cls: type, seed: int, **chosen: Any) -> DataLoader:
        # Worker seeds come from this generator: same (seed, epoch) -> same seeds, mid-epoch too.
        collate = loader.collate_fn
        dataset = SeededSamples(loader.dataset, seed, collate_draws=collate not in _QUIET_COLLATE)
        return _rebuild(loader, cls, dataset, generator=self.generator, **chosen)

    def __len__(self) -> int:
        """Batches in an epoch of this rank (TypeError for an IterableDataset without length)."""
        if self.sampler is None:
            return len(self.loader)
        n, b = self.sampler.num_samples, self.batch_size or 1
        return n // b if self.loader.drop_last else math.ceil(n / b)

    # -- the saved state ---------------------------------------------------------------------
    def state_dict(self) -> Any:
        """What the checkpoint keeps of this loader: its state after the batches consumed so
        far (``BY_STATE``), else None (the position alone says where the epoch re-enters)."""
        return self._consumed

    def resume_from(self, state: Any) -> None:
        """Load ``state`` (from :meth:`state_dict`) when the next epoch starts."""
        if self.mode == BY_STATE:
            self._pending = state

    # -- an epoch ----------------------------------------------------------------------------
    def iterate(
        self, epoch: int, start_batch: int = 0, replayed: Callable[[], None] | None = None
    ) -> Iterator[tuple[Any, bool]]:
        """``(batch, last)`` for this epoch's batches from ``start_batch`` on; ``last`` is True
        on a batch known to be the epoch's final one. Skipped batches are not loaded, except
        that ``BY_REPLAY`` draws an IterableDataset's again (calling ``replayed`` after each)."""
        loader = self.original
        if self.mode != BY_INDEX:  # the script's own sampler, batch sampler or stream
            owners = {id(o): o for o in (loader.dataset, loader.sampler, loader.batch_sampler)}
            for owner in owners.values():
                if hasattr(owner, "set_epoch"):
                    owner.set_epoch(epoch)
        if self.keys is not None:
            self.keys.epoch = epoch
        self.generator.manual_seed(_mix(self.seed, epoch) ^ 0x5EED)
        skip = start_batch
        if self.mode == BY_INDEX:
            self.sampler.set_epoch(epoch, start=start_batch * (self.batch_size or 1))
            skip = 0
        elif self._pending is not None:  # the saved state says where the epoch re-enters
            self.loader.load_state_dict(self._pending)
            self._pending, skip = None, 0
        elif skip and self.keys is not None:  # draw the indices again, load no sample
            self.keys.skip = skip if self.keys.batches else skip * (self.batch_size or 1)
            skip = 0
        with stops_held():  # workers start shielded (tlaunch.loader_workers)
            it = iter(self.loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
            if replayed is not None:
                replayed()
        if self.mode == BY_INDEX:
            return ((batch, False) for batch in it)
        return self._with_lookahead(it)

    def _with_lookahead(self, it: Iterator) -> Iterator[tuple[Any, bool]]:
        """Fetches each batch before yielding the previous one (to know the last); the state
        kept for the checkpoint is read before that fetch, so it never counts a batch that
        was fetched but not consumed."""
        stateful = self.mode == BY_STATE
        batch = next(it, _END)
        while batch is not _END:
            state = copy.deepcopy(self.loader.state_dict()) if stateful else None
            following = next(it, _END)
            if stateful:  # the epoch's end fetched nothing: the finished state is the one
                done = following is _END
                self._consumed = copy.deepcopy(self.loader.state_dict()) if done else state
            yield batch, following is _END
            batch = following


def _replay_warning(loader: DataLoader, iterable: bool, has_state: bool) -> str:
    what = (
        "draws the skipped batches again from the dataset (loading them)"
        if iterable
        else "draws the skipped batches' indices again from its sampler (no sample is loaded), "
        "and is exact only if that sampler's order is deterministic"
    )
    if has_state:
        why = "its state_dict needs torchdata: pip install 'tlaunch[data]'"
    else:
        why = "it has no state_dict/load_state_dict (torchdata's protocol)"
    return f"{_describe(loader)} cannot resume from a saved state ({why}): a resumed epoch {what}"
