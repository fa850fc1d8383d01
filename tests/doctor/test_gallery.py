"""The gallery: each broken script gives exactly its finding (nothing else above info), and the
clean one gives none. All scripts run in one process (``gallery_runner.py``) under the real
hooks; the findings come from the real rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import clean_env
from tlaunch.doctor.findings import INFO, diagnose

pytestmark = pytest.mark.timeout(600)  # one process for the whole gallery; a loaded machine
HERE = Path(__file__).parent
GALLERY = str(HERE / "scripts" / "gallery.py")
BUGS = [
    "cannot-overfit",
    "unregistered-module",
    "params-not-optimized",
    "unused-parameters",
    "missing-zero-grad",
    "eval-mode-training",
    "train-mode-eval",
    "unnormalized-inputs",
    "no-shuffle",
    "exploding-gradients",
    "fp16-without-scaler",
    "input-bound",
]


@pytest.fixture(scope="module")
def diagnoses(tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("gallery")
    names = ["none", *BUGS]
    words = []
    for name in names:
        words += [";", GALLERY, "--bug", name]
    # The clean script to its end, with and without the fixed-batch phase before it.
    # (No mid-epoch evaluation: the script's own step counter counts the phase's steps too.)
    once = [GALLERY, "--val-every", "1000"]
    words += [";", "steps=1000", *once, ";", "steps=1000", "overfit=0", *once]
    done = subprocess.run(
        [sys.executable, str(HERE / "gallery_runner.py"), str(out), *words[1:]],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = done.stdout.split("RUN ")
    found = {"outputs": {int(o.split("\n", 1)[0]): o.split("\n", 1)[1] for o in outputs[1:]}}
    for n, name in enumerate(names):
        with open(os.path.join(out, str(n), "rank-0.json")) as f:
            found[name] = diagnose([json.load(f)], None, 0)
    return found


def _above_info(diagnosis) -> list[str]:
    return [f.id for f in diagnosis.findings if f.severity != INFO]


def test_the_clean_script_has_no_finding_above_info(diagnoses):
    clean = diagnoses["none"]
    assert _above_info(clean) == []
    assert not clean.failed
    assert [f.id for f in clean.findings] == ["checkpoint-budget"]
    assert "pin-memory" in clean.skipped and "no GPU" in clean.skipped["pin-memory"]


@pytest.mark.parametrize("bug", BUGS)
def test_each_broken_script_gives_exactly_its_finding(diagnoses, bug):
    assert _above_info(diagnoses[bug]) == [bug]


def test_findings_carry_what_was_measured(diagnoses):
    def data(bug):
        (finding,) = [f for f in diagnoses[bug].findings if f.id == bug]
        return finding.data

    losses = data("cannot-overfit")["losses"]
    assert len(losses) == 10 and min(losses[5:]) > 0.7 * losses[0]
    # The clean script, on the same first batch, more than halves its loss.
    assert diagnoses["none"].findings[0].data["bytes"] > 0
    assert data("params-not-optimized")["not_optimized"] == [
        "Net.hidden.0.weight",
        "Net.hidden.0.bias",
    ]
    assert data("unused-parameters")["unused"] == ["Net.spare.weight", "Net.spare.bias"]
    assert data("unregistered-module")["unregistered"][0]["attribute"] == "Net.hidden"
    assert data("eval-mode-training")["modules"][0]["module"] == "Net.drop"
    assert data("train-mode-eval")["modules"][0]["module"] == "Net.drop"
    clip = data("exploding-gradients")["suggested_clip_grad_norm"]
    norms = data("exploding-gradients")["grad_norms"]
    assert 0 < clip < 1e3 and max(n for n in norms if n != float("inf")) > 100 * clip
    bound = data("input-bound")
    assert bound["num_workers"] == 0 and bound["suggested_num_workers"] >= 1
    assert data("missing-zero-grad")["stale_steps"]


def test_the_run_after_the_fixed_batch_phase_is_the_run_without_it(diagnoses):
    # Restored models, optimizer, generators, first batch: the same end-of-epoch validation
    # losses as the same script run with no phase at all.
    runs = diagnoses["outputs"][len(BUGS) + 1], diagnoses["outputs"][len(BUGS) + 2]
    with_phase, without = (
        [ln for ln in out.splitlines() if ln.startswith("epoch")] for out in runs
    )
    assert len(with_phase) == 2
    assert with_phase == without
