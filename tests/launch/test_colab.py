"""Colab specifics: the run directory beside checkpoints on Drive, the Drive quota warning, the
progress bar in a Jupyter kernel, and ``--time-limit runtime+DURATION``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from tlaunch import preemption, stopping
from tlaunch.config import LaunchConfig, UsageError, parse_time_limit
from tlaunch.contract import EXIT_USAGE, RUNTIME_START_ENV, START_TIME_ENV
from tlaunch.launcher import launch
from tlaunch.preemption import check_time_left, runtime_start, time_limit_span
from tlaunch.run_io import drive_quota_warning, make_run_dir
from tlaunch.stopping import StopController
from tlaunch.storage import localfs, store
from tlaunch.storage.store import DRIVE_ROOT_ENV

BOOT = 1_700_000_000.0


@pytest.fixture
def drive(tmp_path, monkeypatch):
    """My Drive on Colab's mount, found through a mount table (not TLAUNCH_DRIVE_ROOT)."""
    monkeypatch.delenv(DRIVE_ROOT_ENV, raising=False)
    monkeypatch.setattr(store, "COLAB_DRIVE_ROOT", str(tmp_path / "no-colab"))
    (tmp_path / "gdrive" / "MyDrive").mkdir(parents=True)
    table = tmp_path / "mounts"
    table.write_text(f"/dev/root / ext4 rw 0 0\ndrive {tmp_path}/gdrive fuse.drive rw 0 0\n")
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(table))
    return tmp_path / "gdrive" / "MyDrive"


@pytest.fixture
def boot(tmp_path, monkeypatch):
    """This machine booted at BOOT, as /proc/stat would say."""
    monkeypatch.delenv(RUNTIME_START_ENV, raising=False)
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  1 2 3 4\nintr 5\nctxt 6\nbtime {int(BOOT)}\nprocesses 7\n")
    monkeypatch.setattr(preemption, "BOOT_TIME_FILE", str(stat))
    return BOOT


# -- the run directory and the quota warning ----------------------------------------------------


def test_a_drive_url_keeps_its_run_directory_beside_the_checkpoints(drive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = make_run_dir(LaunchConfig(checkpoint_dir="drive://exp1"))
    assert run_dir.startswith(str(drive / "exp1" / "runs") + "/"), run_dir
    assert not (tmp_path / "tlaunch-runs").exists(), "the VM's disk goes with the runtime"


def test_a_drive_url_without_a_mount_logs_on_local_disk(tmp_path, monkeypatch):
    monkeypatch.delenv(DRIVE_ROOT_ENV, raising=False)
    monkeypatch.setattr(store, "COLAB_DRIVE_ROOT", str(tmp_path / "no-colab"))
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(tmp_path / "no-table"))
    monkeypatch.chdir(tmp_path)
    run_dir = make_run_dir(LaunchConfig(checkpoint_dir="drive://exp1"))
    assert run_dir.startswith(str(tmp_path / "tlaunch-runs") + "/")


@pytest.mark.parametrize(
    "flags, warned",
    [
        ({"checkpoint_dir": "drive://exp1"}, True),
        ({"checkpoint_dir": "{drive}/exp1"}, True),  # a plain path on the mount
        ({"checkpoint_dir": "drive://exp1", "keep_last": 3}, False),
        ({"checkpoint_dir": "drive://exp1", "keep_every": 100}, False),
        ({"checkpoint_dir": "drive://exp1", "keep_best": 1, "monitor": "loss"}, False),
        ({"checkpoint_dir": "drive://exp1", "fast_dev_run": 1}, False),  # saves nothing
        ({"checkpoint_dir": "{tmp}/local"}, False),
        ({"checkpoint_dir": "gs://bucket/exp1"}, False),
        ({"checkpoint_dir": "none"}, False),
        ({}, False),
    ],
)
def test_saving_to_drive_with_no_retention_rule_is_warned_about(drive, tmp_path, flags, warned):
    flags = {
        k: v.format(drive=drive, tmp=tmp_path) if isinstance(v, str) else v
        for k, v in flags.items()
    }
    text = drive_quota_warning(LaunchConfig(**flags))
    assert (text is not None) == warned
    if warned:
        assert "--keep-last 2" in text and "bin" in text and "30 days" in text
        assert "\n" not in text


# -- the progress bar in a kernel ---------------------------------------------------------------


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(120)
def test_deciding_about_a_kernel_imports_nothing_and_a_terminal_ipython_is_not_one():
    out = _python(
        """
        import sys
        from tlaunch.run_io import Progress, in_kernel
        print(in_kernel(), Progress(enabled=True, mode="auto").enabled, "IPython" in sys.modules)
        import ipykernel.zmqshell  # loaded, but the running shell is a terminal's
        from IPython.core.interactiveshell import InteractiveShell
        InteractiveShell.instance()
        print(in_kernel(), Progress(enabled=True, mode="auto").enabled)
        """
    )
    assert out.splitlines() == ["False False False", "False False"]


@pytest.mark.timeout(180)
def test_in_a_real_kernel_the_bar_is_on_and_tqdm_auto_and_text_in_a_forked_worker(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cell = textwrap.dedent(
        """
        import io, os, sys, tqdm.auto, tqdm.std
        from tlaunch.run_io import Progress

        def describe():
            p = Progress(enabled=True, mode="auto")
            bar = p.bar(total=3, start=0, desc="epoch 0") if p.enabled else None
            kind = None if bar is None else (
                "auto" if type(bar._bar) is tqdm.auto.tqdm else
                "std" if type(bar._bar) is tqdm.std.tqdm else type(bar._bar).__module__
            )
            p.close()
            return f"{p.enabled} {kind} {Progress(enabled=True, mode='off').enabled}"

        print("KERNEL", describe())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # as notebook_launch's workers: their own fds, which the kernel forwards
            try:
                sys.stderr = io.open(2, "w", closefd=False)
                os.write(w, describe().encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        print("FORKED", os.read(r, 200).decode())
        """
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout")
    assert "KERNEL True auto False" in printed, printed
    assert "FORKED True std False" in printed, printed


# -- --time-limit runtime+DURATION --------------------------------------------------------------


def test_runtime_limits_parse_and_plain_ones_stay_as_they_were():
    assert parse_time_limit("runtime+11h30m") == (True, 41400.0)
    assert parse_time_limit(" Runtime+ 45m") == (True, 2700.0)
    assert parse_time_limit("11h30m") == (False, 41400.0)
    config = LaunchConfig(time_limit="runtime+11h30m")
    assert config.time_limit == "runtime+11h30m", "kept as written, for commands shown back"
    assert LaunchConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("runtime+", "is runtime+DURATION, e.g. runtime+11h30m"),
        ("runtime", "is runtime+DURATION, e.g. runtime+11h30m"),
        ("runtime-5m", "is runtime+DURATION, e.g. runtime+11h30m"),
        ("runtime+soon", "has no duration after runtime+"),
        ("runtime+0s", "leaves no time to train; give e.g. runtime+11h30m"),
        ("runtime+11h30m+5m", "has no duration after runtime+"),
    ],
)
def test_bad_runtime_limits_are_one_line_usage_errors(text, message):
    with pytest.raises(UsageError) as raised:
        LaunchConfig(time_limit=text)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert repr(text) in str(raised.value)


def test_the_runtime_starts_at_the_machines_boot_unless_the_variable_says(boot, monkeypatch):
    assert runtime_start() == BOOT
    monkeypatch.setenv(RUNTIME_START_ENV, "1700000500.5")
    assert runtime_start() == 1700000500.5
    for bad in ("yesterday", "nan", "inf"):
        monkeypatch.setenv(RUNTIME_START_ENV, bad)
        with pytest.raises(UsageError, match=f"{RUNTIME_START_ENV}='{bad}' is not a time"):
            runtime_start()


def test_without_a_boot_time_the_error_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(RUNTIME_START_ENV, raising=False)
    monkeypatch.setattr(preemption, "BOOT_TIME_FILE", str(tmp_path / "no-stat"))
    with pytest.raises(UsageError, match=f"set {RUNTIME_START_ENV}"):
        time_limit_span("runtime+1h", BOOT)
    assert time_limit_span("1h", BOOT) == 3600.0, "a plain limit needs no boot time"


def test_the_deadline_counts_from_the_boot_for_runtime_limits_and_the_launch_otherwise(boot):
    launched = BOOT + 4 * 3600  # four hours into the runtime
    assert time_limit_span("runtime+11h30m", launched) == 7.5 * 3600
    assert time_limit_span("11h30m", launched) == 11.5 * 3600
    assert time_limit_span(None, launched) is None
    assert time_limit_span("runtime+3h", launched) == -3600, "passed before the launch"


def test_the_workers_clock_stops_one_margin_before_the_runtime_deadline(boot, monkeypatch):
    monkeypatch.setenv(START_TIME_ENV, str(BOOT + 3600))  # launched an hour into the runtime
    stops = StopController(LaunchConfig(time_limit="runtime+2h"), None, None)
    assert stops.clock.started + stops.clock.limit == BOOT + 7200
    clock = SimpleNamespace(now=BOOT + 7200 - 61)
    monkeypatch.setattr(stopping, "time", SimpleNamespace(time=lambda: clock.now))
    assert not stops.clock.deadline_near(0.0)  # margin: 5% of the hour left, at most 60 s
    clock.now += 2
    assert stops.clock.deadline_near(0.0)


def test_a_runtime_limit_that_has_passed_refuses_to_start(boot, tmp_path, monkeypatch, capsys):
    now = BOOT + 12 * 3600 + 600  # twelve hours and ten minutes into the runtime
    with pytest.raises(UsageError) as raised:
        check_time_left("runtime+12h", now)
    message = str(raised.value)
    assert "ran out 10m ago" in message and "started 12h10m ago" in message
    assert "--time-limit 30m" in message and "\n" not in message
    check_time_left("runtime+12h", BOOT + 12 * 3600 - 1)  # a second left: it starts
    check_time_left("30m", now)
    check_time_left(None, now)
    # Through the launcher: exit 2, before anything is made.
    where = tmp_path / "launch"
    where.mkdir()
    monkeypatch.chdir(where)
    (where / "train.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv(RUNTIME_START_ENV, str(time.time() - 12 * 3600 - 600))
    config = LaunchConfig(script="train.py", time_limit="runtime+12h", checkpoint_dir="ck")
    assert launch(config) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("tlaunch: error: --time-limit runtime+12h ran out 10m ago"), err
    assert sorted(p.name for p in where.iterdir()) == ["train.py"]
