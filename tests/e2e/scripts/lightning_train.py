"""A Lightning script as its users write it: ``Trainer(accelerator="cpu", devices=N)``, a
LightningModule, a DataLoader with worker processes; nothing of tlaunch. Prints a digest of the
trained parameters on each rank.

argv: devices, output folder (Lightning's ``default_root_dir``).
"""

import hashlib
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    devices, root = int(sys.argv[1]), sys.argv[2]
    L.seed_everything(0)
    data = TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    model = Regression()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        max_epochs=2,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True, num_workers=1))
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    ).hexdigest()[:16]
    sys.stdout.write(
        f"RESULT rank={trainer.global_rank} world={trainer.world_size} "
        f"steps={trainer.global_step} params={digest}\n"
    )
