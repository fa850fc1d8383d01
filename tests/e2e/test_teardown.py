"""A worker's exit: a script that leaves its gloo process group open still exits cleanly.

gloo's worker threads free the collectives they ran; a tensor freed by one of them as the
interpreter begins to finalize needs the GIL, and the thread is then ended by ``pthread_exit``,
whose unwinding through a ``noexcept`` destructor aborts the process ("terminate called without
an active exception", SIGABRT) after the script has finished. tlaunch ends such a group at exit,
from a ``sitecustomize`` it puts first on the workers' ``PYTHONPATH``, without changing the
script. Real processes, real gloo, hard timeouts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import SCRIPTS, clean_env, results, run_tlaunch

from tlaunch.workers import EXIT_HOOK_DIR, with_exit_hook

pytestmark = pytest.mark.timeout(240)

WARNING = "tlaunch: warning: the process group did not end"

#: The script prints user_site=ran only where this ran in its own process.
USER_SITE = """\
import os
os.environ["USER_SITE"] = str(os.getpid())
"""


def test_a_finished_script_with_collectives_in_flight_at_exit_exits_0(tmp_path):
    # Without the hook rank 0 aborts in its interpreter's teardown (16 of 16 runs here).
    script = str(SCRIPTS / "open_group.py")
    out = run_tlaunch("--cpus", "2", script, "in-flight", cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(r["rank"] for r in results(out.stdout)) == ["0", "1"]
    assert "SIGABRT" not in out.stderr and WARNING not in out.stderr


def test_a_waited_script_that_holds_its_group_exits_0_and_its_sitecustomize_still_runs(tmp_path):
    # The group outlives destroy_process_group here (the script holds it): the hook's wait for
    # gloo's threads is what keeps the exit clean (without it: an abort in 3 of 9 runs here).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(USER_SITE)
    script = str(SCRIPTS / "open_group.py")
    out = run_tlaunch(
        "--cpus", "2", script, "waited", cwd=tmp_path, timeout=180, PYTHONPATH=str(site)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["user_site"] for r in results(out.stdout)] == ["ran", "ran"]


def test_a_crashed_rank_is_the_one_reported(tmp_path):
    # Its peer waits in a collective it never joins: ending the group at the crashed rank's
    # exit would fail that peer first, and the peer would be reported instead. (A rank that
    # calls sys.exit(3) meanwhile: test_spawn's test_a_failing_rank_ends_the_others_within_seconds.)
    out = run_tlaunch("--cpus", "2", str(SCRIPTS / "crash.py"), cwd=tmp_path, timeout=180)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "rank 1 exited with code 1" in out.stderr
    assert "RuntimeError: boom: rank 1 failed" in out.stderr and "UNREACHABLE" not in out.stdout


def test_a_script_that_ends_its_own_group_is_left_alone(tmp_path):
    out = run_tlaunch("--cpus", "2", str(SCRIPTS / "allreduce.py"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(r["sum"] for r in results(out.stdout)) == ["3", "3"]
    assert WARNING not in out.stderr


def test_the_hook_imports_no_torch_at_start():
    probe = (
        "import sys, importlib.machinery as m; "
        "print(m.PathFinder.find_spec('sitecustomize').origin, 'torch' in sys.modules)"
    )
    env = clean_env(PYTHONPATH=EXIT_HOOK_DIR)
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stderr, out.stderr  # site reports a failed import
    where, torch_loaded = out.stdout.split()
    assert os.path.dirname(where) == EXIT_HOOK_DIR and torch_loaded == "False"


def test_the_hook_goes_first_on_pythonpath_once_and_keeps_the_users_entries():
    env = with_exit_hook({"PYTHONPATH": "/a" + os.pathsep + "/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [EXIT_HOOK_DIR, "/a", "/b"]
    assert with_exit_hook(env) == env
    assert with_exit_hook({})["PYTHONPATH"] == EXIT_HOOK_DIR
