"""``tlaunch env``: parsed back, no secret printed, nothing heavy before the devices."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.helpers import clean_env, tlaunch_cmd

SECRET = "s3cr3t-value-never-printed"


def _sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif ": " in line and current is not None:
            name, value = line.split(": ", 1)
            current[name] = value
    return sections


def test_env_report_parses_and_redacts_secrets(tmp_path):
    env = clean_env(
        TLAUNCH_CPUS="2",
        THP_MEM_ALLOC_ENABLE="0",  # a user's opt-out of the workers' 2 MB pages is shown
        TLAUNCH_API_TOKEN=SECRET,
        ACCELERATE_SECRET_KEY=SECRET,
        TLAUNCH_GCE_METADATA_URL=f"http://user:{SECRET}@127.0.0.1:9/computeMetadata/v1",
    )
    done = subprocess.run(
        tlaunch_cmd("env"), env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    report = _sections(done.stdout)
    assert set(report) == {"versions", "platform", "environment", "devices"}
    assert report["versions"]["tlaunch"] == "0.1.0"
    assert report["versions"]["python"].startswith(".".join(map(str, sys.version_info[:2])))
    assert report["versions"]["torch"][0].isdigit()
    assert report["environment"]["TLAUNCH_CPUS"] == "2"
    assert report["environment"]["THP_MEM_ALLOC_ENABLE"] == "0"
    assert report["environment"]["TLAUNCH_API_TOKEN"] == "<redacted>"
    assert report["environment"]["ACCELERATE_SECRET_KEY"] == "<redacted>"
    assert report["environment"]["TLAUNCH_GCE_METADATA_URL"] == (
        "http://<redacted>@127.0.0.1:9/computeMetadata/v1"
    )
    # The metadata URL set above is what the preemption watcher would poll: a GCE VM.
    assert report["platform"]["platform"].startswith("GCE VM")
    assert report["devices"]["cuda devices"] == "none"


def test_everything_before_the_devices_imports_no_torch():
    code = (
        "import sys; from tlaunch import envreport; envreport.header_lines(); "
        "print(sorted(m for m in ('torch', 'accelerate', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_env_takes_no_arguments():
    done = subprocess.run(
        tlaunch_cmd("env", "--bogus"), env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "tlaunch env takes no arguments" in done.stderr
