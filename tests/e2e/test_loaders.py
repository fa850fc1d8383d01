"""Real input pipelines: DataLoader worker processes and random augmentations in __getitem__.

A stop never kills the loader's workers, whoever sends it (the launcher, systemd signalling
every process, a terminal's Ctrl-C to the process group): the ranks save and exit 75, and the
workers end with their rank.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import SCRIPTS, clean_env, tlaunch_cmd, wait_for

from tests.e2e.test_preemption import processes_mentioning

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(SCRIPTS / "augment_train.py")
# 96 samples, batch 8, --grad-accum 2: 12 micro-batches (6 steps) per epoch on 1 process,
# 6 micro-batches (3 steps) per rank on 2.
FLAGS = ("--seed", "5", "--grad-accum", "2", "--progress", "off")


def launch(where, *flags: str, script_args=(), plain: bool = False, env=None, timeout=240):
    """The script under the launcher (or plain ``python`` when ``plain``), in a session of its
    own so that a signal to its process group reaches nothing else."""
    if plain:
        command = [sys.executable, SCRIPT, *script_args]
    else:
        command = tlaunch_cmd(SCRIPT, *FLAGS, *flags, "--", *script_args)
    proc = subprocess.Popen(
        command,
        cwd=where,
        env=clean_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


def committed(ckpt: str) -> list[str]:
    if not os.path.isdir(ckpt):
        return []
    return sorted(d for d in os.listdir(ckpt) if os.path.exists(os.path.join(ckpt, d, "COMMIT")))


@pytest.mark.parametrize(
    "cpus, how, workers, persistent",
    [
        ("2", "all", "2", True),  # systemd's stop: SIGTERM to every process of the unit
        ("2", "launcher", "2", False),  # the reproduction
        ("1", "all", "4", False),
    ],
)
def test_a_stop_to_ranks_with_loader_workers_saves_and_exits_75(
    tmp_path, cpus, how, workers, persistent
):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    args = ["--out", out, "--workers", workers, "--signal-at-batch", "5", "--signal-how", how]
    code, _, stderr = launch(
        tmp_path,
        "--cpus",
        cpus,
        "--checkpoint-dir",
        ckpt,
        script_args=[*args, *(["--persistent"] if persistent else [])],
    )
    assert code == 75, stderr[-3000:]
    assert "killed by signal" not in stderr and "Traceback" not in stderr
    assert committed(ckpt), "the stop committed a checkpoint"
    wait_for(lambda: not processes_mentioning(out), 30, "the loader workers to end with the ranks")


def test_ctrl_c_to_a_plain_python_runs_process_group_saves_and_exits_75(tmp_path):
    # A terminal's Ctrl-C reaches the script and its loader workers at once.
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    args = ["--out", out, "--workers", "2", "--signal-at-batch", "5", "--signal-how", "group-int"]
    code, _, stderr = launch(
        tmp_path, script_args=args, plain=True, env={"TLAUNCH_CHECKPOINT_DIR": ckpt}
    )
    assert code == 75, stderr[-3000:]
    assert committed(ckpt)
    wait_for(lambda: not processes_mentioning(out), 30, "the loader workers to end with the run")
