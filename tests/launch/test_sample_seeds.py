"""Per-sample seeding (tlaunch.sample_seeds): the three streams a sample sees are distinct, and
loading in the training process gives its streams back exactly, cached normals included."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from tlaunch import sample_seeds
from tlaunch.sample_seeds import _NUMPY_STATE, SeededSamples, _seed_streams, sample_seed

pytestmark = pytest.mark.timeout(60)

WORDS = 16


class RawWords(Dataset):
    """Sample i is 16 raw 31-bit words from each of torch, numpy and python ``random``."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> list[set[int]]:
        return [
            set(torch.randint(0, 2**31, (WORDS,)).tolist()),
            set(np.random.randint(0, 2**31, WORDS).tolist()),
            {random.getrandbits(31) for _ in range(WORDS)},
        ]


def test_a_samples_torch_numpy_and_python_streams_share_no_draws():
    # Torch's and numpy's generators are both MT19937 seeded by the same algorithm: from one
    # seed they would draw the same words, so a crop and the noise added after it would be
    # made of the same random bits.
    samples = SeededSamples(RawWords(), seed=3).__getitems__([(1, i) for i in range(64)])
    for i, (torch_words, numpy_words, python_words) in enumerate(samples):
        assert len(torch_words) == len(numpy_words) == len(python_words) == WORDS
        assert torch_words.isdisjoint(numpy_words), f"sample {i}: torch and numpy"
        assert python_words.isdisjoint(torch_words | numpy_words), f"sample {i}: python"
    assert len({frozenset(s[1]) for s in samples}) == 64, "each sample a stream of its own"


class Normals(Dataset):
    """Each sample draws normals from all three streams, an odd number from each, so that
    each stream's cached second normal is left set."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> list[float]:
        return [torch.randn(()).item(), np.random.normal(), random.gauss(0, 1)]


def training_draws() -> list[float]:
    """What a training step draws: one normal from each stream (taking a cached one every
    other call) and a uniform from each."""
    return [
        torch.randn(()).item(),
        np.random.normal(),
        random.gauss(0, 1),
        torch.rand(()).item(),
        np.random.rand(),
        random.random(),
    ]


@pytest.fixture
def global_bit_generator(request):
    """numpy's global generator for the test (``MT19937``, its default, or another), put
    back afterwards."""
    original = np.random.get_bit_generator()
    if request.param != "MT19937":
        np.random.set_bit_generator(getattr(np.random, request.param)(1))
    yield
    np.random.set_bit_generator(original)


@pytest.mark.parametrize("global_bit_generator", ["MT19937", "PCG64"], indirect=True)
@pytest.mark.parametrize("steps_before", [0, 1, 2])
def test_loading_in_the_training_process_gives_back_its_streams_cached_normals_too(
    global_bit_generator, steps_before
):
    start = torch.get_rng_state(), np.random.get_state(legacy=False), random.getstate()

    def reseed() -> None:
        torch.set_rng_state(start[0]), np.random.set_state(start[1]), random.setstate(start[2])

    expected = [training_draws() for _ in range(steps_before + 2)]
    reseed()
    got = [training_draws() for _ in range(steps_before + 1)]
    if np.random.get_bit_generator().__class__.__name__ == "MT19937":  # numpy's default
        assert _NUMPY_STATE._struct() is not None, "numpy's state is copied as bytes"
        assert _NUMPY_STATE.normal_cache() is not None, "and its cached normal"
    assert sample_seeds._python_struct() is not None, "python's state is copied as bytes"
    data = SeededSamples(Normals(), seed=3)
    for batch in ([(0, 0), (0, 1), (0, 2)], [(0, 3)], []):  # num_workers=0: in this process
        loaded = data.__getitems__(batch)
        assert len(loaded) == len(batch)
    got.append(training_draws())
    assert got == expected


@pytest.mark.parametrize("global_bit_generator", ["MT19937", "PCG64"], indirect=True)
def test_a_samples_normals_do_not_depend_on_the_sample_loaded_before_it(global_bit_generator):
    # Each sample leaves a cached normal behind in every stream; the next must not take it.
    data = SeededSamples(Normals(), seed=3)
    after_another = data.__getitems__([(0, 0), (0, 1)])[1]
    assert data.__getitems__([(0, 1)]) == [after_another]
    assert data.__getitems__([(0, 0)]) != [after_another]


def test_seeding_a_sample_is_what_the_public_seed_functions_do():
    # The seeding calls below the public functions (cheaper); same streams, cached normals
    # dropped. torch.initial_seed() inside __getitem__ is the sample's seed.
    def draws_after(seed: int, public: bool) -> list[float]:
        training_draws()  # leaves a cached normal in each stream
        if public:
            torch.manual_seed(seed), np.random.seed(seed >> 32), random.seed(seed)
        else:
            _seed_streams(seed)
        return [torch.initial_seed(), *training_draws(), *training_draws()]

    for seed in (0, 2**32 - 1, 2**32 + 5, 0x9E3779B97F4A7C15):
        assert draws_after(seed, public=False) == draws_after(seed, public=True)


class Sometimes(Dataset):
    """Draws from torch always; from numpy and python ``random`` only for some samples (a
    normal, a uniform and raw words), as a transform applied with a probability would."""

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> list[float]:
        self.calls += 1
        out = [torch.rand(()).item()]
        if i % 7 == 3:
            out += [np.random.normal(), float(np.random.randint(0, 2**31))]
        if i % 5 == 4:
            out += [random.gauss(0, 1), float(random.getrandbits(31))]
        return out


def every_stream_seeded(dataset: Dataset, keys: list[tuple[int, int]], seed: int) -> list:
    """What each sample would be were all three streams seeded for every sample."""
    out = []
    for epoch, index in keys:
        _seed_streams(sample_seed(seed, epoch, index))
        out.append(dataset[index])
    return out


def collate_draws() -> list[float]:
    """What a collate_fn after the batch draws (mixup's lambda, a cutmix box...)."""
    return [torch.rand(()).item(), np.random.normal(), np.random.rand(), random.gauss(0, 1)]


@pytest.mark.parametrize("global_bit_generator", ["MT19937", "PCG64"], indirect=True)
def test_streams_seeded_only_once_drawn_from_give_what_seeding_all_three_gives(
    global_bit_generator,
):
    # numpy's and python's streams are seeded for a sample only once a sample drew from them;
    # a batch in which a sample drew from one not seeded for it is loaded again. The samples,
    # and what a collate_fn draws after the batch, must be what seeding every stream gives.
    data, reference = Sometimes(), Sometimes()
    loader = SeededSamples(data, seed=11)
    for start in range(0, 40, 8):
        keys = [(2, i) for i in range(start, start + 8)]
        got = loader._load(keys), collate_draws()  # _load: as in a worker, no streams kept
        expected = every_stream_seeded(reference, keys, seed=11), collate_draws()
        assert got == expected, f"batch from sample {start}"
    assert loader.streams.python_used and loader.streams.numpy_used
    # numpy is first drawn from by sample 3, python by sample 4: the first batch is loaded
    # twice, and no other (numpy's stream has no cheap position to read with another bit
    # generator: it is seeded for every sample from the start).
    assert data.calls == 40 + 8


class TorchOnly(Dataset):
    """A torchvision-style sample: torch's stream only."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> float:
        return torch.rand(()).item()


@pytest.fixture
def numpy_and_python_seedings(monkeypatch) -> list[int]:
    """The seeds numpy's and python's streams are seeded with from now on."""
    seeded: list[int] = []
    for name in ("_seed_numpy", "_seed_python"):
        real = getattr(sample_seeds, name)
        monkeypatch.setattr(sample_seeds, name, lambda s, real=real: (seeded.append(s), real(s)))
    return seeded


def test_a_dataset_drawing_from_torch_only_costs_no_numpy_or_python_seeding(
    numpy_and_python_seedings,
):
    seeded = numpy_and_python_seedings
    data = SeededSamples(TorchOnly(), seed=5)
    for start in (0, 8):
        keys = [(0, i) for i in range(start, start + 8)]
        got = data._load(keys), collate_draws()
        n = len(seeded)
        # a collate_fn draws what it would were every stream seeded for every sample
        assert got == (every_stream_seeded(TorchOnly(), keys, seed=5), collate_draws())
        del seeded[n:]
    assert not (data.streams.numpy_used or data.streams.python_used)
    # for the collate_fn: after each batch (from its last sample's seed), not per sample
    assert seeded == [sample_seed(5, 0, last) for last in (7, 7, 15, 15)]


def test_with_torchs_own_collate_a_torch_only_dataset_seeds_torchs_stream_alone(
    numpy_and_python_seedings,
):
    data = SeededSamples(TorchOnly(), seed=5, collate_draws=False)
    for start in (0, 8, 16):
        keys = [(3, i) for i in range(start, start + 8)]
        got = data._load(keys, collate_draws=False)
        assert numpy_and_python_seedings == []
        assert got == every_stream_seeded(TorchOnly(), keys, 5)
        numpy_and_python_seedings.clear()


class FirstDrawLate(Sometimes):
    """Torch's stream always; a normal from numpy's by one sample of each batch from sample 19
    on, and one from python's by samples 30 and 35: each first drawn from in a later batch
    than the first."""

    def __getitem__(self, i: int) -> list[float]:
        self.calls += 1
        out = [torch.rand(()).item()]
        if i >= 19 and i % 8 == 3:
            out.append(np.random.normal())
        if i >= 30 and i % 5 == 0:
            out.append(random.gauss(0, 1))
        return out


def test_a_batch_in_which_a_stream_is_first_drawn_from_is_loaded_again():
    # A sample of the third batch is the first to draw from numpy's stream, one of the fourth
    # the first from python's: each of those batches is loaded twice, the samples are what
    # seeding every stream for every sample gives, and no other batch is loaded again. Before
    # each batch a normal is left cached in each stream: the first draw must still be seen.
    data = FirstDrawLate()
    loader = SeededSamples(data, seed=2)
    for start in range(0, 40, 8):
        keys = [(1, i) for i in range(start, start + 8)]
        np.random.normal(), random.gauss(0, 1)
        assert loader._load(keys, collate_draws=False) == every_stream_seeded(
            FirstDrawLate(), keys, seed=2
        ), f"batch from sample {start}"
    mt19937 = np.random.get_bit_generator().__class__.__name__ == "MT19937"
    assert data.calls == 40 + (16 if mt19937 else 8)


def test_the_loader_tells_the_samples_whether_its_collate_fn_may_draw():
    from torch.utils.data import DataLoader

    from tlaunch.sampling import ResumableLoader

    def mixup_collate(batch):
        return batch

    for collate, draws in ((None, False), (mixup_collate, True)):
        loader = DataLoader(TorchOnly(), batch_size=4, shuffle=True, collate_fn=collate)
        rebuilt = ResumableLoader(loader, seed=0, rank=0, world=1).loader
        assert rebuilt.dataset.collate_draws is draws
    unbatched = DataLoader(TorchOnly(), batch_size=None, shuffle=True)  # default_convert
    assert ResumableLoader(unbatched, seed=0, rank=0, world=1).loader.dataset.collate_draws is False


class SwapsNumpysGenerator(Dataset):
    """Draws from all three streams; sample 2 first replaces numpy's global bit generator, as
    a script calling ``np.random.set_bit_generator`` in ``__getitem__`` would."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> list[float]:
        if i == 2:
            np.random.set_bit_generator(np.random.MT19937(99))
        return [torch.rand(()).item(), np.random.normal(), random.random()]


@pytest.mark.parametrize("global_bit_generator", ["MT19937"], indirect=True)
def test_a_bit_generator_replaced_by_a_sample_is_seeded_for_the_samples_after_it(
    global_bit_generator,
):
    # A batch's seeding function binds numpy's bit generator once; one replaced by a sample
    # mid-batch must be the one seeded for the next sample, not the one bound.
    loader = SeededSamples(SwapsNumpysGenerator(), seed=4)
    keys = [(0, i) for i in range(8)]
    loader._load(keys[:2], collate_draws=False)  # the streams are now known to be drawn from
    assert loader.streams.numpy_used and loader.streams.python_used
    got = loader._load(keys, collate_draws=False)
    assert got == every_stream_seeded(SwapsNumpysGenerator(), keys, seed=4)


class CountedDraws(Dataset):
    """Sample i draws from all three streams; loads are counted across worker processes."""

    def __init__(self) -> None:
        import multiprocessing

        self.loads = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        with self.loads.get_lock():
            self.loads.value += 1
        return torch.tensor([torch.rand(()).item(), np.random.normal(), random.random()])


@pytest.mark.timeout(120)
def test_new_workers_of_a_later_epoch_know_the_streams_their_predecessors_drew_from():
    # Without persistent_workers each epoch forks new workers. A worker that found a sample
    # drawing from numpy's and python's streams loads that batch again; the workers of the
    # next epoch are forked knowing it, and load every batch once, seeded as before.
    from torch.utils.data import DataLoader

    from tlaunch.sampling import ResumableLoader

    data = CountedDraws()
    plain = DataLoader(data, batch_size=4, num_workers=2, multiprocessing_context="fork")
    loader = ResumableLoader(plain, seed=6, rank=0, world=1)
    for epoch in (0, 1):
        data.loads.value = 0
        got = torch.cat([batch for batch, _ in loader.iterate(epoch)])
        keys = [(epoch, i) for i in range(16)]
        assert torch.equal(got, torch.stack(every_stream_seeded(data, keys, seed=6)))
        if epoch == 0:
            assert data.loads.value > 2 * 16, "the first batch of each worker, loaded again"
    assert data.loads.value == 2 * 16, "epoch 1: each sample loaded once (and once for reference)"


def test_a_torch_only_dataset_pays_for_no_stream_another_dataset_draws_from(
    numpy_and_python_seedings,
):
    # Two prepared loaders in one process: the first dataset draws from numpy's and python's
    # streams, which says nothing of the second's.
    SeededSamples(Normals(), seed=1)._load([(0, i) for i in range(4)], collate_draws=False)
    numpy_and_python_seedings.clear()
    torch_only = SeededSamples(TorchOnly(), seed=1)
    keys = [(0, i) for i in range(8)]
    got = torch_only._load(keys, collate_draws=False)
    assert numpy_and_python_seedings == []
    assert got == every_stream_seeded(TorchOnly(), keys, 1)


def test_a_spawned_worker_knows_the_streams_the_training_process_found_drawn_from():
    import pickle

    data = SeededSamples(Normals(), seed=1)
    assert pickle.loads(pickle.dumps(data)).streams.known() == (False, False)
    data._load([(0, 0)], collate_draws=False)  # in this process: found drawing from both
    spawned = pickle.loads(pickle.dumps(data))
    assert spawned.streams.known() == (True, True)
    assert spawned.streams.learned is not data.streams.learned
    keys = [(0, i) for i in range(4)]
    assert spawned._load(keys, collate_draws=False) == every_stream_seeded(Normals(), keys, 1)
