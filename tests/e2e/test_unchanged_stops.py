"""Scripts outside the Run API, stopped: the signal reaches the ranks as under torchrun, but
not their DataLoader workers, so a script that handles SIGTERM itself (Lightning's
``OnExceptionCheckpoint``, a handler of its own) still has its loader when it saves; the
loader workers end with their rank either way; and the launcher says what it kept."""

from __future__ import annotations

import signal
import subprocess

import pytest
from helpers import SCRIPTS, clean_env, tlaunch_cmd, wait_for

pytestmark = pytest.mark.timeout(240)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def stop_when_loading(tmp_path, *script_args: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """``own_sigterm.py`` on 2 processes, SIGTERM to the launcher once both ranks' loader
    workers have loaded; the launch's result and those workers' pids."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = tlaunch_cmd("--cpus", "2", str(SCRIPTS / "own_sigterm.py"), str(out), *script_args)
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    loaders: list[int] = []
    try:
        ranks = [out / f"workers-{r}" for r in (0, 1)]
        wait_for(lambda: all(f.exists() for f in ranks) or proc.poll() is not None, 180, "loaders")
        loaders = [int(p) for f in ranks if f.exists() for p in f.read_text().split()]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert len(loaders) == 4, stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), loaders


def test_a_script_that_handles_sigterm_saves_with_its_loader_workers_alive(tmp_path):
    result, loaders = stop_when_loading(tmp_path)
    assert "killed by signal" not in result.stderr, result.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / "out" / f"saved-{rank}").exists(), result.stderr[-3000:]
    wait_for(lambda: not any(map(alive, loaders)), 30, "the loader workers to end with their ranks")
    # tlaunch itself kept nothing of a script outside the Run API, and says so.
    assert result.returncode == 128 + signal.SIGTERM
    assert "outside the Run API" in result.stderr, result.stderr[-2000:]


def test_loader_workers_end_with_a_rank_that_dies_of_the_signal(tmp_path):
    result, loaders = stop_when_loading(tmp_path, "--no-handler")
    assert not any((tmp_path / "out" / f"saved-{rank}").exists() for rank in (0, 1))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    wait_for(lambda: not any(map(alive, loaders)), 30, "the loader workers to end with their ranks")
