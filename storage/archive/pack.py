"""Packing a dataset folder into an archive at a URL, uploading only what the store lacks.

::

    from tlaunch.storage import pack

    pack("data/coco", "gs://bucket/data/coco.tlar")          # zstd tar shards + MANIFEST.json

``pack`` is content-addressed: shards are named by what they hold, so packing an unchanged
folder again compresses and uploads nothing, and a changed folder uploads only the shards
its changes touch.

A shard is named by a hash of its files' contents. A shard that may already be in the
store (the previous manifest has a shard of the same paths, sizes and modes) is hashed
first and compressed only if its content changed: packing an unchanged folder reads it
once and writes nothing. Any other shard is hashed while it is compressed, in one pass,
when the store lets it be named afterwards (a rename, on local disks and the Drive mount).
Object stores need the name before the upload starts, so there the hash pass comes first
and the second read is served by the page cache (a shard is about --shard-size, 1 GB
by default).

The folder is listed and planned by :mod:`tlaunch.storage.archive.sources`, each shard
compressed by :mod:`tlaunch.storage.archive.compress`; what is written locally goes through
:class:`tlaunch.storage.localfs.AtomicFile`, so a crash never leaves a truncated shard or
manifest under its real name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Any

from tlaunch.storage.archive import compress, sources
from tlaunch.storage.archive.fetch import ManifestMissing, one_line, read_manifest_at
from tlaunch.storage.archive.format import (
    DEFAULT_LEVEL,
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    SHARDS_DIR,
    ArchiveError,
    FileEntry,
    Manifest,
    ShardEntry,
    check_options,
    content_id,
    default_threads,
    shard_key,
)
from tlaunch.storage.localfs import AtomicFile, write_atomic
from tlaunch.storage.store import Location, StorageError, redact, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackReport:
    """What :func:`pack` did."""

    url: str
    id: str
    files: int
    total_size: int
    shards: int
    shards_written: int
    bytes_written: int  # compressed bytes uploaded (manifest not counted)
    manifest_written: bool  # False: the store already held exactly this archive

    @property
    def unchanged(self) -> bool:
        return not self.shards_written and not self.manifest_written


def pack(
    src: str,
    url: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
    progress: bool = True,
) -> PackReport:
    """Pack the folder ``src`` into the archive at ``url``, uploading only what is new."""
    check_options(shard_size, level, threads)
    loc = resolve(url)
    _check_destination(src, loc)
    dirs, listed = sources.scan(src)
    previous = _previous_manifest(loc)
    job = _PackJob(loc, level, threads or default_threads(), previous)
    files: list[FileEntry] = []
    shards: list[ShardEntry] = []
    with _progress_bar(sum(s.size for s in listed), "pack", progress) as bar:
        plan = sources.plan_shards(listed, shard_size)
        for n, part in enumerate(plan, 1):
            bar.set_postfix_str(f"shard {n}/{len(plan)}", refresh=False)
            group = sources.unpack_order(listed[part])
            entries, shard = job.pack_shard(group, len(files), bar.update)
            files.extend(entries)
            shards.append(shard)
    manifest = Manifest(content_id(dirs, files), level, tuple(dirs), tuple(files), tuple(shards))
    changed = previous is None or previous.to_json() != manifest.to_json()
    if changed:
        _write_manifest(loc, manifest)
        _delete_unreferenced(loc, previous, manifest)
    return PackReport(redact(url), manifest.id, len(files), manifest.total_size, len(shards),
                      job.written, job.bytes_written, changed)  # fmt: skip


class _PackJob:
    """Per-shard decisions of one :func:`pack`: reuse, or compress (in one pass or two)."""

    def __init__(self, loc: Location, level: int, threads: int, previous: Manifest | None) -> None:
        self.loc, self.level, self.threads = loc, level, threads
        self.reusable = _reusable_shards(loc, previous)
        self.local = loc.local
        # (path, size, mode) of each reusable shard's files: a shard planned with the same
        # files is hashed first, to find out whether it can be skipped.
        self.layouts = (
            {_layout(previous.shard_files(s)) for s in self.reusable.values()}
            if previous
            else set()
        )
        self.written = self.bytes_written = 0

    def pack_shard(
        self, group: list[sources.Source], first: int, on_bytes: Any
    ) -> tuple[list[FileEntry], ShardEntry]:
        if _layout(group) in self.layouts or not self.local:
            # Hash first: to skip an unchanged shard, or because an object store needs the
            # object's name (the key) before its upload starts.
            digests = sources.hash_files(group, self.threads)
            entries = [FileEntry(s.path, s.size, s.mode, d)
                       for s, d in zip(group, digests, strict=True)]  # fmt: skip
            key = shard_key(self.level, entries)
            if key in self.reusable:
                on_bytes(sum(s.size for s in group))
                return entries, dataclasses.replace(
                    self.reusable[key], first=first, count=len(group)
                )
            return self._write(group, first, on_bytes, digests, key)
        # A local disk renames for free: hash while compressing, name the file afterwards.
        return self._write(group, first, on_bytes)

    def _write(
        self,
        group: list[sources.Source],
        first: int,
        on_bytes: Any,
        digests: list[str] | None = None,
        key: str | None = None,
    ) -> tuple[list[FileEntry], ShardEntry]:
        where = redact(self.loc.url)
        try:
            if self.local:
                os.makedirs(self.loc.join(SHARDS_DIR), exist_ok=True)
                sink: Any = AtomicFile(self._path(key or "pending"))
            else:
                sink = StoreSink(self.loc.fs, self._path(key))
        except Exception as e:
            raise StorageError(f"cannot write to {where}: {one_line(e)}") from e
        try:
            entries, sha, size, tar_size, frames = compress.write_shard(
                group, self.level, self.threads, sink, on_bytes, digests
            )
            key = key or shard_key(self.level, entries)
            sink.commit(self._path(key))
        except BaseException as e:
            sink.abort()
            if isinstance(e, (StorageError, KeyboardInterrupt)) or not isinstance(e, Exception):
                raise
            raise StorageError(f"writing {where} failed: {one_line(e)}") from e
        self.written += 1
        self.bytes_written += size
        return entries, ShardEntry(key, sha, size, tar_size, first, len(entries), frames)

    def _path(self, key: str | None) -> str:
        return self.loc.join(SHARDS_DIR, f"{key}{SHARD_SUFFIX}")


def _layout(files: Any) -> tuple:
    return tuple((f.path, f.size, f.mode) for f in files)


def _progress_bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not progress, dynamic_ncols=True)  # fmt: skip


def _check_destination(src: str, loc: Location) -> None:
    if loc.local:
        root = os.path.realpath(src)
        dest = os.path.realpath(loc.path)
        if dest == root or dest.startswith(root + os.sep):
            raise ArchiveError(
                f"{loc.url} is inside the folder being packed; write the archive somewhere else"
            )
    try:
        names = {posixpath.basename(p.rstrip("/")) for p in loc.fs.ls(loc.path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return
    except Exception as e:
        raise StorageError(f"cannot list {redact(loc.url)}: {one_line(e)}") from e
    if names - {MANIFEST_NAME, SHARDS_DIR} and MANIFEST_NAME not in names:
        raise ArchiveError(
            f"{redact(loc.url)} already holds other files; pack into a new location "
            "or into an existing tlaunch archive"
        )


def _previous_manifest(loc: Location) -> Manifest | None:
    try:
        return read_manifest_at(loc)
    except ManifestMissing:
        return None
    except ArchiveError as e:  # unreadable: pack over it, but say so
        log.warning("tlaunch: ignoring the existing manifest at %s: %s", redact(loc.url), e)
        return None


def _reusable_shards(loc: Location, previous: Manifest | None) -> dict[str, ShardEntry]:
    """Shards the previous manifest lists that are still in the store, whole."""
    if previous is None:
        return {}
    shards_dir = loc.join(SHARDS_DIR)
    loc.fs.invalidate_cache(shards_dir)  # gcsfs caches listings
    try:
        listing = loc.fs.ls(shards_dir, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as e:
        raise StorageError(f"cannot list {redact(loc.url)}/{SHARDS_DIR}: {one_line(e)}") from e
    sizes = {posixpath.basename(i["name"].rstrip("/")): i.get("size") for i in listing}
    return {s.key: s for s in previous.shards if sizes.get(s.name) == s.size}


def _write_manifest(loc: Location, manifest: Manifest) -> None:
    path = loc.join(MANIFEST_NAME)
    data = manifest.to_json()
    try:
        if loc.local:
            # Written last and renamed into place: its presence is what makes the archive exist.
            os.makedirs(loc.path, exist_ok=True)
            write_atomic(path, data, sync_dir=True)
        else:
            loc.fs.pipe_file(path, data)  # one object PUT: it appears whole or not at all
    except Exception as e:
        raise StorageError(
            f"writing {redact(loc.url)}/{MANIFEST_NAME} failed: {one_line(e)}"
        ) from e


def _delete_unreferenced(loc: Location, previous: Manifest | None, manifest: Manifest) -> None:
    # Only shards the previous manifest named: never files this pack did not put there.
    # A fetch that read the old manifest just before may now miss a shard; it says so
    # and a rerun gets the new version.
    if previous is None:
        return
    keep = {s.key for s in manifest.shards}
    for shard in previous.shards:
        if shard.key not in keep:
            try:
                loc.fs.rm_file(loc.join(SHARDS_DIR, shard.name))
            except FileNotFoundError:
                pass
            except Exception as e:  # garbage left behind is not worth failing the pack
                log.warning("tlaunch: could not delete an old shard: %s", one_line(e))


class StoreSink:
    """Object stores: stream into ``fs.open(path, "wb")`` from a helper thread.

    The object appears only when its upload completes (GCS, S3), so no temp name is needed
    -- and a rename there is a copy. The helper thread lets compression run while the
    previous chunk is on the network.
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.existed = fs.exists(path)  # see abort()
        self.file = fs.open(path, "wb")
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tlaunch-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.file.write(data)
                except BaseException as e:  # handed to the compressing thread
                    self.error = e

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def commit(self, path: str | None = None) -> None:
        assert path in (None, self.path), "an object's name is fixed when its upload starts"
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.file.close()

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join()
        try:
            self.file.discard()  # cancels a resumable / multipart upload
            self.file.closed = True  # so garbage collection does not commit a partial object
        except Exception:  # best effort: an unfinished object is never named by a manifest
            pass
        try:  # stores that show an object from its open on (memory://): remove it again
            if not self.existed and self.fs.exists(self.path):
                self.fs.rm_file(self.path)
        except Exception:
            pass
