"""A Run API training script that reports what happened, for the strategy and debug-flag tests.

Writes ``probe-rank<R>.json`` in the working directory at the end.
"""

import argparse
import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=320)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--count-comm", action="store_true")
args = parser.parse_args()

run = tlaunch.init(hparams={"lr": args.lr, "batch_size": args.batch_size})
g = torch.Generator().manual_seed(0)
x = torch.randn(args.n, 8, generator=g)
y = (x @ torch.randn(8, 1, generator=g)).squeeze(1)
data = TensorDataset(x, y, torch.arange(args.n))
torch.manual_seed(0)  # identical initial weights whatever the rank
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
model, optimizer, loader = run.prepare(model, optimizer, loader)

comm_calls = 0
if args.count_comm and run.world_size > 1:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def counting_hook(state, bucket):
        global comm_calls
        comm_calls += 1
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)

batches, seen, losses = [], [], []
for _epoch in run.epochs(args.epochs):
    count, indices = 0, []
    for xb, yb, ib in run.batches(loader):
        with run.accumulate(model):
            loss = F.mse_loss(model(xb).squeeze(1), yb)
            run.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        count += 1
        indices += ib.tolist()
    batches.append(count)
    seen.append(indices)
run.log(reduce=True, rank_value=torch.tensor(float(run.rank)))
run.finish()

h = hashlib.sha256()
for _name, t in sorted(run.accelerator.unwrap_model(model).state_dict().items()):
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
params = [
    p.detach().cpu().reshape(-1).tolist() for p in run.accelerator.unwrap_model(model).parameters()
]
# One file per rank: two ranks printing long lines to one pipe interleave them.
with open(f"probe-rank{run.rank}.json", "w") as f:
    json.dump(
        {
            "rank": run.rank,
            "world": run.world_size,
            "steps": run.step,
            "batches": batches,
            "seen": seen,
            "digest": h.hexdigest(),
            "params": params,
            "comm_calls": comm_calls,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "progress": run._progress.enabled,
            "rank_value": run.metrics["rank_value"],
            "strategy": run.strategy.name,
            "type": run.accelerator.distributed_type.value,
        },
        f,
    )
