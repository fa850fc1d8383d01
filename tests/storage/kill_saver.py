"""Saves small checkpoints in a loop until SIGKILLed; driven by test_kill.py.

A zygote: it imports torch and tlaunch once, then forks one saver per JSON line on stdin
(``{"url": ..., "env": {...}}``), so each of many kill trials costs milliseconds instead of a
2-second interpreter start. Nothing here touches a filesystem or runs a parallel tensor op
before forking, so the children start clean (fsspec's IO thread and torch's thread pools are
created in the child).

Lines on stdout: ``ready``; ``pid N`` per fork; ``committed STEP SECONDS`` from the child once a
step's COMMIT is durable and retention has run; ``exited N`` when the child is gone.
"""

from __future__ import annotations

import json
import os
import sys

# gcsfs reads this once, at import, and the import happens here, before any test's env arrives.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import gcsfs  # noqa: E402, F401  (imported before forking, like torch: the point of the zygote)
import safetensors.torch  # noqa: E402, F401
import torch  # noqa: E402

from tlaunch.storage import (  # noqa: E402
    AsyncCheckpointWriter,
    CheckpointStore,
    RetentionPolicy,
    cpu_snapshot,
)


def save_forever(url: str) -> None:
    torch.set_num_threads(1)
    store = CheckpointStore(url)
    store.clean_stale()  # what a run does at start, on rank 0
    latest = store.latest()
    step = latest.step + 1 if latest else 1
    writer = AsyncCheckpointWriter(store, RetentionPolicy(keep_last=2))
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters())
    while True:
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
        writer.submit(
            step,
            tensors={"model": cpu_snapshot(model.state_dict())},
            objects={"optimizer": cpu_snapshot(optimizer.state_dict())},
            # Eight ranks' RNG files, as in a multi-GPU job: more writes, more moments to die in.
            rng={rank: torch.get_rng_state() for rank in range(8)},
            state={"step": step, "metrics": {"loss": 1.0 / step}},
        )
        writer.flush()
        print(f"committed {step} {writer.save_durations[-1]:.4f}", flush=True)
        step += 1


def _die_with_parent() -> None:
    """Linux: SIGKILL this saver when the zygote dies, so a failed test leaves no orphan."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    # Building an optimizer imports torch._dynamo and sympy (~2 s): pay it once, here. No tensor
    # op runs, so no thread pool exists yet to be broken by fork.
    torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _die_with_parent()
                os.environ.update(request["env"])  # e.g. the GCS emulator of this test
                save_forever(request["url"])
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)
        os.waitpid(pid, 0)
        print(f"exited {pid}", flush=True)


if __name__ == "__main__":
    main()
