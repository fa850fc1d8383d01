"""A Transformers ``Trainer`` script as its users write it: ``TrainingArguments``, a model
returning its loss, a map-style dataset; nothing of tlaunch. Prints a digest of the trained
parameters on each rank.

argv: output folder.
"""

import hashlib
import sys

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


if __name__ == "__main__":
    args = TrainingArguments(
        output_dir=sys.argv[1],
        per_device_train_batch_size=16,
        num_train_epochs=2,
        learning_rate=0.05,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=1,
    )
    set_seed(args.seed)  # before the model, as the Transformers example scripts do
    trainer = Trainer(model=Regression(), args=args, train_dataset=Pairs())
    trainer.train()
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())
    ).hexdigest()[:16]
    sys.stdout.write(
        f"RESULT rank={args.process_index} world={args.world_size} "
        f"steps={trainer.state.global_step} params={digest}\n"
    )
