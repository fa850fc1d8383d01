"""URLs to filesystems: the one place tlaunch talks to fsspec.

Paths stay ``str`` throughout: ``pathlib.Path`` collapses the ``//`` of ``gs://``.

Supported URLs:

=====================  ==========================================================
``/abs/path``, ``rel``  local disk (``file://`` too)
``gs://bucket/prefix``  Google Cloud Storage through gcsfs (``tlaunch[gcs]``)
``s3://bucket/prefix``  S3 through s3fs (``tlaunch[s3]``)
``drive://path``        Google Drive: the Colab mount ``/content/drive/MyDrive`` when
                        present (``TLAUNCH_DRIVE_ROOT`` overrides it), else fsspec's
                        ``gdrive`` backend (``tlaunch[drive]``)
``memory://name``       fsspec's in-process memory filesystem (tests)
=====================  ==========================================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

COLAB_DRIVE_ROOT = "/content/drive/MyDrive"

# protocol -> (module that must import, extra that installs it)
_BACKENDS = {
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gdrive": ("gdrive_fsspec", "drive"),
}

_CREDENTIALS_IN_URL = re.compile(r"(?<=://)[^/@\s]+@")


class StorageError(RuntimeError):
    """A storage problem explained in one line (what failed and what to do)."""


def redact(text: str) -> str:
    """Strip ``user:secret@`` from any URL in ``text`` so credentials never reach a log."""
    return _CREDENTIALS_IN_URL.sub("***@", text)


@dataclass(frozen=True, slots=True)
class Location:
    """A resolved URL: the fsspec filesystem, the path inside it, and how to commit there."""

    fs: Any
    path: str
    url: str
    #: True when ``fs.mv`` of a directory is an atomic rename (local POSIX disks only).
    atomic_rename: bool

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def _import_backend(protocol: str) -> None:
    module, extra = _BACKENDS.get(protocol, (None, None))
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise StorageError(
            f"{protocol}:// URLs need the {module} package, which is not installed; "
            f"run: pip install 'tlaunch[{extra}]'"
        ) from None


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol in ("gs", "gcs"):
        # Recent gcsfs probes a gRPC bucket API that emulators do not serve, for ~60 s a bucket.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return {"token": "anon"}
    if protocol in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def _drive_path(rest: str) -> str | None:
    """The local path of ``drive://rest`` on a mounted Drive, or None when not mounted."""
    root = os.environ.get("TLAUNCH_DRIVE_ROOT") or COLAB_DRIVE_ROOT
    if os.path.isdir(root):
        return os.path.join(root, rest.lstrip("/"))
    if os.path.isdir("/content") and not os.environ.get("TLAUNCH_DRIVE_ROOT"):
        # On Colab but the Drive is not mounted: the gdrive backend would ask for OAuth
        # in a notebook that already has a better way.
        raise StorageError(
            "drive:// needs Google Drive mounted in this Colab session; run "
            "`from google.colab import drive; drive.mount('/content/drive')` in a cell first"
        )
    return None


def resolve(url: str) -> Location:
    """Resolve ``url`` to a :class:`Location`, importing its backend lazily."""
    import fsspec

    if not url:
        raise StorageError("empty storage URL; pass a path, gs://, s3://, drive:// or memory:// URL")
    if url.startswith("drive://"):
        local = _drive_path(url[len("drive://") :])
        if local is None:
            _import_backend("gdrive")
            fs = fsspec.filesystem("gdrive")
            return Location(fs, url[len("drive://") :].strip("/"), url, atomic_rename=False)
        # The Drive FUSE mount syncs files to the cloud one by one: a directory rename is not
        # atomic there, so Drive commits with MANIFEST + COMMIT like an object store.
        return Location(fsspec.filesystem("file"), local, url, atomic_rename=False)
    url_for_fs = url
    protocol, _, rest = url_for_fs.partition("://") if "://" in url_for_fs else ("file", "", "")
    if protocol == "file":
        path = os.path.abspath(rest or url_for_fs)
        return Location(fsspec.filesystem("file"), path, url, atomic_rename=True)
    _import_backend(protocol)
    try:
        fs, path = fsspec.core.url_to_fs(url_for_fs, **_storage_options(protocol))
    except ValueError as e:
        raise StorageError(f"unsupported storage URL {redact(url)!r}: {e}") from None
    # memory:// paths are rooted at "/": keep them so, whatever the fsspec version strips.
    return Location(fs, path.rstrip("/") or path, url, atomic_rename=False)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")
