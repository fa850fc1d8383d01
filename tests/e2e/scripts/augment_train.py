"""A vision-style run: generated images through random crops, flips and noise in
``__getitem__`` (torch, numpy and python ``random`` streams); a DataLoader with worker
processes.

``--signal-at-batch B --signal-how HOW``: on rank 0, after micro-batch B (global count):
``launcher`` sends SIGTERM to the launcher and to this rank (a preemption at a known point);
``all`` sends SIGTERM to the launcher, every rank and every loader worker (systemd's stop);
``group-int`` sends SIGINT to this process group (a terminal's Ctrl-C under plain python).
``--batch-seconds T``: each micro-batch takes at least T s (the ranks agree on a stop every
~0.1 s of steps: with T >= 0.1 the stop lands within a step or two of B, not past the end).
Prints ``RESULT step=S`` at the end and saves the final parameters to ``--out``.
"""

import argparse
import math
import os
import random
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import tlaunch

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--data", choices=("images", "stream", "plain-stream"), default="images")
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--persistent", action="store_true")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--samples", type=int, default=96)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--signal-at-batch", type=int, default=-1)
parser.add_argument("--signal-how", choices=("launcher", "all", "group-int"), default="launcher")
parser.add_argument("--batch-seconds", type=float, default=0.0)
args = parser.parse_args()


def random_resized_crop(img: torch.Tensor, size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, then a bilinear resize."""
    _, h, w = img.shape
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, size=(1,)).item())
            j = int(torch.randint(0, w - cw + 1, size=(1,)).item())
            break
    else:
        i, j, ch, cw = 0, 0, h, w
    crop = img[:, i : i + ch, j : j + cw][None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]


def random_horizontal_flip(img: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    return img.flip(-1) if torch.rand(1) < p else img


class Images(Dataset):
    """Generated images through RandomResizedCrop and RandomHorizontalFlip (torch's RNG), then
    albumentations-style numpy code: Gaussian noise from np.random, a python ``random`` gain."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(99)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        pattern = torch.randn(4, 3, 20, 20, generator=g)
        self.images = pattern[self.labels] + 0.5 * torch.randn(n, 3, 20, 20, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = random_horizontal_flip(random_resized_crop(self.images[i], 12)).numpy()
        img = (img + np.random.normal(0, 0.3, size=img.shape)) * random.uniform(0.8, 1.2)
        return torch.from_numpy(img.astype(np.float32)), self.labels[i]


class ImageStream(IterableDataset):
    """The same images as a stream without a length, split between the loader's workers; each
    item's crop, flip and noise seeded from (item, epoch) by the stream itself."""

    def __init__(self, images: Images) -> None:
        self.images, self.epoch, self.pos = images, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        mine = range(info.id, len(self.images), info.num_workers)
        while self.pos < len(mine):
            item = mine[self.pos]
            self.pos += 1
            seed = item * 7919 + self.epoch
            torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
            yield self.images[item]
        self.pos = 0


class StatefulImageStream(ImageStream):
    """torchdata's protocol: the position in this worker's share."""

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(32, 4),
    )  # fmt: skip


def stop_here() -> None:
    """The signals come from a ``kill`` process, as from systemd or a terminal: a worker's own
    rank is its parent, whose SIGTERM rightly ends it."""
    if args.signal_how == "group-int":
        subprocess.run(["kill", "-INT", "--", f"-{os.getpgid(0)}"], timeout=30)
        return
    launcher = os.getppid()
    targets = [launcher, os.getpid()]
    if args.signal_how == "all":
        targets = [launcher, *descendants(launcher)]
    subprocess.run(["kill", "-TERM", *map(str, targets)], timeout=30)


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


run = tlaunch.init(hparams={"batch_size": args.batch_size})
data = Images(args.samples)
model = build_model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
if args.data == "images":
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.persistent,
        timeout=120 if args.workers else 0,
    )
else:  # streams are split between workers: they need some
    from torchdata.stateful_dataloader import StatefulDataLoader

    stateful = args.data == "stream"
    loader = (StatefulDataLoader if stateful else DataLoader)(
        (StatefulImageStream if stateful else ImageStream)(data),
        batch_size=args.batch_size,
        num_workers=args.workers,
        timeout=120,
    )
model, optimizer, loader = run.prepare(model, optimizer, loader)

micro = run.step * run.config.grad_accum  # exact at window boundaries, where resumes happen
started_marker = args.out + ".started"
for _epoch in run.epochs(args.epochs):
    model.train()
    for x, y in run.batches(loader):
        with run.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            run.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        micro += 1
        time.sleep(args.batch_seconds)
        if run.rank == 0 and not os.path.exists(started_marker):
            open(started_marker, "w").close()
        if micro == args.signal_at_batch and run.rank == 0:
            stop_here()
run.finish()
if run.is_main:
    torch.save(run.accelerator.unwrap_model(model).state_dict(), args.out)
    print(f"RESULT step={run.step}", flush=True)
