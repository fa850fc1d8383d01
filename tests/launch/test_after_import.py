"""``after_import``: functions run once a module has executed, in order, and leave the module's
own loader in place."""

from __future__ import annotations

import importlib.machinery
import sys

import pytest

from tlaunch.after_import import after_import

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def module(tmp_path, monkeypatch):
    """The name of a fresh module on sys.path that records its execution in ``ran``."""
    name = f"tlaunch_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import builtins\nbuiltins._tlaunch_ran.append('module')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins._tlaunch_ran", [], raising=False)
    yield name
    sys.modules.pop(name, None)
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "name", None) != name]


def test_functions_run_in_order_once_the_module_has_executed(module):
    import builtins

    ran = builtins._tlaunch_ran
    after_import(module, lambda: ran.append(("first", module in sys.modules)))
    after_import(module, lambda: ran.append("second"))
    import json  # noqa: F401  (another import leaves them waiting)

    assert ran == []
    imported = __import__(module)
    assert ran == ["module", ("first", True), "second"]
    assert type(imported.__loader__) is importlib.machinery.SourceFileLoader
    assert imported.__spec__.loader is imported.__loader__
    __import__(module)  # once only
    assert ran == ["module", ("first", True), "second"]


def test_a_module_already_imported_runs_the_function_at_once(module):
    import builtins

    __import__(module)
    after_import(module, lambda: builtins._tlaunch_ran.append("then"))
    assert builtins._tlaunch_ran == ["module", "then"]
