"""Everything that touches bytes at a URL: stores, checkpoints, retention, data archives.

Built on fsspec; never imports ``tlaunch`` (the launcher) nor ``tlaunch.strategies``.

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
    "Location": ("tlaunch.storage.store", "Location"),
    "resolve": ("tlaunch.storage.store", "resolve"),
    "is_remote": ("tlaunch.storage.store", "is_remote"),
    "redact": ("tlaunch.storage.store", "redact"),
    # checkpoints
    "CheckpointStore": ("tlaunch.storage.checkpoint", "CheckpointStore"),
    "CheckpointInfo": ("tlaunch.storage.checkpoint", "CheckpointInfo"),
    "CheckpointError": ("tlaunch.storage.checkpoint", "CheckpointError"),
    "CheckpointWarning": ("tlaunch.storage.checkpoint", "CheckpointWarning"),
    "LoadedCheckpoint": ("tlaunch.storage.checkpoint", "LoadedCheckpoint"),
    "AsyncCheckpointWriter": ("tlaunch.storage.writer", "AsyncCheckpointWriter"),
    "cpu_snapshot": ("tlaunch.storage.writer", "cpu_snapshot"),
    "RetentionPolicy": ("tlaunch.storage.retention", "RetentionPolicy"),
    "KeepLast": ("tlaunch.storage.retention", "KeepLast"),
    "KeepEvery": ("tlaunch.storage.retention", "KeepEvery"),
    "KeepBest": ("tlaunch.storage.retention", "KeepBest"),
    "ckpt_main": ("tlaunch.storage.checkpoint_cli", "main"),
    # --sync-dir
    "FolderMirror": ("tlaunch.storage.mirror", "FolderMirror"),
    # data archives
    "pack": ("tlaunch.storage.archive", "pack"),
    "fetch": ("tlaunch.storage.archive", "stage"),
    "info": ("tlaunch.storage.archive", "info"),
    "read_manifest": ("tlaunch.storage.archive", "read_manifest"),
    "ArchiveError": ("tlaunch.storage.archive", "ArchiveError"),
    "ArchiveMissing": ("tlaunch.storage.archive_fetch", "ManifestMissing"),
    "data_main": ("tlaunch.storage.archive_cli", "main"),
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
