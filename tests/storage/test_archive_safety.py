"""Hostile archives, built by hand with tarfile: each is refused, named, and leaves no trace.

Every archive here has a correct shard checksum and a manifest that lists one harmless
file per member, so the refusal comes from unpacking itself, not from earlier checks.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from tlaunch.storage import ArchiveError, fetch
from tlaunch.storage.archive import unpack as unpack_module
from tlaunch.storage.archive.format import (
    DIGEST,
    FORMAT,
    MANIFEST_NAME,
    SHARDS_DIR,
    FileEntry,
    content_id,
    hasher,
    zstd,
)


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, len(data), attrs.pop("mode", 0o644)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def entry(path: str, data: bytes = b"", mode: int = 0o644, size: int | None = None) -> FileEntry:
    """A manifest row for ``data``, with its real digest (``size`` may claim another size)."""
    return FileEntry(path, len(data) if size is None else size, mode, hasher(data).hexdigest())


def write_archive(url: str, members: list[tuple], listed: list[FileEntry] | None = None) -> str:
    """A one-shard archive at ``url`` holding exactly ``members``; returns its id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    if listed is None:  # one harmless regular file per member
        listed = [entry(f"ok{i}.txt") for i in range(len(members))]
    return write_shard(url, zstd.compress(raw.getvalue()), listed, len(raw.getvalue()))


def write_shard(url: str, shard: bytes, listed: list[FileEntry], tar_size: int,
                frames: list[list[int]] | None = None) -> str:  # fmt: skip
    """A one-shard archive at ``url``: ``shard`` as it is, with a manifest listing ``listed``
    (and, given ``frames``, that frame table); returns its id."""
    digest = hasher(shard).hexdigest()
    os.makedirs(os.path.join(url, SHARDS_DIR))
    key = "ab" * 32
    with open(os.path.join(url, SHARDS_DIR, key + ".tar.zst"), "wb") as f:
        f.write(shard)
    archive_id = content_id([], listed)
    doc = {
        "format": FORMAT,
        "id": archive_id,
        "level": 3,
        "dirs": [],
        "files": [{"path": e.path, "size": e.size, "mode": e.mode, DIGEST: e.digest} for e in listed],
        "shards": [{"key": key, DIGEST: digest, "size": len(shard), "tar_size": tar_size,
                    "first": 0, "count": len(listed)}],
    }  # fmt: skip
    if frames is not None:
        doc["shards"][0]["frames"] = frames
    with open(os.path.join(url, MANIFEST_NAME), "w") as f:
        json.dump(doc, f)
    return archive_id


def assert_refused(url: str, cache: str, archive_id: str, *fragments: str) -> str:
    with pytest.raises(ArchiveError) as err:
        fetch(url, cache_dir=cache, progress=False)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    # nothing in the final location, no half-unpacked temp directory left behind
    assert not os.path.exists(os.path.join(cache, archive_id))
    assert [n for n in os.listdir(cache) if ".unpack-" in n] == []
    return message


@pytest.fixture
def places(tmp_path):
    """(archive url, cache dir, a path outside both that a hostile member aims at)."""
    return str(tmp_path / "evil.tlar"), str(tmp_path / "cache"), tmp_path / "outside"


HOSTILE = {
    "traversal": (lambda out: [member("../outside", data=b"x")],
                  "'../outside'", "leaves the destination ('..' in its path)"),
    "absolute": (lambda out: [member(str(out), data=b"x")],
                 "is an absolute path", ""),
    "symlink escape": (lambda out: [member("link", tarfile.SYMTYPE, linkname="../../../outside"),
                                    member("link/x", data=b"x")],
                       "'link'", "is a symlink to '../../../outside', which leaves the destination"),
    "absolute symlink": (lambda out: [member("link", tarfile.SYMTYPE, linkname=str(out))],
                         "'link'", "which leaves the destination"),
    "hardlink escape": (lambda out: [member("hard", tarfile.LNKTYPE, linkname="../outside")],
                        "'hard'", "is a hard link to '../outside', which leaves the destination"),
    "device node": (lambda out: [member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)],
                    "'dev'", "is a character device; special files are refused"),
    "block device": (lambda out: [member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0)],
                     "'disk'", "is a block device"),
    "fifo": (lambda out: [member("pipe", tarfile.FIFOTYPE)],
             "'pipe'", "is a FIFO; special files are refused"),
    "inner symlink": (lambda out: [member("ln", tarfile.SYMTYPE, linkname="ok0.txt")],
                      "'ln'", "tlaunch archives hold regular files only"),
    "directory member": (lambda out: [member("sub", tarfile.DIRTYPE, mode=0o755)],
                         "'sub'", "is a directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_refused_and_nothing_is_written(case, places):
    url, cache, outside = places
    build, *fragments = HOSTILE[case]
    archive_id = write_archive(url, build(outside))

    message = assert_refused(url, cache, archive_id, *fragments)

    assert message.startswith(f"refusing {url} (shard 1/1): member ")
    assert not os.path.lexists(outside)


def test_tarfile_data_filter_stands_behind_our_checks(places, monkeypatch):
    # With our own member checks switched off, tarfile's "data" filter still refuses.
    url, cache, outside = places
    monkeypatch.setattr(unpack_module, "member_refusal", lambda member, expected: None)
    archive_id = write_archive(url, [member("../outside", data=b"x")])
    assert_refused(url, cache, archive_id, "'../outside'", "refused by tarfile's data filter")
    assert not os.path.lexists(outside)


def test_manifest_with_a_path_for_a_shard_key_is_refused(places):
    url, cache, _ = places
    archive_id = write_archive(url, [member("a.txt", data=b"x")])
    manifest = os.path.join(url, MANIFEST_NAME)
    with open(manifest) as f:
        doc = json.load(f)
    doc["shards"][0]["key"] = "../../../../tmp/owned"
    with open(manifest, "w") as f:
        json.dump(doc, f)
    assert_refused(url, cache, archive_id, "malformed digest")


def test_manifest_listing_an_unsafe_path_is_refused(places):
    url, cache, _ = places
    listed = [entry("../escape.txt", b"x")]
    archive_id = write_archive(url, [member("../escape.txt", data=b"x")], listed)
    assert_refused(
        url, cache, archive_id, "its manifest lists '../escape.txt'", "leaves the destination"
    )


MISMATCH = {
    "other name": ([member("a.txt", data=b"abc")], [entry("b.txt", b"abc")],
                   "member 'a.txt' is not the file the manifest lists next ('b.txt')"),
    "other size": ([member("a.txt", data=b"abc")], [entry("a.txt", b"abc", size=4)],
                   "member 'a.txt' has 3 bytes where the manifest says 4"),
    "other mode": ([member("a.txt", data=b"abc", mode=0o755)], [entry("a.txt", b"abc")],
                   "member 'a.txt' has mode 755 where the manifest says 644"),
    "extra member": ([member("a.txt", data=b"abc"), member("b.txt", data=b"x")],
                     [entry("a.txt", b"abc")], "member 'b.txt' is not in the manifest"),
    "missing member": ([member("a.txt", data=b"abc")], [entry("a.txt", b"abc"), entry("b.txt", b"x")],
                       "the shard ends before 'b.txt'"),
    "other bytes": ([member("a.txt", data=b"abc")], [entry("a.txt", b"abd")],
                    "member 'a.txt' does not match the manifest's blake3 digest"),
    "other bytes, another writer's header": (
        [member("a.txt", data=b"abc", mtime=1_700_000_000)], [entry("a.txt", b"abd")],
        "member 'a.txt' does not match the manifest's blake3 digest"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MISMATCH))
def test_manifest_mismatch_is_refused(case, places):
    url, cache, _ = places
    members, listed, fragment = MISMATCH[case]
    archive_id = write_archive(url, members, listed)
    assert_refused(url, cache, archive_id, fragment)


def test_garbage_shard_with_matching_checksum_is_refused(places):
    url, cache, _ = places
    archive_id = write_archive(url, [member("a.txt", data=b"abc")])
    shard = os.path.join(url, SHARDS_DIR, "ab" * 32 + ".tar.zst")
    with open(shard, "wb") as f:
        f.write(zstd.compress(b"this is not a tar stream" * 40))
    with open(os.path.join(url, MANIFEST_NAME)) as f:
        doc = json.load(f)
    with open(shard, "rb") as f:
        data = f.read()
    doc["shards"][0].update({DIGEST: hasher(data).hexdigest(), "size": len(data)})
    with open(os.path.join(url, MANIFEST_NAME), "w") as f:
        json.dump(doc, f)
    assert_refused(url, cache, archive_id, "not a valid tar.zst shard")


def write_framed(url: str, members: list[tuple], listed: list[FileEntry], cuts: list[str],
                 starts: list[list[int]]) -> str:  # fmt: skip
    """Like write_archive, but cut into zstd frames before the members named in ``cuts``."""
    archive_id = write_archive(url, members, listed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        offsets = {m.name: m.offset for m in tar.getmembers()}
    bounds = [0, *(offsets[name] for name in cuts), len(tar_bytes)]
    frames = [zstd.compress(tar_bytes[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    shard = b"".join(frames)
    with open(os.path.join(url, SHARDS_DIR, "ab" * 32 + ".tar.zst"), "wb") as f:
        f.write(shard)
    with open(os.path.join(url, MANIFEST_NAME)) as f:
        doc = json.load(f)
    doc["shards"][0].update({
        DIGEST: hasher(shard).hexdigest(), "size": len(shard),
        "frames": [[len(fr), *start] for fr, start in zip(frames, starts, strict=True)],
    })  # fmt: skip
    with open(os.path.join(url, MANIFEST_NAME), "w") as f:
        json.dump(doc, f)
    return archive_id


def listed_for(*names_data: tuple[str, bytes]) -> list[FileEntry]:
    return [entry(name, data) for name, data in names_data]


def test_a_member_hidden_inside_an_earlier_frame_is_refused(places):
    # a.txt is exactly what tlaunch writes (the fast path takes it); x.txt follows it in
    # the first frame, where the table says that frame ends: tarfile and our checks judge it.
    url, cache, _ = places
    members = [member("a.txt", data=b"abc"), member("x.txt", data=b"x"), member("b.txt", data=b"b")]
    listed = listed_for(("a.txt", b"abc"), ("b.txt", b"b"))
    archive_id = write_framed(url, members, listed, cuts=["b.txt"], starts=[[0, 0], [1, 0]])
    assert_refused(url, cache, archive_id, "member 'x.txt' is not in the manifest")


def test_a_framed_archive_from_another_writer_unpacks(places):
    # Headers tlaunch would not write (an mtime, an owner) go the general way, frame by frame.
    url, cache, _ = places
    members = [member("a.txt", data=b"abc", mtime=1_700_000_000, uname="alice"),
               member("b.txt", data=b"defg", mtime=1_700_000_001)]  # fmt: skip
    listed = listed_for(("a.txt", b"abc"), ("b.txt", b"defg"))
    archive_id = write_framed(url, members, listed, cuts=["b.txt"], starts=[[0, 0], [1, 0]])
    path = fetch(url, cache_dir=cache, progress=False)
    assert path.endswith(archive_id)
    assert open(os.path.join(path, "a.txt"), "rb").read() == b"abc"
    assert open(os.path.join(path, "b.txt"), "rb").read() == b"defg"


BAD_TABLES = {
    "sizes do not add up": lambda frames: [[frames[0][0] + 1, 0, 0], frames[1]],
    "starts out of order": lambda frames: [frames[0], [frames[1][0], 0, 0]],
    "offset past the file": lambda frames: [frames[0], [frames[1][0], 1, 9]],
    "file past the shard": lambda frames: [frames[0], [frames[1][0], 3, 0]],
    "first frame not at the start": lambda frames: [[frames[0][0], 0, 1], frames[1]],
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_a_frame_table_that_does_not_fit_is_refused(case, places):
    url, cache, _ = places
    members = [member("a.txt", data=b"abc"), member("b.txt", data=b"b")]
    archive_id = write_framed(url, members, listed_for(("a.txt", b"abc"), ("b.txt", b"b")),
                              cuts=["b.txt"], starts=[[0, 0], [1, 0]])  # fmt: skip
    manifest = os.path.join(url, MANIFEST_NAME)
    with open(manifest) as f:
        doc = json.load(f)
    doc["shards"][0]["frames"] = BAD_TABLES[case](doc["shards"][0]["frames"])
    with open(manifest, "w") as f:
        json.dump(doc, f)
    assert_refused(url, cache, archive_id, "frame table", "does not fit the shard")


def test_a_manifest_mode_the_data_filter_would_not_leave_is_refused(places):
    # Modes are compared to headers byte for byte, so the manifest's own must be safe ones.
    url, cache, _ = places
    listed = [entry("a.txt", b"abc", mode=0o4755)]
    archive_id = write_archive(url, [member("a.txt", data=b"abc", mode=0o4755)], listed)
    assert_refused(url, cache, archive_id, "'a.txt' size 3 and mode 4755")
