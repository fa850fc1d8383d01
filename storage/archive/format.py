"""The data-archive format: manifest, content ids, tar headers, the zstd binding, options.

An archive at ``URL`` is::

    URL/MANIFEST.json                 written last; only its presence makes the archive exist
    URL/shards/<key>.tar.zst          a plain tar stream of regular files, as zstd frames

``MANIFEST.json`` lists every directory, every file (path, size, mode, BLAKE3 digest) in
the order the shards hold them, and every shard (which contiguous run of files it holds, the
digest and size of its compressed bytes, and its frame table). Shards split the path-sorted
file list; inside one, small files come first (see
:func:`tlaunch.storage.archive.sources.unpack_order`). A shard's name is its *key*: a digest
of the level and of its files' (path, size, mode, digest), so packing unchanged files again
finds the shard already there and neither compresses nor uploads it. The archive *id* hashes
only the directories and files, in path order -- the content, not how it was compressed or
ordered -- and keys the unpacked copy in the local cache, so a re-pack at another level or
shard size still hits the cache.

Modes are stored as tarfile's ``data`` filter will restore them (no setuid/setgid/sticky,
no group/other write, owner always read+write), so the manifest says what lands on disk.
Mtimes are not stored (always 0; unpacked files get the time of unpacking): they would make
identical content look different. A shard is a plain ``.tar.zst``: ``zstd -dc S | tar x``
reads it without tlaunch.

Digests
-------
Every digest is BLAKE3-256, in hex (``b3sum`` prints the same for a file). Hashing is the
one thing tlaunch does that ``tar | zstd`` does not: every file once when packing, every
shard once when packing and once when fetching. With SHA-256, the fastest hash in hashlib
(1.7 GB/s here, with the CPU's SHA instructions), that was a fifth of pack's CPU time (0.33
of 1.66 s on the benchmark's folder) and a seventh of a fetch's; BLAKE3 (6.7 GB/s here with
AVX-512, ~3 GB/s with AVX2) is as collision-resistant, and the ``blake3`` package releases
the GIL. Format 1 used SHA-256; its archives are refused with a message saying to pack them
again.

Frames
------
A shard's tar stream is cut into independent zstd frames of up to ``FRAME_SIZE``
uncompressed bytes, smaller at both ends of a shard (``compress.frame_cap``), like
``pzstd``'s output: concatenated frames are one valid zstd stream to every other tool, and
tlaunch compresses and unpacks them in parallel. Cuts fall between members, and inside the
data of a file larger than a frame at multiples of ``BLOCK``, never inside a header. The
frame table records each frame's compressed size and where it starts: ``[size, file,
offset]``, the shard-local index of a file and a byte offset into its data (0: at its header).
A shard without a table is read as one frame.

Bounds
------
Whatever a shard or manifest claims, unpacking holds a few 256 KiB blocks per thread and
decompresses no more than the manifest's files account for:

* a frame (a shard without a table: the whole shard) may expand to tlaunch's own tar layout
  of the files the table places in it -- headers, data, padding, and the tar end in the last
  -- plus ``MEMBER_SLACK`` per member and ``FRAME_SLACK`` for another writer's headers
  (:func:`tlaunch.storage.archive.frames.frame_bound`); one byte more and it is refused, so
  a zstd bomb costs at most that much decompression;
* tarfile reads the headers of a member another writer made, and the file data never
  (:class:`tlaunch.storage.archive.frames.HeaderBudget`): at most ``MAX_HEADER`` bytes in
  ``MAX_HEADER_READS`` reads per member, checked before each read, so a GNU long name or a
  pax header that claims 8 GB, or a negative size, is refused after its one 512-byte block;
* manifest paths are at most ``MAX_PATH`` bytes and ``MAX_DEPTH`` directories deep, checked
  before any shard is read; ``pack`` refuses a folder holding longer ones.

zstd binding
------------
``backports.zstd`` (the PEP 784 ``compression.zstd`` API; on Python 3.14 the stdlib module
itself) rather than ``zstandard``. Both wrap the same libzstd (1.5.7 here) and release the
GIL, and on this project's 2-core machine they measured within noise of each other
(200 MB of mixed text/floats/random, level 3, best of 7 interleaved runs; backports vs
zstandard): one thread 303 vs 314 MB/s, one stream with 2 workers (``nb_workers=2`` vs
``threads=2``) 572 vs 594 MB/s, decompression 568 vs 593 MB/s. Speed does not decide it;
the API does: it is the stdlib's from 3.14, so the dependency disappears there, and it is
the one pyproject already declares. Parallelism is ours, one frame per thread, rather than
libzstd's ``nb_workers``: its jobs overlap their windows and sync at every frame end, and
it cannot decompress in parallel at all. What the PEP 784 API lacks is decompressing into a
caller's buffer; small output blocks recycled by malloc stand in for it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass

from blake3 import blake3

from tlaunch.storage.localfs import unsafe_path_reason
from tlaunch.storage.store import StorageError

try:  # Python 3.14+
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

__all__ = ["unsafe_path_reason", "zstd"]

FORMAT = "tlaunch-data/2"  # 1: SHA-256 digests
MANIFEST_NAME = "MANIFEST.json"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".tar.zst"
DEFAULT_LEVEL = 3  # zstd's own default: the fair point for its speed/ratio trade-off
DEFAULT_SHARD_SIZE = 1_000_000_000
BLOCK = 512
# Uncompressed bytes per zstd frame: the unit of parallel work on both sides. 16 MiB keeps
# eight cores busy on a 128 MiB shard and costs < 0.1% of ratio at level 3 (2 MiB window).
FRAME_SIZE = 16 << 20
_HEX = re.compile(r"[0-9a-f]*")
RECORD = 10240  # tar pads the end of an archive to a multiple of this
DIGEST = "blake3"  # the manifest's key for a file's or shard's digest

# What an archive may ask of the machine that unpacks it. A hostile shard chooses the sizes
# its tar headers claim and how far its zstd frames expand, and a hostile manifest its paths;
# these bounds hold whatever they say (see "Bounds" above).
MAX_PATH = 4096  # bytes in a file's path: Linux's PATH_MAX, the most one open() call takes
# Directories deep: far past any dataset's layout, and far below Python's recursion limit
# (1000), which os.makedirs and shutil.rmtree -- recursive, a frame per level -- run into.
MAX_DEPTH = 256
# Bytes of tar headers read for one member (its own, GNU long names, pax records): Go's
# archive/tar caps long names and pax headers at the same 1 MiB (CVE-2022-2879), and no
# tool writes more -- a path is at most MAX_PATH bytes.
MAX_HEADER = 1 << 20
# Header reads for one member (two per extended header, one for its own). Writers put at
# most two extended headers before a member's own (GNU: long link and long name; pax: global
# and extended); tarfile recurses once per extended header, and a few hundred chained ones
# reach Python's recursion limit.
MAX_HEADER_READS = 32
# What another writer's tar may add to tlaunch's layout (which the bound on a frame is
# computed from): per member, a pax header of times (GNU tar --format=posix: 2 blocks); per
# frame, one header up to MAX_HEADER or an end padded to a larger record than tar's 10 KiB.
MEMBER_SLACK = 2 * BLOCK
FRAME_SLACK = MAX_HEADER


class ArchiveError(StorageError):
    """An archive was refused or is damaged; the message names what and what to do."""


def default_threads() -> int:
    """The cores this process may run on: how many threads pack and fetch use by default."""
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


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative, "/"-separated, normalized
    size: int
    mode: int  # permission bits as the tarfile "data" filter restores them
    digest: str  # of its bytes (see ``hasher``)


@dataclass(frozen=True, slots=True)
class Frame:
    size: int  # compressed bytes
    file: int  # shard-local index of the file it starts in (== count: only the tar end)
    offset: int  # byte offset into that file's data; 0: the frame starts at its header


@dataclass(frozen=True, slots=True)
class ShardEntry:
    key: str  # digest of level + files: the shard's object name is f"{key}{SHARD_SUFFIX}"
    digest: str  # of the compressed bytes, checked on download and on unpack
    size: int  # compressed bytes
    tar_size: int  # uncompressed tar stream bytes
    first: int  # index of its first file in Manifest.files
    count: int
    frames: tuple[Frame, ...] = ()  # empty: read the whole shard as one frame

    @property
    def name(self) -> str:
        return self.key + SHARD_SUFFIX


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    level: int
    dirs: tuple[str, ...]
    files: tuple[FileEntry, ...]
    shards: tuple[ShardEntry, ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def compressed_size(self) -> int:
        return sum(s.size for s in self.shards)

    def shard_files(self, shard: ShardEntry) -> tuple[FileEntry, ...]:
        return self.files[shard.first : shard.first + shard.count]

    def to_json(self) -> bytes:
        """Indented, one file or shard per line.

        File rows are formatted directly (json's string encoder for the path; the rest are
        ints and hex digests): 6,000 ``json.dumps`` calls took 24 ms of a 1 s pack.
        """
        head = {"format": FORMAT, "id": self.id, "level": self.level, "dirs": list(self.dirs)}
        files = [
            f'{{"path": {_json_str(f.path)}, "size": {f.size:d}, "mode": {f.mode:d}, '
            f'"{DIGEST}": "{f.digest}"}}'
            for f in self.files
        ]
        shards = [
            json.dumps({"key": s.key, DIGEST: s.digest, "size": s.size, "tar_size": s.tar_size,
                        "first": s.first, "count": s.count,
                        "frames": [[f.size, f.file, f.offset] for f in s.frames]})
            for s in self.shards
        ]  # fmt: skip

        def rows(items: list[str]) -> str:
            return "[\n  " + ",\n  ".join(items) + "\n ]" if items else "[]"

        text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]  # reopen the object
        return f'{text},\n "files": {rows(files)},\n "shards": {rows(shards)}\n}}\n'.encode()


def _json_str(text: str) -> str:
    return json.encoder.encode_basestring(text)  # what json.dumps(ensure_ascii=False) uses


def data_mode(st_mode: int) -> int:
    """The permission bits tarfile's ``data`` filter leaves on an extracted regular file."""
    mode = stat.S_IMODE(st_mode) & 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def hasher(data: bytes | memoryview = b"") -> blake3:
    """A new digest of ``data``, for ``update()`` and ``hexdigest()``; single-threaded."""
    return blake3(data)


def _digest(doc: object) -> str:
    return hasher(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def _file_rows(files: tuple[FileEntry, ...] | list[FileEntry]) -> list[list]:
    return [[f.path, f.size, f.mode, f.digest] for f in files]


def content_id(
    dirs: tuple[str, ...] | list[str], files: tuple[FileEntry, ...] | list[FileEntry]
) -> str:
    """The archive id: a hash of what unpacks, independent of level, sharding and the order
    of the files in the shards (hashed in path order)."""
    return _digest({"dirs": list(dirs), "files": _file_rows(sorted(files, key=_path))})


def _path(f: FileEntry) -> str:
    return f.path


def shard_key(level: int, files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """A shard's name: everything that decides its bytes (format, level, files)."""
    return _digest({"format": FORMAT, "level": level, "files": _file_rows(files)})


def ustar_header(path: str, size: int, mode: int) -> bytes:
    """A tar header for a regular file, byte-identical to ``TarInfo.tobuf(USTAR_FORMAT)``.

    tarfile spends ~40 us building one header; this takes ~2 us, which is a tenth of a
    second per 6,000 small files. Names that do not fit ustar's 100 bytes (or are not
    ASCII), and sizes of 8 GiB or more, go through tarfile's PAX writer instead.
    """
    name = path.encode("utf-8")
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        import tarfile

        info = tarfile.TarInfo(path)
        info.size, info.mode, info.mtime, info.uname, info.gname = size, mode, 0, "", ""
        return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    head = b"%s%07o\x000000000\x000000000\x00%011o\x0000000000000\x00" % (
        name.ljust(100, b"\0"),
        mode,
        size,
    )
    tail = _USTAR_TAIL
    checksum = sum(head) + _USTAR_TAIL_SUM + 8 * 32
    return head + b"%06o\x00 " % checksum + tail


# typeflag "0", empty linkname, magic "ustar\0" + version "00", empty uname/gname/dev/prefix
_USTAR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
_USTAR_TAIL_SUM = sum(_USTAR_TAIL)


def header_size(path: str, size: int, mode: int) -> int:
    """``len(ustar_header(path, size, mode))``, without building the header when it is one block."""
    if size < 8**11 and len(path) <= 100 and path.isascii():
        return BLOCK
    return len(ustar_header(path, size, mode))


def path_limit_reason(path: str) -> str | None:
    """Why ``path`` may not name a file in an archive although it is safe -- not UTF-8, too
    long, too deep -- (a phrase after "it"), or None."""
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_PATH:
        return f"is {size:,} bytes long; tlaunch archives hold paths of at most {MAX_PATH} bytes"
    depth = path.count("/")
    if depth > MAX_DEPTH:
        return f"is {depth:,} directories deep; tlaunch archives hold at most {MAX_DEPTH}"
    return None


def shown(name: str, width: int = 80) -> str:
    """``repr(name)``, its middle cut out when long: a hostile name may be a megabyte."""
    if len(name) > width:
        name = f"{name[: width - 20]}…{name[-19:]}"
    return repr(name)


def tar_end(tar_size: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record, as tar itself ends an archive."""
    end = tar_size + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end % RECORD))


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse and check ``MANIFEST.json`` bytes; ``where`` names the archive in errors."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ArchiveError(
                f"{where} is not a {FORMAT} archive (format {doc.get('format')!r}); "
                "pack it again with this tlaunch or fetch it with the tlaunch that packed it"
            )
        files = tuple(
            FileEntry(str(f["path"]), int(f["size"]), int(f["mode"]), str(f[DIGEST]))
            for f in doc["files"]
        )
        shards = tuple(
            ShardEntry(str(s["key"]), str(s[DIGEST]), int(s["size"]), int(s["tar_size"]),
                       int(s["first"]), int(s["count"]),
                       tuple(Frame(int(a), int(b), int(c)) for a, b, c in s.get("frames", ())))
            for s in doc["shards"]
        )  # fmt: skip
        dirs = tuple(str(d) for d in doc["dirs"])
        manifest = Manifest(str(doc["id"]), int(doc["level"]), dirs, files, shards)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArchiveError(
            f"{where} has an unreadable manifest ({type(e).__name__}: {e}); pack it again"
        ) from None
    _check_manifest(manifest, where)
    return manifest


def _check_manifest(m: Manifest, where: str) -> None:
    for path in (*m.dirs, *(f.path for f in m.files)):
        reason = unsafe_path_reason(path) or path_limit_reason(path)
        if reason:
            raise ArchiveError(
                f"refusing {where}: its manifest lists {shown(path)}, which {reason}"
            )
    digests = [m.id, *(s.key for s in m.shards), *(s.digest for s in m.shards),
               *(f.digest for f in m.files)]  # fmt: skip
    if not all(len(d) == 64 for d in digests) or not _HEX.fullmatch("".join(digests)):
        # shard keys become file names here and in the download cache: never a path
        raise ArchiveError(
            f"refusing {where}: its manifest holds a malformed digest; pack it again"
        )
    if len({f.path for f in m.files}) != len(m.files):
        raise ArchiveError(f"refusing {where}: its manifest lists a file twice; pack it again")
    for f in m.files:
        if f.size < 0 or not 0 <= f.mode <= 0o7777 or data_mode(f.mode) != f.mode:
            raise ArchiveError(
                f"refusing {where}: its manifest gives {f.path!r} size {f.size} and mode "
                f"{f.mode:o}; pack it again"
            )
    expected = 0
    for shard in m.shards:
        if shard.first != expected or shard.count < 0:
            raise ArchiveError(
                f"refusing {where}: its manifest's shards do not cover the file list in order; "
                "pack it again"
            )
        if shard.frames and not _frames_fit(shard, m.shard_files(shard)):
            raise ArchiveError(
                f"refusing {where}: its manifest's frame table for shard {shard.key[:12]}… "
                "does not fit the shard; pack it again"
            )
        expected += shard.count
    if expected != len(m.files) or content_id(m.dirs, m.files) != m.id:
        raise ArchiveError(
            f"refusing {where}: its manifest does not match its own id or file list; pack it again"
        )


def _frames_fit(shard: ShardEntry, files: tuple[FileEntry, ...]) -> bool:
    """Frames start at (0, 0), in strictly increasing places inside the files, and add up."""
    if sum(f.size for f in shard.frames) != shard.size or any(f.size <= 0 for f in shard.frames):
        return False
    starts = [(f.file, f.offset) for f in shard.frames]
    if starts[0] != (0, 0) or any(a >= b for a, b in zip(starts, starts[1:], strict=False)):
        return False
    return all(
        (0 <= j < len(files) and 0 <= o < files[j].size) or (o == 0 and j in (0, len(files)))
        for j, o in starts
    )


def frame_starts(shard: ShardEntry) -> list[tuple[int, int]]:
    """Where each frame starts and, last, (count, 0): the end of the shard's files."""
    return [(f.file, f.offset) for f in shard.frames] + [(shard.count, 0)]
