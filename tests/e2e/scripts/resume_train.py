"""The issue's reference run: shuffled loader, dropout, BatchNorm, Adam with a StepLR schedule.

``--signal-at-batch B``: on rank 0, after micro-batch B (global count), send SIGTERM to the
launcher and to this process — a real preemption arriving at a known point.
``--signal-ranks R[,R...]``: instead, at that batch each listed rank sends SIGTERM to itself
only (the launcher and the other ranks learn of it only through the Run's agreement).
``--stop-file-at-batch B``: on the last rank only, create the launcher's STOP file instead (no
signal anywhere): the other ranks learn of the stop only through the Run's agreement.
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
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--signal-at-batch", type=int, default=-1)
parser.add_argument("--signal-ranks", default="")
parser.add_argument("--out", required=True)
parser.add_argument("--stop-file-at-batch", type=int, default=-1)
parser.add_argument("--crash-at-batch", type=int, default=-1, help="rank 1 exits 13 there, once")
# An edited script meeting its old checkpoint:
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
parser.add_argument("--samples", type=int, default=384)
args = parser.parse_args()

run = tlaunch.init(hparams={"lr": args.lr, "batch_size": args.batch_size})
data = make_data(n=args.samples)
model = Classifier(hidden=args.hidden)
optimizer = (
    torch.optim.Adam(model.parameters(), lr=args.lr)
    if args.optimizer == "adam"
    else torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
model, optimizer, loader, scheduler = run.prepare(model, optimizer, loader, scheduler)

micro = run.step * run.config.grad_accum  # exact at window boundaries, where resumes happen
step_delay = float(os.environ.get("RESUME_TEST_STEP_DELAY", "0"))  # paces runs that tests interrupt
started_marker = args.out + ".started"
for _epoch in run.epochs(args.epochs):
    model.train()
    for x, y in run.batches(loader):
        with run.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            run.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        run.log(loss=loss)
        micro += 1
        if run.rank == 0 and not os.path.exists(started_marker):
            open(started_marker, "w").close()
        if step_delay:
            time.sleep(step_delay)
        if micro == args.signal_at_batch and args.signal_ranks:
            if str(run.rank) in args.signal_ranks.split(","):
                os.kill(os.getpid(), signal.SIGTERM)
        elif micro == args.signal_at_batch and run.rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        if micro == args.stop_file_at_batch and run.rank == run.world_size - 1:
            open(os.path.join(os.environ["TLAUNCH_CONTROL_DIR"], "STOP"), "w").close()
        crash_marker = args.out + ".crashed"
        if micro == args.crash_at_batch and run.rank == 1 and not os.path.exists(crash_marker):
            open(crash_marker, "w").close()
            os._exit(13)
run.finish()
if run.is_main:
    torch.save(run.accelerator.unwrap_model(model).state_dict(), args.out)
    print(f"RESULT step={run.step}", flush=True)
