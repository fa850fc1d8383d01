"""A run that finishes (its final checkpoint committed), then goes on in the script.

``MARKER MODE``: MARKER is written once ``run.finish()`` returned. Then ``exit`` leaves cleanly
when a stop signal comes (a script that handles its own stop after training); ``linger`` keeps
working until something ends it (post-processing after training).
"""

import signal
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

marker, mode = sys.argv[1], sys.argv[2]
run = tlaunch.init()
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)
model, optimizer, loader = run.prepare(model, optimizer, loader)
for _epoch in run.epochs(1):
    for (x,) in run.batches(loader):
        run.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
run.finish()
if mode == "exit":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
open(marker, "w").close()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
