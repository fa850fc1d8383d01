"""--sync-dir's FolderMirror on every store: settle, upload, mirror deletions safely, restore."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from tlaunch.storage import FolderMirror, resolve


def remote_files(url: str) -> dict[str, bytes]:
    loc = resolve(url)
    loc.fs.invalidate_cache()
    root = loc.path.rstrip("/")
    if not loc.fs.exists(root):
        return {}
    return {p[len(root) :].lstrip("/"): loc.fs.cat_file(p) for p in loc.fs.find(root)}


def write(folder, rel: str, data: bytes) -> None:
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def mirror(any_store_url, tmp_path) -> FolderMirror:
    return FolderMirror(str(tmp_path / "ckpts"), any_store_url + "/run1")


def test_a_file_is_uploaded_once_it_has_settled(mirror):
    write(mirror.local, "step-1/model.bin", b"weights one")
    assert mirror.sync() == (0, 0)  # first seen: it may still be being written
    assert remote_files(mirror.url) == {}
    assert mirror.sync() == (1, 0)
    assert remote_files(mirror.url) == {"step-1/model.bin": b"weights one"}
    assert mirror.sync() == (0, 0)  # unchanged: not uploaded again


def test_a_deletion_waits_until_the_successor_is_uploaded(mirror):
    write(mirror.local, "step-1/model.bin", b"weights one")
    mirror.flush(complete=True)
    # Rotation as Accelerate's total_limit does it: the old one goes before the new is written.
    shutil.rmtree(os.path.join(mirror.local, "step-1"))
    write(mirror.local, "step-2/model.bin", b"weights two")

    assert mirror.sync() == (0, 0)  # step-2 not settled yet, so step-1 stays at the URL
    assert remote_files(mirror.url) == {"step-1/model.bin": b"weights one"}
    assert mirror.sync() == (1, 1)
    assert remote_files(mirror.url) == {"step-2/model.bin": b"weights two"}


def test_the_flush_after_a_clean_end_uploads_and_deletes_everything_outstanding(mirror):
    write(mirror.local, "a.txt", b"a")
    write(mirror.local, "b.txt", b"b")
    mirror.flush(complete=True)
    os.remove(os.path.join(mirror.local, "a.txt"))
    write(mirror.local, "c.txt", b"c")
    assert mirror.flush(complete=True) == (1, 1)
    assert remote_files(mirror.url) == {"b.txt": b"b", "c.txt": b"c"}


def test_a_missing_folder_deletes_nothing(mirror):
    write(mirror.local, "a.txt", b"a")
    mirror.flush(complete=True)
    shutil.rmtree(mirror.local)
    assert mirror.flush(complete=True) == (0, 0)
    assert remote_files(mirror.url) == {"a.txt": b"a"}


class Clock:
    """The mirror's clock, moved by hand: which scan saw what, and when, is the test's."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed(memory_url, tmp_path) -> tuple[FolderMirror, Clock]:
    clock = Clock()
    return FolderMirror(str(tmp_path / "ckpts"), memory_url + "/run1", clock=clock), clock


def test_after_a_stop_a_file_changed_in_the_last_interval_is_left_behind(timed):
    mirror, clock = timed
    write(mirror.local, "model.bin", b"good weights")
    write(mirror.local, "notes.txt", b"v1")  # sizes differ: two writes may share an mtime
    mirror.sync()
    clock.now += 2
    assert mirror.sync() == (2, 0)
    write(mirror.local, "notes.txt", b"version 2")  # finished, then left alone
    clock.now += 2
    mirror.sync()
    write(mirror.local, "model.bin", b"half-wr")  # the script is killed in the middle of this
    clock.now += 0.5
    mirror.sync()  # a periodic scan after it died sees the torn file as it will stay
    clock.now += 1.4
    write(mirror.local, "late.txt", b"whole, but written just before the stop")

    assert mirror.flush() == (0, 0)

    assert mirror.left_behind == ["late.txt", "model.bin"]  # the price of not knowing
    assert remote_files(mirror.url) == {"model.bin": b"good weights", "notes.txt": b"version 2"}


def test_after_a_stop_deletions_wait_for_what_was_left_behind(timed):
    mirror, clock = timed
    write(mirror.local, "step-1/model.bin", b"weights one")
    mirror.flush(complete=True)
    shutil.rmtree(os.path.join(mirror.local, "step-1"))  # rotation, then the kill mid-save
    write(mirror.local, "step-2/model.bin", b"weig")
    clock.now += 0.5

    assert mirror.flush() == (0, 0)

    assert mirror.left_behind == [os.path.join("step-2", "model.bin")]
    assert remote_files(mirror.url) == {"step-1/model.bin": b"weights one"}


def test_files_there_before_the_script_started_count_as_settled(timed):
    mirror, clock = timed
    write(mirror.local, "old.txt", b"from an earlier run")
    mirror.restore()
    clock.now += 2  # stopped before the first periodic scan
    assert mirror.flush() == (1, 0) and mirror.left_behind == []


def test_a_clean_end_does_not_upload_a_file_something_still_writes(timed):
    mirror, _ = timed
    path = os.path.join(mirror.local, "stream.log")
    write(mirror.local, "stream.log", b"")
    stop = threading.Event()

    def writer() -> None:  # a child process the script left behind, say
        with open(path, "ab", buffering=0) as f:
            while not stop.wait(0.001):
                f.write(b"x")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert mirror.flush(complete=True) == (0, 0)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert mirror.left_behind == ["stream.log"]
    assert remote_files(mirror.url) == {}


def test_restore_brings_the_url_back_and_uploads_what_only_this_machine_has(mirror, tmp_path):
    write(mirror.local, "step-1/model.bin", b"weights one")
    mirror.flush(complete=True)

    fresh = FolderMirror(str(tmp_path / "machine2" / "ckpts"), mirror.url)
    write(fresh.local, "notes.txt", b"written before the restore")
    assert fresh.restore() == 1
    with open(os.path.join(fresh.local, "step-1", "model.bin"), "rb") as f:
        assert f.read() == b"weights one"
    assert fresh.flush(complete=True) == (1, 0)  # notes.txt was never at the URL
    assert remote_files(mirror.url) == {
        "step-1/model.bin": b"weights one",
        "notes.txt": b"written before the restore",
    }


# -- restore takes only keys that name a file inside LOCAL -------------------------------------


HOSTILE_KEYS = {
    "parent": "../../../../x",  # S3 and GCS accept such keys
    "absolute": "/abs.txt",  # run1//abs.txt
    "nul": "a/\0b",
    "through a link": "link/y.txt",  # LOCAL/link -> a folder outside LOCAL
}


@pytest.mark.parametrize("case", sorted(HOSTILE_KEYS))
def test_restore_refuses_a_key_that_leaves_the_folder(case, memory_url, tmp_path, caplog):
    url = memory_url + "/run1"
    loc = resolve(url)
    loc.fs.pipe_file(loc.path + "/good.txt", b"kept")
    loc.fs.pipe_file(loc.path + "/" + HOSTILE_KEYS[case], b"evil")
    local = tmp_path / "w1" / "w2" / "w3" / "w4" / "ckpts"
    outside = tmp_path / "outside"
    outside.mkdir()
    local.mkdir(parents=True)
    (local / "link").symlink_to(outside)

    with caplog.at_level("WARNING"):
        assert FolderMirror(str(local), url).restore() == 1

    assert (local / "good.txt").read_bytes() == b"kept"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "good.txt"]
    assert written == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "skipping" in warning and "\n" not in warning
