"""The quarantine rule: only bytes read completely and proven wrong quarantine a step.

A read that failed is retried, then reported (StorageUnavailable); a file that vanished between
the listing and the read belongs to a step being deleted, not to a damaged one. Neither ever
changes what is in the bucket, and retention deletes only steps it could read.
"""

from __future__ import annotations

import warnings

import pytest
from ckpt_helpers import NO_WAIT, faulty_location, file_path, make_state

from tests.faultfs import Fault, http
from tlaunch.storage import CheckpointStore, RetentionPolicy
from tlaunch.storage.checkpoint.manifest import COMMIT, QUARANTINED
from tlaunch.storage.store import StorageUnavailable


def _saved(url: str, losses: dict[int, float]) -> None:
    plain = CheckpointStore(url, retry=NO_WAIT)
    for step, loss in losses.items():
        plain.save(step, **make_state(step, loss=loss))


def _store(url: str, *rules: Fault) -> CheckpointStore:
    return CheckpointStore(faulty_location(url, *rules), retry=NO_WAIT)


def _markers(url: str) -> list[str]:
    fs = CheckpointStore(url).location.fs
    root = CheckpointStore(url).location.path
    fs.invalidate_cache(root)
    return [p for p in fs.find(root) if p.endswith(QUARANTINED)]


@pytest.mark.timeout(60)
def test_a_transient_read_error_never_quarantines_a_good_checkpoint(memory_url):
    # The reproduction: two committed steps, one reset on every COMMIT read.
    _saved(memory_url, {1: 0.5, 2: 0.4})
    store = _store(
        memory_url, Fault("cat_file", f"*/{COMMIT}", ConnectionResetError, each_path=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = store.load_latest()
    assert loaded is not None and loaded.info.step == 2
    assert [i.step for i in store.committed()] == [1, 2]
    assert _markers(memory_url) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [ConnectionResetError, TimeoutError, http(503)])
def test_storage_that_stays_down_is_reported_and_nothing_changes(memory_url, error):
    _saved(memory_url, {1: 0.5, 2: 0.4})
    store = _store(memory_url, Fault("cat_file", f"*step-000000002/{COMMIT}", error, times=None))
    for call in (store.load_latest, store.latest, store.committed, store.all_steps):
        with pytest.raises(StorageUnavailable, match="still failing after 4 attempts") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(StorageUnavailable):
        store.apply_retention(RetentionPolicy(keep_last=1))
    assert [i.step for i in CheckpointStore(memory_url).committed()] == [1, 2]
    assert _markers(memory_url) == []


@pytest.mark.timeout(60)
def test_a_failed_read_of_a_step_file_is_retried_not_quarantined(memory_url):
    _saved(memory_url, {1: 0.5, 2: 0.4})
    store = _store(
        memory_url,
        Fault("cat_file", "*/MANIFEST.json", ConnectionResetError, each_path=True),
        Fault("cat_file", "*.safetensors", http(429), each_path=True),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.latest().step == 2
        assert store.load_latest().info.step == 2
        assert store.load(1).info.step == 1
    assert _markers(memory_url) == []


def _delete_step(url: str, step: int):
    """What a concurrent retention does to ``step``: COMMIT first, then every file."""

    def delete() -> None:
        CheckpointStore(url).delete(step)

    return delete


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moment", ["MANIFEST.json", "model.safetensors", COMMIT])
def test_a_step_deleted_while_being_read_is_gone_not_corrupt(memory_url, moment):
    _saved(memory_url, {1: 0.5, 2: 0.4})
    rule = Fault(
        "cat_file", f"*step-000000002/{moment}", error=None, action=_delete_step(memory_url, 2)
    )
    store = _store(memory_url, rule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed verification" warning: nothing is damaged
        loaded = store.load_latest()
    assert rule.calls, "the deletion happened in the middle of the read"
    assert loaded.info.step == 1
    assert [i.step for i in CheckpointStore(memory_url).all_steps()] == [1]
    assert _markers(memory_url) == []


@pytest.mark.timeout(60)
def test_latest_skips_a_step_deleted_under_it(memory_url):
    _saved(memory_url, {1: 0.5, 2: 0.4})
    rule = Fault(
        "cat_file", "*step-000000002/MANIFEST.json", error=None, action=_delete_step(memory_url, 2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _store(memory_url, rule).latest().step == 1
    assert _markers(memory_url) == []


@pytest.mark.timeout(60)
def test_a_missing_file_in_a_committed_step_is_still_corruption(memory_url):
    # The counterpart: the listing shows COMMIT but not the file MANIFEST names.
    _saved(memory_url, {1: 0.5, 2: 0.4})
    plain = CheckpointStore(memory_url)
    plain.location.fs.rm_file(file_path(plain, 2, "optimizer.pt"))
    with pytest.warns(UserWarning, match=r"step 2 .*optimizer.pt is missing.*using step 1"):
        assert _store(memory_url).load_latest().info.step == 1
    assert len(_markers(memory_url)) == 1


# -- retention -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_retention_deletes_only_steps_it_could_read(memory_url):
    # The issue's reproduction: keep_best=1 by val 0.1/0.5/0.9, one reset on step 1's COMMIT.
    _saved(memory_url, {1: 0.1, 2: 0.5, 3: 0.9})
    store = _store(memory_url, Fault("cat_file", f"*step-000000001/{COMMIT}", ConnectionResetError))
    deleted = store.apply_retention(RetentionPolicy(keep_best=1, monitor="loss"))
    assert deleted == [2]
    assert [i.step for i in CheckpointStore(memory_url).committed()] == [1, 3]


@pytest.mark.timeout(60)
def test_retention_with_an_unreadable_step_deletes_nothing(memory_url):
    _saved(memory_url, {1: 0.1, 2: 0.5, 3: 0.9})
    store = _store(
        memory_url, Fault("cat_file", f"*step-000000001/{COMMIT}", http(503), times=None)
    )
    with pytest.raises(StorageUnavailable):
        store.apply_retention(RetentionPolicy(keep_best=1, monitor="loss"))
    assert [i.step for i in CheckpointStore(memory_url).committed()] == [1, 2, 3]


@pytest.mark.timeout(60)
def test_retention_leaves_a_step_with_a_damaged_record_alone(memory_url):
    # A malformed COMMIT is evidence for quarantine, not a step with no metrics to rank.
    _saved(memory_url, {1: 0.1, 2: 0.5, 3: 0.9})
    plain = CheckpointStore(memory_url)
    plain.location.fs.pipe_file(file_path(plain, 1, COMMIT), b"{not json")
    assert plain.apply_retention(RetentionPolicy(keep_best=1, monitor="loss")) == []
    assert [i.step for i in plain.all_steps()] == [1, 2, 3]
