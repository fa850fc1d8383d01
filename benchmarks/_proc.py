"""Running a benchmark's launcher so that a hang cannot outlive the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new process group.

    On timeout the whole group is killed -- the launcher and the workers it started, which
    ``subprocess.run`` would leave running -- and the benchmark stops with the command's
    stderr so far.
    """
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise SystemExit(
            f"{' '.join(cmd)} did not finish in {timeout:.0f} s; killed it and its workers:\n"
            f"{err[-2000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
