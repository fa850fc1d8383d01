"""A script that ends right after a background save, while the writer's thread frees the snapshot.

The store serializes as torch.save does: each storage gets its Python object, so freeing a
tensor of the snapshot takes the GIL back from inside torch's (noexcept) destructors.

argv: exit | close (a plain script: the interpreter's teardown follows), quick-exit |
quick-raise (a stopped worker: ``tlaunch.quick_exit`` armed, then the script ends or raises).
"""

import collections
import sys

import torch

from tlaunch import quick_exit
from tlaunch.storage import AsyncCheckpointWriter, CheckpointInfo, cpu_snapshot
from tlaunch.storage.checkpoint import writer as writers


class TorchSaveLike:
    def save(self, step, objects, **kw):
        for t in objects["optimizer"].values():
            t.untyped_storage()
        return CheckpointInfo(step, "memory://x", True, 0.0, 1)

    def apply_retention(self, policy):
        return []


how = sys.argv[1]
if how.startswith("quick"):
    quick_exit.install()  # first: runs last, as in a worker (sitecustomize)
writer = AsyncCheckpointWriter(TorchSaveLike())
state = collections.OrderedDict((f"t{i}", torch.ones(10)) for i in range(20000))
writer.submit(1, objects={"optimizer": cpu_snapshot(state)})
del state
if how == "close":
    writer.close()
if how.startswith("quick"):
    writer.flush()
    quick_exit.arm(0)
    print("teardown follows:", writers._teardown_follows, flush=True)
if how == "quick-raise":
    raise RuntimeError("the script failed after the stop")
sys.exit(0)
