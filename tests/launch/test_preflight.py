"""Before any worker starts: every URL the launch will write is probed and the checkpoint
directory's lease taken; a problem is one line and exit 2 (or 69), with nothing started or left.

In-process ``launch(config)`` calls (as in test_launch_failures.py); the "script" is a tiny
program that leaves a marker, so "no worker started" is something to assert.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import faultfs
from tlaunch.config import LaunchConfig
from tlaunch.contract import EXIT_UNAVAILABLE, EXIT_USAGE, LEASE_TOKEN_ENV
from tlaunch.launcher import launch
from tlaunch.storage import Lease
from tlaunch.storage.checkpoint.lease import LEASE

pytestmark = pytest.mark.timeout(120)

#: How long the script's "training step" takes: a refusal must come well before it ends.
STEP_SECONDS = 20.0


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "worker-started"


@pytest.fixture
def script(tmp_path: Path, marker: Path, monkeypatch) -> str:
    """Leaves ``marker`` (holding the lease token it was given), then "trains" for a while."""
    monkeypatch.setenv("PREFLIGHT_MARKER", str(marker))
    monkeypatch.setenv("PREFLIGHT_STEP_SECONDS", "0")
    monkeypatch.setenv("PREFLIGHT_EXIT", "0")
    path = tmp_path / "train.py"
    path.write_text(
        "import os, sys, time\n"
        "with open(os.environ['PREFLIGHT_MARKER'], 'w') as f:\n"
        f"    f.write(os.environ.get({LEASE_TOKEN_ENV!r}, ''))\n"
        "time.sleep(float(os.environ['PREFLIGHT_STEP_SECONDS']))\n"
        "sys.exit(int(os.environ['PREFLIGHT_EXIT']))\n"
    )
    return str(path)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    faultfs.clear()
    yield
    faultfs.clear()


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err}"
    assert lines[0].startswith("tlaunch: error: ")
    return lines[0]


def faulty_files(prefix: str = "/bucket") -> list[str]:
    fs = faultfs.FaultyFileSystem()
    return fs.fs.find(prefix) if fs.fs.exists(prefix) else []


class TestProbe:
    def test_a_missing_bucket_is_refused_before_any_worker_starts(
        self, gcs_env, script, marker, monkeypatch, capsys
    ):
        monkeypatch.setenv("PREFLIGHT_STEP_SECONDS", str(STEP_SECONDS))
        url = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/run1"
        started = time.monotonic()
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=url, save_every=50))
        elapsed = time.monotonic() - started
        assert code == EXIT_USAGE
        assert elapsed < STEP_SECONDS / 2, f"refused only after {elapsed:.1f} s"
        assert not marker.exists(), "a worker started"
        line = one_error(capsys)
        assert url in line and "--checkpoint-dir" in line and "does not exist" in line
        assert not Path("tlaunch-runs").exists(), "nothing is left behind"

    def test_a_sync_dir_url_is_probed_too(self, gcs_env, script, marker, capsys):
        url = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/notes"
        code = launch(LaunchConfig(script=script, cpus=1, sync_dir=[f"notes={url}"]))
        assert code == EXIT_USAGE and not marker.exists()
        line = one_error(capsys)
        assert "--sync-dir" in line and url in line

    def test_permission_denied_is_a_usage_error_and_leaves_no_probe_behind(
        self, script, marker, capsys
    ):
        # A torn write: part of the probe lands, then the store says no.
        rule = faultfs.torn("pipe_file", "*", keep=1, error=PermissionError, times=None)
        with faultfs.faults(rule):
            code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir="faulty://bucket/run"))
        assert code == EXIT_USAGE and not marker.exists()
        assert rule.calls, "the probe wrote"
        line = one_error(capsys)
        assert "permission denied" in line and "faulty://bucket/run" in line
        assert faulty_files() == [], "the probe object was removed"

    def test_unreachable_storage_exits_69_after_retries(self, script, marker, capsys):
        rule = faultfs.Fault("pipe_file", "*", ConnectionResetError, times=None)
        with faultfs.faults(rule):
            code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir="faulty://bucket/run"))
        assert code == EXIT_UNAVAILABLE and not marker.exists()
        assert len(rule.calls) > 1, "retried before giving up"
        assert "still failing after" in one_error(capsys)
        assert faulty_files() == []

    def test_a_probe_that_cannot_be_deleted_is_refused(self, script, marker, capsys):
        # Retention and the commit protocol delete files: a store that refuses is unusable.
        rule = faultfs.Fault("rm_file", "*", PermissionError, times=None)
        with faultfs.faults(rule):
            code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir="faulty://bucket/run"))
        assert code == EXIT_USAGE and not marker.exists()
        assert "permission denied" in one_error(capsys)

    def test_a_local_disk_that_fills_during_the_probe_is_refused_and_left_clean(
        self, tmp_path, script, marker, capsys, monkeypatch
    ):
        # On a local disk the probe writes with os calls: a torn write there (part of the
        # probe lands, then ENOSPC) is refused in one line and the part is removed.
        import errno

        from tlaunch.storage import probe

        def torn(path: str, data: bytes) -> None:
            with open(path, "wb") as f:
                f.write(data[:1])
            raise OSError(errno.ENOSPC, "No space left on device", path)

        monkeypatch.setattr(probe, "create_file", torn)
        ckpt = tmp_path / "ckpt"
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=str(ckpt)))
        assert code == EXIT_USAGE and not marker.exists()
        line = one_error(capsys)
        assert "disk full" in line and str(ckpt) in line
        assert not ckpt.exists(), "the probe's file and the folder it made are gone"

    def test_a_local_checkpoint_dir_that_is_a_file_is_refused(
        self, tmp_path, script, marker, capsys
    ):
        (tmp_path / "ckpt").write_text("not a folder")
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=str(tmp_path / "ckpt")))
        assert code == EXIT_USAGE and not marker.exists()
        assert str(tmp_path / "ckpt") in one_error(capsys)

    def test_a_new_local_folder_passes_and_the_probe_leaves_nothing(self, tmp_path):
        from tlaunch.storage import probe_writable

        target = tmp_path / "a" / "b" / "ckpt"
        probe_writable(str(target))
        assert not (tmp_path / "a").exists(), "folders the probe made are removed again"

    def test_checkpoint_dir_none_is_not_probed(self, tmp_path):
        from tlaunch.preflight import written_urls

        config = LaunchConfig(checkpoint_dir="none", sync_dir=["c=gs://b/c"])
        assert written_urls(config) == [("--sync-dir", "gs://b/c")]
        # --fast-dev-run saves nothing: a smoke test beside a live run takes no lease
        assert written_urls(LaunchConfig(checkpoint_dir="gs://b/r", fast_dev_run=1)) == []


class TestLease:
    def test_a_second_launcher_is_refused_with_the_owner_named(
        self, tmp_path, script, marker, capsys
    ):
        ckpt = str(tmp_path / "ckpt")
        owner = Lease(ckpt)
        owner.acquire()
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=ckpt))
        assert code == EXIT_USAGE and not marker.exists()
        line = one_error(capsys)
        assert f"host {socket.gethostname()} pid {os.getpid()}" in line
        assert "pass --takeover if that run is gone" in line
        assert owner.read().token == owner.token
        assert os.listdir(ckpt) == [LEASE], "nothing else was written there"

    def test_a_stale_lease_is_taken_over_with_a_warning(self, tmp_path, script, marker, capsys):
        ckpt = str(tmp_path / "ckpt")
        dead = Lease(ckpt, ttl=60, clock=lambda: time.time() - 3600)  # died an hour ago
        dead.acquire()
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=ckpt))
        assert code == 0
        err = capsys.readouterr().err
        assert "taking over" in err and "expired" in err
        token = marker.read_text()
        assert token and token != dead.token, "the workers got the new lease's token"
        assert Lease(ckpt).read() is None, "released at exit"

    def test_an_abandoned_lease_is_taken_with_a_warning_saying_its_owner_is_gone(
        self, tmp_path, script, marker, capsys
    ):
        # A launcher killed with SIGKILL leaves its lease, naming this host and a dead pid.
        ckpt = str(tmp_path / "ckpt")
        take = f"from tlaunch.storage import Lease; Lease({ckpt!r}).acquire()"
        subprocess.run([sys.executable, "-c", take], check=True, timeout=60)
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=ckpt))
        assert code == 0 and marker.exists()
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "taking over" in x]
        assert "process is gone" in line
        assert "--takeover" not in line, "no --takeover was given"

    def test_takeover_replaces_a_live_lease(self, tmp_path, script, marker, capsys):
        ckpt = str(tmp_path / "ckpt")
        other = Lease(ckpt)
        other.acquire()
        code = launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=ckpt, takeover=True))
        assert code == 0 and marker.exists()
        assert "--takeover" in capsys.readouterr().err
        assert Lease(ckpt).read() is None

    def test_the_lease_is_released_when_the_script_fails(self, tmp_path, script, monkeypatch):
        monkeypatch.setenv("PREFLIGHT_EXIT", "3")
        ckpt = str(tmp_path / "ckpt")
        assert launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=ckpt)) == 3
        assert Lease(ckpt).read() is None

    def test_the_heartbeat_keeps_the_lease_fresh_while_the_workers_run(self, tmp_path, monkeypatch):
        import tlaunch.lease

        ttl = 0.6
        monkeypatch.setattr(tlaunch.lease, "LEASE_TTL", ttl)
        ckpt, result = tmp_path / "ckpt", tmp_path / "result.json"
        script = tmp_path / "watch.py"
        script.write_text(
            "import json, os, sys, time\n"
            "path = sys.argv[1]\n"
            "seen, stale = [], 0\n"
            f"end = time.time() + {5 * ttl}\n"
            "while time.time() < end:\n"
            "    record = json.load(open(path))\n"
            "    stale += record['expires'] < time.time()\n"
            "    seen.append(record['heartbeat'])\n"
            "    time.sleep(0.05)\n"
            f"token = os.environ[{LEASE_TOKEN_ENV!r}]\n"
            "json.dump({'stale': stale, 'beats': len(set(seen)), 'ours': record['token'] == token},"
            " open(sys.argv[2], 'w'))\n"
        )
        config = LaunchConfig(
            script=str(script),
            cpus=1,
            checkpoint_dir=str(ckpt),
            script_args=[str(ckpt / LEASE), str(result)],
        )
        assert launch(config) == 0
        seen = json.loads(result.read_text())
        assert seen["ours"] and seen["stale"] == 0
        assert seen["beats"] >= 3, "renewed every TTL/3 while the run lasted five TTLs"
        assert Lease(str(ckpt)).read() is None

    def test_a_memory_checkpoint_dir_takes_no_lease_in_the_launcher(self, script, marker):
        # memory:// lives in one process: the workers could never see the launcher's lease.
        url = f"memory://preflight-{uuid.uuid4().hex[:6]}"
        assert launch(LaunchConfig(script=script, cpus=1, checkpoint_dir=url)) == 0
        assert marker.read_text() == "", "no token: the worker takes its own lease"


@pytest.mark.timeout(60)
def test_a_launch_on_a_local_disk_does_not_import_fsspec(tmp_path, script, marker):
    # The probe and the lease on a local folder are os calls: fsspec's import (and the
    # asyncio it pulls in, 0.05 s together) is no part of a local launch's start.
    ckpt = tmp_path / "ckpt"
    program = (
        "import sys\n"
        "from tlaunch.cli import main\n"
        f"code = main(['--cpus', '1', '--checkpoint-dir', {str(ckpt)!r}, {script!r}])\n"
        "print(code, [m for m in ('fsspec', 'asyncio') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr
    token = marker.read_text()
    assert len(token) == 32, "the launcher probed the folder and took its lease"
    assert Lease(str(ckpt)).read() is None, "and gave it back"
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".")], "the probe left nothing"
