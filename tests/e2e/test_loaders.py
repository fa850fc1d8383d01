"""Real input pipelines: DataLoader worker processes and random augmentations in __getitem__.

* A stop never kills the loader's workers, whoever sends it (the launcher, systemd signalling
  every process, a terminal's Ctrl-C to the process group): the ranks save and exit 75, and
  the workers end with their rank.
* A sample's augmentation is a function of (seed, epoch, index): uninterrupted runs end with
  the same parameters for any num_workers, and a stopped run resumed with another
  num_workers or persistence ends bitwise equal to the uninterrupted one.

Each stopped run resumes with other loader settings than it stopped with, so one pair of
launches checks the stop, the resume and the independence from the workers at once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import SCRIPTS, clean_env, processes_mentioning, tlaunch_cmd, wait_for

from tests.e2e.test_resume import assert_bitwise_equal

pytestmark = pytest.mark.timeout(300)
SCRIPT = str(SCRIPTS / "augment_train.py")
SEED, ACCUM = "5", "2"
# 96 samples, batch 8, --grad-accum 2: 12 micro-batches (6 steps) an epoch on 1 process,
# 6 micro-batches (3 steps) a rank on 2; two epochs.
FLAGS = ("--seed", SEED, "--grad-accum", ACCUM, "--progress", "off")
# The same settings for a plain ``python script.py``, through the variables tlaunch.init reads.
PLAIN_ENV = {"TLAUNCH_SEED": SEED, "TLAUNCH_GRAD_ACCUM": ACCUM, "TLAUNCH_PROGRESS": "off"}


def launch(where, cpus: str, *script_args: str, ckpt: str = "none", plain: bool = False):
    """The script under the launcher, or under plain ``python`` when ``plain``; in a session of
    its own, so that a signal to its process group reaches nothing else. (code, stderr)."""
    if plain:
        command = [sys.executable, SCRIPT, *script_args]
        env = {**PLAIN_ENV, "TLAUNCH_CHECKPOINT_DIR": ckpt}
    else:
        command = tlaunch_cmd(SCRIPT, "--cpus", cpus, *FLAGS, "--checkpoint-dir", ckpt, "--")
        command += script_args
        env = {}
    proc = subprocess.Popen(
        command,
        cwd=where,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    return proc.returncode, stderr


def loader_args(workers: str, persistent: bool) -> list[str]:
    return ["--workers", workers, *(["--persistent"] if persistent else [])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's parameters for (processes, loader settings), once each."""
    root = tmp_path_factory.mktemp("references")
    done: dict[tuple, dict[str, torch.Tensor]] = {}

    def run(cpus: str, workers: str = "0", persistent: bool = False, data: str = "images"):
        key = (cpus, workers, persistent, data)
        if key not in done:
            out = str(root / f"ref-{'-'.join(map(str, key))}.pt")
            args = ["--out", out, "--data", data, *loader_args(workers, persistent)]
            code, stderr = launch(root, cpus, *args)
            assert code == 0, stderr[-3000:]
            done[key] = torch.load(out, weights_only=True)
        return done[key]

    return run


def test_uninterrupted_runs_end_equal_for_any_num_workers(reference):
    in_process = reference("1", workers="0")
    assert_bitwise_equal(in_process, reference("1", workers="2"))
    assert_bitwise_equal(in_process, reference("1", workers="4", persistent=True))


@pytest.mark.parametrize(
    "cpus, how, signal_at, stop_with, resume_with",
    [
        # systemd's stop: SIGTERM to the launcher, every rank and every loader worker.
        ("2", "all", 3, ("2", True), ("0", False)),  # mid-epoch
        ("2", "launcher", 5, ("2", False), ("4", True)),  # inside an accumulation window
        ("1", "all", 12, ("4", False), ("2", True)),  # at the epoch boundary
        # A terminal's Ctrl-C to a plain ``python`` run and its loader workers.
        ("plain", "group-int", 5, ("2", False), ("0", False)),
    ],
)
def test_a_stopped_run_resumed_with_other_loader_workers_ends_bitwise_equal(
    tmp_path, reference, cpus, how, signal_at, stop_with, resume_with
):
    plain = cpus == "plain"
    # Loaded in the training process (no workers); plain python runs as one launched process.
    expected = reference("1" if plain else cpus)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    # 0.12 s batches: the ranks agree on a stop every ~0.1 s of steps, so every step here and
    # the stop lands before the run's end however fast the machine is.
    stop = ["--signal-at-batch", str(signal_at), "--signal-how", how, "--batch-seconds", "0.12"]
    code, stderr = launch(
        tmp_path, cpus, "--out", out, *loader_args(*stop_with), *stop, ckpt=ckpt, plain=plain
    )
    assert code == 75, stderr[-3000:]
    assert "killed by signal" not in stderr and "Traceback" not in stderr
    assert not os.path.exists(out), "the stopped run must not reach the end"
    wait_for(lambda: not processes_mentioning(out), 30, "the loader workers to end with the ranks")
    code, stderr = launch(
        tmp_path, cpus, "--out", out, *loader_args(*resume_with), ckpt=ckpt, plain=plain
    )
    assert code == 0, stderr[-3000:]
    assert "resuming from step" in stderr
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))


@pytest.mark.parametrize("data, warned", [("stream", False), ("plain-stream", True)])
def test_a_stream_resumes_from_its_state_or_by_the_replay_it_warned_of(
    tmp_path, reference, data, warned
):
    # An IterableDataset of unknown length split between 2 workers; "stream" has torchdata's
    # state_dict and goes through StatefulDataLoader, "plain-stream" has none. Same data.
    expected = reference("1", "2", data="stream")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    args = ["--out", out, "--data", data, "--workers", "2"]
    stop = ["--signal-at-batch", "7"]  # inside an accumulation window
    code, stderr = launch(tmp_path, "1", *args, *stop, ckpt=ckpt)
    assert code == 75, stderr[-3000:]
    assert stderr.count("cannot resume from a saved state") == (1 if warned else 0)
    code, stderr = launch(tmp_path, "1", *args, ckpt=ckpt)
    assert code == 0, stderr[-3000:]
    assert stderr.count("cannot resume from a saved state") == (1 if warned else 0)
    assert "resuming from step" in stderr
    assert_bitwise_equal(expected, torch.load(out, weights_only=True))
