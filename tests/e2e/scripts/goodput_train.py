"""A small Run API job a test can stop where it wants: the step count goes to ``<out>.step``
after each step; with ``HOLD_AT=K`` the run trains step K, which its goodput records then
name (the step before it is slowed past the records' interval), and waits there (``<out>.held``
says so) for a SIGKILL."""

import os
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import tlaunch
from tlaunch.storage import GOODPUT_PROGRESS_SECONDS

out = sys.argv[1]
hold_at = int(os.environ.get("HOLD_AT", "0"))
run = tlaunch.init(hparams={"lr": 0.1})
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(0)
loader = DataLoader(TensorDataset(torch.randn(120, 4, generator=g)), batch_size=4)
model, optimizer, loader = run.prepare(model, optimizer, loader)
print(f"START step={run.step}", flush=True)
for _epoch in run.epochs(1):
    for (x,) in run.batches(loader):
        if hold_at and run.step == hold_at:
            with open(out + ".held", "w") as f:
                f.write(str(run.step))
            while True:  # until killed
                time.sleep(1)
        if hold_at and run.step == hold_at - 1:
            # The step about to finish is recorded once this much time passed since the last
            # record, so the run's own records know the step it is killed at.
            time.sleep(GOODPUT_PROGRESS_SECONDS + 0.2)
        run.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        with open(out + ".step.tmp", "w") as f:
            f.write(str(run.step))
        os.replace(out + ".step.tmp", out + ".step")
        time.sleep(0.1)
run.finish()
print(f"DONE step={run.step}", flush=True)
