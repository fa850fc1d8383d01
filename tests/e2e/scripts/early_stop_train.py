"""Early stopping under the Run API: ``val_metric`` is ``(epoch - 3) ** 2``, best at epoch 3
and worse after it, logged from an evaluation pass at the end of every epoch.

``--signal-at-step S``: rank 0 sends SIGTERM to the launcher and to itself after step S (a
preemption at a known point; a resumed run starts past S and does not send it again).
``--step-seconds T``: each step takes at least T seconds (the ranks agree on a stop about
every 0.1 s of steps: with T >= 0.1 the stop lands within a step of S).
Rank 0 prints ``RESULT epoch=<last epoch run> step=<steps>`` and saves the final parameters.
In epoch 0 a first pass raises inside its loop: the model must be back in train mode after.
"""

import argparse
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples"))
from train_classifier import Classifier, make_data  # noqa: E402

import tlaunch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--signal-at-step", type=int, default=-1)
parser.add_argument("--step-seconds", type=float, default=0.0)
args = parser.parse_args()

run = tlaunch.init(hparams={"lr": 0.01, "batch_size": 8})
model = Classifier()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
loader = DataLoader(make_data(n=64), batch_size=8, shuffle=True)
val_loader = DataLoader(make_data(n=15), batch_size=4)
model, optimizer, loader = run.prepare(model, optimizer, loader)
last = -1
for epoch in run.epochs(args.epochs):
    model.train()
    for x, y in run.batches(loader):
        with run.accumulate(model):
            run.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        time.sleep(args.step_seconds)
        if run.step == args.signal_at_step and run.rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    if epoch == 0:
        try:
            for _ in run.eval_batches(val_loader):
                raise RuntimeError("a failing evaluation loop")
        except RuntimeError:
            pass
        assert model.training, "an evaluation pass that raised left the model in eval mode"
    for x, _y in run.eval_batches(val_loader):
        score = F.cross_entropy(model(x), _y) * 0 + (epoch - 3) ** 2
        run.log(val_metric=score, reduce=True)
    last = epoch
run.finish()
if run.is_main:
    torch.save(run.accelerator.unwrap_model(model).state_dict(), args.out)
    print(f"RESULT epoch={last} step={run.step}", flush=True)
