"""``notebook_launch(fn, tpus=1)`` from a real kernel, on torch_xla's CPU device (the XLA lane:
``make test-xla`` runs it with ``PJRT_DEVICE=CPU``)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.xla, pytest.mark.timeout(420)]

pytest.importorskip("torch_xla")
pytest.importorskip("ipykernel")

from tests.notebook.kernel import Kernel, kernel_env  # noqa: E402
from tests.notebook.test_kernel import TRAIN  # noqa: E402


def test_notebook_launch_trains_on_the_xla_device_and_resumes_there(tmp_path):
    kernel = Kernel(str(tmp_path), kernel_env(PJRT_DEVICE="CPU"))
    try:
        assert kernel.run(TRAIN).error is None
        first = kernel.run(
            'r = tlaunch.notebook_launch(train, 1, tpus=1, checkpoint_dir="ck", progress="off")\n'
            "print(r.status, r.step, sorted(r.value))"
        )
        assert first.error is None, first.stderr[-3000:]
        assert "xla strategy" in first.stderr
        assert first.stdout.split()[:2] == ["finished", "12"], first.stdout + first.stderr[-2000:]
        # One more epoch: the same cell with 2 epochs resumes from step 12 on the device.
        again = kernel.run(
            'r = tlaunch.notebook_launch(train, 2, tpus=1, checkpoint_dir="ck", progress="off")\n'
            "print(r.status, r.step)"
        )
        assert again.error is None, again.stderr[-3000:]
        assert "resuming from step 12" in again.stderr
        assert again.stdout.split() == ["finished", "24"]
    finally:
        kernel.close()
