"""Rank 1 raises after one all-reduce; rank 0 waits in the next, which rank 1 never joins."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
dist.all_reduce(torch.ones(1))
if dist.get_rank() == 1:
    raise RuntimeError("boom: rank 1 failed")
dist.all_reduce(torch.ones(1))
print("UNREACHABLE", flush=True)
