"""The progress bar shows the latest values, not the epoch's first ones."""

from __future__ import annotations

import re

from tlaunch.run_io import Progress


class _Metrics:
    """A MetricsLog stand-in: ``latest()`` is what the bar reads; each read is counted."""

    def __init__(self) -> None:
        self.loss, self.reads = 1.26, 0

    def latest(self) -> dict[str, float]:
        self.reads += 1
        return {"loss": self.loss}


def test_a_fast_epoch_ends_showing_its_last_step_and_loss(capsys):
    metrics = _Metrics()
    bar = Progress(enabled=True, mode="on").bar(total=50, start=0, desc="epoch 0")
    for step in range(1, 51):  # 50 steps well inside one postfix interval
        metrics.loss = 1.26 / step
        bar.update(step, metrics)
    bar.close()
    shown = capsys.readouterr().err.rsplit("\r", 1)[-1]
    assert re.search(r"step=50, loss=0\.0252", shown), shown
    # The loss is read (a flush, a device sync on a GPU) at the bar's rate, not per step.
    assert metrics.reads <= 3
