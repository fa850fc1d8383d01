"""Leaving without the interpreter's teardown keeps what teardown would have kept: files the
script never closed (whether opened before or after the stop began: ``prepare``), its atexit
functions, and its own exit after an uncaught exception."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
    import atexit, gc, io, os, sys
    from tlaunch import quick_exit

    class Log(io.TextIOWrapper):
        pass

    quick_exit.install()  # first: runs last, as in a worker (sitecustomize)
    text = open(sys.argv[1] + ".txt", "w")
    text.write("never closed, never flushed")
    closed = open(sys.argv[1] + ".closed", "w")
    if sys.argv[3] == "prepared":  # the stop began: files from before it are found meanwhile
        quick_exit.prepare()
    closed.close()
    raw = open(sys.argv[1] + ".bin", "wb")
    raw.write(b"\\x00" * 10)
    sub = Log(open(sys.argv[1] + ".sub", "wb"))
    sub.write("a subclass")
    gc.collect()  # the newer files move to the oldest generation, where the frozen ones are not
    atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").close())

    class Slow:
        def __del__(self, _open=open, path=sys.argv[1] + ".del"):
            _open(path, "w").close()  # finalization would run this; a quick exit does not

    kept = Slow()
    quick_exit.arm(0)
    if sys.argv[2] == "raise":
        raise RuntimeError("the script failed after the stop")
    sys.exit(0)
"""


@pytest.mark.parametrize("prepared", ["prepared", "not prepared"])
@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_quick_exit_keeps_unclosed_files_and_exit_functions(tmp_path, how, prepared):
    base = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), base, how, prepared],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert open(base + ".txt").read() == "never closed, never flushed"
    assert open(base + ".bin", "rb").read() == b"\x00" * 10
    assert open(base + ".sub").read() == "a subclass"
    assert (tmp_path / "out.atexit").exists()
    if how == "exit":
        assert proc.returncode == 0
        assert not (tmp_path / "out.del").exists(), "the teardown was skipped"
    else:  # an uncaught exception: Python reports it and exits as always
        assert proc.returncode == 1 and "the script failed after the stop" in proc.stderr
        assert (tmp_path / "out.del").exists()


EXIT_AFTER_A_SAVE = str(pathlib.Path(__file__).parents[1] / "storage" / "exit_after_save.py")


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_snapshot_being_freed_is_waited_for_only_when_the_teardown_follows(how):
    # A quick exit leaves with os._exit: the writer's thread may go on freeing the snapshot
    # (the kernel takes the pages back). A script that raised after the stop leaves through
    # the teardown after all: a writer's thread still freeing would be ended by pthread_exit
    # inside torch and abort the process (8 times in 10 without the wait).
    for _ in range(3 if how == "raise" else 1):
        proc = subprocess.run(
            [sys.executable, EXIT_AFTER_A_SAVE, f"quick-{how}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "teardown follows: False" in proc.stdout  # arm told the writer
        assert "terminate called" not in proc.stderr
        if how == "exit":
            assert proc.returncode == 0, proc.stderr[-2000:]
        else:
            assert proc.returncode == 1 and "the script failed after the stop" in proc.stderr
