"""Finishes without ending its gloo process group, as Lightning's Trainer and most torchrun
scripts do: ``open_group.py in-flight`` or ``open_group.py waited``.

gloo's threads free each collective they ran, and each tensor it holds needs the GIL; a thread
that asks for it once the interpreter has begun to finalize aborts the process (SIGABRT). A long
GIL switch interval stands for a busy CPU: the main thread keeps the GIL from the last
collective to its exit, so a free that starts then is still waiting when finalization begins.

* ``in-flight``: rank 0 starts all-reduces it never waits for; rank 1 takes part in each, so
  rank 0's threads complete and free them while rank 0 exits.
* ``waited``: every collective is waited for, and the script keeps a reference to the group
  (as a DDP model does), so destroying it at exit does not join gloo's threads.

Prints a RESULT line per rank, with user_site=ran where a test's own sitecustomize ran in this
process (it sets USER_SITE to its pid).
"""

import os
import sys

import torch
import torch.distributed as dist

mode = sys.argv[1]
dist.init_process_group("gloo")
group = dist.group.WORLD if mode == "waited" else None
rank = dist.get_rank()
sys.setswitchinterval(1.0)
for _ in range(200):
    dist.all_reduce(torch.ones(1), async_op=mode == "in-flight" and rank == 0)
user_site = "ran" if os.environ.get("USER_SITE") == str(os.getpid()) else "-"
sys.stdout.write(f"RESULT rank={rank} user_site={user_site}\n")
