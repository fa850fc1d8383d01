"""The resumable sampler and loader: an epoch's order is a function of (seed, epoch), and a
resumed epoch yields exactly the tail of the whole one, worker seeds included."""

from __future__ import annotations

import io
import math
import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    Subset,
    TensorDataset,
)

from tlaunch import sampling
from tlaunch.sampling import ResumableLoader, ResumableSampler

pytestmark = pytest.mark.timeout(60)


def order(size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle=True):
    sampler = ResumableSampler(size, shuffle=shuffle, seed=seed, rank=rank, world=world)
    sampler.set_epoch(epoch)
    return list(sampler)


class Indices(Dataset):
    """Sample i is i; records which indices were loaded (in this process)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


class WorkerSeeds(Indices):
    """Sample i is (i, the seed of the worker process that loaded it)."""

    def __getitem__(self, i: int) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return i, (info.seed if info is not None else -1)


def batches(iterator) -> list:
    """The batches of ``ResumableLoader.iterate`` (which pairs each with ``last``) or of a
    plain loader, as lists."""
    out = []
    for item in iterator:
        b = item[0] if isinstance(item, tuple) and isinstance(item[1], bool) else item
        out.append(b.tolist() if isinstance(b, torch.Tensor) else [t.tolist() for t in b])
    return out


# -- ResumableSampler -------------------------------------------------------------------------


def test_the_order_is_a_function_of_seed_and_epoch_only():
    a = order(50, seed=3, epoch=2)
    torch.manual_seed(999)  # the global RNG plays no part
    assert order(50, seed=3, epoch=2) == a
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert order(50, seed=3, epoch=1) != a
    assert order(50, seed=3, epoch=3) != a
    assert order(50, seed=4, epoch=2) != a
    # seed and epoch do not trade off against each other.
    assert order(50, seed=4, epoch=1) != a and order(50, seed=2, epoch=3) != a
    # Going back to an epoch gives its order again: no state carried between epochs.
    sampler = ResumableSampler(50, shuffle=True, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(5)
    list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first == a


def test_drawing_the_order_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    order(50, seed=3, epoch=2)
    assert torch.equal(torch.get_rng_state(), before)


def test_unshuffled_order_is_the_index_order():
    assert order(7, seed=3, epoch=4, shuffle=False) == list(range(7))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 10, 12, 13])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharding_is_distributed_samplers(world, size, shuffle):
    seed, epoch = 7, 3
    ranks = [
        order(size, seed=seed, epoch=epoch, rank=r, world=world, shuffle=shuffle)
        for r in range(world)
    ]
    # Each rank gets ceil(size / world) samples; every index appears, and only the padding
    # (the first few of the order, repeated) appears twice.
    per_rank = math.ceil(size / world)
    assert [len(r) for r in ranks] == [per_rank] * world
    counts = Counter(i for r in ranks for i in r)
    assert set(counts) == set(range(size))
    assert sum(counts.values()) - size == per_rank * world - size
    # DistributedSampler seeds its shuffle with seed + epoch; give it the stream ours uses.
    for r, ours in enumerate(ranks):
        theirs = DistributedSampler(
            range(size),
            num_replicas=world,
            rank=r,
            shuffle=shuffle,
            seed=sampling._mix(seed, epoch),
        )
        theirs.set_epoch(0)
        assert ours == list(theirs), f"rank {r} of {world}"


@pytest.mark.parametrize("world", [1, 3])
def test_set_epoch_with_start_yields_the_tail_of_the_epoch(world):
    for rank in range(world):
        sampler = ResumableSampler(23, shuffle=True, seed=1, rank=rank, world=world)
        sampler.set_epoch(4)
        whole = list(sampler)
        assert len(sampler) == len(whole) == math.ceil(23 / world)
        for start in range(len(whole) + 1):
            sampler.set_epoch(4, start=start)
            assert list(sampler) == whole[start:]
            assert len(sampler) == len(whole) - start
        sampler.set_epoch(5)  # a new epoch starts at its beginning
        assert len(sampler) == len(whole) and list(sampler) != whole


# -- ResumableLoader --------------------------------------------------------------------------


def build_loader(data: Dataset, *, rank: int = 0, world: int = 1, **kwargs) -> ResumableLoader:
    loader = DataLoader(data, batch_size=4, shuffle=True, **kwargs)
    return ResumableLoader(loader, seed=11, rank=rank, world=world)


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_from_a_batch_yields_the_tail_of_the_whole_epoch(drop_last):
    data = Indices(30)
    loader = build_loader(data, drop_last=drop_last)
    whole = batches(loader.iterate(2))
    assert len(whole) == len(loader) == (7 if drop_last else 8)
    assert whole != batches(loader.iterate(3))
    for start in range(len(whole) + 1):
        data.loaded.clear()
        assert batches(loader.iterate(2, start)) == whole[start:]
        # Skipped batches are neither loaded nor drawn.
        assert sorted(data.loaded) == sorted(i for b in whole[start:] for i in b)


def test_ranks_of_a_loader_split_the_epoch_like_distributed_sampler():
    ranks = [batches(build_loader(Indices(30), rank=r, world=2).iterate(1)) for r in (0, 1)]
    seen = [i for r in ranks for b in r for i in b]
    assert sorted(seen) == list(range(30))
    for r, got in enumerate(ranks):
        assert batches(build_loader(Indices(30), rank=r, world=2).iterate(1, 2)) == got[2:]


def test_the_loader_leaves_the_global_rng_alone_where_a_plain_one_does_not():
    data = Indices(30)
    plain = DataLoader(data, batch_size=4, shuffle=True)
    before = torch.get_rng_state()
    list(plain)
    assert not torch.equal(torch.get_rng_state(), before), "the contrast this test relies on"
    before = torch.get_rng_state()
    batches(ResumableLoader(plain, seed=11, rank=0, world=1).iterate(0, 3))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_distributed_sampler_keeps_its_own_shuffle_and_seed():
    data = Indices(30)
    loader = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, 1, 0, seed=42))
    resumable = ResumableLoader(loader, seed=11, rank=0, world=1)
    assert (resumable.sampler.shuffle, resumable.sampler.seed) == (True, 42)
    unshuffled = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, 1, 0, False))
    first = batches(ResumableLoader(unshuffled, seed=11, rank=0, world=1).iterate(3))
    assert first[0] == [0, 1, 2, 3, 4]


@pytest.mark.timeout(120)
def test_two_workers_resume_with_the_same_batches_and_worker_seeds():
    data = WorkerSeeds(40)
    loader = build_loader(data, num_workers=2, timeout=60)
    whole = batches(loader.iterate(1))
    torch.manual_seed(12345)  # a resumed process's global RNG is elsewhere
    torch.rand(7)
    start = 4
    tail = batches(loader.iterate(1, start))
    assert [b[0] for b in tail] == [b[0] for b in whole[start:]]
    whole_seeds = {s for b in whole for s in b[1]}
    assert len(whole_seeds) == 2 and -1 not in whole_seeds, "two worker processes"
    assert {s for b in tail for s in b[1]} == whole_seeds
    other_epoch = batches(loader.iterate(2))
    assert {s for b in other_epoch for s in b[1]}.isdisjoint(whole_seeds)


def test_a_plain_loader_draws_different_worker_seeds_after_the_global_rng_moved():
    # Why the resumable loader owns a generator: without one, the seeds follow the global RNG.
    data = WorkerSeeds(8)
    plain = DataLoader(data, batch_size=4, num_workers=2, timeout=60)
    torch.manual_seed(0)
    first = {s for b in batches(plain) for s in b[1]}
    torch.rand(3)
    assert {s for b in batches(plain) for s in b[1]} != first


# -- per-sample randomness ------------------------------------------------------------------


class Augmented(Dataset):
    """Sample i draws from torch, numpy and python ``random``, as random transforms do."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        draws = [torch.rand(()).item(), np.random.rand(), random.random()]
        return torch.tensor([i, *draws], dtype=torch.float64)


class BatchedAugmented(Augmented):
    """Loads a batch in one call (as Hugging Face datasets do); counts its calls."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls = 0

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        self.calls += 1
        return [self[i] for i in indices]


def by_index(iterator) -> dict[int, list[float]]:
    """Each loaded sample's draws, by sample index."""
    return {int(row[0]): row[1:].tolist() for batch, _ in iterator for row in batch}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batched", [False, True])
def test_a_samples_draws_are_the_same_for_any_workers_ranks_and_resume_point(batched):
    data = (BatchedAugmented if batched else Augmented)(24)
    whole = by_index(build_loader(data).iterate(1))
    assert len(whole) == 24 and len({tuple(v) for v in whole.values()}) == 24
    for workers in (2, 4):
        loader = build_loader(data, num_workers=workers, timeout=60)
        assert by_index(loader.iterate(1)) == whole, f"{workers} workers"
        tail = by_index(loader.iterate(1, 3))  # a resumed epoch: 3 batches of 4 skipped
        assert len(tail) == 12 and tail == {i: whole[i] for i in tail}
    if not batched:  # a sample's draws do not depend on which rank loads it either
        ranks = [by_index(build_loader(data, rank=r, world=2).iterate(1)) for r in (0, 1)]
        assert {**ranks[0], **ranks[1]} == whole
    other_epoch = by_index(build_loader(data).iterate(2))
    assert all(other_epoch[i] != whole[i] for i in whole)
    other_seed = DataLoader(data, batch_size=4, shuffle=True)
    other_seed = by_index(ResumableLoader(other_seed, seed=12, rank=0, world=1).iterate(1))
    assert all(other_seed[i] != whole[i] for i in whole)


@pytest.mark.timeout(120)
def test_persistent_workers_draw_each_epochs_samples_from_that_epoch():
    data = Augmented(16)
    loader = build_loader(data, num_workers=2, persistent_workers=True, timeout=60)
    plain = build_loader(data)
    first, second = by_index(loader.iterate(1)), by_index(loader.iterate(2))
    assert first == by_index(plain.iterate(1)) and second == by_index(plain.iterate(2))
    tail = by_index(loader.iterate(1, 2))  # the same workers, resumed mid-epoch
    assert len(tail) == 8 and tail == {i: first[i] for i in tail}


def test_a_batched_dataset_is_called_once_per_batch_and_a_subset_per_sample():
    batched = BatchedAugmented(24)
    by_index(build_loader(batched).iterate(0))
    assert batched.calls == 6
    # Subset's own __getitems__ only passes the call through: seeded per sample, like its base.
    whole = by_index(build_loader(Augmented(24)).iterate(0))
    assert by_index(build_loader(Subset(Augmented(24), range(24))).iterate(0)) == whole


def test_a_dataset_that_cannot_draw_is_loaded_as_it_is_and_resumes_exactly():
    # A TensorDataset (or a Subset/ConcatDataset of them) only indexes tensors: no seeds, no
    # keys, no wrapper per sample; its resumed epoch is still the tail of the whole one.
    tensors = TensorDataset(torch.arange(30), torch.arange(30) * 2)
    for data in (tensors, Subset(tensors, range(5, 30)), ConcatDataset([tensors, tensors])):
        loader = build_loader(data)
        assert loader.loader.dataset is data and loader.keys is None
        whole = [b[0].tolist() for b, _ in loader.iterate(2)]
        assert whole != [b[0].tolist() for b, _ in loader.iterate(3)]
        for start in (1, 3):
            assert [b[0].tolist() for b, _ in loader.iterate(2, start)] == whole[start:]
    # One part that may draw is enough to seed the samples.
    mixed = build_loader(ConcatDataset([tensors, Augmented(24)]))
    assert isinstance(mixed.loader.dataset, sampling.SeededSamples)


def test_loading_in_the_training_process_leaves_its_random_streams_alone():
    def draw() -> list[float]:
        return [*torch.rand(2).tolist(), *np.random.rand(2).tolist(), random.random()]

    def reseed() -> None:
        torch.manual_seed(1), np.random.seed(1), random.seed(1)

    reseed()
    expected = [draw(), draw()]
    reseed()
    got = [draw()]
    batches(build_loader(Augmented(24)).iterate(0, 2))  # num_workers=0: in this process
    got.append(draw())
    assert got == expected


# -- loaders tlaunch cannot rebuild -----------------------------------------------------------


class EveryOther(Sampler[int]):
    """A deterministic custom sampler: even indices, then odd ones; remembers set_epoch."""

    def __init__(self, size: int) -> None:
        self.size, self.epochs = size, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter([*range(0, self.size, 2), *range(1, self.size, 2)])

    def __len__(self) -> int:
        return self.size


def caught_warnings(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught if "cannot resume" in str(w.message)]


def test_a_custom_sampler_without_state_warns_once_and_draws_only_its_indices_again():
    data, sampler = Indices(20), EveryOther(20)
    loader, said = caught_warnings(
        lambda: ResumableLoader(
            DataLoader(data, batch_size=4, sampler=sampler), seed=11, rank=0, world=1
        )
    )
    assert said == [
        "the DataLoader over Indices with the sampler EveryOther cannot resume from a saved "
        "state (it has no state_dict/load_state_dict (torchdata's protocol)): a resumed epoch "
        "draws the skipped batches' indices again from its sampler (no sample is loaded), and "
        "is exact only if that sampler's order is deterministic"
    ]
    whole = batches(loader.iterate(0))
    assert whole[0] == [0, 2, 4, 6]
    data.loaded.clear()
    assert batches(loader.iterate(0, 3)) == whole[3:]
    assert data.loaded == [i for b in whole[3:] for i in b], "the skipped samples were not loaded"
    assert sampler.epochs == [0, 0]
    _, said_again = caught_warnings(lambda: loader.iterate(1, 2))
    assert said_again == [], "once, at start"


class ResumingSampler(Sampler[int]):
    """A sampler of a script's own with torchdata's protocol: a permutation from (seed, epoch),
    resumed from the number of indices it had yielded. Records what it draws."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch, self.yielded, self._resume_at = size, 0, 0, 0
        self.drawn: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch))
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        for i in order.tolist()[start:]:
            self.yielded += 1
            self.drawn.append(i)
            yield i

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_at = state["epoch"], state["yielded"]


class Stream(IterableDataset):
    """Items 0..n-1 split between the workers, each with a draw seeded from (item, epoch); its
    state is the position in this worker's share. Counts the items it generates."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch, self.pos, self.generated = size, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(worker, self.size, workers)
        while self.pos < len(mine):
            item = mine[self.pos]
            self.pos += 1
            self.generated += 1
            g = torch.Generator().manual_seed(item * 1000 + self.epoch)
            yield torch.tensor([float(item), torch.rand((), generator=g).item()])
        self.pos = 0


class StatefulStream(Stream):
    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def saved(state):
    """``state`` as a checkpoint gives it back: through torch.save, loaded weights-only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def stop_after(resumable: ResumableLoader, epoch: int, count: int) -> tuple[list, object]:
    """The first ``count`` batches of ``epoch``, and the loader state a save then would keep."""
    it = resumable.iterate(epoch)
    head = batches(next(it) for _ in range(count))
    return head, saved(resumable.state_dict())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_sampler_with_state_resumes_from_it_without_drawing_again(workers):
    def build(sampler):
        timeout = 60 if workers else 0
        loader = DataLoader(
            Augmented(24), batch_size=4, sampler=sampler, num_workers=workers, timeout=timeout
        )
        return ResumableLoader(loader, seed=11, rank=0, world=1)

    whole = batches(build(ResumingSampler(24)).iterate(1))
    first = build(ResumingSampler(24))
    assert first.mode == sampling.BY_STATE
    head, state = stop_after(first, 1, 3)  # workers have prefetched past these 3
    assert head == whole[:3]
    sampler = ResumingSampler(24)
    resumed = build(sampler)
    resumed.resume_from(state)
    assert batches(resumed.iterate(1, 3)) == whole[3:]  # draws included: seeded per sample
    assert sampler.drawn == [int(row[0]) for b in whole[3:] for row in b]
    fresh = build(ResumingSampler(24))
    assert batches(resumed.iterate(2)) == batches(fresh.iterate(2))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_an_iterable_dataset_resumes_through_stateful_dataloader_without_replaying(workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def build(stream, cls=DataLoader):
        loader = cls(stream, batch_size=3, num_workers=workers, timeout=60 if workers else 0)
        return ResumableLoader(loader, seed=11, rank=0, world=1)

    reference = build(StatefulStream(24))
    pairs = list(reference.iterate(1))
    whole = batches(pairs)
    assert [last for _, last in pairs] == [False] * 7 + [True], "the last batch is known"
    with pytest.raises(TypeError):
        len(reference)  # no length: the epoch ends where the data does
    following = batches(reference.iterate(2))
    head, state = stop_after(build(StatefulStream(24), StatefulDataLoader), 1, 5)
    assert head == whole[:5]
    stream = StatefulStream(24)
    resumed = build(stream, StatefulDataLoader)
    resumed.resume_from(state)
    assert batches(resumed.iterate(1, 5)) == whole[5:]
    if not workers:
        assert stream.generated == 9, "the first 15 items were not generated again"
    # Saved at the end of the epoch: the next epoch starts whole.
    at_end = build(StatefulStream(24))
    list(at_end.iterate(1))
    again = build(StatefulStream(24))
    again.resume_from(saved(at_end.state_dict()))
    assert batches(again.iterate(2)) == following


def test_an_iterable_without_state_warns_once_and_replays_its_batches():
    stream = Stream(24)
    loader, said = caught_warnings(
        lambda: ResumableLoader(DataLoader(stream, batch_size=3), seed=11, rank=0, world=1)
    )
    assert said == [
        "the DataLoader over Stream (an IterableDataset) cannot resume from a saved state (it "
        "has no state_dict/load_state_dict (torchdata's protocol)): a resumed epoch draws the "
        "skipped batches again from the dataset (loading them)"
    ]
    whole = batches(loader.iterate(1))
    ticks: list[int] = []
    tail = batches(loader.iterate(1, 5, replayed=lambda: ticks.append(1)))
    assert tail == whole[5:] and len(ticks) == 5


def test_without_torchdata_a_stateful_sampler_is_replayed_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(sampling, "_stateful_loader_class", lambda: None)
    loader = DataLoader(Indices(20), batch_size=4, sampler=ResumingSampler(20))
    resumable, said = caught_warnings(lambda: ResumableLoader(loader, seed=1, rank=0, world=1))
    assert resumable.mode == sampling.BY_REPLAY
    assert len(said) == 1 and "pip install 'tlaunch[data]'" in said[0]
    assert caught_warnings(lambda: ResumableLoader(loader, seed=1, rank=1, world=2))[1] == []


class PairBatches(Sampler[list[int]]):
    """A batch sampler of a script's own: pairs of neighbours, in an order set by the epoch."""

    def __init__(self, size: int) -> None:
        self.size, self.epochs = size, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        pairs = [[i, i + 1] for i in range(0, self.size, 2)]
        shift = self.epochs[-1] % len(pairs) if self.epochs else 0
        return iter(pairs[shift:] + pairs[:shift])

    def __len__(self) -> int:
        return self.size // 2


def test_a_batch_sampler_of_its_own_gets_its_epoch_and_draws_only_indices_again():
    data, batch_sampler = Indices(12), PairBatches(12)
    plain = DataLoader(data, batch_sampler=batch_sampler)
    loader, said = caught_warnings(lambda: ResumableLoader(plain, seed=1, rank=0, world=1))
    assert len(said) == 1 and "with the sampler PairBatches" in said[0]
    whole = batches(loader.iterate(2))
    assert whole[0] == [4, 5] and batch_sampler.epochs == [2]
    data.loaded.clear()
    assert batches(loader.iterate(2, 4)) == whole[4:]
    assert data.loaded == [i for b in whole[4:] for i in b]
