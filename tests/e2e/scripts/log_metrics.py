"""Logs one record per step and reports what metrics.jsonl held at chosen moments.

Time-based flushes are switched off and the buffer is made small, so every line that reaches
the file got there through a flush the test can name (a full buffer, a save, a stop, finish).

Run it with ``tlaunch --max-steps N``. ``--end finish|raise|sigkill``: how the script leaves
after its last step; ``--signal-at-step S``: rank 0 sends itself SIGTERM at step S (the Run's
stop; ``--step-seconds T`` makes each step take at least T s, so that the ranks, which agree
on a stop every ~0.1 s of steps, agree on every step). Rank 0 prints ``RESULT step=S lines=N`` after each step's ``run.log``, N being the lines
on disk then.
"""

import argparse
import os
import signal
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlaunch
from tlaunch.run_io import MetricsLog

parser = argparse.ArgumentParser()
parser.add_argument("--end", default="finish", choices=["finish", "raise", "sigkill"])
parser.add_argument("--signal-at-step", type=int, default=-1)
parser.add_argument("--step-seconds", type=float, default=0.0)
parser.add_argument("--flush-records", type=int, default=1000)
args = parser.parse_args()

MetricsLog.FLUSH_SECONDS = float("inf")
MetricsLog.FLUSH_RECORDS = args.flush_records

run = tlaunch.init()
torch.manual_seed(0)
data = TensorDataset(torch.randn(64 * run.world_size, 4), torch.randn(64 * run.world_size, 1))
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loader = DataLoader(data, batch_size=2, shuffle=True)
model, optimizer, loader = run.prepare(model, optimizer, loader)
path = os.path.join(run.run_dir, "metrics.jsonl")
counter = torch.zeros(())  # logged, then changed in place: the line must keep the old value

for _epoch in run.epochs(1):
    for x, y in run.batches(loader):
        with run.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            run.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        counter += 1
        time.sleep(args.step_seconds)
        run.log(loss=loss, counter=counter, rank=torch.tensor(float(run.rank)), reduce=True)
        if run.is_main:
            with open(path) as f:
                print(f"RESULT step={run.step} lines={len(f.readlines())}", flush=True)
        if run.step == args.signal_at_step and run.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

if args.end == "raise":
    raise RuntimeError("the script fails after logging")
if args.end == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
run.finish()
