"""Two optimizer steps and one committed checkpoint: the smallest run that writes a state.json."""

import torch
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

run = tlaunch.init(hparams={"lr": 0.1})
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)
model, optimizer, loader = run.prepare(model, optimizer, loader)
for _epoch in run.epochs(1):
    for (x,) in run.batches(loader):
        run.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
run.save()
run.finish()
print("SAVED", run.step, flush=True)
