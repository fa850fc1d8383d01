"""Storage that fails on purpose: an fsspec filesystem wrapper that injects faults.

:class:`FaultyFS` wraps ANY fsspec filesystem instance (local, memory, gcsfs, s3fs, ...) and
makes chosen calls fail the way cloud storage fails::

    fs = FaultyFS(gcsfs_instance, Fault("cat_file", "*/COMMIT", ConnectionResetError))
    fs = FaultyFS(local_fs, torn("pipe_file", "*model*", keep=100, error=PermissionError))

A :class:`Fault` names the operation (one of :data:`OPS`, or a glob over their names), a glob
over the path the call names, and what happens, ``times`` times (``None``: every time;
``each_path``: that many times per distinct path, or per ``each_path(path)`` when it is a
function, e.g. one that drops the random part of temp-file names a retry changes):

* ``error``: raised instead of doing the call. Transient kinds a retry may cure:
  ``ConnectionResetError``, ``TimeoutError``, ``http(429)``/``http(503)`` (an error carrying
  ``.status``, as aiohttp's and botocore's do); permanent: ``PermissionError``,
  ``FileNotFoundError``.
* ``keep`` (writes only: ``pipe_file``, ``put_file``, ``open`` for writing): a torn write. The
  first ``keep`` bytes (an int) or that fraction of them (a float) land, then ``error`` is
  raised -- or with ``error=None`` the call reports success, as a lying mount would.
* ``delay``: seconds to stall before the call (``error=None`` makes it only a slow call).
* ``action``: run when the rule fires, before anything else: another process acting at
  exactly that moment (deleting the step being read, say).

Only the wrapper's primitive calls inject (:data:`OPS`); composite calls fsspec implements on
top of them (``cat``, ``pipe``, ``get``, ``put``, ``copy``, ``read_bytes``, ``cat_ranges``,
``glob``, ``walk``, ...) run through them, with the wrapped filesystem's glob semantics. Every
primitive call is recorded in :attr:`FaultyFS.log` as ``(op, path)``.

``faulty://`` is the same wrapper over a private in-process memory store, registered with
fsspec so real code resolves ``faulty://bucket/run`` like any URL; its rules are process-wide
(:func:`faults`, :func:`clear`). Faults are process-local: for subprocess tests use a real
server (fake-gcs-server, moto) instead.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

PROTOCOL = "faulty"

#: The calls a rule can name. Writes that can be torn: pipe_file, put_file, open (w/a/x modes).
OPS = (
    "cat_file", "pipe_file", "open", "ls", "find", "info", "exists", "rm_file", "rm",
    "rmdir", "makedirs", "mkdir", "put_file", "get_file", "cp_file", "mv",
)  # fmt: skip
_TEARABLE = ("pipe_file", "put_file", "open")
# Where the path(s) a call names sit among its positional arguments.
_PATH_ARGS = {"put_file": (1,), "cp_file": (0, 1), "mv": (0, 1)}
_ERRNOS = {
    ConnectionResetError: errno.ECONNRESET,
    PermissionError: errno.EACCES,
    FileNotFoundError: errno.ENOENT,
    TimeoutError: errno.ETIMEDOUT,
}


class HTTPError(Exception):
    """An HTTP failure as the backends report it: ``status`` (and ``code``) on the error."""

    status: int = 500

    @property
    def code(self) -> int:
        return self.status


def http(status: int) -> type[HTTPError]:
    """An HTTPError class for ``status``: ``Fault("cat_file", error=http(503))``."""
    return type(f"HTTP{status}Error", (HTTPError,), {"status": status})


#: Errors a retry may cure, and errors it never will.
TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionResetError, TimeoutError, http(429), http(503),
)  # fmt: skip
PERMANENT: tuple[type[BaseException], ...] = (PermissionError, FileNotFoundError)


@dataclass(eq=False)
class Fault:
    """One injection rule; ``calls`` records the paths it hit."""

    op: str = "*"
    path: str = "*"
    error: type[BaseException] | BaseException | None = ConnectionResetError
    times: int | None = 1
    each_path: bool | Callable[[str], str] = False
    keep: int | float | None = None
    delay: float = 0.0
    action: Callable[[], Any] | None = None
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.keep is not None and not any(fnmatch.fnmatchcase(op, self.op) for op in _TEARABLE):
            raise ValueError(f"keep= tears writes; {self.op!r} names no write ({_TEARABLE})")
        if not any(fnmatch.fnmatchcase(op, self.op) for op in OPS):
            raise ValueError(f"{self.op!r} matches none of the injectable calls {OPS}")

    def _claims(self, op: str, path: str, writing: bool) -> bool:
        if not (fnmatch.fnmatchcase(op, self.op) and fnmatch.fnmatchcase(path, self.path)):
            return False
        if self.keep is not None and not writing:
            return False  # a tear rule on open() leaves reads alone
        if self.times is None:
            return True
        if not self.each_path:
            return len(self.calls) < self.times
        key = self.each_path if callable(self.each_path) else str
        return sum(1 for p in self.calls if key(p) == key(path)) < self.times

    def exception(self, op: str, path: str) -> BaseException:
        if isinstance(self.error, BaseException):
            return self.error
        message = f"injected {op} fault on {path}"
        if self.error in _ERRNOS:
            return self.error(_ERRNOS[self.error], message)
        return self.error(message)

    def kept(self, data: bytes) -> bytes:
        keep = self.keep if isinstance(self.keep, int) else int(len(data) * float(self.keep))
        return bytes(data[: max(0, min(keep, len(data)))])


def torn(op: str, path: str = "*", keep: int | float = 0.5, **kwargs: Any) -> Fault:
    """A torn write: ``keep`` bytes (or that fraction) land, then ``error`` (default: a reset)."""
    return Fault(op, path, keep=keep, **kwargs)


def slow(op: str, path: str = "*", seconds: float = 0.05, **kwargs: Any) -> Fault:
    """A call that stalls ``seconds`` and then works."""
    return Fault(op, path, error=None, delay=seconds, **kwargs)


class _TornWriter:
    """A file open for writing that keeps only a prefix of what is written, then fails.

    An int ``keep`` counts bytes over the whole file; a float keeps that share of each write.
    """

    def __init__(self, file: Any, rule: Fault, op: str, path: str) -> None:
        self._file, self._rule, self._op, self._path = file, rule, op, path
        self._written = 0

    def write(self, data: Any) -> int:
        data = bytes(data)
        if isinstance(self._rule.keep, float):
            room = self._rule.kept(data)
        else:
            room = data[: max(0, int(self._rule.keep) - self._written)]
        if room:
            self._file.write(room)
            self._written += len(room)
        if len(room) < len(data) and self._rule.error is not None:
            raise self._rule.exception(self._op, self._path)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _TornWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


class FaultyFS(AbstractFileSystem):
    """``fs`` with the calls named by ``rules`` failing; everything else passes through."""

    cachable = False  # each wrapper has its own rules
    protocol = "faultwrap"

    def __init__(self, fs: Any, *rules: Fault, shared: list[Fault] | None = None) -> None:
        super().__init__()
        self.fs = fs
        #: The active rules; add or remove at will (``with wrapper.faults(...)`` scopes some).
        self.rules: list[Fault] = shared if shared is not None else list(rules)
        #: Every primitive call: (op, path).
        self.log: list[tuple[str, str]] = []
        self.root_marker = getattr(fs, "root_marker", "")
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaultyFS({self.fs!r}, {len(self.rules)} rules)"

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        # Paths are the wrapped filesystem's own; it strips its URLs itself.
        return [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path)

    @contextlib.contextmanager
    def faults(self, *rules: Fault) -> Iterator[list[Fault]]:
        """Activate ``rules`` for the block only."""
        with self._lock:
            self.rules.extend(rules)
        try:
            yield list(rules)
        finally:
            with self._lock:
                for rule in rules:
                    self.rules.remove(rule)

    def calls(self, op: str = "*", path: str = "*") -> list[str]:
        """Paths of the logged calls matching ``op`` and ``path`` (globs)."""
        return [
            p
            for o, p in list(self.log)
            if fnmatch.fnmatchcase(o, op) and fnmatch.fnmatchcase(p, path)
        ]

    # -- the one injection point -------------------------------------------------------------

    def _claim(self, op: str, args: tuple, kwargs: dict) -> tuple[Fault | None, str]:
        named = [args[i] for i in _PATH_ARGS.get(op, (0,)) if i < len(args)] or [
            kwargs.get("path", "")
        ]
        paths = [str(p) for item in named for p in (item if isinstance(item, list) else [item])]
        writing = _writing(args, kwargs) if op == "open" else op in _TEARABLE
        with self._lock:
            self.log.extend((op, p) for p in paths)
            for rule in self.rules:
                for p in paths:
                    if rule._claims(op, p, writing):
                        rule.calls.append(p)
                        return rule, p
        return None, paths[0] if paths else ""

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        rule, path = self._claim(op, args, kwargs)
        real = getattr(self.fs, op)
        if rule is None:
            return real(*args, **kwargs)
        if rule.action is not None:
            rule.action()
        if rule.delay:
            time.sleep(rule.delay)
        if rule.keep is not None and op in ("pipe_file", "put_file"):
            return self._tear(rule, op, path, args, kwargs)
        if rule.keep is not None and op == "open":
            return _TornWriter(real(*args, **kwargs), rule, op, path)
        if rule.error is not None:
            raise rule.exception(op, path)
        return real(*args, **kwargs)

    def _tear(self, rule: Fault, op: str, path: str, args: tuple, kwargs: dict) -> None:
        if op == "put_file":
            with open(args[0], "rb") as f:
                data = f.read()
        else:
            data = args[1] if len(args) > 1 else kwargs["value"]
        self.fs.pipe_file(path, rule.kept(data))
        if rule.error is not None:
            raise rule.exception(op, path)

    # -- primitives: injected, then the wrapped filesystem's own --------------------------------

    def cat_file(self, path, start=None, end=None, **kwargs):
        return self._call("cat_file", path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, **kwargs):
        return self._call("pipe_file", path, value, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        return self._call("open", path, mode, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        return self._call("ls", path, detail=detail, **kwargs)

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        return self._call(
            "find", path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs
        )

    def info(self, path, **kwargs):
        return self._call("info", path, **kwargs)

    def exists(self, path, **kwargs):
        return self._call("exists", path, **kwargs)

    def rm_file(self, path, **kwargs):
        return self._call("rm_file", path, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        return self._call("rm", path, recursive=recursive, maxdepth=maxdepth)

    def rmdir(self, path):
        return self._call("rmdir", path)

    def makedirs(self, path, exist_ok=False):
        return self._call("makedirs", path, exist_ok=exist_ok)

    def mkdir(self, path, create_parents=True, **kwargs):
        return self._call("mkdir", path, create_parents=create_parents, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        return self._call("put_file", lpath, rpath, **kwargs)

    def get_file(self, rpath, lpath, **kwargs):
        return self._call("get_file", rpath, lpath, **kwargs)

    def cp_file(self, path1, path2, **kwargs):
        return self._call("cp_file", path1, path2, **kwargs)

    def mv(self, path1, path2, **kwargs):
        return self._call("mv", path1, path2, **kwargs)

    def invalidate_cache(self, path=None):
        return self.fs.invalidate_cache(path)


def _writing(args: tuple, kwargs: dict) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "rb")
    return any(c in mode for c in "wax")


# -- faulty://: the wrapper over a private memory store, rules shared process-wide ---------------

_RULES: list[Fault] = []
_RULES_LOCK = threading.Lock()


class _FaultyStore(MemoryFileSystem):
    # A separate store from memory://, so tests of both never see each other's files.
    store: dict = {}
    pseudo_dirs = [""]


class FaultyFileSystem(FaultyFS):
    """``faulty://``: fsspec's memory filesystem behind the process-wide fault rules."""

    cachable = True
    protocol = PROTOCOL

    def __init__(self, **storage_options: Any) -> None:
        super().__init__(_FaultyStore(skip_instance_cache=True), shared=_RULES)
        self._lock = _RULES_LOCK

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        return MemoryFileSystem._strip_protocol(str(path).removeprefix(f"{PROTOCOL}://"))


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


@contextlib.contextmanager
def faults(*rules: Fault) -> Iterator[list[Fault]]:
    """Activate ``rules`` on ``faulty://`` for the block; removed afterwards, even on error."""
    with _RULES_LOCK:
        _RULES.extend(rules)
    try:
        yield list(rules)
    finally:
        with _RULES_LOCK:
            for r in rules:
                _RULES.remove(r)


def clear() -> None:
    """Forget every file on ``faulty://`` (between tests)."""
    _FaultyStore.store.clear()
    _FaultyStore.pseudo_dirs[:] = [""]
