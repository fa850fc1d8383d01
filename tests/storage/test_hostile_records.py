"""Crafted or damaged records from a bucket: COMMIT, MANIFEST.json, state.json.

Each was read completely and is malformed, so the step is quarantined with one line and the
previous step is used: never a traceback, never a read outside the step directory. MANIFEST and
state.json changes are re-signed (a hostile writer can do that), so the seal cannot be what
catches them.
"""

from __future__ import annotations

import json

import pytest
from ckpt_helpers import NO_WAIT, faulty_location, file_path, plant, reseal

from tlaunch.storage import CheckpointError, CheckpointStore, CheckpointWarning
from tlaunch.storage.checkpoint.manifest import COMMIT, MANIFEST, STATE

LONG = "A" * 5000


def _set(key, value):
    def change(record):
        record[key] = value
        return record

    return change


def _drop(key):
    def change(record):
        del record[key]
        return record

    return change


def _file_entry(name, entry=None):
    """Add (or replace) a MANIFEST entry ``name``; by default one copied from a real file."""

    def change(table):
        files = table["files"]
        files[name] = entry if entry is not None else dict(files["optimizer.pt"])
        return table

    return change


def _entry_field(key, value):
    def change(table):
        table["files"]["optimizer.pt"][key] = value
        return table

    return change


COMMIT_CASES = {
    "not-an-object": lambda r: [r],
    "format-2": _set("format", 2),
    "format-str": _set("format", "1"),
    "step-missing": _drop("step"),
    "step-str": _set("step", "2"),
    "step-of-another-dir": _set("step", 1),
    "step-bool": _set("step", True),
    "time-str": _set("time", "yesterday"),
    "time-huge-int": _set("time", 10**400),
    "time-inf": _set("time", float("inf")),
    "time-nan": _set("time", float("nan")),
    "time-negative": _set("time", -1),
    "time-missing": _drop("time"),
    "size-str": _set("size", "big"),
    "size-negative": _set("size", -5),
    "size-huge": _set("size", 10**30),
    "size-float": _set("size", 1.5),
    "metrics-list": _set("metrics", [0.1]),
    "metrics-null": _set("metrics", None),
    "metrics-missing": _drop("metrics"),
    "digest-int": _set("manifest_sha256", 5),
    "digest-path": _set("manifest_sha256", "../../etc/passwd"),
    "digest-missing": _drop("manifest_sha256"),
}

MANIFEST_CASES = {
    "not-an-object": lambda t: [t],
    "format-2": _set("format", 2),
    "hash-md5": _set("hash", "md5"),
    "files-missing": _drop("files"),
    "files-list": _set("files", [["model.safetensors", 1]]),
    "entry-not-object": _file_entry("model.safetensors", [1, 2]),
    "size-str": _entry_field("size", "12"),
    "size-negative": _entry_field("size", -1),
    "size-huge": _entry_field("size", 10**40),
    "size-bool": _entry_field("size", True),
    "digest-int": _entry_field("sha256", 0),
    "digest-short": _entry_field("sha256", "abc"),
    "digest-upper": lambda t: _entry_field("sha256", t["files"]["optimizer.pt"]["sha256"].upper())(
        t
    ),
    "digest-missing": lambda t: t["files"]["optimizer.pt"].pop("sha256") and t,
    "name-dotdot": _file_entry("../step-000000001/model.safetensors"),
    "name-dotdot-deep": _file_entry("../../../../etc/passwd"),
    "name-absolute": _file_entry("/etc/passwd"),
    "name-slash": _file_entry("sub/model.safetensors"),
    "name-dot": _file_entry("."),
    "name-dotdot-alone": _file_entry(".."),
    "name-empty": _file_entry(""),
    "name-nul": _file_entry("model\x00.safetensors"),
    "name-newline": _file_entry("model\n.pt"),
    "name-commit": _file_entry(COMMIT),
    "name-manifest": _file_entry(MANIFEST),
    "name-rng-not-a-rank": _file_entry("rng-rankabc.pt"),
    "name-huge": _file_entry(LONG),
}

STATE_CASES = {
    "not-json": lambda _: b"{step: 2",
    "a-list": lambda _: b"[1, 2]",
    "a-number": lambda _: b"12",
    "null": lambda _: b"null",
    "nul-byte": lambda _: b'{"step": 2}\x00',
    "bad-utf8": lambda _: b'{"step": "\xff\xfe"}',
    "huge-int": lambda _: b'{"step": ' + b"9" * 50000 + b"}",
    "deep-nesting": lambda _: b"[" * 100000 + b"]" * 100000,
    "metrics-not-object": lambda b: json.dumps({**json.loads(b), "metrics": [1]}).encode(),
}


CASES = [
    pytest.param(target, change, id=f"{target}-{case_id}")
    for target, cases in ((COMMIT, COMMIT_CASES), (MANIFEST, MANIFEST_CASES), (STATE, STATE_CASES))
    for case_id, change in cases.items()
]


def _damage(store: CheckpointStore, step: int, name: str, change) -> None:
    raw = store.location.fs.cat_file(file_path(store, step, name))
    data = change(raw) if name == STATE else json.dumps(change(json.loads(raw))).encode()
    reseal(store, step, name, data)


def _reads_stay_inside_their_step(store: CheckpointStore) -> None:
    root = store.location.path
    for op, path in store.location.fs.log:
        if op in ("cat_file", "open", "info", "exists"):
            head, _, name = path[len(root) + 1 :].partition("/")
            assert path.startswith(root + "/step-0000000") and "/" not in name, path
            assert ".." not in name.split("/"), path


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("target", "change"), CASES)
def test_a_hostile_record_is_one_line_and_a_quarantine(memory_url, two_steps, target, change):
    # Inspected (ckpt ls / verify), loaded unverified (a non-zero rank), and resumed from.
    for url in (f"{memory_url}-look", f"{memory_url}-resume"):
        _damage(plant(url, two_steps), 2, target, change)
    store = CheckpointStore(faulty_location(f"{memory_url}-look"), retry=NO_WAIT)
    assert [i.step for i in store.all_steps()] == [1, 2]
    report = store.verify()
    assert report[1] == [] and report[2] and all("\n" not in p for p in report[2])
    with pytest.raises(CheckpointError) as err:
        store.load(2, verify=False)
    assert "\n" not in str(err.value)
    _reads_stay_inside_their_step(store)

    store = CheckpointStore(faulty_location(f"{memory_url}-resume"), retry=NO_WAIT)
    with pytest.warns(CheckpointWarning) as caught:
        loaded = store.load_latest()
    assert loaded.info.step == 1
    (warning,) = [w for w in caught if "step 2" in str(w.message)]
    assert "failed verification" in str(warning.message)
    assert "\n" not in str(warning.message) and len(str(warning.message)) < 600
    assert [(i.step, i.quarantined) for i in store.all_steps()] == [(1, False), (2, True)]
    _reads_stay_inside_their_step(store)


@pytest.mark.timeout(60)
def test_a_manifest_pointing_at_another_steps_file_is_never_followed(tmp_path, two_steps):
    # On a local disk "step-2/../step-1/x" is step 1's file: a rank loading unverified would
    # have read it.
    url = str(tmp_path / "ckpt")
    plain = plant(url, two_steps)
    _damage(plain, 2, MANIFEST, _file_entry("../step-000000001/model.safetensors"))
    store = CheckpointStore(faulty_location(url), retry=NO_WAIT)
    with pytest.raises(CheckpointError, match="step 2 .*failed verification"):
        store.load(2, verify=False)
    _reads_stay_inside_their_step(store)
    assert not store.location.fs.calls("*", "*..*")


@pytest.mark.timeout(60)
def test_a_commit_larger_than_any_record_is_not_read(memory_url, two_steps):
    plain = plant(memory_url, two_steps)
    raw = json.loads(plain.location.fs.cat_file(file_path(plain, 2, COMMIT)))
    raw["metrics"] = {"pad": "x" * (2 << 20)}
    reseal(plain, 2, COMMIT, json.dumps(raw).encode())
    store = CheckpointStore(faulty_location(memory_url), retry=NO_WAIT)
    with pytest.warns(CheckpointWarning, match=r"step 2 .*COMMIT is \d+ bytes"):
        assert store.latest().step == 1
    assert not store.location.fs.calls("cat_file", "*step-000000002/COMMIT")
