"""Running the real launcher as a subprocess, with hard timeouts; a loopback GCE metadata server.

Importable as ``tests.e2e.helpers`` too: ``benchmarks/faults.py`` sends its notices through
:func:`gce_metadata` and finds a launch's workers with :func:`processes_mentioning`.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


class _Metadata(http.server.BaseHTTPRequestHandler):
    """Speaks the GCE metadata protocol for the two paths tlaunch polls."""

    preempted = threading.Event()

    def do_GET(self):  # noqa: N802
        if self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(403, "Missing Metadata-Flavor:Google header")
            return
        if self.path.endswith("/instance/preempted"):
            body = b"TRUE" if self.preempted.is_set() else b"FALSE"
        elif self.path.endswith("/instance/maintenance-event"):
            body = b"NONE"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def gce_metadata() -> Iterator[tuple[str, threading.Event]]:
    """A loopback GCE metadata server: (its base URL, the event that turns preemption on)."""
    handler = type("H", (_Metadata,), {"preempted": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1", handler.preempted
    finally:
        server.shutdown()
