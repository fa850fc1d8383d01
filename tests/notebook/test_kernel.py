"""Training from cells of a real Jupyter kernel: ``notebook_launch`` and in-kernel ``init()``.

Interrupting a cell is a stop that keeps everything and hands the kernel back; running the
cell again resumes, bitwise; the kernel's own Ctrl-C works again once the run is over.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from tests.e2e.helpers import wait_for  # noqa: E402
from tests.notebook.kernel import Kernel, kernel_env  # noqa: E402

pytestmark = pytest.mark.timeout(420)

# A cell that defines the training function (fork lets workers use functions from cells).
TRAIN = """
import os, signal, time
import torch, tlaunch

# The kernel computes before it forks (it always does: data, a sanity check): its OpenMP pool
# is then live, which a forked worker must survive.
torch.randn(256, 256) @ torch.randn(256, 256)

def train(epochs, marker=None, delay=0.0):
    run = tlaunch.init()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(96, 8, generator=g), torch.randint(0, 2, (96,), generator=g))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model, optimizer, loader = run.prepare(model, optimizer, loader)
    for epoch in run.epochs(epochs):
        model.train()
        for x, y in run.batches(loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            run.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if marker and run.step >= 3 and run.is_main:
                open(marker, "w").close()
            time.sleep(delay)
    run.finish()
    return {k: v.detach().clone() for k, v in run.accelerator.unwrap_model(model).state_dict().items()}

def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
"""


@pytest.fixture
def kernel(tmp_path):
    k = Kernel(str(tmp_path), kernel_env())
    try:
        yield k
    finally:
        k.close()


def _ok(result) -> None:
    assert result.error is None, f"{result.error}\n{result.stderr[-3000:]}"


def test_an_interrupted_notebook_launch_returns_stopped_and_the_same_cell_resumes_bitwise(
    kernel, tmp_path
):
    marker = str(tmp_path / "trained")
    _ok(kernel.run(TRAIN))
    flags = 'cpus=2, seed=3, progress="off"'
    ref = kernel.run(f'ref = tlaunch.notebook_launch(train, 3, {flags}, checkpoint_dir="ref")')
    _ok(ref)
    _ok(kernel.run("assert ref.status == 'finished' and ref.value, ref"))

    cell = f'r = tlaunch.notebook_launch(train, 3, {marker!r}, 0.3, {flags}, checkpoint_dir="ck")'
    msg = kernel.start(cell)
    wait_for(lambda: os.path.exists(marker), 180, "three training steps")
    kernel.interrupt()  # the kernel's SIGINT, as the notebook's stop button sends it
    stopped = kernel.wait(msg)
    _ok(stopped)  # no SystemExit, no KeyboardInterrupt into the kernel
    check = kernel.run("print(r.status, r.exit_code, r.step, r.value)")
    status, code, step, value = check.stdout.split()
    assert (status, code, value) == ("stopped", "75", "None"), stopped.stderr[-3000:]
    assert int(step) >= 3
    assert kernel.alive()

    again = kernel.run(cell.replace(", 0.3,", ", 0.0,"))  # run the cell again
    _ok(again)
    assert f"resuming from step {step}" in again.stderr
    result = kernel.run("print(r.status, same(r.value, ref.value))")
    assert result.stdout.split() == ["finished", "True"], again.stderr[-3000:]


def test_a_failing_function_returns_failed_with_its_error_in_the_cell(kernel):
    _ok(kernel.run("import tlaunch\ndef boom():\n    raise ValueError('bad batch')"))
    result = kernel.run('r = tlaunch.notebook_launch(boom, cpus=2, checkpoint_dir="none")')
    _ok(result)
    assert "ValueError: bad batch" in result.stderr
    assert kernel.run("print(r.status, r.exit_code)").stdout.split() == ["failed", "1"]


def test_in_kernel_init_stops_with_stopped_restores_the_kernel_and_resumes_bitwise(
    kernel, tmp_path
):
    marker = str(tmp_path / "trained")
    _ok(kernel.run(TRAIN))
    _ok(kernel.run("kernels_sigint = signal.getsignal(signal.SIGINT)"))
    # The reference: an uninterrupted in-kernel run, no checkpoints (a keyword wins).
    _ok(kernel.run("ref = train(2)"))
    env = kernel.run(f"%env TLAUNCH_CHECKPOINT_DIR={tmp_path / 'ck'}")
    _ok(env)

    msg = kernel.start(f"params = train(2, {marker!r}, 0.3)")
    wait_for(lambda: os.path.exists(marker), 120, "three training steps")
    kernel.interrupt()
    stopped = kernel.wait(msg)
    assert stopped.error is not None and stopped.error.startswith(
        "Stopped: the run stopped at step"
    )
    assert "committed in a checkpoint" in stopped.error
    after = kernel.run(
        "print(signal.getsignal(signal.SIGINT) is kernels_sigint, tlaunch.Stopped.__name__)"
    )
    assert after.stdout.split() == ["True", "Stopped"]
    assert kernel.alive()

    again = kernel.run("params = train(2)")  # the cell again: init() again, resumed
    _ok(again)
    assert "resuming from step" in again.stderr
    assert kernel.run("print(same(params, ref))").stdout.strip() == "True"

    # The run is over: the kernel's Ctrl-C is its own again.
    sleeping = str(tmp_path / "sleeping")
    msg = kernel.start(f"open({sleeping!r}, 'w').close(); time.sleep(60)")
    wait_for(lambda: os.path.exists(sleeping), 60, "the cell to run")
    kernel.interrupt()
    assert kernel.wait(msg, timeout=60).error.startswith("KeyboardInterrupt")


def test_tlaunch_variables_set_in_the_kernel_are_read_by_init(kernel, tmp_path):
    _ok(kernel.run(f"%env TLAUNCH_CHECKPOINT_DIR={tmp_path / 'ck'}\n%env TLAUNCH_SAVE_EVERY=7"))
    result = kernel.run(
        "import tlaunch\nrun = tlaunch.init()\n"
        "print(run.config.checkpoint_dir, run.config.save_every)\nrun.finish()"
    )
    _ok(result)
    assert result.stdout.split() == [str(tmp_path / "ck"), "7"]
