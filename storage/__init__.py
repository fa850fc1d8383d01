"""Everything that touches bytes at a URL: stores, checkpoints, retention, data archives.

Built on fsspec; never imports ``tlaunch`` (the launcher) nor ``tlaunch.strategies``.

::

    store.py      URLs to fsspec filesystems, retries, one-line storage errors
    localfs.py    which URLs are local; the one way a local file is written (temp, fsync, rename)
    mirror.py     ``--sync-dir LOCAL=URL``: a folder mirrored file by file
    probe.py      can tlaunch write at a URL? (checked before any worker starts)
    checkpoint/   checkpoints: format, commit protocol, async writer, retention, ``tlaunch ckpt``
    archive/      data archives: pack, fetch, the cache, ``tlaunch data``

The public names below are what the rest of tlaunch (and users) import, always from
``tlaunch.storage`` itself; they load on first use, so ``import tlaunch.storage`` stays free of
torch, fsspec's backends and the compression libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    # the URL layer
    "StorageError": ("tlaunch.storage.store", "StorageError"),
    "StorageUnavailable": ("tlaunch.storage.store", "StorageUnavailable"),
    "Location": ("tlaunch.storage.store", "Location"),
    "resolve": ("tlaunch.storage.store", "resolve"),
    "is_remote": ("tlaunch.storage.store", "is_remote"),
    "local_path": ("tlaunch.storage.store", "local_path"),
    "on_drive": ("tlaunch.storage.store", "on_drive"),
    "redact": ("tlaunch.storage.store", "redact"),
    "probe_writable": ("tlaunch.storage.probe", "probe_writable"),
    # checkpoints
    "CheckpointStore": ("tlaunch.storage.checkpoint.store", "CheckpointStore"),
    "CheckpointInfo": ("tlaunch.storage.checkpoint.store", "CheckpointInfo"),
    "CheckpointError": ("tlaunch.storage.checkpoint.manifest", "CheckpointError"),
    "CheckpointWarning": ("tlaunch.storage.checkpoint.store", "CheckpointWarning"),
    "LoadedCheckpoint": ("tlaunch.storage.checkpoint.store", "LoadedCheckpoint"),
    "AsyncCheckpointWriter": ("tlaunch.storage.checkpoint.writer", "AsyncCheckpointWriter"),
    "cpu_snapshot": ("tlaunch.storage.checkpoint.writer", "cpu_snapshot"),
    "cpu_view": ("tlaunch.storage.checkpoint.writer", "cpu_view"),
    "SnapshotBuffers": ("tlaunch.storage.checkpoint.writer", "SnapshotBuffers"),
    "RetentionPolicy": ("tlaunch.storage.checkpoint.retention", "RetentionPolicy"),
    "KeepLast": ("tlaunch.storage.checkpoint.retention", "KeepLast"),
    "KeepEvery": ("tlaunch.storage.checkpoint.retention", "KeepEvery"),
    "KeepBest": ("tlaunch.storage.checkpoint.retention", "KeepBest"),
    "ckpt_main": ("tlaunch.storage.checkpoint.cli", "main"),
    "load_weights": ("tlaunch.storage.checkpoint.export", "load_weights"),
    "resolve_step": ("tlaunch.storage.checkpoint.export", "resolve_step"),
    # the run's goodput, recorded beside its checkpoints
    "append_goodput": ("tlaunch.storage.checkpoint.goodput", "append_record"),
    "read_goodput": ("tlaunch.storage.checkpoint.goodput", "read_goodput"),
    "GOODPUT_PROGRESS_SECONDS": ("tlaunch.storage.checkpoint.goodput", "PROGRESS_SECONDS"),
    # one writer per checkpoint directory
    "Lease": ("tlaunch.storage.checkpoint.lease", "Lease"),
    "LeaseHeld": ("tlaunch.storage.checkpoint.lease", "LeaseHeld"),
    "LeaseLost": ("tlaunch.storage.checkpoint.lease", "LeaseLost"),
    # --sync-dir
    "FolderMirror": ("tlaunch.storage.mirror", "FolderMirror"),
    # data archives
    "pack": ("tlaunch.storage.archive.pack", "pack"),
    "fetch": ("tlaunch.storage.archive.fetch", "fetch"),
    "info": ("tlaunch.storage.archive.fetch", "info"),
    "read_manifest": ("tlaunch.storage.archive.fetch", "read_manifest"),
    "ArchiveError": ("tlaunch.storage.archive.format", "ArchiveError"),
    "ArchiveMissing": ("tlaunch.storage.archive.fetch", "ManifestMissing"),
    "data_main": ("tlaunch.storage.archive.cli", "main"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'tlaunch.storage' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
