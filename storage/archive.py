"""Data archives: pack a dataset folder to a URL once, stage it on every machine that trains.

::

    from tlaunch.storage.archive import pack, stage, info

    pack("data/coco", "gs://bucket/data/coco.tlar")          # zstd tar shards + MANIFEST.json
    path = stage("gs://bucket/data/coco.tlar")                # ~/.cache/tlaunch/data/<id>
    path = stage("gs://bucket/data/coco.tlar", "/content/coco")   # a link to that
    info("gs://bucket/data/coco.tlar").files

``pack`` is content-addressed: shards are named by what they hold, so packing an unchanged
folder again compresses and uploads nothing, and a changed folder uploads only the shards
its changes touch. ``stage`` downloads shards in parallel with ranged reads (an interrupted
download resumes where it stopped), verifies every shard's digest, unpacks into a temp
directory beside the cache entry and renames it into place; the next ``stage`` of the same
content on this machine returns at once. Unpacking refuses anything but the regular files
the manifest lists: see :mod:`tlaunch.storage.archive_unpack`.

The format is described in :mod:`tlaunch.storage.archive_format`, the cache in
:mod:`tlaunch.storage.archive_fetch`. Storage goes through :func:`tlaunch.storage.store.resolve`,
so every URL it knows works here: paths, ``gs://``, ``s3://``, ``drive://``, ``memory://``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import sys
from dataclasses import dataclass
from typing import Any

from tlaunch.storage import archive_fetch as _fetch
from tlaunch.storage import archive_pack as _pack
from tlaunch.storage.archive_format import (
    DEFAULT_LEVEL,
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    SHARDS_DIR,
    ArchiveError,
    FileEntry,
    Manifest,
    ShardEntry,
    content_id,
    shard_key,
    zstd,
)
from tlaunch.storage.store import Location, StorageError, redact, resolve

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_SHARD_SIZE",
    "ArchiveError",
    "ArchiveInfo",
    "Manifest",
    "PackReport",
    "info",
    "pack",
    "read_manifest",
    "stage",
]

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


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_options(shard_size: int, level: int, threads: int | None) -> None:
    """Raise ValueError (a usage error) for options no archive can be made with."""
    low, high = zstd.CompressionParameter.compression_level.bounds()
    if not low <= level <= high:
        raise ValueError(
            f"zstd level {level} is out of range; use {low}..{high} (default {DEFAULT_LEVEL})"
        )
    if shard_size < 10**6:
        raise ValueError(
            f"shard size {shard_size} bytes is too small; use at least 1MB (default 1GB)"
        )
    if threads is not None and not 1 <= threads <= 256:
        raise ValueError(f"--threads {threads} is out of range; use 1..256")


def read_manifest(url: str) -> Manifest:
    """The manifest of the archive at ``url``."""
    return _fetch.read_manifest(resolve(url))


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
    dirs, sources = _pack.scan(src)
    previous = _previous_manifest(loc)
    job = _PackJob(loc, level, threads or default_threads(), previous)
    files: list[FileEntry] = []
    shards: list[ShardEntry] = []
    with _progress_bar(sum(s.size for s in sources), "pack", progress) as bar:
        plan = _pack.plan_shards(sources, shard_size)
        for n, part in enumerate(plan, 1):
            bar.set_postfix_str(f"shard {n}/{len(plan)}", refresh=False)
            entries, shard = job.pack_shard(sources[part], len(files), bar.update)
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
        self.local = _fetch.is_local(loc.fs)
        # (path, size, mode) of each reusable shard's files: a shard planned with the same
        # files is hashed first, to find out whether it can be skipped.
        self.layouts = (
            {_layout(previous.shard_files(s)) for s in self.reusable.values()}
            if previous
            else set()
        )
        self.written = self.bytes_written = 0

    def pack_shard(
        self, group: list[_pack.Source], first: int, on_bytes: Any
    ) -> tuple[list[FileEntry], ShardEntry]:
        if _layout(group) in self.layouts or not self.local:
            # Hash first: to skip an unchanged shard, or because an object store needs the
            # object's name (the key) before its upload starts.
            digests = _pack.hash_files(group, self.threads)
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
        group: list[_pack.Source],
        first: int,
        on_bytes: Any,
        digests: list[str] | None = None,
        key: str | None = None,
    ) -> tuple[list[FileEntry], ShardEntry]:
        where = redact(self.loc.url)
        try:
            if self.local:
                os.makedirs(self.loc.join(SHARDS_DIR), exist_ok=True)
                sink: Any = _pack.LocalSink(self._path(key or "pending"))
            else:
                sink = _pack.StoreSink(self.loc.fs, self._path(key))
        except Exception as e:
            raise StorageError(f"cannot write to {where}: {_fetch.one_line(e)}") from e
        try:
            entries, sha, size, tar_size, frames = _pack.write_shard(
                group, self.level, self.threads, sink, on_bytes, digests
            )
            key = key or shard_key(self.level, entries)
            sink.commit(self._path(key))
        except BaseException as e:
            sink.abort()
            if isinstance(e, (StorageError, KeyboardInterrupt)) or not isinstance(e, Exception):
                raise
            raise StorageError(f"writing {where} failed: {_fetch.one_line(e)}") from e
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
    if _fetch.is_local(loc.fs):
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
        raise StorageError(f"cannot list {redact(loc.url)}: {_fetch.one_line(e)}") from e
    if names - {MANIFEST_NAME, SHARDS_DIR} and MANIFEST_NAME not in names:
        raise ArchiveError(
            f"{redact(loc.url)} already holds other files; pack into a new location "
            "or into an existing tlaunch archive"
        )


def _previous_manifest(loc: Location) -> Manifest | None:
    try:
        return _fetch.read_manifest(loc)
    except _fetch.ManifestMissing:
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
        raise StorageError(
            f"cannot list {redact(loc.url)}/{SHARDS_DIR}: {_fetch.one_line(e)}"
        ) from e
    sizes = {posixpath.basename(i["name"].rstrip("/")): i.get("size") for i in listing}
    return {s.key: s for s in previous.shards if sizes.get(s.name) == s.size}


def _write_manifest(loc: Location, manifest: Manifest) -> None:
    path = loc.join(MANIFEST_NAME)
    data = manifest.to_json()
    try:
        if _fetch.is_local(loc.fs):
            # Written last and renamed into place: its presence is what makes the archive exist.
            os.makedirs(loc.path, exist_ok=True)
            sink = _pack.LocalSink(path)
            sink.write(data)
            sink.commit()
        else:
            loc.fs.pipe_file(path, data)  # one object PUT: it appears whole or not at all
    except Exception as e:
        raise StorageError(
            f"writing {redact(loc.url)}/{MANIFEST_NAME} failed: {_fetch.one_line(e)}"
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
                log.warning("tlaunch: could not delete an old shard: %s", _fetch.one_line(e))


def stage(
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
    cache = _fetch.cache_root(cache_dir)
    os.makedirs(cache, exist_ok=True)
    loc = resolve(url)
    try:
        manifest = _fetch.read_manifest(loc)
    except _fetch.ManifestUnavailable as e:
        cached = _fetch.cached_copy(cache, url)
        if cached is None:
            raise
        log.warning(
            "tlaunch: warning: %s; using the copy this machine fetched before: %s", e, cached
        )
        return _fetch.link(dest, cached, cache) if dest else cached
    final = os.path.join(cache, manifest.id)
    if not os.path.isdir(final):
        with _fetch.locked(final + ".lock"):
            if not os.path.isdir(final):  # another process may have filled it while we waited
                _fetch.populate(loc, manifest, cache, threads or default_threads(), progress)
    _fetch.remember(cache, url, manifest.id)
    return _fetch.link(dest, final, cache) if dest else final


def info(url: str, *, cache_dir: str | None = None) -> ArchiveInfo:
    """Describe the archive at ``url`` and whether this machine has it unpacked."""
    m = read_manifest(url)
    cached = os.path.join(_fetch.cache_root(cache_dir), m.id)
    return ArchiveInfo(redact(url), m.id, len(m.files), m.total_size, len(m.shards),
                       m.compressed_size, m.level, cached if os.path.isdir(cached) else None)  # fmt: skip
