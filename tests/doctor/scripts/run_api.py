"""A Run API script (tlaunch.init, run.prepare, run.batches); ``--bug small-batchnorm`` puts a
BatchNorm over 8 samples per device, which the doctor reports under two processes."""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

parser = argparse.ArgumentParser()
parser.add_argument("--bug", default="none", choices=("none", "small-batchnorm"))
bug = parser.parse_args().bug

run = tlaunch.init()
torch.manual_seed(0)
x = torch.randn(512, 8)
y = x @ torch.randn(8, 1) / 8**0.5
norm = nn.BatchNorm1d(32) if bug == "small-batchnorm" else nn.LayerNorm(32)
model = nn.Sequential(nn.Linear(8, 32), norm, nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
model, optimizer, loader = run.prepare(model, optimizer, loader)

for _epoch in run.epochs(2):
    for xb, yb in run.batches(loader):
        with run.accumulate(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            run.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
