"""An unchanged torchrun-style script that handles SIGTERM itself, as Lightning's Trainer does
(its ``OnExceptionCheckpoint``): a handler sets a flag, the ranks agree on it at the next
step (an all-reduce), and each saves and exits 0. Its DataLoader has worker processes.

``argv[1]``: a folder for its files: ``workers-<rank>`` (the pids of the loader's workers,
written once every worker has loaded a sample), then ``saved-<rank>`` (the step at the save).
With ``--no-handler`` it leaves SIGTERM's default action (death) in place.
"""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, get_worker_info

out = sys.argv[1]
stop = False


def on_sigterm(signum, frame):
    global stop
    stop = True


if "--no-handler" not in sys.argv:
    signal.signal(signal.SIGTERM, on_sigterm)


class Pids(Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        time.sleep(0.005)
        return torch.tensor([float(i), float(get_worker_info().id), float(os.getpid())])


world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-6)
loader = DataLoader(Pids(), batch_size=4, num_workers=2, persistent_workers=True)
pids: dict[int, int] = {}
for step, batch in enumerate(loader):
    opt.zero_grad()
    model(batch).sum().backward()
    if world > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad)
    opt.step()
    if len(pids) < 2:
        pids.update({int(w): int(p) for w, p in batch[:, 1:].tolist()})
        if len(pids) == 2:
            with open(os.path.join(out, f"workers-{rank}.tmp"), "w") as f:
                f.write(" ".join(map(str, pids.values())))
            os.replace(
                os.path.join(out, f"workers-{rank}.tmp"), os.path.join(out, f"workers-{rank}")
            )
    flag = torch.tensor([float(stop)])
    if world > 1:
        dist.all_reduce(flag)
    if flag.item():
        torch.save(model.state_dict(), os.path.join(out, f"model-{rank}.pt"))
        with open(os.path.join(out, f"saved-{rank}"), "w") as f:
            f.write(str(step))
        break
if world > 1:
    dist.destroy_process_group()
