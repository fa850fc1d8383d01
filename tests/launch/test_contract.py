"""Every TLAUNCH_ name, control file and exit code is declared once, in tlaunch.contract."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re

from tlaunch import contract
from tlaunch.config import LaunchConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
CODE = ("launch", "strategies", "storage", "benchmarks", "examples")
NAME = re.compile(r"\bTLAUNCH_[A-Z0-9_]*[A-Z0-9]\b")
#: A quoted literal: where a name is *spelled* as a value rather than mentioned in prose.
LITERAL = re.compile(r"""["'](TLAUNCH_[A-Z0-9_]+)["']""")
#: The storage layer cannot import the launcher: it declares its two names itself.
STORAGE_DECLARES = {"TLAUNCH_CACHE_DIR", "TLAUNCH_DRIVE_ROOT"}


def _sources() -> list[pathlib.Path]:
    return [p for d in CODE for p in sorted((ROOT / d).rglob("*.py"))]


def _allowed() -> set[str]:
    flags = {contract.flag_env(f.name) for f in dataclasses.fields(LaunchConfig)}
    return contract.declared_names() | flags


def test_code_anywhere_uses_only_declared_names():
    unknown = {}
    for path in _sources():
        for name in NAME.findall(path.read_text()):
            if name not in _allowed():
                unknown.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unknown, f"TLAUNCH_ names not declared in launch/contract.py: {unknown}"


def test_names_are_spelled_as_values_only_in_the_contract():
    spelled = {}
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        for name in LITERAL.findall(path.read_text()):
            if rel == "launch/contract.py":
                continue
            if name in STORAGE_DECLARES and rel.startswith("storage/"):
                continue
            spelled.setdefault(rel, set()).add(name)
    assert not spelled, f"import these names from tlaunch.contract instead: {spelled}"


def test_storage_declares_the_same_names_the_contract_lists():
    # By module path: a package may export a function of the same name as its module.
    store = importlib.import_module("tlaunch.storage.store")
    fetch = importlib.import_module("tlaunch.storage.archive.fetch")
    assert store.DRIVE_ROOT_ENV == contract.DRIVE_ROOT_ENV
    assert fetch.CACHE_DIR_ENV == contract.CACHE_DIR_ENV


def test_the_detector_catches_an_undeclared_name(tmp_path):
    # The scan above must be able to fail: an undeclared name in a file is found.
    text = 'os.environ.get("TLAUNCH_NOT_A_THING")'
    assert [n for n in NAME.findall(text) if n not in _allowed()] == ["TLAUNCH_NOT_A_THING"]
    assert LITERAL.findall(text) == ["TLAUNCH_NOT_A_THING"]


def test_exit_codes_are_the_documented_ones():
    assert (contract.EXIT_OK, contract.EXIT_USAGE, contract.EXIT_UNAVAILABLE) == (0, 2, 69)
    assert contract.EXIT_PREEMPTED == 75
    # Every code is in the module's table, which ARCHITECTURE.md and the README repeat.
    for code in (0, 2, 69, 75):
        assert re.search(rf"^{code}\s", contract.__doc__, re.MULTILINE)


def test_every_declared_variable_is_documented():
    for name in contract.declared_names():
        assert name in contract.__doc__, f"{name} is declared but not in the module's table"
