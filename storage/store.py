"""URLs to filesystems: the one place tlaunch talks to fsspec.

Paths stay ``str`` throughout: ``pathlib.Path`` collapses the ``//`` of ``gs://``.

Supported URLs:

=====================  ==========================================================
``/abs/path``, ``rel``  local disk (``file://`` too)
``gs://bucket/prefix``  Google Cloud Storage through gcsfs (``tlaunch[gcs]``)
``s3://bucket/prefix``  S3 through s3fs (``tlaunch[s3]``)
``drive://path``        Google Drive: ``MyDrive`` on Colab's Drive mount, wherever
                        ``drive.mount()`` put it (the mount table says where;
                        ``TLAUNCH_DRIVE_ROOT`` overrides it), else fsspec's ``gdrive``
                        backend (``tlaunch[drive]``)
``memory://name``       fsspec's in-process memory filesystem (tests)
=====================  ==========================================================
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from tlaunch.storage.localfs import (
    LocalFiles,
    drive_mounts,
    is_local,
    on_drive_mount,
    renames_atomically,
)

#: Where ``drive.mount('/content/drive')``, the call Colab's snippets show, puts My Drive.
COLAB_DRIVE_ROOT = "/content/drive/MyDrive"
#: The folder ``drive://`` names, overriding the mount table (tests point it at a folder).
DRIVE_ROOT_ENV = "TLAUNCH_DRIVE_ROOT"
#: My Drive's folder inside Colab's Drive mount ("My Drive" in runtimes before 2020).
_MY_DRIVE = ("MyDrive", "My Drive")

# protocol -> (module that must import, extra that installs it)
_BACKENDS = {
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gdrive": ("gdrive_fsspec", "drive"),
}

# ``user:password@`` right after ``scheme://``. The password may hold "/", "+", ":" and even
# "@" (AWS secret keys have "/" and "+"), so it runs to the last "@" of the URL; without a ":"
# (a bare token) it ends at the first "/", so "bucket/alice@example.com" is a path, not a user.
_CREDENTIALS_IN_URL = re.compile(r"(?<=://)(?:[^\s/@:\"'<>]*:[^\s\"'<>]*|[^\s/@\"'<>]+)@")
# Query parameters that carry a credential: presigned S3 / GCS URLs (X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature), Azure SAS (sig), OAuth
# (access_token), API keys (key, api_key) and anything else named like a secret.
_SECRET_PARAM = re.compile(
    r"([?&;][\w.-]*(?:token|sig|key|secret|passw|credential|auth)[\w.-]*=)[^&#\s\"'<>]*",
    re.IGNORECASE,
)


class StorageError(RuntimeError):
    """A storage problem explained in one line (what failed and what to do)."""


class StorageUnavailable(StorageError):
    """Storage kept failing with errors a retry could cure (resets, timeouts, 429, 5xx) until
    the retries ran out: nothing is known to be wrong with the data or the request, so the
    caller changes nothing and says "run again later" (exit 69 under the launcher)."""


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: userinfo
    (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``) and secret query parameters
    (``?X-Amz-Signature=...``, ``&token=...``). Call it on anything written where others
    may read it: logs, run files, records uploaded to a bucket, error messages."""
    return _SECRET_PARAM.sub(r"\1***", _CREDENTIALS_IN_URL.sub("***@", text))


def is_remote(url: str) -> bool:
    """True for every URL that is not a local path (``drive://`` too, even when mounted)."""
    return not is_local(url)


def local_path(url: str) -> str | None:
    """Where ``url`` is on this machine's file system, or None: a plain path or ``file://``
    (made absolute), ``drive://`` on a mounted Drive; never a bucket, never the gdrive backend."""
    if url.startswith("drive://"):
        try:
            return _drive_path(url[len("drive://") :])
        except StorageError:  # on Colab with Drive not mounted: resolve() says so
            return None
    if is_local(url):
        return os.path.abspath(url[len("file://") :] if url.startswith("file://") else url)
    return None


def on_drive(url: str) -> bool:
    """True when ``url`` is in Google Drive: a ``drive://`` URL, or a local path on Colab's
    Drive mount or under ``TLAUNCH_DRIVE_ROOT``."""
    if url.startswith("drive://"):
        return True
    path = local_path(url)
    if path is None:
        return False
    root = os.environ.get(DRIVE_ROOT_ENV)
    if root and _inside(os.path.realpath(path), os.path.realpath(root)):
        return True
    return on_drive_mount(path)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Location:
    """A resolved URL: the fsspec filesystem, the path inside it, and how to commit there."""

    fs: Any
    path: str
    url: str
    #: True when ``path`` is on this machine's file system (a local disk, or the Drive mount), so
    #: ``os`` calls work on it and a local file is made whole by renaming a temp file.
    local: bool

    @property
    def atomic_rename(self) -> bool:
        """True when renaming a directory is atomic here: a local disk named by a local path.

        The Drive FUSE mount is local too, but it syncs files to the cloud one by one, so a
        directory rename there is not atomic: Drive commits with MANIFEST + COMMIT like an
        object store -- as ``drive://`` and as a plain path on any FUSE mount
        (``/content/drive/MyDrive/...``; see :func:`~tlaunch.storage.localfs.renames_atomically`).
        """
        return self.local and is_local(self.url) and renames_atomically(self.path)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


#: The fsspec backends' loggers. gcsfs logs a whole traceback at ERROR when its own retries run
#: out, just before the error reaches us -- and we report that error in one line ourselves.
_BACKEND_LOGGERS = ("gcsfs", "s3fs", "aiobotocore", "botocore", "fsspec")


class _OneLineRecords(logging.Filter):
    """A backend's log record without its traceback, its message on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a backend's malformed format string: keep what there is
            message = str(record.msg)
        record.msg, record.args = " ".join(message.split()), None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _quiet_backend_logs() -> None:
    """Keep backend log records off the user's terminal, once per process.

    A NullHandler on each backend logger means Python's last-resort handler (stderr, WARNING
    and up, tracebacks included) never prints them when the application configured no logging;
    an application that did configure logging still gets them, as one line each. Nothing else
    of the logging setup is touched (no basicConfig, no levels).
    """
    for name in _BACKEND_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineRecords) for f in logger.filters):
            logger.addFilter(_OneLineRecords())
            logger.addHandler(logging.NullHandler())


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
    _quiet_backend_logs()


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol in ("gs", "gcs"):
        # Recent gcsfs probes a gRPC bucket API that emulators do not serve, for ~60 s a bucket.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return {"token": "anon"}
    if protocol in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def _drive_root() -> str | None:
    """My Drive's folder on this machine: ``TLAUNCH_DRIVE_ROOT`` when set, else ``MyDrive`` in
    the first Colab Drive mount the mount table lists that has one (``drive.mount`` takes any
    folder), else :data:`COLAB_DRIVE_ROOT` when it exists; None when Drive is not mounted."""
    root = os.environ.get(DRIVE_ROOT_ENV)
    if root:
        return root if os.path.isdir(root) else None
    for point in drive_mounts():
        for name in _MY_DRIVE:
            if os.path.isdir(os.path.join(point, name)):
                return os.path.join(point, name)
    return COLAB_DRIVE_ROOT if os.path.isdir(COLAB_DRIVE_ROOT) else None


def _drive_path(rest: str) -> str | None:
    """The local path of ``drive://rest`` on a mounted Drive, or None when not mounted."""
    root = _drive_root()
    if root is not None:
        return os.path.join(root, rest.lstrip("/"))
    if os.path.isdir("/content") and not os.environ.get(DRIVE_ROOT_ENV):
        # On Colab but the Drive is not mounted: the gdrive backend would ask for OAuth
        # in a notebook that already has a better way.
        raise StorageError(
            "drive:// needs Google Drive mounted in this Colab session; run "
            "`from google.colab import drive; drive.mount('/content/drive')` in a cell first"
        )
    return None


_LOCAL_FILES = LocalFiles()


def resolve(url: str, *, lazy: bool = False) -> Location:
    """Resolve ``url`` to a :class:`Location`, importing its backend. ``lazy``: a local path's
    file system is imported only once a call needs it, for callers that do their local work
    with ``os`` calls (:class:`~tlaunch.storage.localfs.LocalFiles`)."""
    local_files = _LOCAL_FILES if lazy else _LOCAL_FILES.load()
    if not url:
        raise StorageError(
            "empty storage URL; pass a path, gs://, s3://, drive:// or memory:// URL"
        )
    if url.startswith("drive://"):
        mounted = _drive_path(url[len("drive://") :])
        if mounted is None:
            import fsspec

            _import_backend("gdrive")
            fs = fsspec.filesystem("gdrive")
            return Location(fs, url[len("drive://") :].strip("/"), url, local=False)
        return Location(local_files, mounted, url, local=is_local(mounted))
    if is_local(url):
        rest = url[len("file://") :] if url.startswith("file://") else ""
        return Location(local_files, os.path.abspath(rest or url), url, local=True)
    import fsspec

    protocol = url.partition("://")[0]
    # Options first: they set gcsfs's environment switch, which gcsfs reads once, at import.
    options = _storage_options(protocol)
    _import_backend(protocol)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ValueError as e:
        raise StorageError(f"unsupported storage URL {redact(url)!r}: {e}") from None
    # memory:// paths are rooted at "/": keep them so, whatever the fsspec version strips.
    return Location(fs, path.rstrip("/") or path, url, local=False)


# -- faults: transient errors are retried, the rest become one-line StorageErrors ------------

# Connection-level failures a retry can cure; disk full, permissions and missing files cannot.
_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
     errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH}
)  # fmt: skip
# Rate limiting and server-side hiccups, as GCS and S3 document them.
_TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})

# errno -> (what happened, what to do), for the faults a user can fix.
_FIXABLE_ERRNOS = {
    errno.ENOSPC: ("disk full", "free space or point --checkpoint-dir at a larger disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EACCES: ("permission denied", "give this user write access (or fix the bucket's IAM)"),
    errno.EPERM: (
        "operation not permitted",
        "give this user write access (or fix the bucket's IAM)",
    ),
    errno.EROFS: ("read-only file system", "point --checkpoint-dir at a writable place"),
}


def _causes(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an fsspec backend attached to ``exc`` (gcsfs ``code``, aiohttp ``status``)."""
    for attr in ("code", "status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: timeouts, dropped connections, HTTP 408/429/5xx."""
    aiohttp = sys.modules.get("aiohttp")
    # asyncio's TimeoutError is the builtin from 3.11 on, its own class in 3.10; none can be
    # raised where asyncio was never imported (and importing it costs a local launch 0.03 s).
    asyncio = sys.modules.get("asyncio")
    timeouts = (TimeoutError,) if asyncio is None else (TimeoutError, asyncio.TimeoutError)
    for e in _causes(exc):
        if isinstance(e, (ConnectionError, *timeouts)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if _http_status(e) in _TRANSIENT_HTTP:
            return True
        if aiohttp is not None and isinstance(e, aiohttp.ClientConnectionError):
            return True
    return False


def one_line(exc: BaseException, limit: int = 240) -> str:
    """``exc`` as a single redacted line: backends put newlines and whole responses in messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text if len(text) <= limit else text[: limit - 1] + "…")


def storage_error(exc: BaseException, action: str, where: str) -> StorageError:
    """A one-line :class:`StorageError` for ``exc`` raised while ``action`` at ``where``."""
    where = redact(where)
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in _FIXABLE_ERRNOS:
            what, fix = _FIXABLE_ERRNOS[e.errno]
            return StorageError(f"{what} while {action} {where}; {fix}")
        if isinstance(e, PermissionError) or _http_status(e) in (401, 403):
            what, fix = _FIXABLE_ERRNOS[errno.EACCES]
            return StorageError(f"{what} while {action} {where}; {fix}")
    return StorageError(f"{action} {where} failed: {one_line(exc)}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for transient storage errors, bounded in attempts and in time.

    gcsfs and s3fs already retry each request themselves (gcsfs 6 tries over ~33 s; s3fs and
    botocore a few seconds), so an error that reaches us has been retried once already, and
    attempts alone would multiply the two: on a dead endpoint 5 x 33 s was 2 min 55 s. So the
    policy bounds the whole operation in time too: no attempt starts, and no backoff sleep
    reaches, past ``deadline`` seconds after the first attempt began. Backends that fail fast
    (a local disk, memory://, the Drive mount) get every attempt within it; behind gcsfs one
    attempt fills it. An attempt in progress is never cut short -- a 5 GB upload may rightly
    take longer than any deadline -- the bound is on starting more.

    Delays: base, 2*base, ... capped at ``max_delay``, with jitter so ranks never retry in
    lockstep. ``sleep`` and ``clock`` are there for tests.
    """

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 8.0
    #: Seconds after the first attempt past which none starts (None: attempts alone bound).
    deadline: float | None = 30.0
    sleep: Any = time.sleep
    clock: Any = time.monotonic

    def call(self, fn: Any, *args: Any, action: str, where: str, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried while transient; other errors become StorageError."""
        started = self.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except (StorageError, FileNotFoundError):
                raise  # callers decide what a missing file means
            except Exception as e:  # backends raise anything from OSError to their own HttpError
                if not is_transient(e):
                    raise storage_error(e, action, where) from e
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                delay *= random.uniform(0.8, 1.2)
                elapsed = self.clock() - started
                if attempt >= self.attempts or (
                    self.deadline is not None and elapsed + delay > self.deadline
                ):
                    raise StorageUnavailable(
                        f"{action} {redact(where)} still failing after {attempt} "
                        f"attempt{'s' if attempt > 1 else ''} in "
                        f"{elapsed:.0f} s ({one_line(e)}); check the network and the service's "
                        "status, then re-run"
                    ) from e
                self.sleep(delay)
