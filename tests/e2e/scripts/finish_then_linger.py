"""A run that finishes (its final checkpoint committed), then goes on in the script.

``MARKER MODE``: MARKER is written once ``run.finish()`` returned. Then ``exit`` leaves cleanly
when a stop signal comes (a script that handles its own stop after training); ``linger`` keeps
working until something ends it (post-processing after training).
"""

import signal
import sys
import time

from tiny import train_two_steps

import tlaunch

marker, mode = sys.argv[1], sys.argv[2]
run = tlaunch.init()
train_two_steps(run)
run.finish()
if mode == "exit":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
open(marker, "w").close()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
