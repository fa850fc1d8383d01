"""A Run API script whose start-up the test controls: ``OUT`` names the files.

Each rank writes ``OUT.starting.<rank>`` and waits (at most 60 s) for ``OUT.go`` before it
imports torch: a stop that reaches every process then finds the workers still starting, as
one does while they import torch on a busy machine. Then two steps and ``OUT`` is written.
"""

import os
import sys
import time

out = sys.argv[1]
with open(f"{out}.starting.{os.environ.get('RANK', '0')}", "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 60
while not os.path.exists(f"{out}.go") and time.monotonic() < deadline:
    time.sleep(0.05)

from tiny import train_two_steps  # noqa: E402

import tlaunch  # noqa: E402

run = tlaunch.init()
train_two_steps(run)
run.finish()
open(out, "w").close()
