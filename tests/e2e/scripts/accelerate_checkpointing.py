"""A plain Accelerate script that checkpoints itself with save_state: no tlaunch API at all.

argv[1]: a file to create once the checkpoint of step 20 is saved. argv[2] == "hold": then
wait there to be stopped (at most 120 s), saving nothing more.
"""

import os
import sys
import time

import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
start = 0
if os.path.exists("ckpts/latest/step.txt"):
    accelerator.load_state("ckpts/latest")
    start = int(open("ckpts/latest/step.txt").read())
    print(f"RESUMED step={start}", flush=True)
x = torch.ones(8, 4)
for step in range(start, 60):
    loss = model(x).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    if step + 1 in (10, 20):
        accelerator.save_state("ckpts/latest")
        with open("ckpts/latest/step.txt", "w") as f:
            f.write(str(step + 1))
        print(f"SAVED step={step + 1}", flush=True)
        if step + 1 == 20:
            open(sys.argv[1], "w").close()  # tells the test a checkpoint exists
            if sys.argv[2:] == ["hold"]:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                sys.exit("nobody stopped this run")
    time.sleep(0.02)
print("DONE", flush=True)
