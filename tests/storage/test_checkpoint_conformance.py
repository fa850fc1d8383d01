"""The checkpoint conformance suite: every behaviour, on every backend.

Each class is one behaviour; the ``store`` fixture (tests/storage/conftest.py) runs it on local
disk, memory://, fake-gcs-server and moto S3, like fsspec's ``tests/abstract``. A backend that
needs its own setup opts in by overriding ``store`` in a subclass (the Drive mount, below; flaky
storage through the fault layer in test_checkpoint_under_faults.py). Tests tamper and look
through ``raw_fs(store)``, never through the store's own (possibly faulty) filesystem.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from ckpt_helpers import (
    NO_WAIT,
    file_path,
    flip_byte,
    make_state,
    raw_fs,
    remove,
    rewrite,
    truncate,
)

from tlaunch.storage import CheckpointError, CheckpointStore, CheckpointWarning, RetentionPolicy
from tlaunch.storage.checkpoint.manifest import (
    COMMIT,
    MANIFEST,
    build_manifest,
    commit_record,
    encode_json,
    sha256,
)
from tlaunch.storage.checkpoint.store import CorruptCheckpointError
from tlaunch.storage.store import DRIVE_ROOT_ENV


def _assert_same(loaded, saved: dict) -> None:
    for name, sd in saved["tensors"].items():
        assert loaded.tensors[name].keys() == sd.keys()
        for key, tensor in sd.items():
            assert loaded.tensors[name][key].dtype == tensor.dtype
            assert torch.equal(loaded.tensors[name][key], tensor), f"{name}.{key}"
    opt = loaded.objects["optimizer"]
    for index, slot in saved["objects"]["optimizer"]["state"].items():
        for key, value in slot.items():
            assert torch.equal(opt["state"][index][key], value)
    assert opt["param_groups"] == saved["objects"]["optimizer"]["param_groups"]
    assert loaded.objects["scheduler"] == saved["objects"]["scheduler"]
    assert torch.equal(loaded.rng[0], saved["rng"][0])
    assert loaded.rng[1] == saved["rng"][1]
    assert loaded.state == saved["state"]


def _save(store, *steps, **metrics):
    for step in steps:
        store.save(step, **make_state(step, loss=metrics.get(f"loss_{step}")))


class TestRoundTrip:
    def test_everything_comes_back_bitwise(self, store):
        saved = make_state(7)
        info = store.save(7, **saved)
        assert (info.step, info.committed, info.metrics) == (7, True, saved["state"]["metrics"])
        assert info.url.endswith("/step-000000007") and info.size > 0
        _assert_same(store.load(7), saved)
        _assert_same(store.load_latest(), saved)

    def test_layout_is_the_documented_one(self, store):
        store.save(12, **make_state(12))
        names = {
            p.rsplit("/", 1)[-1]
            for p in raw_fs(store).ls(store.location.join("step-000000012"), detail=False)
        }
        assert names == {
            "model.safetensors", "model_1.safetensors", "optimizer.pt", "scheduler.pt",
            "rng-rank00000.pt", "rng-rank00001.pt", "state.json", "MANIFEST.json", "COMMIT",
        }  # fmt: skip

    def test_a_committed_step_is_never_rewritten(self, store):
        _save(store, 3)
        with pytest.raises(CheckpointError, match="already committed.*delete it first"):
            store.save(3, **make_state(3))

    def test_delete_then_save_again(self, store):
        _save(store, 3, 4)
        store.delete(3)
        assert [i.step for i in store.committed()] == [4]
        _save(store, 3)
        assert [i.step for i in store.committed()] == [3, 4]


class TestDiscovery:
    def test_empty_store(self, store):
        assert store.committed() == [] and store.latest() is None and store.load_latest() is None

    def test_committed_steps_ascend_with_their_records(self, store):
        _save(store, 20, 5, 10)
        infos = store.committed()
        assert [i.step for i in infos] == [5, 10, 20]
        assert infos[0].metrics["loss"] == pytest.approx(1 / 6) and infos[0].time > 0
        assert store.latest().step == 20 and store.get(10).step == 10

    def test_uncommitted_steps_are_invisible(self, store):
        _save(store, 1, 2)
        remove(store, 2, COMMIT)  # a save killed before its last write
        assert [i.step for i in store.committed()] == [1]
        assert store.latest().step == 1
        with pytest.raises(
            CheckpointError, match=r"step 2 is not committed .*committed steps: 1\)"
        ):
            store.get(2)
        with pytest.raises(CheckpointError, match="step 2 is not committed"):
            store.load(2)


class TestRetention:
    def test_keep_last(self, store):
        _save(store, 1, 2, 3, 4)
        assert store.apply_retention(RetentionPolicy(keep_last=2)) == [1, 2]
        assert [i.step for i in store.committed()] == [3, 4]
        assert not raw_fs(store).exists(store.location.join("step-000000001"))

    def test_keep_every_and_best_combined(self, store):
        for step, loss in [(10, 0.1), (20, 0.9), (30, 0.5), (40, 0.8), (50, 0.7)]:
            store.save(step, **make_state(step, loss=loss))
        policy = RetentionPolicy(keep_every=20, keep_best=1, monitor="loss", mode="min")
        assert store.apply_retention(policy) == [30]
        assert [i.step for i in store.committed()] == [10, 20, 40, 50]

    def test_newest_survives_any_policy(self, store):
        for step, loss in [(1, 0.1), (2, 0.9)]:
            store.save(step, **make_state(step, loss=loss))
        store.apply_retention(RetentionPolicy(keep_best=1, monitor="loss"))
        assert [i.step for i in store.committed()] == [1, 2]


class TestCorruption:
    @pytest.mark.parametrize(
        "damage",
        [
            lambda s: rewrite(s, 3, "model.safetensors", flip_byte),
            lambda s: rewrite(s, 3, "optimizer.pt", truncate),
            lambda s: rewrite(s, 3, "state.json", lambda b: b.replace(b"epoch", b"epocx")),
            lambda s: rewrite(s, 3, MANIFEST, lambda b: b.replace(b'"size": ', b'"size": 1')),
            lambda s: remove(s, 3, "rng-rank00001.pt"),
        ],
        ids=["flipped-byte", "truncated", "edited-state", "edited-manifest", "missing-file"],
    )
    def test_load_latest_falls_back_loudly(self, store, damage):
        _save(store, 2, 3)
        damage(store)
        with pytest.warns(
            CheckpointWarning, match=r"step 3 .*failed verification.*using step 2 instead"
        ):
            loaded = store.load_latest()
        assert loaded.info.step == 2
        assert [i.step for i in store.committed()] == [2]  # quarantined for good
        assert [i.step for i in store.all_steps() if i.quarantined] == [3]

    def test_latest_checks_sizes_cheaply(self, store):
        _save(store, 2, 3)
        rewrite(store, 3, "optimizer.pt", truncate)
        with pytest.warns(
            CheckpointWarning, match=r"step 3 .*optimizer.pt has \d+ bytes.*using step 2"
        ):
            assert store.latest().step == 2

    def test_load_of_a_damaged_step_quarantines_and_names_it(self, store):
        _save(store, 3)
        rewrite(store, 3, "model_1.safetensors", flip_byte)
        with pytest.raises(
            CorruptCheckpointError, match=r"step 3 .*model_1.safetensors fails its sha256"
        ):
            store.load(3)
        with pytest.raises(CheckpointError, match="step 3 .* is quarantined"):
            store.load(3)

    def test_a_quarantined_step_can_be_saved_again(self, store):
        _save(store, 2, 3)
        rewrite(store, 3, "model.safetensors", flip_byte)
        with pytest.warns(CheckpointWarning):
            store.load_latest()
        saved = make_state(3)
        store.save(3, **saved)
        assert [(i.step, i.quarantined) for i in store.all_steps()] == [(2, False), (3, False)]
        _assert_same(store.load_latest(), saved)

    def test_missing_commit_means_not_there(self, store):
        _save(store, 2, 3)
        remove(store, 3, COMMIT)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: an uncommitted step is not a bad one
            assert store.load_latest().info.step == 2

    def test_nothing_left_to_fall_back_to(self, store):
        _save(store, 3)
        rewrite(store, 3, "model.safetensors", flip_byte)
        with pytest.warns(CheckpointWarning, match="step 3 .*no earlier committed step remains"):
            assert store.load_latest() is None

    def test_verify_reports_without_changing_anything(self, store):
        _save(store, 2, 3)
        rewrite(store, 3, "optimizer.pt", flip_byte)
        assert store.verify() == {2: [], 3: ["optimizer.pt fails its sha256 check"]}
        assert store.verify(full=False) == {2: [], 3: []}
        assert [i.step for i in store.committed()] == [2, 3]


def _reseal(store, step: int, name: str, data: bytes) -> None:
    """Replace a file AND re-sign MANIFEST and COMMIT, as a malicious writer would."""
    import json

    fs = raw_fs(store)
    fs.pipe_file(file_path(store, step, name), data)
    files = json.loads(fs.cat_file(file_path(store, step, MANIFEST)))["files"]
    files[name] = {"size": len(data), "sha256": sha256(data)}
    manifest = build_manifest(files)
    fs.pipe_file(file_path(store, step, MANIFEST), manifest)
    fs.pipe_file(
        file_path(store, step, COMMIT), encode_json(commit_record(step, 1.0, files, manifest, {}))
    )
    fs.invalidate_cache(store.location.path)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TestUnsafePickle:
    def test_a_pickle_that_would_run_code_is_refused(self, store, tmp_path):
        import io

        marker = tmp_path / "pwned"
        buffer = io.BytesIO()
        torch.save({"state": {}, "param_groups": [_RunsCode(str(marker))]}, buffer)
        _save(store, 1, 2)
        _reseal(store, 2, "optimizer.pt", buffer.getvalue())
        assert store.verify(2) == {2: []}  # the checksums are right: only the content is hostile
        with pytest.raises(
            CheckpointError, match=r"refusing to load .*optimizer.pt.*posix.system"
        ) as err:
            store.load_latest()
        assert "\n" not in str(err.value)
        assert not marker.exists()

    def test_saving_what_could_not_be_loaded_fails_at_save_time(self, store):
        import numpy as np

        with pytest.raises(CheckpointError, match=r"objects\['extra'\] contains numpy"):
            store.save(1, objects={"extra": {"rng": np.random.get_state()}})
        assert store.committed() == [] and store.clean_stale() == []


class TestCleanStale:
    def test_removes_uncommitted_and_keeps_committed(self, store):
        _save(store, 1, 2, 3)
        remove(store, 3, COMMIT)
        fs = raw_fs(store)
        fs.makedirs(store.location.join(".tmp-step-000000004-abcd1234"), exist_ok=True)
        fs.pipe_file(store.location.join(".tmp-step-000000004-abcd1234", "model.safetensors"), b"x")
        removed = store.clean_stale()
        assert sorted(r.rsplit("/", 1)[-1] for r in removed) == [
            ".tmp-step-000000004-abcd1234",
            "step-000000003",
        ]
        assert all(r.startswith(store.url) for r in removed)
        assert [i.step for i in store.committed()] == [1, 2]
        assert store.clean_stale() == []
        assert [i.step for i in store.all_steps()] == [1, 2]

    def test_quarantined_steps_are_kept_for_inspection(self, store):
        _save(store, 1, 2)
        rewrite(store, 2, "model.safetensors", flip_byte)
        with pytest.warns(CheckpointWarning):
            store.load_latest()
        assert store.clean_stale() == []
        assert [(i.step, i.quarantined) for i in store.all_steps()] == [(1, False), (2, True)]


class _OnDriveMount:
    """Google Drive's FUSE mount: a local path, but committed like an object store (no rename)."""

    @pytest.fixture
    def store(self, tmp_path, monkeypatch):
        monkeypatch.setenv(DRIVE_ROOT_ENV, str(tmp_path / "MyDrive"))
        (tmp_path / "MyDrive").mkdir()
        store = CheckpointStore("drive://runs/exp1", retry=NO_WAIT)
        assert not store.location.atomic_rename
        return store


class TestRoundTripOnDrive(_OnDriveMount, TestRoundTrip):
    pass


class TestDiscoveryOnDrive(_OnDriveMount, TestDiscovery):
    pass


class TestRetentionOnDrive(_OnDriveMount, TestRetention):
    pass


class TestCorruptionOnDrive(_OnDriveMount, TestCorruption):
    pass


class TestUnsafePickleOnDrive(_OnDriveMount, TestUnsafePickle):
    pass


class TestCleanStaleOnDrive(_OnDriveMount, TestCleanStale):
    pass
