"""Announces itself, then waits for a signal and reports which one arrived."""

import os
import signal
import sys
import time

got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
# One file per rank: a test signals only once every rank is past interpreter start-up.
with open(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}", "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"GOT {signal.Signals(got[0]).name if got else 'nothing'}", flush=True)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
