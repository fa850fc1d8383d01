"""The launcher end to end: real processes, real gloo, real signals, hard timeouts."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time

import pytest
from helpers import SCRIPTS, clean_env, results, run_tlaunch, tlaunch_cmd, wait_for

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(180)


def test_one_process_runs_the_script_directly_with_its_arguments(tmp_path):
    out = run_tlaunch(
        str(SCRIPTS / "allreduce.py"), "--cpus", "1", "--lr", "3", "--", "--cpus", "7", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    (row,) = results(out.stdout)
    assert (row["rank"], row["world"], row["sum"]) == ("0", "1", "1")
    assert "args=['--lr', '3', '--cpus', '7']" in out.stdout


def test_two_cpu_processes_all_reduce_over_gloo(tmp_path):
    out = run_tlaunch("--cpus", "2", str(SCRIPTS / "allreduce.py"), "--x", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = sorted(results(out.stdout), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["sum"]) for r in rows] == [("0", "2", "3"), ("1", "2", "3")]


def test_unmodified_accelerate_script_is_distributed_with_precision_and_accumulation(tmp_path):
    out = run_tlaunch(
        str(SCRIPTS / "accelerate_script.py"),
        "--cpus",
        "2",
        "--precision",
        "bf16",
        "--grad-accum",
        "4",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = results(out.stdout)
    assert len(rows) == 2
    for r in rows:
        assert r["num_processes"] == "2" and r["type"] == "MULTI_CPU" and r["sum"] == "2"
        assert r["precision"] == "bf16" and r["accum"] == "4"


def test_two_machines_on_loopback_form_one_world(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            tlaunch_cmd(
                "--cpus",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                str(SCRIPTS / "allreduce.py"),
            ),
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    rows = [r for o in outs for r in results(o[0])]
    assert sorted(r["rank"] for r in rows) == ["0", "1"]
    assert all(r["world"] == "2" and r["sum"] == "3" for r in rows)


def test_script_exit_code_is_propagated(tmp_path):
    script = tmp_path / "exit7.py"
    script.write_text("import sys; sys.exit(7)\n")
    assert run_tlaunch(str(script), cwd=tmp_path).returncode == 7
    assert run_tlaunch(str(script), "--cpus", "2", cwd=tmp_path).returncode == 7


def test_a_failing_rank_ends_the_others_within_seconds(tmp_path):
    started = time.monotonic()
    out = run_tlaunch(
        str(SCRIPTS / "fail_rank.py"), "--cpus", "2", cwd=tmp_path, FAIL_RANK="1", FAIL_CODE="3"
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 3, out.stderr
    assert "UNREACHABLE" not in out.stdout
    assert "rank 1 exited with code 3" in out.stderr
    assert elapsed < 60, f"the surviving rank lingered: {elapsed:.0f}s"


@pytest.mark.parametrize("nprocs", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_reach_the_script_and_no_traceback_is_printed(tmp_path, nprocs, sig):
    ready = tmp_path / "pid"
    proc = subprocess.Popen(
        tlaunch_cmd(str(SCRIPTS / "wait_for_signal.py"), "--cpus", nprocs, str(ready)),
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        files = [tmp_path / f"pid.{rank}" for rank in range(int(nprocs))]
        wait_for(lambda: all(f.exists() and f.read_text() for f in files), 60, "every rank")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert f"GOT {sig.name}" in stdout
    assert "Traceback" not in stderr
    # Nothing was checkpointed: not "preempted", but the conventional 128+signal.
    assert proc.returncode == 128 + sig, stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "2"], "--gpus 2 requested but this machine has 0 CUDA GPUs"),
        (["--tpus", "8"], "pip install 'tlaunch[tpu]'"),
        (["--precision", "fp16"], "use --precision bf16"),
    ],
)
def test_missing_hardware_is_refused_before_anything_starts(tmp_path, argv, message):
    marker = tmp_path / "started"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    if argv[0] == "--tpus" and importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed here")
    out = run_tlaunch(str(script), *argv, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and out.stderr.count("\n") == 1
    assert not marker.exists()


_HUGE_PAGES_OF_A_TENSOR = """
import os, torch
tensor = torch.ones(16 << 20)  # 64 MB, every page touched
address, huge_kb, inside = tensor.data_ptr(), 0, False
with open("/proc/self/smaps") as smaps:
    for line in smaps:
        head = line.split()
        if not head[0].endswith(":"):  # a mapping's first line: "lo-hi perms ..."
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= address < hi
        elif inside and head[0] == "AnonHugePages:":
            huge_kb = int(head[1])
print(f"RESULT thp={os.environ.get('THP_MEM_ALLOC_ENABLE')} huge_kb={huge_kb}")
"""


def _thp_mode(name: str) -> str:
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.parametrize("setting", [None, "0"])
def test_workers_tensors_get_huge_pages_unless_the_user_says_otherwise(tmp_path, setting):
    script = tmp_path / "huge.py"
    script.write_text(_HUGE_PAGES_OF_A_TENSOR)
    env = {} if setting is None else {"THP_MEM_ALLOC_ENABLE": setting}
    out = run_tlaunch("--cpus", "1", str(script), cwd=tmp_path, **env)
    assert out.returncode == 0, out.stderr
    (row,) = results(out.stdout)
    assert row["thp"] == (setting or "1")
    mode, defrag = _thp_mode("enabled"), _thp_mode("defrag")
    if mode == "madvise" and setting == "0":
        assert row["huge_kb"] == "0"  # torch asked for nothing: 4 KB pages only
    if mode in ("madvise", "always") and setting is None and defrag != "never":
        assert int(row["huge_kb"]) > 0  # the kernel backed the tensor with 2 MB pages
