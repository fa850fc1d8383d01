"""``tlaunch doctor``: the practitioners' first checks, run on the script itself.

Usage::

    tlaunch doctor train.py [script args] [launcher flags] [--steps N] [--overfit-steps K]
                   [--cloud gce|aws|colab] [--json]

Runs the script as ``tlaunch`` would (the same launcher, workers and flags: ``--cpus 2`` starts
two gloo processes), with the doctor's hooks installed in every worker
(:mod:`tlaunch.doctor.hooks`): first ``--overfit-steps`` optimizer steps (default 10) on one
fixed batch, then the model, optimizer and generators are put back and the script runs on for
``--steps`` real steps (default 20) before the doctor ends it. The run saves no checkpoint and
resumes from none. Then it prints a table of findings (id, what was seen with its numbers, why
it matters, the fix as code) and a verdict; ``--json`` prints the same as JSON. The script's
own output goes to stderr, the report to stdout.

Exit codes: 0 nothing above ``warn``; 1 at least one ``error``; 2 usage error. A script argument
spelled like a doctor flag (``--steps``) goes after ``--``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import NoReturn

from tlaunch.config import NO_CHECKPOINTS, UsageError
from tlaunch.contract import DOCTOR_ENV, EXIT_USAGE

CLOUDS = ("gce", "aws", "colab")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"tlaunch doctor: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlaunch doctor", add_help=False, allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--overfit-steps", type=int, default=10)
    parser.add_argument("--cloud", choices=CLOUDS)
    parser.add_argument("--json", action="store_true")
    return parser


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The doctor's own flags (anywhere before ``--``) and everything else, for the launcher."""
    head, tail = (
        (argv[: argv.index("--")], argv[argv.index("--") :]) if "--" in argv else (argv, [])
    )
    options, rest = _parser().parse_known_args(head)
    if options.steps < 3:
        raise UsageError(f"--steps must be at least 3 (got {options.steps}); try --steps 20")
    if options.overfit_steps < 0:
        raise UsageError(f"--overfit-steps must be 0 or more (got {options.overfit_steps})")
    return options, rest + tail


def detect_platform(cloud: str | None) -> str | None:
    """gce, aws or colab: named by --cloud, else as the preemption watcher detects it."""
    if cloud:
        return cloud
    if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") is not None:
        return "colab"
    from tlaunch.preemption import detect

    return detect("auto")


@contextlib.contextmanager
def _script_output_to_stderr() -> Iterator[None]:
    """The workers inherit fd 1: point it at stderr so stdout carries only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str]) -> int:
    from tlaunch.cli import parse_args

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        options, rest = split_args(argv)
        config = parse_args(rest)
    except UsageError as e:
        message = str(e).replace("run: tlaunch [flags]", "run: tlaunch doctor [flags]")
        print(f"tlaunch: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    platform = detect_platform(options.cloud)
    with tempfile.TemporaryDirectory(prefix="tlaunch-doctor-") as findings:
        config = dataclasses.replace(
            config,
            checkpoint_dir=NO_CHECKPOINTS,
            max_restarts=0,
            progress="off",
            run_dir=os.path.join(findings, "runs"),
        )
        settings = {"steps": options.steps, "overfit_steps": options.overfit_steps}
        with open(os.path.join(findings, "settings.json"), "w") as f:
            json.dump(settings, f)
        code = _launch(config, findings)
        ranks = []
        for path in sorted(glob.glob(os.path.join(findings, "rank-*.json"))):
            with open(path) as f:
                ranks.append(json.load(f))
    ranks.sort(key=lambda r: r["rank"])
    return _report(options, config, ranks, platform, code)


def _launch(config, findings: str) -> int:
    from tlaunch.launcher import launch

    previous = os.environ.get(DOCTOR_ENV)
    os.environ[DOCTOR_ENV] = findings
    try:
        with _script_output_to_stderr():
            return launch(config)
    finally:
        if previous is None:
            os.environ.pop(DOCTOR_ENV, None)
        else:
            os.environ[DOCTOR_ENV] = previous


def _report(options, config, ranks: list[dict], platform: str | None, code: int) -> int:
    from tlaunch.doctor.findings import diagnose
    from tlaunch.doctor.report import as_json, table

    if code == 2 and not ranks:
        return code  # the launcher refused the flags and said why
    diagnosis = diagnose(ranks, platform, code)
    processes = ranks[0]["world_size"] if ranks else 1
    target = config.script or f"-m {config.module}"
    run = {
        "script": target,
        "processes": processes,
        "overfit_steps": options.overfit_steps,
        "steps": options.steps,
        "platform": platform,
    }
    if options.json:
        print(as_json(diagnosis, run))
    else:
        heading = (
            f"tlaunch doctor: {target} in {processes} process{'es' * (processes != 1)}: "
            f"{options.overfit_steps} steps on one fixed batch, then {options.steps} steps"
        )
        print(table(diagnosis, heading))
    return 1 if diagnosis.failed else 0
