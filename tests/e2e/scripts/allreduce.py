"""Prints its rank, the world size and an all-reduced sum, then its arguments."""

import os
import sys

import torch
import torch.distributed as dist

world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    rank, total = dist.get_rank(), t.item()
    dist.destroy_process_group()
else:
    rank, total = 0, 1.0
# One write per line: the ranks share one pipe, and print() writes the newline separately.
sys.stdout.write(f"RESULT rank={rank} world={world} sum={total:g} args={sys.argv[1:]}\n")
