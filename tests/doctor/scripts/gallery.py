"""A small sound training script, and the classic bugs it can be given one at a time.

``--bug none`` (the default) is the clean script: the doctor finds nothing above info in it.
Every other ``--bug`` adds exactly one mistake, the one its name says; the doctor must report
that finding and no other above info. Unchanged script: no tlaunch import.
"""

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

BUGS = (
    "none",
    "cannot-overfit",
    "unregistered-module",
    "params-not-optimized",
    "unused-parameters",
    "missing-zero-grad",
    "eval-mode-training",
    "train-mode-eval",
    "unnormalized-inputs",
    "no-shuffle",
    "exploding-gradients",
    "fp16-without-scaler",
    "input-bound",
)
parser = argparse.ArgumentParser()
parser.add_argument("--bug", default="none", choices=BUGS)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--val-every", type=int, default=8)
bug = parser.parse_args().bug
args = parser.parse_args()


class SlowSamples(Dataset):
    """Each sample costs 2 ms to produce, as a decoded image would."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(0.002)
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        hidden = nn.Linear(8, 32)
        # unregistered-module: a plain list hides the layer from parameters()
        self.hidden = [hidden] if bug == "unregistered-module" else nn.ModuleList([hidden])
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(32, 1)
        if bug == "unused-parameters":
            self.spare = nn.Linear(32, 32)  # built, never called

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.hidden[0](x))))


torch.manual_seed(0)
x = torch.randn(512, 8)
y = x @ torch.randn(8, 1) / 8**0.5
if bug == "unnormalized-inputs":
    x = x * 10 + 20  # raw readings: the model sees them unscaled
samples = (SlowSamples if bug == "input-bound" else TensorDataset)(x[:448], y[:448])
train = DataLoader(samples, batch_size=16, shuffle=bug != "no-shuffle")
val = DataLoader(TensorDataset(x[448:], y[448:]), batch_size=64)
model = Net()
params = list(model.parameters())
if bug == "params-not-optimized":
    params = list(model.out.parameters())  # the hidden layer is left out
lr = {"cannot-overfit": 1e-6}.get(bug, 3e-2)
optimizer = torch.optim.Adam(params, lr=lr)
if bug == "exploding-gradients":
    optimizer = torch.optim.SGD(params, lr=3.0)


def evaluate():
    if bug != "train-mode-eval":
        model.eval()
    with torch.no_grad():
        loss = sum(nn.functional.mse_loss(model(xb), yb) for xb, yb in val)
    if bug != "eval-mode-training":
        model.train()
    return float(loss)


step = 0
for epoch in range(args.epochs):
    model.train()
    if bug == "eval-mode-training" and epoch == 0:
        evaluate()  # leaves the model in eval mode
    for xb, yb in train:
        with torch.autocast("cpu", dtype=torch.float16, enabled=bug == "fp16-without-scaler"):
            loss = nn.functional.mse_loss(model(xb).float(), yb)
        if bug != "missing-zero-grad":
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.val_every == 0:
            print(f"step {step} val {evaluate():.4f}", flush=True)
    print(f"epoch {epoch} val {evaluate():.6f}", flush=True)
