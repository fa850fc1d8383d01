"""Command-line parsing: flags anywhere, pass-through, env defaults, one-line usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tlaunch.cli import main, parse_args
from tlaunch.config import LaunchConfig, UsageError, parse_duration


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    return "train.py"


def test_flags_before_and_after_the_script_are_the_same(script):
    a = parse_args(["train.py", "--cpus", "2", "--lr", "3"])
    b = parse_args(["--cpus", "2", "train.py", "--lr", "3"])
    assert a == b
    assert a.cpus == 2 and a.script == "train.py" and a.script_args == ["--lr", "3"]


def test_everything_after_double_dash_goes_to_the_script(script):
    c = parse_args(["train.py", "--cpus", "2", "--", "--cpus", "9", "x"])
    assert c.cpus == 2
    assert c.script_args == ["--cpus", "9", "x"]


def test_module_form(script):
    c = parse_args(["--seed", "3", "-m", "pkg.train", "--epochs", "2"])
    assert c.module == "pkg.train" and c.script is None
    assert c.seed == 3 and c.script_args == ["--epochs", "2"]


def test_environment_supplies_defaults_and_flags_win(script, monkeypatch):
    monkeypatch.setenv("TLAUNCH_CPUS", "2")
    monkeypatch.setenv("TLAUNCH_PRECISION", "bf16")
    monkeypatch.setenv("TLAUNCH_RESUME_FORCE", "true")
    c = parse_args(["train.py"])
    assert (c.cpus, c.precision, c.resume_force) == (2, "bf16", True)
    assert parse_args(["train.py", "--cpus", "1"]).cpus == 1


def test_precision_aliases_from_lightning(script):
    assert parse_args(["train.py", "--precision", "bf16-mixed"]).precision == "bf16"
    assert parse_args(["train.py", "--precision", "32"]).precision == "no"
    assert parse_args(["train.py", "--precision", "16-mixed"]).precision == "fp16"


def test_fast_dev_run_takes_an_optional_count(script):
    assert parse_args(["train.py", "--fast-dev-run"]).fast_dev_run == 1
    assert parse_args(["train.py", "--fast-dev-run", "3"]).fast_dev_run == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.py"], "does not exist"),
        (["train.py", "--cpus", "0"], "--cpus must be at least 1; run: tlaunch train.py --cpus 1"),
        (["train.py", "--nnodes", "2"], "--rdzv-endpoint HOST:29400"),
        (["train.py", "--precision", "fp8"], "--precision 'fp8' is unknown"),
        (["train.py", "--time-limit", "soon"], "write it like 11h30m"),
        (["train.py", "--keep-best", "2"], "--monitor val_loss"),
        (["train.py", "--cpus", "2", "--gpus", "1"], "choose one of"),
        (["train.py", "--cpus", "x"], "argument --cpus: invalid int value: 'x'"),
        (["train.py", "--mode", "best"], "argument --mode: invalid choice: 'best'"),
        ([], "no script given"),
    ],
)
def test_bad_input_is_one_line_with_the_fix_and_exit_2(script, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_config_round_trips_through_json():
    c = LaunchConfig(script="t.py", cpus=2, data=["gs://b/x"], clip_grad_norm=1.0)
    assert LaunchConfig.from_json(c.to_json()) == c


def test_durations():
    assert parse_duration("11h30m") == 41400
    assert parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400
    with pytest.raises(UsageError):
        parse_duration("11x")


@pytest.mark.timeout(60)
def test_help_and_version_do_not_import_torch():
    probe = (
        "import sys; from tlaunch.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (
        "tlaunch 0." in out.stdout and "--grad-accum" in out.stdout and out.stdout.endswith("ok\n")
    )


@pytest.mark.parametrize("variable", ["TLAUNCH_SCRIPT", "TLAUNCH_MODULE", "TLAUNCH_SCRIPT_ARGS"])
def test_what_to_run_comes_from_the_command_line_not_the_environment(script, monkeypatch, variable):
    monkeypatch.setenv(variable, "other")
    c = parse_args(["train.py", "--cpus", "1"])
    assert (c.script, c.module, c.script_args) == ("train.py", None, [])


def test_a_bad_environment_value_is_one_line_naming_the_variable(script, monkeypatch, capsys):
    monkeypatch.setenv("TLAUNCH_CPUS", "x")
    assert main(["train.py"]) == 2
    assert capsys.readouterr().err == "tlaunch: error: TLAUNCH_CPUS='x' is not a valid int\n"


@pytest.mark.timeout(60)
def test_a_listing_into_a_closed_pipe_ends_quietly(tmp_path):
    # `tlaunch ckpt ls URL | head`: the reader is gone before tlaunch writes a line.
    import subprocess
    import sys

    (tmp_path / "step-000000001").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlaunch", "ckpt", "ls", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=50)
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()
    assert proc.returncode == 141
