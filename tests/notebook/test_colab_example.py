"""``examples/colab.ipynb`` runs end to end in a real kernel (on the CPU: its accelerator cell
falls back to 2 processes), and running it again after it finished resumes instead of
training again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

from tests.notebook.kernel import kernel_env  # noqa: E402

pytestmark = pytest.mark.timeout(600)
NOTEBOOK = Path(__file__).parents[2] / "examples" / "colab.ipynb"


def _execute(cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    env = kernel_env()
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or json.dumps(o.get("data", {})))
    return "".join(out)


def test_the_colab_notebook_trains_and_a_second_run_resumes_instead_of_retraining(tmp_path):
    first = _text(_execute(tmp_path))
    assert "finished at step 80" in first, first[-3000:]
    assert "loss" in first  # the metrics cell read metrics.jsonl
    ckpts = tmp_path / "tlaunch-demo" / "ckpts"
    committed = sorted(p.name for p in ckpts.iterdir() if (p / "COMMIT").exists())
    assert committed == ["step-000000080"], committed

    second = _text(_execute(tmp_path))  # "run all cells again" after a disconnect
    assert "resuming from step 80" in second and "finished at step 80" in second, second[-3000:]
