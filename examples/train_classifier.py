"""A small real training run under the Run API: synthetic data made here, a BatchNorm +
Dropout classifier, Adam with a StepLR schedule, shuffled batches.

    tlaunch examples/train_classifier.py --cpus 2 --checkpoint-dir ckpts --save-every 10

Add `--log-with tensorboard` for its curves: `tensorboard --logdir ckpts/logs`.

Interrupt it (Ctrl-C, or `kill -TERM` the launcher) and run the same command again: it
resumes where it stopped, and ends with the same parameters as an uninterrupted run.

Each epoch ends with an evaluation pass on a held-out set (`run.eval_batches`: every rank
evaluates its share, the logged averages are over samples). With early stopping and the best
evaluated weights kept:

    tlaunch examples/train_classifier.py --cpus 2 --checkpoint-dir ckpts --save-every 10 \
        --early-stop val_loss --patience 3 --keep-best 1 --monitor val_loss -- --epochs 30
"""

from __future__ import annotations

import argparse
import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlaunch


def make_data(
    n: int = 512, features: int = 16, classes: int = 4, seed: int | None = None
) -> TensorDataset:
    """``n`` samples around fixed class centers; another ``seed`` draws other samples (a
    held-out set) around the same centers."""
    g = torch.Generator().manual_seed(1234)  # the data set is fixed; training order is tlaunch's
    centers = torch.randn(classes, features, generator=g) * 2
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    x = (x - x.mean(0)) / x.std(0)  # normalize inputs: the practitioners' second lesson
    return TensorDataset(x, y)


class Classifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--save-params", help="write the final state_dict here (torch.save)")
    parser.add_argument(
        "--step-delay", type=float, default=0.0, help="seconds to sleep per step (demo pacing)"
    )
    args = parser.parse_args()

    run = tlaunch.init(
        hparams={"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs}
    )
    data = make_data()
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    # Not given to run.prepare: run.eval_batches shares it out over the ranks itself.
    val_loader = DataLoader(make_data(n=250, seed=4321), batch_size=64)
    model, optimizer, loader, scheduler = run.prepare(model, optimizer, loader, scheduler)

    for epoch in run.epochs(args.epochs):
        model.train()
        for x, y in run.batches(loader):
            with run.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                run.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            run.log(loss=loss)
            if args.step_delay:
                import time

                time.sleep(args.step_delay)
        if run.should_evaluate:  # every epoch, or as --val-every-epochs says
            # Eval mode and no_grad inside; per-sample values averaged over the whole set.
            for x, y in run.eval_batches(val_loader):
                logits = model(x)
                run.log(val_loss=F.cross_entropy(logits, y, reduction="none"), reduce=True)
                run.log(val_acc=(logits.argmax(1) == y).float(), reduce=True)
            if run.is_main:
                m = run.metrics
                print(
                    f"epoch {epoch}: step {run.step} val_loss {m['val_loss']:.4f} "
                    f"val_acc {m['val_acc']:.3f}",
                    flush=True,
                )
    run.finish()
    if run.is_main:
        final = run.accelerator.unwrap_model(model)
        print(
            f"final val_loss {run.metrics.get('val_loss', float('nan')):.4f} "
            f"params {params_digest(final)}",
            flush=True,
        )
        if args.save_params:
            torch.save(final.state_dict(), args.save_params)


if __name__ == "__main__":
    main()
