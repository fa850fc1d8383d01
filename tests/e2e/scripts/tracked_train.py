"""A small Run API job that logs a loss and a token count every step and ``val`` at the end of
each epoch, for the trackers' tests.

Every record is flushed at once and the figures are computed at every flush, so that what a
killed run leaves behind (lines past its last checkpoint) is on disk. ``--kill-at-step S``: the
worker SIGKILLs itself after step S's log (a hard kill: nothing saved since the last
checkpoint); ``--term-at-step S``: SIGTERM to the launcher and to this worker (a preemption).
"""

import argparse
import os
import signal
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import tlaunch
from tlaunch.run_io import MetricsLog
from tlaunch.trackers import RunLogs

MetricsLog.FLUSH_RECORDS = 1
RunLogs.FIGURES_SECONDS = 0.0

parser = argparse.ArgumentParser()
parser.add_argument("--kill-at-step", type=int, default=-1)
parser.add_argument("--term-at-step", type=int, default=-1)
args = parser.parse_args()

run = tlaunch.init(hparams={"lr": 0.1, "batch_size": 4, "layers": [8, 2]})
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g))
model = torch.nn.Linear(8, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
loader = DataLoader(data, batch_size=4, shuffle=True)
model, optimizer, loader, scheduler = run.prepare(model, optimizer, loader, scheduler)
for _epoch in run.epochs(2):
    for x, y in run.batches(loader):
        with run.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            run.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        run.log(loss=loss, tokens=100)
        if run.step == args.kill_at_step:
            # The newest save runs in the background: a hard kill before its COMMIT is durable
            # would make the resume point depend on how fast this machine is.
            newest = run.step - run.step % run.config.save_every
            commit = os.path.join(run.config.checkpoint_dir, f"step-{newest:09d}", "COMMIT")
            deadline = time.monotonic() + 60
            while not os.path.exists(commit) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        if run.step == args.term_at_step:
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    with torch.no_grad():  # at the step of an epoch-end save, logged after it
        run.log(val=F.cross_entropy(model(data.tensors[0]), data.tensors[1]))
run.finish()
print(f"RESULT step={run.step}", flush=True)
