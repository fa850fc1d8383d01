"""The smallest Run API job the launch tests share: a linear model, one epoch of two steps.

Imported by the scripts beside it (``python script.py`` puts their folder first on sys.path).
"""

import torch
from torch.utils.data import DataLoader, TensorDataset


def train_two_steps(run) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)
    model, optimizer, loader = run.prepare(model, optimizer, loader)
    for _epoch in run.epochs(1):
        for (x,) in run.batches(loader):
            run.backward(model(x).pow(2).mean())
            optimizer.step()
            optimizer.zero_grad()
