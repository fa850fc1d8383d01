"""``notebook_launch`` outside a kernel: restarts after a crash, the CUDA refusal, the default
folder's key. (The kernel itself: tests/notebook.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.e2e.helpers import clean_env
from tlaunch.config import UsageError
from tlaunch.notebook import _default_checkpoint_dir, notebook_launch

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import tlaunch

    def flaky(marker):
        if os.environ["RANK"] == "1" and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(13)  # a worker that dies once
        return int(os.environ["TORCHELASTIC_RESTART_COUNT"])

    if __name__ == "__main__":
        r = tlaunch.notebook_launch(flaky, sys.argv[1], cpus=2, max_restarts=1, checkpoint_dir="none")
        print("RESULT", r.status, r.exit_code, r.value)
    """
)


def test_a_crashed_worker_is_restarted_within_max_restarts(tmp_path):
    script = tmp_path / "nb.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "crashed")], cwd=tmp_path,
        env=clean_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert "RESULT finished 0 1" in result.stdout, result.stderr[-3000:]
    assert "rank 1 exited with code 13" in result.stderr


def test_cuda_initialised_in_the_kernel_is_refused_with_the_fix(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(UsageError, match="restart the runtime and call notebook_launch before"):
        notebook_launch(print, gpus=1)


def test_the_default_folder_follows_the_function_and_its_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def train(epochs):
        return epochs

    base = _default_checkpoint_dir(train, (3,))
    assert base.startswith(str(tmp_path / "tlaunch-checkpoints" / "test_the_default_folder"))
    assert _default_checkpoint_dir(train, (3,)) == base != _default_checkpoint_dir(train, (4,))
