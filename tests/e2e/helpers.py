"""Running the real launcher as a subprocess, with hard timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
EXAMPLES = Path(__file__).parents[2] / "examples"


def tlaunch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlaunch", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLAUNCH_", "ACCELERATE_"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_tlaunch(
    *args: str, cwd: str | os.PathLike, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        tlaunch_cmd(*args),
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results(stdout: str) -> list[dict[str, str]]:
    """Parse ``RESULT k=v k=v`` lines printed by the test scripts."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            rows.append(
                dict(
                    part.split("=", 1) for part in line[len("RESULT ") :].split(" ") if "=" in part
                )
            )
    return rows


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll a condition the test is waiting on (a file, a line); fail loudly at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
