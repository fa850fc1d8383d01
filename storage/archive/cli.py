"""``tlaunch data pack|fetch|ls``: the command line over :mod:`tlaunch.storage.archive`.

::

    tlaunch data pack DIR URL [--shard-size 1GB] [--level 3] [--threads N] [-q]
    tlaunch data fetch URL [DIR] [--cache-dir D] [--threads N] [-q]
    tlaunch data ls URL [--cache-dir D]

Progress bars go to stderr; results go to stdout (``fetch`` prints the local directory as
its last line, so ``DATA=$(tlaunch data fetch URL -q)`` works). Exit codes: 0 done, 1 the
archive was refused or storage failed (one line: ``tlaunch: error: ...``), 2 usage error,
130 interrupted (a ``fetch`` resumes when run again).
"""

from __future__ import annotations

import argparse
import re
import sys

from tlaunch.storage.archive.cache import CACHE_DIR_ENV
from tlaunch.storage.archive.fetch import fetch, info
from tlaunch.storage.archive.format import DEFAULT_LEVEL, DEFAULT_SHARD_SIZE, zstd
from tlaunch.storage.store import StorageError, redact

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1GB`` -> 10**9, ``512MiB`` -> 2**29, ``4096`` -> 4096 (argparse type)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1GB, 512MB or 256MiB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size < 10**6:
        raise argparse.ArgumentTypeError(f"{text!r} is too small for a shard; use at least 1MB")
    return size


def _level(text: str) -> int:
    low, high = zstd.CompressionParameter.compression_level.bounds()
    try:
        level = int(text)
    except ValueError:
        level = low - 1
    if not low <= level <= high:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a zstd level; use 1..{high} (negative levels trade ratio for speed)"
        )
    return level


def _threads(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count; use 1..256")
    return int(text)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlaunch data",
        description="Pack a dataset folder into zstd tar shards at a URL; fetch it onto a machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{pack,fetch,ls}")
    p = sub.add_parser("pack", help="pack DIR into an archive at URL (uploads only what is new)")
    p.add_argument("dir", help="the folder to pack")
    p.add_argument(
        "url", help="where the archive goes: a path, gs://, s3://, drive:// or memory://"
    )
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                   help="uncompressed bytes per shard, at most (default: 1GB)")  # fmt: skip
    p.add_argument("--level", type=_level, default=DEFAULT_LEVEL,
                   help=f"zstd compression level (default: {DEFAULT_LEVEL})")  # fmt: skip
    f = sub.add_parser("fetch", help="download, verify and unpack URL into the local cache")
    f.add_argument("url", help="the archive, as given to `pack`")
    f.add_argument("dir", nargs="?", help="make DIR a link to the unpacked data (optional)")
    ls = sub.add_parser("ls", help="what an archive holds, and whether this machine has it")
    ls.add_argument("url", help="the archive, as given to `pack`")
    for cmd in (p, f):
        cmd.add_argument("--threads", type=_threads, default=None,
                         help="compression / unpacking threads (default: all cores)")  # fmt: skip
        cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    for cmd in (f, ls):
        cmd.add_argument("--cache-dir", default=None, metavar="DIR",
                         help=f"the data cache (default: ${CACHE_DIR_ENV} or ~/.cache/tlaunch/data)")  # fmt: skip
    return parser


def _pack(args: argparse.Namespace) -> int:
    from tlaunch.storage.archive.pack import pack

    r = pack(args.dir, args.url, shard_size=args.shard_size, level=args.level,
             threads=args.threads, progress=not args.quiet)  # fmt: skip
    what = f"{r.files:,} files ({human(r.total_size)})"
    if r.unchanged:
        print(f"nothing to upload: {r.url} already holds {what} (id {r.id[:12]})")
    else:
        reused = r.shards - r.shards_written
        print(f"packed {what} into {r.url}: uploaded {r.shards_written} of {r.shards} shards "
              f"({human(r.bytes_written)}), {reused} unchanged; id {r.id[:12]}")  # fmt: skip
    return 0


def _fetch(args: argparse.Namespace) -> int:
    print(fetch(args.url, args.dir, cache_dir=args.cache_dir, threads=args.threads,
                progress=not args.quiet))  # fmt: skip
    return 0


def _ls(args: argparse.Namespace) -> int:
    i = info(args.url, cache_dir=args.cache_dir)
    print(f"archive     {i.url}")
    print(f"id          {i.id}")
    print(f"files       {i.files:,}")
    print(f"size        {human(i.total_size)}")
    print(f"compressed  {human(i.compressed_size)} (ratio {i.ratio:.2f}x, zstd level {i.level})")
    print(f"shards      {i.shards}")
    print(f"cached      {'yes: ' + i.cached if i.cached else 'no'}")
    return 0


_COMMANDS = {"pack": _pack, "fetch": _fetch, "ls": _ls}


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, StorageError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return redact(" ".join(text.split()))


def main(argv: list[str] | None = None) -> int:
    """Run ``tlaunch data ...`` with ``argv`` (without the ``data``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors and 0 after --help
        return e.code if isinstance(e.code, int) else 2
    try:
        return _COMMANDS[args.command](args)
    except (StorageError, OSError) as e:
        print(f"tlaunch: error: {_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tlaunch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
