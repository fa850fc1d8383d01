"""``flaky://PATH``: a local folder behind the fault layer, failing a share of storage calls.

The fault layer (``tests/faultfs.py``) is process-local, and a launch is several processes (the
launcher, torch's elastic agent inside it, one worker per rank). So the fault campaign
(``benchmarks/faults.py``) writes a ``sitecustomize.py`` that loads this file into every Python
process it starts, through ``PYTHONPATH``; this file registers ``flaky`` with fsspec, and
``--checkpoint-dir flaky:///tmp/x`` then reaches ``/tmp/x`` through :class:`FlakyFileSystem`.

Every primitive storage call (``cat_file``, ``pipe_file``, ``ls``, ``find``, ``rm_file``, ...;
``tests/faultfs.py`` lists them) fails, instead of running, with probability
``FAULTS_STORAGE_ERROR_RATE`` (default 0), raising one of the transient errors a cloud store
raises (a connection reset, a timeout, HTTP 429 or 503). The draws come from a generator seeded
with ``FAULTS_STORAGE_SEED`` and the process's role (the launcher, or the worker of rank N),
so each process of a launch draws the same sequence each time; which call meets which draw
still depends on thread timing.

Under the fault layer sits a local folder with an object store's write semantics, not a plain
disk's: tlaunch commits to a non-local URL with files, MANIFEST, then COMMIT, trusting that
one PUT lands whole or not at all; so here a write goes to a temp file in
``FAULTS_PARTIAL_DIR`` (the same file system, outside the checkpoint folder) and is renamed
into place, and ``mode="create"`` (how the lease is created) fails when the name exists. A
plain ``LocalFileSystem`` write killed half-way would leave half a COMMIT, a fault no object
store has.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import sys
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "flaky"
RATE_ENV = "FAULTS_STORAGE_ERROR_RATE"
SEED_ENV = "FAULTS_STORAGE_SEED"
PARTIAL_DIR_ENV = "FAULTS_PARTIAL_DIR"
#: A file each process appends one line to per fault it injects: its role (``launcher``,
#: ``rank N``), so the campaign can show the faults reached every process.
INJECTED_LOG_ENV = "FAULTS_INJECTED_LOG"
FAULTFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "faultfs.py")


def _load_faultfs():
    """``tests/faultfs.py`` by path: the ``tests`` package need not be importable here."""
    spec = importlib.util.spec_from_file_location("_tlaunch_faultfs", FAULTFS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


faultfs = _load_faultfs()


class ObjectStoreOnDisk(LocalFileSystem):
    """A local folder whose writes are PUTs: whole or absent, create-only when asked."""

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)  # object stores have no folders
        fd, temp = tempfile.mkstemp(dir=os.environ.get(PARTIAL_DIR_ENV) or os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            if mode == "create":
                os.link(temp, path)  # FileExistsError when the name is taken, as a PUT would
            else:
                os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)


class FlakyFileSystem(faultfs.FaultyFS):
    """``flaky://``: :class:`ObjectStoreOnDisk` with a share of its calls failing."""

    protocol = PROTOCOL
    cachable = True  # one instance, one generator, per process

    def __init__(self, **storage_options) -> None:
        rate = float(os.environ.get(RATE_ENV) or 0)
        role = _role()
        rng = random.Random(f"{os.environ.get(SEED_ENV, '')}/{role}")
        log = os.environ.get(INJECTED_LOG_ENV)

        def maybe_fail() -> None:
            if rng.random() < rate:
                if log:
                    with open(log, "a") as f:  # one short append: whole lines, even from threads
                        f.write(f"{role}\n")
                error = rng.choice(faultfs.TRANSIENT)
                if issubclass(error, faultfs.HTTPError):
                    raise error("injected storage fault")
                code = errno.ETIMEDOUT if error is TimeoutError else errno.ECONNRESET
                raise error(code, "injected storage fault")

        every_call = faultfs.Fault("*", "*", error=None, times=None, action=maybe_fail)
        super().__init__(ObjectStoreOnDisk(), every_call)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]
        return str(path).removeprefix(f"{PROTOCOL}://")


def _role() -> str:
    """``launcher`` for tlaunch itself (and its elastic agent), ``rank N`` for a worker."""
    if os.path.basename(sys.argv[0]) == "__main__.py":  # python -m tlaunch
        return "launcher"
    return f"rank {os.environ.get('RANK', '0')}"


fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)

#: What the campaign writes as ``sitecustomize.py`` into a folder it puts on ``PYTHONPATH``.
SITECUSTOMIZE = f"""\
# Written by benchmarks/faults.py: registers flaky:// in every process of a campaign launch.
import importlib.util as _util

_spec = _util.spec_from_file_location("_tlaunch_flaky", {os.path.abspath(__file__)!r})
_spec.loader.exec_module(_util.module_from_spec(_spec))
"""
