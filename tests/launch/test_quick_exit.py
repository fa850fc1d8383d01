"""Leaving without the interpreter's teardown keeps what teardown would have kept: files the
script never closed, its atexit functions, and its own exit after an uncaught exception."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
    import atexit, os, sys
    from tlaunch import quick_exit

    atexit.register(quick_exit.at_exit)  # first: runs last, as sitecustomize registers it
    text = open(sys.argv[1] + ".txt", "w")
    text.write("never closed, never flushed")
    raw = open(sys.argv[1] + ".bin", "wb")
    raw.write(b"\\x00" * 10)
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


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_quick_exit_keeps_unclosed_files_and_exit_functions(tmp_path, how):
    base = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), base, how],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert open(base + ".txt").read() == "never closed, never flushed"
    assert open(base + ".bin", "rb").read() == b"\x00" * 10
    assert (tmp_path / "out.atexit").exists()
    if how == "exit":
        assert proc.returncode == 0
        assert not (tmp_path / "out.del").exists(), "the teardown was skipped"
    else:  # an uncaught exception: Python reports it and exits as always
        assert proc.returncode == 1 and "the script failed after the stop" in proc.stderr
        assert (tmp_path / "out.del").exists()
