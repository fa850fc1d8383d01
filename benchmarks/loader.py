"""What resumable input pipelines cost: loader throughput with per-sample seeding, and the time
from a resume to its first batch mid-epoch.

Run: ``.venv/bin/python benchmarks/loader.py [--reps 9] [--workers 2] [--sizes 64,128]
[--throughput-only] [--a-a]``

1. Throughput. Two vision-style map datasets of generated images (64 pixels a side: light
   work that shows the seeding's fixed cost per sample; 128: ~1 ms a sample, still lighter
   than decoding a photo) through a random resized crop and a horizontal flip, plus noise: a
   torchvision-style one whose noise comes from torch too (its samples draw from torch's
   stream only), and an albumentations-style one with numpy noise and a python gain (all
   three streams). Each is loaded by the plain ``DataLoader`` (shuffled, persistent workers)
   and by the same loader as ``run.prepare`` rebuilds it
   (:class:`tlaunch.sampling.ResumableLoader`: keys, the streams seeded per sample). Same
   dataset, batch size and workers, after a warm-up epoch; each repetition runs an epoch of
   both, batch by batch in turns, so that both meet the same load from the rest of the
   machine. A last, heavier row decodes a JPEG per sample (256 px, cropped to 224), as an
   ImageNet-style pipeline does at its lightest. Samples per CPU second (the process's time
   in each loader's calls plus that loader's workers'; one torch thread everywhere); the
   target, >= 0.98x, is judged on the median of the repetitions' ratios, shown with their
   range. Also on ``num_workers=0``,
   where the training process's streams are saved and restored around each batch. The first
   line gives the seeding's cost in a tight loop (each stream's), between the samples of an
   epoch (where caches are cold) and, per batch, of keeping the training process's streams.
   ``--a-a`` also times the plain loader against a second plain loader the same way: how far
   from 1.00x the measurement itself lands on this machine. glibc's malloc is given fixed
   thresholds first (as in ``overhead.py``; ``--glibc-malloc`` keeps its adaptive ones): it
   raises its mmap threshold to the size of a block freed, so with two loaders' batches
   interleaved in one process one loader's batches can come from fresh mappings, zero-filled
   page by page, and be unmapped again when freed: the plain loader against itself then
   lands at 0.987-0.993x on the 128 px rows, and at 0.94-0.95x on fixed-size 128 px crops,
   whose second loader's collate took 10-15 us a sample more. A training run has one
   loader, not two in turns.
2. Resume. Time from starting an epoch's iterator to its first batch, at the middle of the
   epoch (a resumed run) against at its start (non-persistent workers: both start them).
   Target: <= 1.1x, i.e. no replay. For contrast, the same for a loader that would replay the
   skipped batches (what a custom sampler without state costs), and for a sampler with
   torchdata's state protocol through StatefulDataLoader.

Counted instead of timed: ``--run-epochs plain|seeded N`` only runs N epochs of one loader
over fixed-size crops (the same work per sample whatever the draws), with no workers. Under
``valgrind --tool=cachegrind --cache-sim=yes``, the counts of N=3 less those of N=1 are two
epochs' instructions and simulated cache misses, free of this machine's noise.
"""

from __future__ import annotations

import _random
import argparse
import ctypes
import io
import itertools
import math
import os
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from _proc import fix_malloc  # benchmarks/, on sys.path when a script here runs
from torch.utils.data import DataLoader, Dataset, Sampler

from tlaunch.sample_seeds import (
    _NUMPY,
    _PYTHON,
    _TORCH,
    _restore_streams,
    _save_streams,
    _seed_streams,
)
from tlaunch.sampling import ResumableLoader

BATCH = 32
THROUGHPUT_TARGET, RESUME_TARGET = 0.98, 1.1
IMAGE_BYTES = 200 << 20
SUMS = ("the three", "between samples", "kept a batch")


def crop_and_flip(img: torch.Tensor, out: int) -> torch.Tensor:
    """RandomResizedCrop to ``out`` pixels a side + RandomHorizontalFlip (torchvision's
    algorithm), drawing from torch's stream."""
    _, h, w = img.shape
    area = h * w * torch.empty(1).uniform_(0.3, 1.0).item()
    aspect = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3)).item())
    cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
    top = int(torch.randint(0, h - ch + 1, (1,)).item())
    left = int(torch.randint(0, w - cw + 1, (1,)).item())
    crop = img[:, top : top + ch, left : left + cw][None]
    img = F.interpolate(crop, size=(out, out), mode="bilinear", antialias=True)[0]
    return img.flip(-1) if torch.rand(1) < 0.5 else img


class Augmented(Dataset):
    """Generated images through RandomResizedCrop + RandomHorizontalFlip (torchvision's
    algorithm on torch's RNG) and albumentations-style numpy noise with a python gain."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.out = size * 3 // 4

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.crop_and_flip(i)
        noisy = img.numpy() + np.random.normal(0, 0.05, img.shape).astype(np.float32)
        return torch.from_numpy(noisy * random.uniform(0.9, 1.1)), self.labels[i]

    def crop_and_flip(self, i: int) -> torch.Tensor:
        return crop_and_flip(self.images[i], self.out)


class TorchStream(Augmented):
    """The same crop and flip, with the noise from torch: a torchvision v2 pipeline's
    draws (``GaussianNoise`` included), from torch's stream only."""

    def __getitem__(self, i: int):
        img = self.crop_and_flip(i)
        return img + torch.randn_like(img) * 0.05 * torch.empty(1).uniform_(0.9, 1.1), self.labels[
            i
        ]


class Decoded(Dataset):
    """JPEG photos decoded per sample (generated, smooth with grain, quality 90), then a
    random resized crop to 7/8 of the side and a horizontal flip from torch's stream, scaled
    to [0, 1]: an ImageNet-style pipeline at its lightest (no normalisation, no colour
    jitter)."""

    def __init__(self, n: int, size: int) -> None:
        from PIL import Image  # optional: see pil_available

        g = torch.Generator().manual_seed(0)
        self.blobs = []
        for _ in range(n):
            coarse = torch.rand(1, 3, 8, 8, generator=g)
            smooth = F.interpolate(coarse, size=(size, size), mode="bicubic")[0]
            grain = torch.rand(3, size, size, generator=g) * 0.08
            pixels = ((smooth + grain).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
            out = io.BytesIO()
            Image.fromarray(pixels.numpy()).save(out, format="JPEG", quality=90)
            self.blobs.append(out.getvalue())
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.out = size * 7 // 8

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(io.BytesIO(self.blobs[i])) as photo:
            img = torch.from_numpy(np.array(photo.convert("RGB"))).permute(2, 0, 1)
        return crop_and_flip(img.float().div_(255), self.out), self.labels[i]


def pil_available() -> bool:
    try:
        import PIL  # noqa: F401  (Pillow: tensorboard's dependency, in the dev install)
    except ImportError:
        return False
    return True


#: The two kinds of augmentation measured: torch's stream only (numpy's and python's are then
#: not seeded per sample), and all three.
DATASETS = {
    "torchvision-style, torch's stream": TorchStream,
    "albumentations-style, torch + numpy + python streams": Augmented,
}


class ResumingSampler(Sampler[int]):
    """A permutation per epoch with torchdata's state protocol (yielded count)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.yielded, self._at = n, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        start, self._at = self._at, 0
        self.yielded = start
        for i in order.tolist()[start:]:
            self.yielded += 1
            yield i

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._at = state["epoch"], state["yielded"]


def plain_loader(data: Dataset, workers: int, persistent: bool, **kw) -> DataLoader:
    extra = {"persistent_workers": persistent} if workers else {}
    if "sampler" not in kw:
        kw["shuffle"] = True
    return DataLoader(data, batch_size=BATCH, num_workers=workers, **extra, **kw)


_LIBC = ctypes.CDLL(None, use_errno=True)


def children() -> set[int]:
    """This process's child processes (the loaders' workers)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:  # a thread that ended since the listing
            pass
    return pids


def cpu_of(pids: set[int]) -> float:
    """CPU seconds of these processes, to the nanosecond (the 10 ms ticks of /proc/PID/stat
    would be a few percent of an epoch)."""
    total = 0.0
    for pid in pids:
        clock = ctypes.c_int()
        if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
            total += time.clock_gettime(clock.value)
    return total


def samples(batch) -> int:
    return len(batch[0][0] if isinstance(batch[1], bool) else batch[0])


class PlainAgain:
    """A second plain loader, iterated as :class:`ResumableLoader` is: the A/A contrast."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def iterate(self, epoch: int):
        return ((batch, False) for batch in self.loader)


def throughput(
    data: Dataset, workers: int, reps: int, a_a: bool = False
) -> tuple[float, float, list[float]]:
    """Plain and seeded samples per CPU second (medians) and the repetitions' ratios (with
    ``a_a``, a second plain loader in the seeded one's place: the measurement's own noise).

    Each repetition runs an epoch of both loaders at once, a batch of one then a batch of the
    other (which first alternates), so that both meet the same load from the rest of the
    machine. A loader's CPU time is its workers' and what this process spends in its calls.
    Both epochs start at their first batch's request (``iterate``'s generators): with the plain
    loader's iterator made up front, its workers started each epoch alone, and the plain
    loader against itself landed at 0.94-0.98x with 2 workers.
    """
    plain = PlainAgain(plain_loader(data, workers, persistent=True))
    second = plain_loader(data, workers, True)
    seeded = PlainAgain(second) if a_a else ResumableLoader(second, seed=0, rank=0, world=1)
    others = children()
    for _ in plain.iterate(0):  # warm-up: the workers started
        pass
    pids = [children() - others]
    for _ in seeded.iterate(0):
        pass
    pids.append(children() - others - pids[0])
    rates = []
    for r in range(reps):
        cpu = [-cpu_of(p) for p in pids]
        start = [lambda r=r: plain.iterate(r + 1), lambda r=r: seeded.iterate(r + 1)]
        its, count = [], [0, 0]
        for k in (0, 1):
            t = time.process_time()
            its.append(start[k]())
            cpu[k] += time.process_time() - t
        live = [0, 1] if r % 2 == 0 else [1, 0]
        while live:
            for k in list(live):
                t = time.process_time()
                batch = next(its[k], None)
                cpu[k] += time.process_time() - t
                if batch is None:
                    live.remove(k)
                else:
                    count[k] += samples(batch)
        rates.append([count[k] / (cpu[k] + cpu_of(pids[k])) for k in (0, 1)])
    return (
        statistics.median(p for p, _ in rates),
        statistics.median(s for _, s in rates),
        [s / p for p, s in rates],
    )


def first_batch(start_epoch) -> float:
    t = time.perf_counter()
    next(iter(start_epoch()))
    return time.perf_counter() - t


def resume_times(data: Dataset, workers: int, reps: int) -> dict[str, tuple[float, float]]:
    """Per loader kind: (median time to the first batch at the epoch's start, mid-epoch)."""
    mid = len(data) // BATCH // 2
    index = ResumableLoader(plain_loader(data, workers, False), seed=0, rank=0, world=1)
    sampler = ResumingSampler(len(data))
    state_kind = ResumableLoader(
        plain_loader(data, workers, False, sampler=sampler), seed=0, rank=0, world=1
    )
    it = state_kind.iterate(1)
    for _ in range(mid):
        next(it)
    saved = state_kind.state_dict()
    del it

    def replayed(epoch_start: int):
        it = iter(plain_loader(data, workers, False))
        for _ in range(epoch_start):
            next(it)
        return it

    def from_state():
        state_kind.resume_from(saved)
        return state_kind.iterate(1, mid)

    kinds = {
        "by sample index (run.prepare, standard samplers)": (
            lambda: index.iterate(1),
            lambda: index.iterate(1, mid),
        ),
        "from a sampler's saved state (StatefulDataLoader)": (
            lambda: state_kind.iterate(1),
            from_state,
        ),
        "replaying the skipped batches (contrast)": (lambda: replayed(0), lambda: replayed(mid)),
    }
    out = {}
    for name, (fresh, resumed) in kinds.items():
        pairs = [(first_batch(fresh), first_batch(resumed)) for _ in range(reps)]
        out[name] = (statistics.median(f for f, _ in pairs), statistics.median(r for _, r in pairs))
    return out


def per_call(call, n: int = 20000) -> float:
    """CPU seconds a call of ``call(i)``, the best of 5 runs of ``n`` in a row (warm caches:
    between the samples of an epoch each costs more)."""
    best = math.inf
    for _ in range(5):
        start = time.process_time()
        for i in range(n):
            call(i)
        best = min(best, (time.process_time() - start) / n)
    return best


def seeding_costs(data: Dataset) -> dict[str, float]:
    """Seconds per sample to seed the three streams, together and each on its own, in a tight
    loop; the three between samples (each after a sample of ``data``, less a call that does
    nothing there); per batch, keeping the training process's streams around it."""

    def seed(i: int) -> int:
        return i * 0x9E3779B97F4A7C15 & (2**64 - 1)

    def kept(_: int) -> None:
        _restore_streams(_save_streams())

    after: dict[bool, list[float]] = {True: [], False: []}
    for i in range(800):
        data[i % len(data)]
        start = time.process_time()
        if i % 2:
            _seed_streams(seed(i))
        after[bool(i % 2)].append(time.process_time() - start)
    return {
        "the three": per_call(lambda i: _seed_streams(seed(i))),
        "torch": per_call(lambda i: _TORCH.manual_seed(seed(i))),
        "numpy": per_call(lambda i: _NUMPY.seed(seed(i) >> 32)),
        "python random": per_call(lambda i: _random.Random.seed(_PYTHON, seed(i))),
        "between samples": statistics.median(after[True]) - statistics.median(after[False]),
        "kept a batch": per_call(kept, 2000),
    }


class FixedCrop(Augmented):
    """A fixed-size crop at a random place, a flip and noise, all from torch's stream: the
    same work for every sample whatever the draws, so that counting the instructions of an
    epoch compares the loaders, not their samples' crop sizes."""

    def __getitem__(self, i: int):
        img = self.images[i]
        _, h, w = img.shape
        top = int(torch.randint(0, h - self.out + 1, (1,)).item())
        left = int(torch.randint(0, w - self.out + 1, (1,)).item())
        crop = img[:, top : top + self.out, left : left + self.out][None]
        out = F.interpolate(crop, size=(self.out, self.out), mode="bilinear", antialias=True)[0]
        out = out.flip(-1) if torch.rand(1) < 0.5 else out
        return out + torch.randn_like(out) * 0.05, self.labels[i]


def run_epochs(kind: str, epochs: int) -> None:
    """``epochs`` epochs of 512 fixed-crop 128 px samples through one loader, no workers: the
    program to count under valgrind (the difference between 3 epochs and 1 is two epochs)."""
    torch.set_num_threads(1)
    loader = plain_loader(FixedCrop(512, 128), 0, True)
    if kind == "plain":
        loader = PlainAgain(loader)
    else:
        loader = ResumableLoader(loader, seed=0, rank=0, world=1)
    for epoch in range(epochs):
        for _ in loader.iterate(epoch):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--sizes", default="64,128", help="image sides in pixels (crops are 3/4 of them)"
    )
    parser.add_argument("--samples", type=int, default=1024, help="at most; 200 MB of images")
    parser.add_argument("--throughput-only", action="store_true", help="skip part 2 (resume)")
    parser.add_argument(
        "--decoded",
        type=int,
        default=256,
        help="side of the decoded-photo row's JPEGs in pixels (0: no such row)",
    )
    parser.add_argument(
        "--a-a",
        action="store_true",
        help="also time the plain loader against itself (the measurement's noise)",
    )
    parser.add_argument("--glibc-malloc", action="store_true", help="keep glibc's adaptive malloc")
    parser.add_argument(
        "--run-epochs",
        nargs=2,
        metavar=("plain|seeded", "N"),
        help="only run N epochs of one loader (fixed crops, no workers), to count under valgrind",
    )
    args = parser.parse_args()
    if args.run_epochs:
        return run_epochs(args.run_epochs[0], int(args.run_epochs[1]))
    # One thread, as in a loader worker: with two, the training process's CPU time would be
    # mostly OpenMP's threads waiting for work.
    torch.set_num_threads(1)
    fixed = not args.glibc_malloc and fix_malloc()
    print(f"malloc: {'fixed thresholds' if fixed else 'glibc default (adaptive)'}")
    sizes = [int(side) for side in args.sizes.split(",")]
    data = Augmented(args.samples, sizes[0])
    costs = seeding_costs(data)
    each = ", ".join(f"{k} {v * 1e6:.1f}" for k, v in costs.items() if k not in SUMS)
    print(
        f"seeding the three streams: {costs['the three'] * 1e6:.1f} us a sample in a loop "
        f"({each}), {costs['between samples'] * 1e6:.1f} us between samples; keeping the "
        f"training process's streams {costs['kept a batch'] * 1e6:.0f} us a batch of {BATCH}"
    )
    ok = True
    rows = [(size, kind, cls) for size, (kind, cls) in itertools.product(sizes, DATASETS.items())]
    if args.decoded and pil_available():
        rows.append((args.decoded, "decoded JPEG photos, torch's stream", Decoded))
    elif args.decoded:
        print("decoded JPEG photos: skipped (Pillow is not installed)")
    for size, kind, cls in rows:
        n = min(args.samples, IMAGE_BYTES // (3 * size * size * 4))
        n = min(args.samples, 512) if cls is Decoded else n  # JPEG bytes, ~20 KB an image
        kind_data = cls(n, size)
        t = time.process_time()
        for i in range(200):
            kind_data[i % n]
        per_sample = (time.process_time() - t) / 200
        print(f"{kind}: {n} images {size}x{size}, {per_sample * 1e3:.2f} ms of CPU a sample")
        for workers in sorted({args.workers, 0}, reverse=True):
            p, s, ratios = throughput(kind_data, workers, args.reps)
            ratio = statistics.median(ratios)
            ok &= ratio >= THROUGHPUT_TARGET
            print(
                f"  throughput, {workers} workers, per CPU second: plain {p:.0f} samples, "
                f"per-sample seeding {s:.0f} samples: {ratio:.3f}x (target >= "
                f"{THROUGHPUT_TARGET}x), {min(ratios):.3f}-{max(ratios):.3f}x over "
                f"{len(ratios)} repetitions"
            )
            if args.a_a:
                _, _, same = throughput(kind_data, workers, args.reps, a_a=True)
                print(
                    f"  A/A, {workers} workers: the plain loader against itself "
                    f"{statistics.median(same):.3f}x, {min(same):.3f}-{max(same):.3f}x"
                )
    resumes = {} if args.throughput_only else resume_times(data, args.workers, args.reps)
    for name, (fresh, resumed) in resumes.items():
        ratio = resumed / fresh
        contrast = "contrast" in name
        ok &= contrast or ratio <= RESUME_TARGET
        target = "" if contrast else f" (target <= {RESUME_TARGET}x)"
        print(
            f"first batch, {args.workers} workers, {name}: epoch start {fresh * 1e3:.0f} ms, "
            f"mid-epoch {resumed * 1e3:.0f} ms: {ratio:.2f}x{target}"
        )
    print("targets met" if ok else "a target was missed")


if __name__ == "__main__":
    main()
