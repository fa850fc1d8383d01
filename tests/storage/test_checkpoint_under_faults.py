"""The checkpoint conformance promises, through the fault layer, on every backend.

The ``any_store_url`` fixture runs each test on local disk, memory://, fake-gcs-server and moto
S3; tests/faultfs.py wraps the backend's own filesystem, so what fails is exactly what a flaky
link or a dying writer would make fail there:

* the conformance suite itself (test_checkpoint_conformance.py) with transient errors (reset,
  timeout, 429, 503) on every kind of call, once per call and file, while saving, discovering,
  loading, verifying, retaining and cleaning: its fault-free answers all still hold, so
  nothing is lost and nothing but the damage a test makes is quarantined;
* torn writes while saving (a prefix lands, then a transient error, a permanent one, or a
  lying success): a torn file is never taken for a committed checkpoint;
* a read refused for good: an error, never a quarantine.
"""

from __future__ import annotations

import re
import warnings

import pytest
import test_checkpoint_conformance as conformance
from ckpt_helpers import NO_WAIT, faulty_location, flip_byte, make_state, plant, remove, rewrite
from test_checkpoint_conformance import _assert_same

from tests.faultfs import OPS, TRANSIENT, Fault, http, slow, torn
from tlaunch.storage import CheckpointStore, CheckpointWarning, StorageError
from tlaunch.storage.checkpoint.manifest import COMMIT, MANIFEST, QUARANTINED


def _stable(path: str) -> str:
    """``path`` without the random token of a temp name (``.tmp-step-N-1a2b3c4d``,
    ``.model.pt.tmp-PID-1a2b3c4d``): a retry writes a new temp file, but the same file."""
    return re.sub(r"-[0-9a-f]{8}(?=/|$)", "", path)


def _store(url: str, *rules: Fault) -> CheckpointStore:
    return CheckpointStore(faulty_location(url, *rules), retry=NO_WAIT)


def _markers(url: str) -> list[str]:
    loc = CheckpointStore(url).location
    loc.fs.invalidate_cache(loc.path)
    return [p for p in loc.fs.find(loc.path) if p.endswith(QUARANTINED)]


class _Flaky:
    """The conformance classes on storage where every kind of call fails once per file with a
    transient error (each kind in turn), and COMMIT reads are slow: every assertion of the
    fault-free suite must still hold, and only the damage a test makes is quarantined."""

    @pytest.fixture
    def store(self, any_store_url):
        rules = [
            Fault(op, error=TRANSIENT[i % len(TRANSIENT)], each_path=_stable)
            for i, op in enumerate(OPS)
        ]
        store = _store(any_store_url, slow("cat_file", f"*/{COMMIT}", seconds=0.005), *rules)
        yield store
        assert any(rule.calls for rule in rules), "no fault was injected"


class TestRoundTripUnderFaults(_Flaky, conformance.TestRoundTrip):
    pass


class TestDiscoveryUnderFaults(_Flaky, conformance.TestDiscovery):
    pass


class TestRetentionUnderFaults(_Flaky, conformance.TestRetention):
    pass


class TestCorruptionUnderFaults(_Flaky, conformance.TestCorruption):
    # Of the five kinds of damage, one found by sizes and one by digests: the others take the
    # same read paths, and each run here costs a bucket on every backend.
    @pytest.mark.parametrize(
        "damage",
        [
            lambda s: rewrite(s, 3, "model.safetensors", flip_byte),
            lambda s: remove(s, 3, "rng-rank00001.pt"),
        ],
        ids=["flipped-byte", "missing-file"],
    )
    def test_load_latest_falls_back_loudly(self, store, damage):
        super().test_load_latest_falls_back_loudly(store, damage)


def _base(url: str, two_steps) -> dict:
    """Step 1 committed at ``url``; returns its state."""
    plant(url, {1: two_steps[1]})
    return make_state(1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["model.safetensors", COMMIT])
def test_a_torn_write_then_a_transient_error_is_retried_whole(any_store_url, two_steps, name):
    _base(any_store_url, two_steps)
    rule = torn("*", f"*{name}*", keep=0.5, error=ConnectionResetError)
    store = _store(any_store_url, rule)
    state = make_state(2, loss=0.2)
    store.save(2, **state)
    assert rule.calls, "the write was torn"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        _assert_same(CheckpointStore(any_store_url).load_latest(), state)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [MANIFEST, COMMIT])
def test_a_torn_write_that_fails_for_good_commits_nothing(any_store_url, two_steps, name):
    first = _base(any_store_url, two_steps)
    rule = torn("*", f"*{name}*", keep=0.5, error=PermissionError, times=None)
    with pytest.raises(StorageError, match="saving checkpoint step 2 failed") as err:
        _store(any_store_url, rule).save(2, **make_state(2))
    assert "\n" not in str(err.value) and rule.calls
    plain = CheckpointStore(any_store_url)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        _assert_same(plain.load_latest(), first)
    plain.clean_stale()
    assert [(i.step, i.quarantined) for i in plain.all_steps()] == [(1, False)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["model.safetensors", COMMIT])
def test_a_silently_torn_write_is_never_loaded(any_store_url, two_steps, name):
    # The store (or a mount) says the write worked but kept half: the step looks committed, so
    # the bytes are the proof: it is quarantined and step 1 is used, loudly.
    first = _base(any_store_url, two_steps)
    _store(any_store_url, torn("*", f"*{name}*", keep=0.5, error=None)).save(2, **make_state(2))
    plain = CheckpointStore(any_store_url)
    with pytest.warns(CheckpointWarning, match=r"step 2 .*failed verification.*using step 1"):
        _assert_same(plain.load_latest(), first)
    assert [i.step for i in plain.committed()] == [1]


@pytest.mark.timeout(120)
def test_a_read_refused_for_good_is_an_error_not_a_quarantine(any_store_url, two_steps):
    # (A listed file that reads as not found while its COMMIT stands is damage: see
    # test_quarantine_rule.py for that and for a step deleted mid-read.)
    _base(any_store_url, two_steps)
    for error in (PermissionError, http(403)):
        store = _store(any_store_url, Fault("cat_file", f"*/{MANIFEST}", error, times=None))
        with pytest.raises(StorageError, match="permission denied") as err:
            store.load_latest()
        assert "\n" not in str(err.value)
    assert _markers(any_store_url) == []
    assert [i.step for i in CheckpointStore(any_store_url).committed()] == [1]
