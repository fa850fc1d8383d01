"""A resume from ``faulty://`` whose prefetch meets a connection reset: ``resume_train.py``
under plain ``python``, its checkpoint directory copied from a local one into the in-process
``faulty://`` store first.

``python prefetch_faulty.py LOCAL_CKPT FILE -- ARGS``: copies LOCAL_CKPT's steps to
``faulty://prefetch/ckpt``, makes the first read of each step's FILE fail with a reset, runs
``resume_train.py ARGS`` with ``TLAUNCH_CHECKPOINT_DIR`` there, and prints
``RESULT reset_in=<thread names>``: which threads the reset hit.
"""

import os
import runpy
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from tests import faultfs  # noqa: E402
from tlaunch.storage import resolve  # noqa: E402

URL = "faulty://prefetch/ckpt"
local, name, _, *args = sys.argv[1:]
store = resolve(URL)
for root, _dirs, files in os.walk(local):
    rel = os.path.relpath(root, local)
    if rel.startswith("step-"):
        for f in files:
            with open(os.path.join(root, f), "rb") as src:
                store.fs.pipe_file(f"{store.path}/{rel}/{f}", src.read())

hit: list[str] = []
reset = faultfs.Fault(
    "cat_file",
    f"*/{name}",
    ConnectionResetError,
    each_path=True,
    action=lambda: hit.append(threading.current_thread().name),
)
os.environ["TLAUNCH_CHECKPOINT_DIR"] = URL
sys.argv = [os.path.join(os.path.dirname(__file__), "resume_train.py"), *args]
with faultfs.faults(reset):
    runpy.run_path(sys.argv[0], run_name="__main__")
print(f"RESULT reset_in={','.join(hit)}", flush=True)
