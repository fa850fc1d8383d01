"""Credentials in URLs never reach a file tlaunch writes: the run directory, the checkpoint."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import SCRIPTS, run_tlaunch

pytestmark = pytest.mark.timeout(200)

SECRETS = ("se/cr+et", "SIGSECRET", "TOKSECRET", "ARGSECRET")


def files_under(root) -> list:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_no_secret_reaches_the_run_directory_or_the_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    out = run_tlaunch(
        str(SCRIPTS / "save_once.py"),
        "--checkpoint-dir", str(ckpt),
        # memory:// lives in the launcher's process: the URLs work and hold nothing.
        "--sync-dir", "c=memory://KEY:se/cr+et@bkt/run1",
        "--sync-dir", "d=memory://bkt/run2?X-Amz-Signature=SIGSECRET&token=TOKSECRET",
        "--", "--upload-to", "https://h/x?sig=ARGSECRET",
        cwd=tmp_path,
        timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SAVED" in out.stdout
    (run_dir,) = (ckpt / "runs").iterdir()
    steps = [p for p in ckpt.iterdir() if p.name.startswith("step-")]
    assert steps, "no checkpoint was committed"
    written = files_under(run_dir) + files_under(steps[-1])
    assert any(p.endswith("state.json") for p in written)
    assert any(p.endswith("config.json") for p in written)
    for path in written:
        with open(path, "rb") as f:
            data = f.read()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} in {path}"
    for secret in SECRETS:
        assert secret not in out.stderr
    assert "memory://***@bkt/run1" in (run_dir / "launcher.log").read_text()


def test_the_run_directory_is_private(tmp_path):
    out = run_tlaunch(str(SCRIPTS / "save_once.py"), "--checkpoint-dir", str(tmp_path / "ckpt"),
                      cwd=tmp_path, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "ckpt" / "runs").iterdir()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700  # nobody else can even list it
    names = {os.path.basename(p) for p in files_under(run_dir)}
    assert {"config.json", "launcher.log", "metrics.jsonl"} <= names
    for path in files_under(run_dir):
        if not path.endswith("exit.json"):  # launch() writes it with the umask's mode
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
