"""Training with evaluation passes every few steps, for keep-best and the sharded metric.

A linear model learns ``y = sum(x)`` while its evaluation set asks for ``-sum(x)``: the
evaluation loss grows as training goes on, so the best evaluation is an early one, and a
checkpoint saved a few steps after it would carry its value on weights that score worse.

``--plain-eval``: every rank evaluates the whole set itself at steps that are multiples of
``--eval-every`` and logs ``val_loss`` with ``run.log`` (what scripts did before
``run.eval_batches``). Otherwise ``run.eval_batches`` runs where ``--val-every-steps`` says; it
logs ``val_loss`` (per-sample values) and ``val_mse`` (batch means), both ``reduce=True``, rank
0 checks them against the whole set evaluated in one process, and every rank writes the
sample ids it evaluated to ``--out``.ids-<rank>.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

VAL_SAMPLES = 17  # not a multiple of 2: the ranks' shards differ by a sample and a batch


def val_set() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(VAL_SAMPLES, 4, generator=g)
    return TensorDataset(torch.arange(VAL_SAMPLES), x, -x.sum(1, keepdim=True))


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))


def plain_val_loss(model: nn.Module) -> float:
    """The evaluation set's mean squared error in one process, the way anyone computes it."""
    _, x, y = val_set().tensors
    was = model.training
    model.eval()
    with torch.no_grad():
        value = F.mse_loss(model(x), y).item()
    model.train(was)
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--plain-eval", action="store_true")
    parser.add_argument("--eval-every", type=int, default=3)
    args = parser.parse_args()

    run = tlaunch.init()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    train = TensorDataset(x, x.sum(1, keepdim=True))
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(train, batch_size=4, shuffle=True)
    val_loader = DataLoader(val_set(), batch_size=4)
    model, optimizer, loader = run.prepare(model, optimizer, loader)
    plain = run.accelerator.unwrap_model(model)
    try:  # a prepared loader is a training loader: refused in one line
        next(iter(run.eval_batches(loader)))
        raise AssertionError("run.eval_batches took a prepared loader")
    except ValueError as e:
        assert "without preparing it" in str(e), e
    seen: list[int] = []
    for _epoch in run.epochs(args.epochs):
        model.train()
        for xb, yb in run.batches(loader):
            with run.accumulate(model):
                run.backward(F.mse_loss(model(xb), yb))
                optimizer.step()
                optimizer.zero_grad()
            if args.plain_eval:
                if run.step % args.eval_every == 0:
                    run.log(val_loss=plain_val_loss(plain))
                continue
            step, stats = run.step, plain[1].running_mean.clone()
            evaluated = False
            for ids, xv, yv in run.eval_batches(val_loader):
                assert not model.training and not torch.is_grad_enabled()
                out = model(xv)
                run.log(val_loss=F.mse_loss(out, yv, reduction="none").squeeze(1), reduce=True)
                run.log(val_mse=F.mse_loss(out, yv), reduce=True)
                seen.extend(ids.tolist())
                evaluated = True
            assert model.training and run.step == step
            if run.is_main:  # eval mode: BatchNorm's statistics untouched (rank 0's are everyone's)
                assert torch.equal(stats, plain[1].running_mean)
            if evaluated and run.is_main:
                expected = plain_val_loss(plain)
                got, mse = run.metrics["val_loss"], run.metrics["val_mse"]
                print(f"RESULT step={step} val_loss={got!r} val_mse={mse!r} plain={expected!r}")
    run.finish()
    with open(f"{args.out}.ids-{run.rank}", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
