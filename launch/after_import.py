"""Run a function once a module has been imported, without importing it first.

The workers' ``sitecustomize`` uses it to act on torch (the loader workers' shield, the doctor's
hooks) only if and when the script imports torch: importing torch there would cost every
script its seconds before its first line, and would import it before the script could set the
environment variables torch reads at import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any


def after_import(name: str, then: Callable[[], Any]) -> None:
    """Call ``then()`` once the top-level module ``name`` has finished executing (at once if
    it already has); functions given for the same module run in the order given. ``then``
    runs inside the script's ``import``: it must not fail."""
    if name in sys.modules:
        then()
        return
    waiting = next(
        (f for f in sys.meta_path if isinstance(f, _AfterImport) and f.name == name), None
    )
    if waiting is None:
        waiting = _AfterImport(name)
        sys.meta_path.insert(0, waiting)
    waiting.then.append(then)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` as the path finder would and wraps its loader for that one import; the
    module keeps its own loader in ``__loader__`` and ``__spec__``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.then: list[Callable[[], Any]] = []

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, then: list[Callable[[], Any]]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        for then in self.then:
            then()
