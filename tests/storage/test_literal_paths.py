"""URLs are literal paths, never globs: ``exp[1]``, ``run*`` and ``what?`` name one directory.

fsspec's ``cat``, ``rm`` and ``expand_path`` expand ``[``, ``*`` and ``?``: a store at
``exp[1]`` read ``exp1``'s records and deleted ``exp1``'s files, and on fake-gcs-server a run in
``gs://b/exp[1]`` with keep_last=1 died with FileNotFoundError.
"""

from __future__ import annotations

import pytest
from ckpt_helpers import NO_WAIT, make_state

from tlaunch.storage import CheckpointStore, RetentionPolicy
from tlaunch.storage import ckpt_main as ckpt

PAIRS = [("exp[1]", "exp1"), ("run*", "runX"), ("what?", "whatX")]


def _pair(base: str, name: str, sibling: str) -> tuple[CheckpointStore, CheckpointStore]:
    """A run at ``base/name`` (steps 1, 2) beside another at ``base/sibling`` (steps 1, 2)."""
    target = CheckpointStore(f"{base}/{name}", retry=NO_WAIT)
    other = CheckpointStore(f"{base}/{sibling}", retry=NO_WAIT)
    for step in (1, 2):
        other.save(step, **make_state(step, loss=0.9))
    for step in (1, 2):
        target.save(step, **make_state(step, loss=step / 10))
    return target, other


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "sibling"), PAIRS, ids=[p[0] for p in PAIRS])
def test_a_url_with_glob_characters_is_one_directory(any_store_url, name, sibling):
    target, other = _pair(any_store_url, name, sibling)
    assert [(i.step, i.metrics["loss"]) for i in target.committed()] == [(1, 0.1), (2, 0.2)]
    assert target.latest().step == 2
    assert target.load_latest().state["metrics"]["loss"] == 0.2
    assert target.verify() == {1: [], 2: []}

    assert target.apply_retention(RetentionPolicy(keep_last=1)) == [1]
    assert target.clean_stale() == []
    assert [i.step for i in target.all_steps()] == [2]
    # The sibling run is untouched: every step, every byte.
    assert [i.step for i in other.committed()] == [1, 2]
    assert other.verify() == {1: [], 2: []}


@pytest.mark.timeout(120)
def test_a_killed_save_under_a_glob_url_is_cleaned_only_there(memory_url):
    target, other = _pair(memory_url, "run*", "runX")
    target.location.fs.rm_file(target.location.join("step-000000002", "COMMIT"))
    other.location.fs.rm_file(other.location.join("step-000000001", "COMMIT"))
    assert [r.rsplit("/", 1)[-1] for r in target.clean_stale()] == ["step-000000002"]
    assert [i.step for i in other.all_steps()] == [1, 2]  # its uncommitted 1 is its own


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "memory"])
def test_ckpt_ls_and_verify_take_such_urls(tmp_path, memory_url, backend, capsys):
    base = str(tmp_path) if backend == "local" else memory_url
    target, _ = _pair(base, "exp[1]", "exp1")
    assert ckpt(["ls", target.url]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[5]) for row in rows] == [("1", "ok"), ("2", "ok")]
    assert "loss=0.1" in " ".join(rows[0])
    assert ckpt(["verify", target.url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 of 2 checkpoints verify"
