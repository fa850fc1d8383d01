"""Rank FAIL_RANK exits with FAIL_CODE; the others block in a collective that never completes."""

import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == int(os.environ.get("FAIL_RANK", "1")):
    time.sleep(0.5)
    sys.exit(int(os.environ.get("FAIL_CODE", "3")))
print(f"READY rank={rank}", flush=True)
dist.all_reduce(torch.ones(1))  # the failed peer never joins
dist.all_reduce(torch.ones(1))
print("UNREACHABLE", flush=True)
