"""Runs gallery scripts one after another in this process, under the doctor's hooks.

``python gallery_runner.py OUT [steps=N] [overfit=K] SCRIPT [args] [; ...] ...``: for each
script, a findings folder ``OUT/<n>`` with its ``rank-0.json``, and a ``RUN <n>`` line on stdout
before the script's own output. One torch import for the whole gallery
keeps it cheap; the hooks, the scripts and the rules are the real ones (the launcher and its
workers have their own tests in test_doctor_cli.py).
"""

import json
import os
import runpy
import sys

import torch  # noqa: F401  (imported first: the hooks install at once)

from tlaunch.doctor import hooks

STEPS, OVERFIT_STEPS = 20, 10


def main(out: str, runs: list[list[str]]) -> None:
    for n, words in enumerate(runs):
        settings = {"steps": STEPS, "overfit_steps": OVERFIT_STEPS, "end": "raise"}
        while "=" in words[0]:
            name, value = words.pop(0).split("=")
            settings[{"overfit": "overfit_steps"}.get(name, name)] = int(value)
        argv = words
        folder = os.path.join(out, str(n))
        os.makedirs(folder)
        with open(os.path.join(folder, hooks.SETTINGS_FILE), "w") as f:
            json.dump(settings, f)
        print(f"RUN {n}", flush=True)
        hooks.arm(folder)
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except hooks.Done:
            pass
        hooks._observer.write()
        sys.stdout.flush()


if __name__ == "__main__":
    words, runs = sys.argv[2:], [[]]
    for word in words:
        if word == ";":
            runs.append([])
        else:
            runs[-1].append(word)
    main(sys.argv[1], runs)
