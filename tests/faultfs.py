"""A filesystem that fails on purpose: fault injection for storage tests.

``faulty://`` is fsspec's in-process memory filesystem with rules that make chosen calls
fail. A rule names the operation (``cat_file``, ``pipe_file``, ``rm``, ...; ``*`` for any),
a glob over the path, what to raise, and how many times (``times=None``: always)::

    with faults(Fault("cat_file", "*/COMMIT", ConnectionResetError, times=1)):
        store.load_latest()

Real code resolves ``faulty://bucket/run`` through fsspec like any URL, so the layer under
test is the project's own, untouched. Faults are process-local: for subprocess tests use a
real server (fake-gcs-server, moto) instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

PROTOCOL = "faulty"


@dataclass
class Fault:
    op: str
    path: str = "*"
    error: type[BaseException] | BaseException = ConnectionResetError
    times: int | None = 1
    calls: list[str] = field(default_factory=list)

    def matches(self, op: str, path: str) -> bool:
        if self.times is not None and len(self.calls) >= self.times:
            return False
        return (self.op in ("*", op)) and fnmatch.fnmatchcase(path, self.path)


_RULES: list[Fault] = []
_LOCK = threading.Lock()


def _check(op: str, path: Any) -> None:
    paths = path if isinstance(path, (list, tuple)) else [path]
    with _LOCK:
        for p in paths:
            p = str(p)
            for rule in _RULES:
                if rule.matches(op, p):
                    rule.calls.append(p)
                    err = rule.error
                    raise err(f"injected {op} fault on {p}") if isinstance(err, type) else err


class FaultyFileSystem(MemoryFileSystem):
    """Memory filesystem whose calls consult the active fault rules first."""

    protocol = PROTOCOL
    # A separate store from memory://, so tests of both never see each other's files.
    store: dict = {}
    pseudo_dirs = [""]

    def cat_file(self, path, start=None, end=None, **kwargs):
        _check("cat_file", path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        _check("pipe_file", path)
        return super().pipe_file(path, value, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        _check("open", path)
        return super()._open(path, mode=mode, **kwargs)

    def rm_file(self, path):
        _check("rm_file", path)
        return super().rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        _check("rm", path)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def ls(self, path, detail=True, **kwargs):
        _check("ls", path)
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        _check("info", path)
        return super().info(path, **kwargs)


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


@contextlib.contextmanager
def faults(*rules: Fault) -> Iterator[list[Fault]]:
    """Activate ``rules`` for the block; they are removed afterwards, even on error."""
    with _LOCK:
        _RULES.extend(rules)
    try:
        yield list(rules)
    finally:
        with _LOCK:
            for r in rules:
                _RULES.remove(r)


def clear() -> None:
    """Forget every file on ``faulty://`` (between tests)."""
    FaultyFileSystem.store.clear()
    FaultyFileSystem.pseudo_dirs[:] = [""]
