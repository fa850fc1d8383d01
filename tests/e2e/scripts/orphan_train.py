"""A worker that outlives its launcher: before ``tlaunch.init()`` it waits until its launcher is
gone (the test SIGKILLs it) and forgets its launcher's pid, so nothing ties it to that
launcher's death any more; then it trains slowly, saving every step, as an orphan would.

argv: MARKER -- written (with this process's pid) once the script runs.
"""

import ctypes
import os
import sys
import time

# Untied from the launcher's death first: a worker asks Linux to end it with its launcher from
# its first line (tlaunch's sitecustomize); an orphan is one that request never reached.
ctypes.CDLL(None, use_errno=True).prctl(1, 0)  # PR_SET_PDEATHSIG: none
marker = sys.argv[1]
launcher = os.getppid()
with open(marker + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(marker + ".tmp", marker)
deadline = time.monotonic() + 60
while os.getppid() == launcher:
    if time.monotonic() > deadline:
        sys.exit("the test never killed the launcher")
    time.sleep(0.05)

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import tlaunch  # noqa: E402
from tlaunch.contract import LAUNCHER_PID_ENV  # noqa: E402

# A worker started after its launcher died leaves at init (tests/launch/test_stopping.py); this
# one stands for an orphan nothing ties to its launcher (another machine's, say), which only
# the lease's fence can stop.
os.environ.pop(LAUNCHER_PID_ENV, None)

run = tlaunch.init()
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loader = DataLoader(TensorDataset(torch.ones(300, 2)), batch_size=1)
model, optimizer, loader = run.prepare(model, optimizer, loader)
for _epoch in run.epochs(1):
    for (x,) in run.batches(loader):
        run.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        time.sleep(0.2)
run.finish()
print("ORPHAN FINISHED", run.step, flush=True)
