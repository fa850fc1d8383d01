"""What save() refuses before writing a byte, and the edge cases it handles instead."""

from __future__ import annotations

import errno
import warnings

import pytest
import torch
from ckpt_helpers import faulty_store, flip_byte, make_state, rewrite

from tlaunch.storage import CheckpointError, CheckpointStore, CheckpointWarning
from tlaunch.storage.checkpoint.manifest import COMMIT


@pytest.fixture
def store(memory_url) -> CheckpointStore:
    return CheckpointStore(memory_url)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, r"step must be an int between 0 and 999999999, got -1"),
        ({"step": True}, r"step must be an int .*got True"),
        (
            {"tensors": {"model": {"w": [1.0]}}},
            r"tensors\['model'\]\['w'\] is a list; tensors= takes str -> Tensor",
        ),
        ({"objects": {"../escape": {}}}, r"objects name '../escape' cannot be a file name"),
        ({"objects": {"rng-rank00001": {}}}, r"reserved for rng= files"),
        ({"rng": {"0": {}}}, r"rng= keys are ranks \(ints >= 0\), got '0'"),
        ({"state": {"when": object()}}, r"state= must be plain JSON"),
        ({"state": {"metrics": [0.1]}}, r"state\['metrics'\] must be a dict, got list"),
        (
            {"objects": {"fn": {"f": lambda x: x}}},
            r"objects\['fn'\] cannot be saved with torch.save",
        ),
    ],
)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(store, kwargs, message):
    step = kwargs.pop("step", 1)
    with pytest.raises(CheckpointError, match=message) as err:
        store.save(step, **kwargs)
    assert "\n" not in str(err.value)
    assert store.all_steps() == []


def test_tied_and_strided_tensors_are_saved(store):
    weight = torch.randn(4, 3)
    store.save(1, tensors={"model": {"embed": weight, "head": weight, "t": weight.t()}})
    loaded = store.load(1).tensors["model"]
    assert torch.equal(loaded["embed"], loaded["head"]) and torch.equal(loaded["t"], weight.t())


def test_an_unreadable_commit_is_quarantined_like_corruption(store):
    for step in (1, 2):
        store.save(step, **make_state(step))
    rewrite(store, 2, COMMIT, lambda _: b"{not json")
    assert [i.step for i in store.committed()] == [1, 2]  # listing alone cannot tell
    with pytest.warns(CheckpointWarning, match=r"step 2 .*COMMIT is not valid JSON.*using step 1"):
        assert store.latest().step == 1
    assert [i.step for i in store.committed()] == [1]


def test_a_marker_that_cannot_be_written_still_skips_the_step(memory_url):
    good = CheckpointStore(memory_url)
    for step in (1, 2):
        good.save(step, **make_state(step))
    rewrite(good, 2, "model.safetensors", flip_byte)
    store = faulty_store(memory_url, PermissionError(errno.EACCES, "read-only"), "QUARANTINED")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.load_latest().info.step == 1
    messages = [str(w.message) for w in caught]
    assert any(
        "could not mark step 2" in m and "checked again on the next start" in m for m in messages
    )
    assert any("step 2 " in m and "using step 1 instead" in m for m in messages)
    assert [i.step for i in store.committed()] == [1]  # this process remembers


def test_delete_is_idempotent(store):
    store.save(1, **make_state(1))
    store.delete(1)
    store.delete(1)
    assert store.all_steps() == []


def test_step_names_take_ascii_digits_only():
    from tlaunch.storage.checkpoint.manifest import parse_step_dir

    assert parse_step_dir("step-000000012") == 12
    # Arabic-Indic and full-width digits: int() would read them, the layout does not allow them.
    assert parse_step_dir("step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661\u0662") is None
    assert parse_step_dir("step-\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11\uff12") is None
