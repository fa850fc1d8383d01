"""Writes ckpts/model.bin whole, then -- told to by the test -- rewrites it in place, a few
bytes every few milliseconds, until killed: what a plain script is doing when SIGTERM (whose
default action ends it at once) arrives during its save. No tlaunch API."""

import os
import sys
import time

GOOD = b"good weights\n" * 1000
go = sys.argv[1]
os.makedirs("ckpts", exist_ok=True)
with open("ckpts/model.bin", "wb") as f:
    f.write(GOOD)
print("READY", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(go):  # the test saw the good copy reach the URL
    if time.monotonic() > deadline:
        sys.exit("the test never said go")
    time.sleep(0.01)
with open("ckpts/model.bin", "wb") as f:
    for i in range(10**6):
        f.write(b"half-written")
        f.flush()
        if i == 10:
            print("WRITING", flush=True)
        time.sleep(0.005)
