"""Start-up time of ``tlaunch --help`` against ``accelerate launch --help`` and ``torchrun --help``.

Run: ``.venv/bin/python benchmarks/cli_startup.py [--reps 7]``

What a user waits for before anything happens is the launcher's own start-up: a launcher
that imports torch (and, for Accelerate, transformers-style plumbing) just to print its help
costs seconds on every invocation, every typo, every notebook cell. The design requires that
``tlaunch --help`` not import torch; this measures the consequence.

Each command runs as a subprocess from this venv (the console scripts users type, plus
``python -m tlaunch``), interleaved so a noisy neighbour hits every tool alike; one untimed
round first warms the page cache. Reported: medians, and ratios against
``accelerate launch --help`` measured in the same run (target: tlaunch <= 0.15x). The bare
interpreter (``python -c pass``) is shown as the floor no Python CLI can beat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _proc import compile_tlaunch  # benchmarks/, on sys.path when a script here runs

BIN = os.path.dirname(sys.executable)
TARGET = 0.15

COMMANDS = {
    "tlaunch --help": [os.path.join(BIN, "tlaunch"), "--help"],
    "python -m tlaunch --help": [sys.executable, "-m", "tlaunch", "--help"],
    "accelerate launch --help": [os.path.join(BIN, "accelerate"), "launch", "--help"],
    "torchrun --help": [os.path.join(BIN, "torchrun"), "--help"],
    "python -c pass": [sys.executable, "-c", "pass"],
}
BASELINE = "accelerate launch --help"


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}"
        )
    return elapsed


def imports_torch(env: dict[str, str]) -> bool:
    """Does ``tlaunch --help`` import torch? (The design says it must not.)"""
    code = (
        "import sys, runpy; sys.argv=['tlaunch','--help']\n"
        "try: runpy.run_module('tlaunch', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return b"NOTORCH" not in out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    compile_tlaunch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLAUNCH_", "ACCELERATE_"))}
    names = list(COMMANDS)
    for name in names:  # warm the page cache and the bytecode caches
        time_once(COMMANDS[name], env)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        shift = rep % len(names)  # rotate the order: no tool always runs right after another
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(COMMANDS[name], env))

    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"cli_startup: medians of {args.reps} runs each, interleaved ({os.cpu_count()} cores)")
    for name in names:
        spread = max(times[name]) - min(times[name])
        print(f"  {name:28s} {med[name] * 1000:8.1f} ms   (min..max spread {spread * 1000:.0f} ms)")
    base = med[BASELINE]
    for name in ("tlaunch --help", "python -m tlaunch --help"):
        ratio = med[name] / base
        verdict = "" if ratio <= TARGET else "  MISSED"
        print(f"{name} / {BASELINE}: {ratio:.3f}x (target <= {TARGET}x){verdict}")
    print(f"torchrun --help / {BASELINE}: {med['torchrun --help'] / base:.3f}x (for reference)")
    print(
        f"tlaunch --help / torchrun --help: {med['tlaunch --help'] / med['torchrun --help']:.3f}x"
    )
    floor = med["python -c pass"]
    print(
        f"tlaunch --help above the bare interpreter: {(med['tlaunch --help'] - floor) * 1000:.0f} ms "
        f"({med['tlaunch --help'] / floor:.1f}x python -c pass)"
    )
    torch_loaded = imports_torch(env)
    print(f"tlaunch --help imports torch: {'yes  MISSED' if torch_loaded else 'no'} (target: no)")


if __name__ == "__main__":
    main()
