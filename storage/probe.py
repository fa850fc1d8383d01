"""Can tlaunch write at a URL? Found out in a second at the start, not at the first save.

:func:`probe_writable` does at ``url`` what every writer there will do: make the folder if it
is missing (a local disk, Drive; object stores have no folders, but the bucket must exist),
write a small hidden object and delete it again (retention and the commit protocol delete).
A uniquely named object (``.tlaunch-probe-<host>-<pid>-<random>``) keeps concurrent probes
and readers of the folder apart; it is removed whatever happens, and folders the probe made
are removed again, so a probe leaves the place as it found it.

Failures are one-line :class:`~tlaunch.storage.StorageError` s naming the URL, what failed and
the fix; storage that stays unreachable through the retries is
:class:`~tlaunch.storage.StorageUnavailable`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket

from tlaunch.storage.localfs import create_file
from tlaunch.storage.store import (
    Location,
    RetryPolicy,
    StorageError,
    redact,
    resolve,
    storage_error,
)

PROBE_PREFIX = ".tlaunch-probe-"
#: Protocols whose top-level name is a bucket that writes never create, and how to create one.
_BUCKET_STORES = {
    "gs": "gcloud storage buckets create",
    "gcs": "gcloud storage buckets create",
    "s3": "aws s3 mb",
    "s3a": "aws s3 mb",
}


def probe_writable(url: str, *, retry: RetryPolicy | None = None) -> None:
    """Prove that ``url`` takes writes and deletes; StorageError saying why not."""
    location = resolve(url, lazy=True)  # local: os calls only, no fsspec import
    retry = retry or RetryPolicy()
    name = f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    probe = location.join(name)
    made = _make_folder(location, retry)
    # On this machine's file system (a disk, the Drive mount) with os calls: no fsspec import.
    write, remove = (
        (create_file, os.remove) if location.local else (location.fs.pipe_file, location.fs.rm_file)
    )
    try:
        try:
            retry.call(
                write, probe, b"tlaunch", action="writing a test file to", where=location.url
            )
            retry.call(remove, probe, action="deleting a test file at", where=location.url)
        except FileNotFoundError:
            raise _missing(location) from None
    except Exception:
        # Not on a stop signal (a BaseException): one more call to a store that stopped
        # answering would hang the stop, and a hidden probe object left behind harms nobody.
        with contextlib.suppress(Exception):  # gone already, or the store refuses: said above
            remove(probe)
        raise
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _make_folder(location: Location, retry: RetryPolicy) -> list[str]:
    """Create the folder where that is needed; returns the local folders made, outermost first."""
    if location.local:
        made, path = [], os.path.abspath(location.path)
        while not os.path.isdir(path) and path != os.path.dirname(path):
            made.append(path)
            path = os.path.dirname(path)
        try:
            os.makedirs(location.path, exist_ok=True)
        except OSError as e:
            raise _local_error(e, location) from None
        return made[::-1]
    if _protocol(location) not in _BUCKET_STORES:  # Drive, memory: folders exist there
        retry.call(
            location.fs.makedirs, location.path, exist_ok=True, action="creating",
            where=location.url,
        )  # fmt: skip
    return []


def _local_error(e: OSError, location: Location) -> StorageError:
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return StorageError(
            f"{redact(location.url)} is not a folder (a file is in the way); "
            "remove it or choose another path"
        )
    return storage_error(e, "creating", location.url)


def _missing(location: Location) -> StorageError:
    url = redact(location.url)
    make = _BUCKET_STORES.get(_protocol(location))
    if make is not None:
        scheme, _, rest = url.partition("://")
        bucket = f"{scheme}://{rest.split('/', 1)[0]}"
        return StorageError(
            f"{url}: the bucket {bucket} does not exist; create it ({make} {bucket}) or fix the URL"
        )
    return StorageError(f"{url}: the folder does not exist and could not be created; fix the URL")


def _protocol(location: Location) -> str:
    protocol = location.fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]
