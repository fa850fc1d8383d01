"""The tlaunch demo: train, get preempted, run the same command again, end bitwise equal.

1. an uninterrupted reference run of examples/train_classifier.py under `tlaunch --cpus 2`;
2. the same command with a checkpoint directory, interrupted part-way by a real SIGTERM to the
   launcher (what a spot VM or Colab gets): it commits a checkpoint and exits 75;
3. the same command again: it resumes from that checkpoint and finishes;
4. the final parameters of 3 are compared with those of 1, bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train_classifier.py")
TIMEOUT = 300


def tlaunch(workdir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tlaunch", SCRIPT, "--cpus", "2", *args]


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def committed_steps(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        d for d in os.listdir(ckpt_dir) if os.path.exists(os.path.join(ckpt_dir, d, "COMMIT"))
    )


def main() -> int:
    work = tempfile.mkdtemp(prefix="tlaunch-demo-")
    ckpt = os.path.join(work, "ckpts")
    common = ["--seed", "7", "--progress", "off"]

    banner("1/3 uninterrupted reference run")
    ref = os.path.join(work, "reference.pt")
    subprocess.run(
        tlaunch(work, *common, "--", "--save-params", ref), cwd=work, check=True, timeout=TIMEOUT
    )

    command = tlaunch(
        work,
        *common,
        "--checkpoint-dir",
        ckpt,
        "--save-every",
        "10",
        "--keep-last",
        "2",
        "--",
        "--save-params",
        os.path.join(work, "resumed.pt"),
        "--step-delay",
        "0.05",
    )
    banner("2/3 the same run with checkpoints; SIGTERM arrives part-way, as on a preempted VM")
    proc = subprocess.Popen(command, cwd=work)
    deadline = time.monotonic() + TIMEOUT
    while not committed_steps(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=TIMEOUT)
    print(f"launcher exit code: {code} (75 = preempted after a committed save)", flush=True)
    if code != 75:
        print("demo failed: expected exit code 75", file=sys.stderr)
        return 1
    print(f"committed checkpoints: {', '.join(committed_steps(ckpt))}", flush=True)

    banner("3/3 the same command again: it resumes")
    subprocess.run(command, cwd=work, check=True, timeout=TIMEOUT)

    a = torch.load(ref, weights_only=True)
    b = torch.load(os.path.join(work, "resumed.pt"), weights_only=True)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    banner("result")
    if not equal:
        print("final parameters DIFFER from the uninterrupted run", flush=True)
        return 1
    print(
        f"final parameters of the preempted-and-resumed run are bitwise equal to the uninterrupted run "
        f"({len(a)} tensors compared with torch.equal)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
