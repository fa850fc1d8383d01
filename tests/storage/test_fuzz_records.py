"""Fuzzing every record a checkpoint reads back from a bucket: COMMIT, MANIFEST.json, state.json.

A seeded generator mutates a good step's record (wrong types, deleted and added keys, hostile
file names, huge numbers, NULs, truncation, flipped bytes) and re-signs it the way a hostile
writer would. Whatever the mutation, the store must: keep the intact step 1 usable, either load
step 2 or quarantine it loudly, raise nothing but one-line CheckpointErrors, and read nothing
outside a step directory. The same for ``tlaunch ckpt ls|verify``. Seeds are fixed: a failure
names its case, and ``FUZZ_CASES`` below is the only knob.
"""

from __future__ import annotations

import copy
import json
import random
import warnings

import pytest
from ckpt_helpers import NO_WAIT, faulty_location, file_path, plant, reseal

from tlaunch.storage import CheckpointError, CheckpointStore, CheckpointWarning
from tlaunch.storage import ckpt_main as ckpt
from tlaunch.storage.checkpoint.manifest import COMMIT, MANIFEST, STATE

FUZZ_CASES = 40  # per record kind

HOSTILE_VALUES = [
    None, True, False, -1, 0, 1, 2**63, 10**30, -(10**30), 1.5, 1e308, float("inf"),
    float("nan"), "", "x", "../x", "/etc/passwd", "a\x00b", "\n", "A" * 300, [], {}, [1, "a"],
    {"a": {"b": []}}, "0" * 64, "f" * 64,
]  # fmt: skip
HOSTILE_NAMES = [
    "../x", "..", ".", "", "/abs", "a/b", "x\x00", COMMIT, MANIFEST, "QUARANTINED",
    "rng-rankx.pt", "A" * 300, ".hidden", "model.safetensors", STATE, "optimizer.pt",
    "../step-000000001/model.safetensors", "rng-rank00000.pt",
]  # fmt: skip


def _containers(node, path=()):
    """(path, container) for every dict and list inside ``node``."""
    if isinstance(node, (dict, list)):
        yield path, node
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            yield from _containers(child, (*path, key))


def _mutate_json(obj, rng: random.Random):
    containers = list(_containers(obj))
    if not containers:  # an earlier mutation left a bare value
        return rng.choice(HOSTILE_VALUES)
    path, node = rng.choice(containers)
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    op = rng.choice(["replace", "replace", "delete", "add", "rename", "retype"])
    if op == "retype" or not keys:
        replacement = rng.choice(HOSTILE_VALUES)
        if not path:
            return replacement
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = replacement
        return obj
    key = rng.choice(keys)
    if op == "replace":
        node[key] = rng.choice(HOSTILE_VALUES)
    elif op == "delete":
        del node[key]
    elif op == "add" and isinstance(node, dict):
        # A hostile key, holding a hostile value or a copy of a real entry (a file entry, say).
        node[rng.choice(HOSTILE_NAMES)] = rng.choice([*HOSTILE_VALUES, copy.deepcopy(node[key])])
    elif op == "rename" and isinstance(node, dict):
        node[rng.choice(HOSTILE_NAMES)] = node.pop(key)
    else:
        node.append(rng.choice(HOSTILE_VALUES))
    return obj


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    where = rng.randrange(len(data) + 1)
    return rng.choice(
        [
            lambda: data[:where],
            lambda: data[:where] + bytes([rng.randrange(256)]) + data[where + 1 :],
            lambda: data[:where] + bytes(rng.randrange(256) for _ in range(8)) + data[where:],
            lambda: data[:where] + b"\x00" + data[where:],
            lambda: data + data,
            lambda: b"",
        ]
    )()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three structural mutations of a JSON record, or one byte-level one."""
    if rng.random() < 0.15:
        return _mutate_bytes(data, rng)
    obj = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        obj = _mutate_json(obj, rng)
    return json.dumps(obj).encode()


def _case(url: str, two_steps, target: str, seed: int) -> CheckpointStore:
    plain = plant(url, two_steps)
    rng = random.Random(f"{target}-{seed}")
    reseal(plain, 2, target, mutate(plain.location.fs.cat_file(file_path(plain, 2, target)), rng))
    return CheckpointStore(faulty_location(url), retry=NO_WAIT)


def _one_line(err: BaseException) -> None:
    assert isinstance(err, CheckpointError), repr(err)
    assert "\n" not in str(err) and len(str(err)) < 600, str(err)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", [COMMIT, MANIFEST, STATE])
def test_mutated_records_never_escape(memory_url, two_steps, target, capsys):
    outcomes = {"loaded": 0, "quarantined": 0}
    for seed in range(FUZZ_CASES):
        url = f"{memory_url}-{seed}"
        store = _case(url, two_steps, target, seed)
        for argv in (["ls", url], ["verify", url]):
            assert ckpt(argv) in (0, 1), (seed, argv)
        capsys.readouterr()
        assert store.verify(1) == {1: []}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = store.load_latest()
        assert loaded is not None, seed
        steps = {i.step: i.quarantined for i in store.all_steps()}
        if loaded.info.step == 2:
            outcomes["loaded"] += 1  # a mutation that changed nothing that matters
            assert steps == {1: False, 2: False}, seed
        else:
            outcomes["quarantined"] += 1
            assert steps == {1: False, 2: True}, seed
            notes = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
            assert any("step 2" in n and "\n" not in n for n in notes), (seed, notes)
        try:  # what a non-zero rank does with the step rank 0 chose
            store.load(2, verify=False)
        except CheckpointError as e:
            _one_line(e)
        root = store.location.path
        for path in store.location.fs.calls("[coi]*"):  # cat_file, open, info, exists
            assert path.startswith(root + "/step-00000000") and ".." not in path, (seed, path)
    assert outcomes["quarantined"] >= FUZZ_CASES // 4, outcomes  # the generator does bite
