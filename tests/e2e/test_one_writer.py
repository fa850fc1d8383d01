"""One writer per checkpoint directory, with real launchers: a second launcher is refused, an
orphaned worker is fenced off, and a script under plain python takes the lease itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import SCRIPTS, clean_env, run_tlaunch, tlaunch_cmd, wait_for

from tlaunch.storage import CheckpointStore, Lease

pytestmark = pytest.mark.timeout(300)


def committed(ckpt: str) -> list:
    return CheckpointStore(ckpt).committed()


def test_a_second_launcher_on_the_same_folder_is_refused_and_the_first_finishes(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    script = str(SCRIPTS / "resume_train.py")
    flags = ("--checkpoint-dir", ckpt, "--save-every", "4", "--progress", "off")
    first = subprocess.Popen(
        tlaunch_cmd(script, *flags, "--", "--out", out),
        cwd=tmp_path,
        env=clean_env(RESUME_TEST_STEP_DELAY="0.05"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: os.path.exists(out + ".started"), 120, "the first launcher's training")
        second = run_tlaunch(
            script, *flags, "--", "--out", str(tmp_path / "second.pt"), cwd=tmp_path, timeout=60
        )
        _, first_err = first.communicate(timeout=200)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    (line,) = [x for x in second.stderr.splitlines() if "error" in x]
    assert f"host {socket.gethostname()} pid {first.pid}" in line
    assert "pass --takeover if that run is gone" in line
    assert not os.path.exists(tmp_path / "second.pt")
    assert first.returncode == 0, first_err[-3000:]
    store = CheckpointStore(ckpt)
    steps = [i.step for i in store.committed()]
    assert steps and steps[-1] == 72
    assert all(problems == [] for problems in store.verify().values())
    assert Lease(ckpt).read() is None, "the first launcher released its lease at exit"


def test_an_orphaned_worker_commits_nothing_once_a_new_launcher_holds_the_lease(tmp_path):
    ckpt, marker = str(tmp_path / "ckpt"), str(tmp_path / "orphan.pid")
    hold = tmp_path / "hold.py"  # the new launch's script: keeps it running until told
    hold.write_text(
        "import os, sys, time\n"
        "end = time.time() + 100\n"
        "while not os.path.exists(sys.argv[1]) and time.time() < end:\n"
        "    time.sleep(0.05)\n"
    )
    done = tmp_path / "done"
    a = subprocess.Popen(
        tlaunch_cmd(str(SCRIPTS / "orphan_train.py"), "--checkpoint-dir", ckpt,
                    "--save-every", "1", "--progress", "off", "--", marker),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    b = orphan = None
    try:
        wait_for(lambda: os.path.exists(marker), 60, "launcher A's worker")
        orphan = int(open(marker).read())
        a_token = Lease(ckpt).read().token
        a.send_signal(signal.SIGKILL)  # the launcher only: its worker has not reached init()
        wait_for(lambda: committed(ckpt), 120, "the orphan's first commit")
        b = subprocess.Popen(
            tlaunch_cmd(str(hold), "--checkpoint-dir", ckpt, "--takeover", "--", str(done)),
            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

        def b_holds() -> bool:
            record = Lease(ckpt).read()
            return record is not None and record.token != a_token

        wait_for(b_holds, 60, "B's lease")
        taken = Lease(ckpt).read().started
        # The orphan holds launcher A's pipes: they close when it exits.
        orphan_out, orphan_err = a.communicate(timeout=120)
        done.touch()
        _, b_err = b.communicate(timeout=60)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if orphan is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
    assert "ORPHAN FINISHED" not in orphan_out
    # Fenced: its check found B's lease, or none while B replaced A's (delete, then create).
    fenced = ("another run took it over", "another run is taking it over")
    assert any(why in orphan_err for why in fenced), orphan_err[-3000:]
    late = [i.step for i in committed(ckpt) if i.time >= taken]
    assert not late, f"the orphan committed steps {late} after B took the lease"
    assert b.returncode == 0, b_err[-3000:]
    assert "--takeover" in b_err
    assert Lease(ckpt).read() is None


def test_a_script_under_plain_python_takes_the_lease_itself(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    env = clean_env(TLAUNCH_CHECKPOINT_DIR=ckpt, TLAUNCH_PROGRESS="off")
    command = [sys.executable, str(SCRIPTS / "save_once.py")]
    owner = Lease(ckpt)
    owner.acquire()
    refused = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"pid {os.getpid()}" in refused.stderr and "--takeover" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert committed(ckpt) == []
    owner.release()
    ran = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert [i.step for i in committed(ckpt)] == [2]
    assert Lease(ckpt).read() is None, "released when the run finished"
