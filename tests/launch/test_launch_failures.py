"""The launcher's exit codes for what goes wrong before any worker starts, and where a run
under plain python writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import faultfs
from tlaunch.config import LaunchConfig
from tlaunch.contract import EXIT_UNAVAILABLE, EXIT_USAGE, LAUNCH_DIR_ENV, METRICS_FILE
from tlaunch.launcher import launch


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("raise SystemExit('the workers must not start')\n")
    return str(path)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    faultfs.clear()
    yield
    faultfs.clear()


@pytest.mark.timeout(60)
def test_unreachable_storage_while_staging_data_exits_69_and_changes_nothing(script, capsys):
    rule = faultfs.Fault("cat_file", "*", ConnectionResetError, times=None)
    with faultfs.faults(rule):
        code = launch(LaunchConfig(script=script, cpus=1, data=["faulty://bucket/ds.tlar"]))
    assert code == EXIT_UNAVAILABLE
    assert len(rule.calls) > 1, "the read was retried before giving up"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "still failing after" in err
    assert not os.path.exists(os.environ["TLAUNCH_CACHE_DIR"]) or not os.listdir(
        os.environ["TLAUNCH_CACHE_DIR"]
    )


@pytest.mark.timeout(60)
def test_a_missing_archive_is_a_usage_error(script, capsys):
    code = launch(LaunchConfig(script=script, cpus=1, data=["faulty://bucket/none.tlar"]))
    assert code == EXIT_USAGE
    assert "no tlaunch data archive at faulty://bucket/none.tlar" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_plain_python_makes_its_own_run_dir_under_tlaunch_run_dir(tmp_path):
    # TLAUNCH_RUN_DIR is the --run-dir default: a base folder, never the run directory itself.
    base = tmp_path / "runs"
    script = tmp_path / "log_once.py"
    script.write_text(
        "import tlaunch\n"
        "run = tlaunch.init()\n"
        "run.log(loss=1.0)\n"
        "print(run.run_dir)\n"
        "run.finish()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLAUNCH_")}
    env["TLAUNCH_RUN_DIR"] = str(base)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert run_dir.parent == base, "a new folder under the base, not the base itself"
    assert not (base / METRICS_FILE).exists()
    (line,) = (run_dir / METRICS_FILE).read_text().splitlines()
    assert json.loads(line)["loss"] == 1.0
    assert LAUNCH_DIR_ENV not in env


@pytest.mark.timeout(120)
def test_data_urls_may_hold_an_equals_sign(tmp_path, monkeypatch):
    from tlaunch.storage import pack

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    url = "faulty://bucket/lr=0.1/ds.tlar"
    pack(str(src), url, progress=False)
    script = tmp_path / "show.py"
    script.write_text(
        "import os, pathlib\n"
        "print(pathlib.Path(os.environ['TLAUNCH_DATA_DIR'], 'a.txt').read_text())\n"
    )
    dest = tmp_path / "here"
    for spec in (url, f"{url}={dest}"):
        assert launch(LaunchConfig(script=str(script), cpus=1, data=[spec])) == 0
    assert (dest / "a.txt").read_text() == "hello", "URL=DEST still splits at the last ="


@pytest.mark.timeout(60)
def test_a_missing_archive_with_an_equals_sign_names_both_readings(script, capsys):
    spec = "faulty://bucket/lr=0.1/none.tlar"
    assert launch(LaunchConfig(script=script, cpus=1, data=[spec])) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"no tlaunch data archive at '{spec}', nor at 'faulty://bucket/lr'" in err
