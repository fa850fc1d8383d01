"""With short steps the ranks agree on stops and timed saves every few steps, not every step
(tlaunch.agreement); a stop or a save must still land at the same step on every rank.

The reference job on 2 gloo processes, ~10 ms steps (so about ten steps between agreements).
A stop that only some ranks see, or a timed save that ranks decided at different steps, would
pair mismatched collectives (a hang, a crash) or commit a state the resume cannot continue
bitwise.
"""

from __future__ import annotations

import pytest
from helpers import run_tlaunch

from tests.e2e.test_preemption import (
    FLAGS,
    SCRIPT,
    committed,
    finish_and_compare,
    ref_root,  # noqa: F401  (fixture)
)
from tests.e2e.test_resume import reference

pytestmark = pytest.mark.timeout(300)
STEP_DELAY = "0.01"
SIGNAL_AT = 10


def test_a_sigterm_to_one_worker_stops_both_at_one_step_and_resumes_bitwise(tmp_path, ref_root):  # noqa: F811
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    result = run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", ckpt,
        "--", "--out", out, "--signal-at-batch", str(SIGNAL_AT), "--signal-ranks", "1",
        cwd=tmp_path, timeout=200, RESUME_TEST_STEP_DELAY=STEP_DELAY,
    )  # fmt: skip
    assert result.returncode == 75, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (step,) = committed(ckpt)
    # Seen at the first agreement from step 10 on (they start at most 100 ms of steps apart,
    # 10 steps of >= 10 ms), acted on by both ranks one step later.
    assert SIGNAL_AT < step <= SIGNAL_AT + 11, step
    assert f"checkpoint at step {step} committed" in result.stderr
    finish_and_compare(tmp_path, ckpt, out, expected)


def test_timed_saves_and_a_sigterm_to_every_worker_land_on_one_step_across_ranks(
    tmp_path,
    ref_root,  # noqa: F811
):
    # A save due every 0.12 s of >= 10 ms steps: timed saves from about step 12 on, then every
    # worker's own SIGTERM at step 24.
    expected = reference(ref_root, FLAGS[:4])
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.pt")
    result = run_tlaunch(
        SCRIPT, *FLAGS, "--checkpoint-dir", ckpt, "--save-every-minutes", "0.002",
        "--", "--out", out, "--signal-at-batch", "24", "--signal-ranks", "0,1",
        cwd=tmp_path, timeout=200, RESUME_TEST_STEP_DELAY=STEP_DELAY,
    )  # fmt: skip
    assert result.returncode == 75, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    *timed, step = committed(ckpt)
    assert timed and 24 < step <= 24 + 11, (timed, step)
    assert f"checkpoint at step {step} committed" in result.stderr
    finish_and_compare(tmp_path, ckpt, out, expected)
