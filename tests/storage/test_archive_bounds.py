"""Hostile shards that ask for memory or work without bound: each is refused, in one line,
after a bounded amount of reading and decompressing.

The shards are built by hand (raw tar headers, streaming zstd) with a manifest that matches
them, shard checksum and all, so what refuses them is unpacking itself. The bombs expand to
1 GiB of zeros from ~32 KiB; the tests that use them run ``tlaunch data fetch`` in a child
process whose address space is capped (so a regression fails fast instead of taking the
machine's memory) and whose peak RSS growth must stay under ``RSS_BOUND``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile

import pytest
from test_archive_safety import assert_refused, entry, member, write_archive, write_shard

from tlaunch.storage import ArchiveError, fetch, pack
from tlaunch.storage.archive.format import (
    BLOCK,
    MAX_DEPTH,
    MAX_HEADER,
    MAX_HEADER_READS,
    MAX_PATH,
    tar_end,
    ustar_header,
    zstd,
)

BOMB = 1 << 30  # bytes of zeros a bomb expands to
RSS_BOUND = 64 << 20  # peak RSS growth allowed while refusing one (a bomb would take 1 GiB)

# Runs `tlaunch data ...` with the address space capped at 1 GiB over its size after the
# imports, and writes its peak RSS growth (bytes) to $TLAUNCH_TEST_RSS.
_RUNNER = r"""
import os, resource, sys
import tqdm, tlaunch.storage.archive.fetch  # imported by fetch on first use: not the growth
from tlaunch.cli import main

with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), size + (1 << 30)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    code = main(["data", *sys.argv[1:]])
finally:
    with open(os.environ["TLAUNCH_TEST_RSS"], "w") as f:
        f.write(str((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
sys.exit(code)
"""


def zeros_frame(size: int, prefix: bytes = b"") -> bytes:
    """One zstd frame of ``prefix`` and ``size`` zeros, compressed as a stream (never held)."""
    compressor, zeros = zstd.ZstdCompressor(level=1), bytes(1 << 20)
    parts = [compressor.compress(prefix)]
    parts += [compressor.compress(zeros) for _ in range(size >> 20)]
    return b"".join([*parts, compressor.flush()])


@pytest.fixture
def places(tmp_path) -> tuple[str, str]:
    """(archive url, cache dir)."""
    return str(tmp_path / "evil.tlar"), str(tmp_path / "cache")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zeros_frame(BOMB)


def raw_header(name: str, kind: bytes, size: int | bytes) -> bytes:
    """A tar header block for ``name`` claiming ``size`` bytes: an int (base-256 when
    negative, as GNU tar writes large values) or the raw 12-byte field."""
    info = tarfile.TarInfo(name)
    info.type = kind
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    if isinstance(size, bytes):
        block[124:136] = size
    elif size < 0:
        block[124:136] = b"\xff" + (256**11 + size).to_bytes(11, "big")
    else:
        block[124:136] = b"%011o\0" % size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def fetch_in_child(url: str, cache: str, tmp_path) -> tuple[subprocess.CompletedProcess, int]:
    """``tlaunch data fetch URL`` in a capped child: (the process, its peak RSS growth)."""
    rss = tmp_path / "rss"
    env = {**os.environ, "TLAUNCH_TEST_RSS": str(rss), "MALLOC_ARENA_MAX": "2"}
    args = ["fetch", url, "--cache-dir", cache, "--threads", "2", "-q"]
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    return proc, int(rss.read_text())


def assert_refused_in_child(url: str, cache: str, tmp_path, *fragments: str) -> str:
    proc, growth = fetch_in_child(url, cache, tmp_path)
    assert growth < RSS_BOUND, f"peak RSS grew by {growth >> 20} MiB: {proc.stderr[-2000:]}"
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"tlaunch: error: refusing {url} (shard 1/1): "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert [n for n in os.listdir(cache) if not n.endswith(".lock")] == []  # nothing kept
    return lines[0]


HUGE_HEADERS = {
    "GNU long name claiming 8 GB": (b"L", 8_000_000_000, "asks for 8,000,000,000 bytes"),
    "GNU long link claiming 8 GB": (b"K", 8_000_000_000, "asks for 8,000,000,000 bytes"),
    "pax header claiming 100 MiB": (b"x", 100 << 20, "asks for 104,857,600 bytes"),
    "pax global header claiming 100 MiB": (b"g", 100 << 20, "asks for 104,857,600 bytes"),
    "GNU long name with a negative size": (b"L", -1_000_000, "asks for -999,936 bytes"),
}


@pytest.mark.parametrize("case", sorted(HUGE_HEADERS))
def test_a_header_claiming_a_huge_size_is_refused_after_one_block(case, places, bomb, tmp_path):
    # The claimed bytes are there to be read: a gigabyte of zeros behind the header.
    url, cache = places
    kind, size, says = HUGE_HEADERS[case]
    shard = zstd.compress(raw_header("././@LongLink", kind, size)) + bomb
    write_shard(url, shard, [entry("ok0.txt")], tar_size=BLOCK)
    assert_refused_in_child(url, cache, tmp_path, "a tar header", says,
                            f"at most {MAX_HEADER:,} bytes of headers per member")  # fmt: skip


def test_a_frame_that_expands_past_its_files_is_refused_at_the_bound(places, tmp_path):
    # Exactly what tlaunch writes for one 3-byte file, then 1 GiB of zeros, in one zstd frame
    # that the frame table lists: decompression stops a few KiB past the tar end.
    url, cache = places
    head = ustar_header("a.txt", 3, 0o644) + b"abc" + bytes(BLOCK - 3)
    tar = head + tar_end(len(head))
    shard = zeros_frame(BOMB, prefix=tar)
    write_shard(url, shard, [entry("a.txt", b"abc")], len(tar), frames=[[len(shard), 0, 0]])
    line = assert_refused_in_child(url, cache, tmp_path, "decompresses to more than")
    bound = int(re.search(r"more than ([\d,]+) bytes", line).group(1).replace(",", ""))
    assert len(tar) < bound < len(tar) + 2 * MAX_HEADER  # a megabyte past the end, not a GiB


def test_a_shard_without_a_frame_table_is_bounded_by_its_files(places):
    url, cache = places
    head = ustar_header("a.txt", 3, 0o644) + b"abc" + bytes(BLOCK - 3)
    tar = head + tar_end(len(head))
    archive_id = write_shard(url, zeros_frame(64 << 20, prefix=tar), [entry("a.txt", b"abc")],
                             len(tar))  # fmt: skip
    assert_refused(url, cache, archive_id, "decompresses to more than", "pack it again")


def test_a_foreign_writers_bigger_headers_fit_the_bound(places, tmp_path):
    # Another tar's layout takes more than tlaunch's (here: pax records of times, an owner,
    # a long comment, and a 64 KiB record at the end); the slack admits it.
    url, cache = places
    pax = {"mtime": "1700000000.5", "atime": "1700000000.5", "comment": "x" * 4000}
    members = [member(f"f{i}.txt", data=b"%d" % i, uname="alice", pax_headers=pax)
               for i in range(3)]  # fmt: skip
    listed = [entry(f"f{i}.txt", b"%d" % i) for i in range(3)]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    stream = raw.getvalue() + bytes(64 << 10)
    write_shard(url, zstd.compress(stream), listed, len(stream))
    path = fetch(url, cache_dir=cache, progress=False)
    assert sorted(os.listdir(path)) == ["f0.txt", "f1.txt", "f2.txt"]


@pytest.mark.parametrize("writer", ["tlaunch", "another"])
def test_a_member_claiming_more_than_the_shard_holds_is_refused(writer, places):
    # The manifest agrees with the header (5 GB); the shard holds 3 bytes of it.
    url, cache = places
    size = 5_000_000_000
    if writer == "tlaunch":  # the fast path: the header is byte for byte tlaunch's
        stream = ustar_header("a.txt", size, 0o644) + b"abc"
    else:  # tarfile judges it: an mtime tlaunch would not write
        info = tarfile.TarInfo("a.txt")
        info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
        stream = info.tobuf(format=tarfile.USTAR_FORMAT) + b"abc"
    archive_id = write_shard(url, zstd.compress(stream), [entry("a.txt", b"abc", size=size)],
                             len(stream))  # fmt: skip
    assert_refused(url, cache, archive_id, "not a valid tar.zst shard", "ends inside a file")


SIZE_FIELDS = {
    "not octal": (b"12345678901z", "not a valid tar.zst shard"),
    "base-256, 2**88 - 1": (
        b"\x80" + b"\xff" * 11,
        f"has {2**88 - 1} bytes where the manifest says 0",
    ),
    "negative": (-4096, "member 'ok0.txt' has -4096 bytes where the manifest says 0"),
}


@pytest.mark.parametrize("case", sorted(SIZE_FIELDS))
def test_a_garbage_size_field_is_refused(case, places):
    url, cache = places
    field, fragment = SIZE_FIELDS[case]
    stream = raw_header("ok0.txt", tarfile.REGTYPE, field) + bytes(2 * BLOCK)
    archive_id = write_shard(url, zstd.compress(stream), [entry("ok0.txt")], len(stream))
    assert_refused(url, cache, archive_id, fragment)


def test_a_long_member_name_is_refused_in_a_short_line(places):
    # 600 KB of name fits the header budget; the refusal shows its two ends, not all of it.
    url, cache = places
    name = "n" * 600_000 + ".txt"
    archive_id = write_archive(url, [member(name, data=b"x")])
    message = assert_refused(url, cache, archive_id, "is not the file the manifest lists next")
    assert len(message) < 400
    assert "nnn…nnn" in message and ".txt'" in message


def test_chained_extended_headers_are_refused_before_tarfile_recurses_too_deep(places):
    # 400 pax headers before one member (400 KB, within the byte budget): tarfile recurses
    # once per header and would hit Python's recursion limit.
    url, cache = places
    record = b"20 comment=aaaaaaaa\n"
    pax = raw_header("PaxHeader", tarfile.XHDTYPE, len(record)) + record.ljust(BLOCK, b"\0")
    own = raw_header("ok0.txt", tarfile.REGTYPE, 0)
    stream = pax * 400 + own + bytes(2 * BLOCK)
    archive_id = write_shard(url, zstd.compress(stream), [entry("ok0.txt")], len(stream))
    assert_refused(url, cache, archive_id, f"more than {MAX_HEADER_READS} tar headers")


LISTED_PATHS = {
    "too long": ("d/" + "x" * (MAX_PATH + 10), f"tlaunch archives hold paths of at most {MAX_PATH}"),
    "too deep": ("a/" * 1500 + "f", f"is 1,500 directories deep; tlaunch archives hold at most {MAX_DEPTH}"),
    "not UTF-8": ("bad\udcff.txt", "is not valid UTF-8"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LISTED_PATHS))
def test_a_manifest_path_past_the_limits_is_refused_before_unpacking(case, places):
    url, cache = places
    path, fragment = LISTED_PATHS[case]
    # The shard holds the file: unchecked, it failed later and worse (os.makedirs recursing
    # past Python's limit, a 4 KB error line, a UnicodeEncodeError traceback).
    archive_id = write_archive(url, [member(path)], [entry(path)])
    message = assert_refused(url, cache, archive_id, "its manifest lists", fragment)
    assert len(message) < 400


def test_pack_refuses_a_folder_deeper_than_fetch_unpacks(tmp_path):
    deep = tmp_path / "src" / os.path.join(*["d"] * (MAX_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "f.txt").write_bytes(b"x")
    with pytest.raises(
        ArchiveError, match=f"directories deep; tlaunch archives hold at most {MAX_DEPTH}"
    ):
        pack(str(tmp_path / "src"), str(tmp_path / "out.tlar"), progress=False)
