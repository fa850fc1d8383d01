"""An unmodified Accelerate script: it knows nothing of tlaunch."""

import sys

import torch
from accelerate import Accelerator

accelerator = Accelerator()
t = torch.tensor([1.0], device=accelerator.device)
total = accelerator.reduce(t, reduction="sum").item()
# One write per line: the ranks share one pipe, and print() writes the newline separately.
sys.stdout.write(
    f"RESULT rank={accelerator.process_index} num_processes={accelerator.num_processes} "
    f"type={accelerator.distributed_type.value} precision={accelerator.mixed_precision} "
    f"accum={accelerator.gradient_accumulation_steps} sum={total:g}\n"
)
# A clean Accelerate ending: without it a rank can abort in gloo's teardown when its peer
# has already exited (same under torchrun).
accelerator.wait_for_everyone()
accelerator.end_training()
