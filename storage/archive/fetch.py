"""Fetching an archive onto this machine: a cache keyed by archive id, filled once, then reused.

::

    from tlaunch.storage import fetch, info

    path = fetch("gs://bucket/data/coco.tlar")                  # ~/.cache/tlaunch/data/<id>
    path = fetch("gs://bucket/data/coco.tlar", "/content/coco")  # a link to that
    info("gs://bucket/data/coco.tlar").files

``fetch`` downloads shards in parallel with ranged reads, several in flight per shard, each
retried while the store's error is transient (an interrupted download resumes where it
stopped); unpacks each frame into a temp directory beside the cache entry as soon as its bytes
are here (:mod:`tlaunch.storage.archive.stream`), verifying every file's digest; checks each
shard's digest once it is whole; and commits the directory into place. The next ``fetch`` of
the same content on this machine returns at once. Unpacking refuses anything but the regular files the manifest lists: see
:mod:`tlaunch.storage.archive.unpack`.

The cache, and what makes an entry in it count, is :mod:`tlaunch.storage.archive.cache`.
Because every file is checked against the manifest's BLAKE3 digest -- and the id is a digest
of those -- an archive whose shards do not hold what its manifest lists, even one that claims
another archive's id, cannot fill the cache.

Archives on a local path (or the Drive mount) are unpacked straight from their shard
files; only remote ones are downloaded first.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tlaunch.storage.archive.cache import (
    CACHE_DIR_ENV,  # noqa: F401 -- also read from here (tests/launch/test_contract.py)
    cache_root,
    cached_copy,
    commit,
    entry_problem,
    link,
    remember,
    reuse_or_fill,
)
from tlaunch.storage.archive.format import (
    DEFAULT_LEVEL,
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    SHARDS_DIR,
    ArchiveError,
    FileEntry,
    Manifest,
    ShardEntry,
    check_options,
    default_threads,
    parse_manifest,
)
from tlaunch.storage.archive.stream import ShardStream
from tlaunch.storage.archive.unpack import Aborted, ShardCorrupt, unpack_shard
from tlaunch.storage.store import (
    Location,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    redact,
    resolve,
)

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK = 8 << 20  # one ranged read; an interruption loses at most the reads in flight
_DOWNLOADERS = 8  # parallel shard downloads: enough to fill a VM's link from GCS or S3


class ManifestUnavailable(StorageError):
    """The store did not answer with a manifest (missing, unreachable, no permission)."""


class ManifestMissing(ManifestUnavailable):
    """The store answered: there is no archive at that URL."""


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    """What :func:`info` (``tlaunch data ls``) reports about an archive."""

    url: str
    id: str
    files: int
    total_size: int
    shards: int
    compressed_size: int
    level: int
    cached: str | None  # the unpacked copy on this machine, if any

    @property
    def ratio(self) -> float:
        return self.total_size / self.compressed_size if self.compressed_size else 1.0


def fetch(
    url: str,
    dest: str | None = None,
    *,
    cache_dir: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> str:
    """Make the archive at ``url`` available locally; return the directory that holds it.

    The data is unpacked once per machine into ``cache_dir/<archive id>`` (default
    ``$TLAUNCH_CACHE_DIR`` or ``~/.cache/tlaunch/data``). With ``dest``, ``dest`` becomes a
    symlink to it and is returned. Concurrent calls for the same archive are safe: one
    fills the cache under a file lock, the others wait and reuse it. When the store cannot
    be read but this machine already holds the URL's last-fetched data, that is used with a
    warning, so a restart on the same machine does not depend on the network.
    """
    check_options(DEFAULT_SHARD_SIZE, DEFAULT_LEVEL, threads)
    cache = cache_root(cache_dir)
    os.makedirs(cache, exist_ok=True)
    loc = resolve(url)
    try:
        manifest = read_manifest_at(loc)
    except ManifestUnavailable as e:
        cached = cached_copy(cache, url)
        if cached is None:
            raise
        log.warning(
            "tlaunch: warning: %s; using the copy this machine fetched before: %s", e, cached
        )
        return link(dest, cached, cache) if dest else cached
    final = reuse_or_fill(
        cache, manifest.id, url,
        lambda: _fetch_into_cache(loc, manifest, cache, threads or default_threads(), progress),
    )  # fmt: skip
    remember(cache, url, manifest.id)
    return link(dest, final, cache) if dest else final


def info(url: str, *, cache_dir: str | None = None) -> ArchiveInfo:
    """Describe the archive at ``url`` and whether this machine has it unpacked."""
    m = read_manifest(url)
    cache = cache_root(cache_dir)
    cached = os.path.join(cache, m.id) if entry_problem(cache, m.id) is None else None
    return ArchiveInfo(redact(url), m.id, len(m.files), m.total_size, len(m.shards),
                       m.compressed_size, m.level, cached)  # fmt: skip


def read_manifest(url: str) -> Manifest:
    """The manifest of the archive at ``url``."""
    return read_manifest_at(resolve(url))


def one_line(e: BaseException) -> str:
    return redact(" ".join(f"{type(e).__name__}: {e}".split()))


def read_manifest_at(loc: Location) -> Manifest:
    """The manifest at ``loc``; :class:`ManifestUnavailable` when the store has none."""
    where = redact(loc.url)
    try:
        data = RetryPolicy().call(
            loc.fs.cat_file, loc.join(MANIFEST_NAME), action="reading", where=loc.url
        )
    except FileNotFoundError:
        raise ManifestMissing(
            f"no tlaunch data archive at {where} (no {MANIFEST_NAME}); "
            f"create one with `tlaunch data pack DIR {where}`"
        ) from None
    except StorageError:
        raise
    except Exception as e:  # backends raise their own types (HttpError, ClientError, ...)
        raise ManifestUnavailable(f"cannot read {where}/{MANIFEST_NAME}: {one_line(e)}") from e
    return parse_manifest(data, where)


def read_range(fs: Any, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a remote file (the one seam tests interrupt)."""
    return fs.cat_file(path, start=start, end=end)


def _fetch_into_cache(
    loc: Location, manifest: Manifest, cache: str, threads: int, progress: bool
) -> str:
    """Download, verify and unpack ``manifest`` into ``cache/<id>``; call it under the lock."""
    tmp = os.path.join(cache, f".{manifest.id}.unpack-{os.getpid()}")
    downloads = os.path.join(cache, f".{manifest.id}.shards")
    os.makedirs(tmp)
    try:
        for d in manifest.dirs:
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        _FetchJob(loc, manifest, tmp, downloads, threads, progress).run()
        # Before the sync: a download nobody needs any more is not worth writing to disk.
        shutil.rmtree(downloads, ignore_errors=True)
        return commit(tmp, cache, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True, slots=True)
class _Download:
    """One remote shard on its way: ``got`` gives (its local copy, whether it was verified
    here); with ``stream``, its frames may unpack while it downloads."""

    got: Future
    stream: ShardStream | None


class _FetchJob:
    """One fill of the cache: parallel downloads feeding parallel unpacks, two progress bars.

    A shard downloaded from its first byte is unpacked while it downloads
    (:mod:`tlaunch.storage.archive.stream`): each frame as soon as it is here, and its digest
    checked once its last frame is out. A shard resumed from an earlier run's ``.part`` file is
    unpacked once it is whole and verified, because what that run kept may be what is wrong;
    one already whole is checked while it unpacks.
    """

    def __init__(
        self, loc: Location, manifest: Manifest, tmp: str, downloads: str, threads: int,
        progress: bool,
    ) -> None:  # fmt: skip
        self.loc, self.manifest, self.tmp, self.downloads = loc, manifest, tmp, downloads
        self.threads = threads
        self.local = loc.local
        self.where = redact(loc.url)
        self.abort = threading.Event()
        self.lock = threading.Lock()
        self.bars = self._bars(progress)
        self.streams: list[ShardStream] = []

    def _bars(self, progress: bool) -> list[Any]:
        from tqdm import tqdm

        opts = dict(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    disable=not progress, dynamic_ncols=True)  # fmt: skip
        bars = []
        if not self.local:
            bars.append(tqdm(total=self.manifest.compressed_size, desc="download", **opts))
        bars.append(tqdm(total=self.manifest.total_size, desc="unpack", position=len(bars), **opts))
        return bars

    def _tick(self, bar: Any) -> Callable[[int], None]:
        def update(n: int) -> None:
            if self.abort.is_set():
                raise Aborted
            with self.lock:
                bar.update(n)

        return update

    def run(self) -> None:
        shards = self.manifest.shards
        # Frames of every shard share one pool; a thread per shard (up to _DOWNLOADERS)
        # hands its frames to the pool as they arrive, and ranged reads share another.
        frames = ThreadPoolExecutor(max(1, self.threads), thread_name_prefix="tlaunch-unpack")
        shard_threads = ThreadPoolExecutor(max(1, min(len(shards), _DOWNLOADERS)))
        downloaders = ThreadPoolExecutor(max(1, min(len(shards), _DOWNLOADERS)))
        readers = ThreadPoolExecutor(_DOWNLOADERS, thread_name_prefix="tlaunch-read")
        futures: list[Future] = []
        try:
            if not self.local:
                os.makedirs(self.downloads, exist_ok=True)
            for i, shard in enumerate(shards):
                got = None if self.local else self._start(shard, downloaders, readers)
                futures.append(shard_threads.submit(self._unpack, i, shard, got, frames))
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                # The first to end may be a shard the failure stopped (Aborted) while the
                # failing one still hashes: stop the rest and wait, to report the failure.
                self._stop()
                for f in futures:
                    f.cancel()
                wait(futures)
                errors = [e for f in futures if not f.cancelled() and (e := f.exception())]
                raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])
        except BaseException:
            self._stop()
            raise
        finally:
            downloaders.shutdown(wait=True, cancel_futures=True)
            shard_threads.shutdown(wait=True, cancel_futures=True)
            readers.shutdown(wait=True, cancel_futures=True)
            frames.shutdown(wait=True, cancel_futures=True)
            for bar in self.bars:
                bar.close()

    def _stop(self) -> None:
        self.abort.set()
        for stream in self.streams:
            stream.stop()

    def _start(
        self, shard: ShardEntry, downloaders: ThreadPoolExecutor, readers: ThreadPoolExecutor
    ) -> _Download:
        final = os.path.join(self.downloads, shard.name)
        if os.path.exists(final) and os.path.getsize(final) == shard.size:
            # complete from an earlier run; re-verified while unpacking
            return _Download(downloaders.submit(self._whole, shard, final), None)
        stream = self._stream(shard, final, readers)
        # Streamed: its unpacker checks the digest, after its last frame, so that nothing
        # renames or deletes the file while a frame may still read it.
        streamed = not stream.resumed
        got = downloaders.submit(self._download, shard, stream, final, not streamed)
        return _Download(got, stream if streamed else None)

    def _stream(self, shard: ShardEntry, final: str, readers: ThreadPoolExecutor) -> ShardStream:
        part = final + ".part"
        stream = ShardStream(self._reader(shard), shard.size, part,
                             _resume_size(part, shard.size), DOWNLOAD_CHUNK, readers)  # fmt: skip
        self.streams.append(stream)
        return stream

    def _whole(self, shard: ShardEntry, final: str) -> tuple[str, bool]:
        self._tick(self.bars[0])(shard.size)
        return final, False

    def _unpack(
        self, index: int, shard: ShardEntry, got: _Download | None, frames: ThreadPoolExecutor
    ) -> None:
        where = f"{self.where} (shard {index + 1}/{len(self.manifest.shards)})"
        files = self.manifest.shard_files(shard)
        tick = self._tick(self.bars[-1])
        if got is not None and got.stream is not None:
            return self._unpack_streamed(shard, got, files, where, tick, frames)
        # Unpacks start in shard order as downloads finish, overlapping the two.
        path, verified = got.got.result() if got is not None else (self._local_path(shard), False)
        try:
            unpack_shard(path, shard, files, self.tmp, where, tick, frames, self.abort,
                         verify=not verified)  # fmt: skip
        except FileNotFoundError:
            raise ArchiveError(
                f"{where}: shard {shard.name} is missing; pack the archive again"
            ) from None
        except ShardCorrupt as e:
            if not self.local:
                os.unlink(path)  # the next run downloads it again
                raise ShardCorrupt(
                    f"{e}: the local copy was damaged and is deleted; run the same command again"
                ) from None
            raise ShardCorrupt(f"{e}: the archive is damaged; pack it again") from None

    def _unpack_streamed(
        self, shard: ShardEntry, got: _Download, files: Sequence[FileEntry], where: str,
        tick: Callable[[int], None], frames: ThreadPoolExecutor,
    ) -> None:  # fmt: skip
        stream = got.stream
        assert stream is not None
        try:
            unpack_shard(stream.part, shard, files, self.tmp, where, tick, frames, self.abort,
                         verify=False, ready=stream.wait_for)  # fmt: skip
        except Aborted:
            got.got.result()  # raises what stopped the download, when that is what stopped us
            raise
        except ArchiveError as e:
            raise self._verdict(shard, got, e) from None
        got.got.result()
        # The shard's digest, now that every file is checked.
        self._verified(shard, stream, stream.part.removesuffix(".part"), lambda n: None)

    def _verdict(self, shard: ShardEntry, got: _Download, failure: ArchiveError) -> ArchiveError:
        """What to report when a streamed shard's files fail: :class:`ShardCorrupt` when its
        bytes are not the manifest's (as a download checked before unpacking would say),
        else ``failure``. Telling the two apart takes the rest of the shard, which the
        failure stopped: at most one shard more, on a path that ends in an error anyway."""
        stream = got.stream
        assert stream is not None
        final = stream.part.removesuffix(".part")
        try:
            try:
                got.got.result()
            except Aborted:
                stream.pump(lambda n: None)
            self._verified(shard, stream, final, lambda n: None)
        except ShardCorrupt as damaged:
            return damaged
        except StorageError:
            pass  # the download failed meanwhile: the files' failure is what is known
        return failure

    def _local_path(self, shard: ShardEntry) -> str:
        return self.loc.join(SHARDS_DIR, shard.name)

    def _reader(self, shard: ShardEntry) -> Callable[[int, int], bytes]:
        """``read(start, end)``: bytes of the shard, retried while the store's error is transient."""
        remote = self.loc.join(SHARDS_DIR, shard.name)
        fs = self.loc.fs

        def read(start: int, end: int) -> bytes:
            try:
                data = RetryPolicy().call(
                    lambda: read_range(fs, remote, start, end), action="downloading",
                    where=self.loc.url,
                )  # fmt: skip
            except FileNotFoundError:
                raise ArchiveError(
                    f"{self.where}: shard {shard.name} is missing; pack the archive again"
                ) from None
            except StorageError as e:
                if e.__cause__ is None or isinstance(e, ArchiveError):
                    raise
                # A download breaks off for network reasons: the .part file keeps what
                # arrived, and a rerun resumes; "unavailable" tells the launcher so.
                kind = StorageUnavailable if isinstance(e, StorageUnavailable) else StorageError
                raise kind(
                    f"downloading {self.where} failed ({one_line(e.__cause__)}); "
                    "run the same command again to resume"
                ) from e.__cause__
            if len(data) != end - start:
                raise ArchiveError(
                    f"{self.where}: shard {shard.name} is shorter than its manifest says; "
                    "the archive is damaged; pack it again"
                )
            return data

        return read

    def _download(
        self, shard: ShardEntry, stream: ShardStream, final: str, verify: bool = True
    ) -> tuple[str, bool]:
        """(the local copy, whether verified): downloaded, hashed as the bytes arrive, and with
        ``verify`` checked against the shard's digest and renamed to ``final``."""
        tick = self._tick(self.bars[0])
        try:
            tick(stream.have)
            stream.pump(tick)
        except BaseException:
            stream.stop()  # its unpacker, waiting for bytes, learns it here
            raise
        return self._verified(shard, stream, final, tick) if verify else (stream.part, False)

    def _verified(
        self, shard: ShardEntry, stream: ShardStream, final: str, tick: Callable[[int], None]
    ) -> tuple[str, bool]:
        if stream.hexdigest() == shard.digest:
            os.replace(stream.part, final)
            return final, True
        os.unlink(stream.part)
        tick(-shard.size)
        if stream.resumed:  # the kept part may be what was damaged: once more from the start
            return self._download(shard, self._stream(shard, final, stream.readers), final)
        raise ShardCorrupt(
            f"{self.where}: shard {shard.name} does not match its checksum as downloaded; "
            "the archive is damaged; pack it again"
        )


def _resume_size(part: str, size: int) -> int:
    try:
        have = os.path.getsize(part)
    except FileNotFoundError:
        return 0
    if have > size:
        os.unlink(part)
        return 0
    return have
