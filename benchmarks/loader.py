"""What resumable input pipelines cost: loader throughput with per-sample seeding, and the time
from a resume to its first batch mid-epoch.

Run: ``.venv/bin/python benchmarks/loader.py [--reps 5] [--workers 2] [--size 64]``

1. Throughput. A vision-style map dataset (``--size``-pixel images through a random resized
   crop, a horizontal flip and numpy noise: torch, numpy and python ``random`` draws in
   ``__getitem__``) loaded by the plain ``DataLoader`` (shuffled, persistent workers) and by
   the same loader as ``run.prepare`` rebuilds it (:class:`tlaunch.sampling.ResumableLoader`:
   keys, a seed per sample for the three streams). Same dataset, batch size and workers; whole
   epochs after a warm-up epoch, in alternating order; the ratio is the median of the
   repetitions' back-to-back ratios. Samples per wall-clock second and per CPU second of the
   process and its workers are both shown; the target, >= 0.98x, is judged on CPU time, which
   other work on a shared machine does not inflate. Also on ``num_workers=0``, where the
   training process's streams are saved and restored around each batch.
2. Resume. Time from starting an epoch's iterator to its first batch, at the middle of the
   epoch (a resumed run) against at its start (non-persistent workers: both start them).
   Target: <= 1.1x, i.e. no replay. For contrast, the same for a loader that would replay the
   skipped batches (what a custom sampler without state costs), and for a sampler with
   torchdata's state protocol through StatefulDataLoader.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from tlaunch.sample_seeds import _seed_streams
from tlaunch.sampling import ResumableLoader

BATCH = 32
THROUGHPUT_TARGET, RESUME_TARGET = 0.98, 1.1


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
        img = self.images[i]
        _, h, w = img.shape
        area = h * w * torch.empty(1).uniform_(0.3, 1.0).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3)).item())
        cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
        top = int(torch.randint(0, h - ch + 1, (1,)).item())
        left = int(torch.randint(0, w - cw + 1, (1,)).item())
        crop = img[:, top : top + ch, left : left + cw][None]
        img = F.interpolate(crop, size=(self.out, self.out), mode="bilinear", antialias=True)[0]
        if torch.rand(1) < 0.5:
            img = img.flip(-1)
        noisy = img.numpy() + np.random.normal(0, 0.05, img.shape).astype(np.float32)
        return torch.from_numpy(noisy * random.uniform(0.9, 1.1)), self.labels[i]


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


def cpu_seconds() -> float:
    """CPU time of this process and of its children that are running (the loader's workers;
    they are persistent, so the same ones before and after an epoch)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def epoch_rate(batches) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second) over one epoch."""
    start, cpu, n = time.perf_counter(), cpu_seconds(), 0
    for b in batches:
        n += len(b[0][0] if isinstance(b[1], bool) else b[0])
    return n / (time.perf_counter() - start), n / (cpu_seconds() - cpu)


def throughput(data: Dataset, workers: int, reps: int) -> list[tuple[str, float, float, float]]:
    """Per clock (wall, CPU): plain samples/s, seeded samples/s and the median of the
    repetitions' back-to-back ratios."""
    plain = plain_loader(data, workers, persistent=True)
    seeded = ResumableLoader(plain_loader(data, workers, True), seed=0, rank=0, world=1)
    epoch_rate(plain), epoch_rate(seeded.iterate(0))  # warm-up: workers started
    pairs = []
    for r in range(reps):
        if r % 2:
            s = epoch_rate(seeded.iterate(r + 1))
            p = epoch_rate(plain)
        else:
            p = epoch_rate(plain)
            s = epoch_rate(seeded.iterate(r + 1))
        pairs.append((p, s))
    out = []
    for clock, k in (("wall", 0), ("CPU", 1)):
        ratio = statistics.median(s[k] / p[k] for p, s in pairs)
        out.append(
            (
                clock,
                statistics.median(p[k] for p, _ in pairs),
                statistics.median(s[k] for _, s in pairs),
                ratio,
            )
        )
    return out


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


def seeding_cost(n: int = 20000) -> float:
    """Seconds per sample to seed torch's CPU generator, numpy and python ``random``."""
    start = time.perf_counter()
    for i in range(n):
        _seed_streams(i * 0x9E3779B97F4A7C15 & (2**64 - 1))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    data = Augmented(args.samples, args.size)
    t = time.perf_counter()
    for i in range(200):
        data[i]
    per_sample = (time.perf_counter() - t) / 200
    print(
        f"dataset: {args.samples} images {args.size}x{args.size}, {per_sample * 1e3:.2f} ms a "
        f"sample in one process; seeding the three streams: {seeding_cost() * 1e6:.1f} us a sample"
    )
    ok = True
    for workers in sorted({args.workers, 0}, reverse=True):
        for clock, p, s, ratio in throughput(data, workers, args.reps):
            judged = clock == "CPU"  # what other work on the machine does not inflate
            ok &= not judged or ratio >= THROUGHPUT_TARGET
            target = f" (target >= {THROUGHPUT_TARGET}x)" if judged else ""
            print(
                f"throughput, {workers} workers, per {clock} second: plain {p:.0f} samples, "
                f"per-sample seeding {s:.0f} samples: {ratio:.3f}x{target}"
            )
    for name, (fresh, resumed) in resume_times(data, args.workers, args.reps).items():
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
