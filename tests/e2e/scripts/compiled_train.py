"""A torch.compile'd model trained under the Run API; rank 0 writes its final parameters.

``--out FILE``: where rank 0 saves the trained module's own state dict (no wrapper prefixes),
the reference an export must equal. Logs ``score``, lowest at step 2, so ``best`` is an early
step and ``last`` the final one.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

run = tlaunch.init()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
# The eager backend still wraps the module (keys under _orig_mod.) but needs no C++ compiler.
model = torch.compile(net, backend="eager")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = TensorDataset(torch.randn(16 * run.world_size, 4), torch.randn(16 * run.world_size, 1))
loader = DataLoader(data, batch_size=4)
model, optimizer, loader = run.prepare(model, optimizer, loader)
for _epoch in run.epochs(1):
    for x, y in run.batches(loader):
        with run.accumulate(model):
            run.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        run.log(score=float(abs(run.step - 2)))
run.finish()
if run.is_main:
    torch.save(net.state_dict(), args.out)
    print(f"RESULT step={run.step}", flush=True)
