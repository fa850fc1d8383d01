"""The --sync-dir mirror and the data cache through the fault layer: a blip or a torn upload
costs a retry, never a file."""

from __future__ import annotations

import os

import pytest

from tests import faultfs
from tests.faultfs import Fault
from tlaunch.storage import FolderMirror, StorageError, fetch, pack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _fresh_store():
    faultfs.clear()
    yield
    faultfs.clear()


def _remote_files(url: str) -> dict[str, bytes]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return {}
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def test_a_failed_upload_costs_a_retry_and_the_next_sync_completes(tmp_path):
    # An object store's PUT lands whole or not at all; what fails is the call.
    local, url = tmp_path / "ckpts", "faulty://m/run1"
    local.mkdir()
    (local / "a.bin").write_bytes(b"A" * 4096)
    mirror = FolderMirror(str(local), url, settle=0.0)
    mirror.sync()  # the first scan sees the file; a later one uploads it once settled
    blip = Fault("put_file", "*a.bin*", ConnectionResetError, times=None)
    with faultfs.faults(blip), pytest.raises((StorageError, OSError)):
        mirror.sync()
    assert blip.calls, "the upload was tried"
    assert "a.bin" not in _remote_files(url)
    mirror.sync()
    assert _remote_files(url) == {"a.bin": b"A" * 4096}


def test_a_blip_while_restoring_is_an_error_not_a_half_restored_file(tmp_path):
    src, url = tmp_path / "src", "faulty://m/run2"
    src.mkdir()
    (src / "ckpt.pt").write_bytes(b"C" * 10000)
    first = FolderMirror(str(src), url, settle=0.0)
    first.sync()
    first.sync()
    assert _remote_files(url) == {"ckpt.pt": b"C" * 10000}
    dest = tmp_path / "fresh-machine"
    blip = Fault("*", "*ckpt.pt*", ConnectionResetError, times=None)
    with faultfs.faults(blip), pytest.raises((StorageError, OSError)):
        FolderMirror(str(dest), url).restore()
    assert not (dest / "ckpt.pt").exists(), "no partial copy under the real name"
    assert FolderMirror(str(dest), url).restore() == 1
    assert (dest / "ckpt.pt").read_bytes() == b"C" * 10000


def test_a_reset_while_fetching_leaves_no_cache_entry_and_a_rerun_completes(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(os.urandom(50_000))
    url, cache = "faulty://d/ds.tlar", str(tmp_path / "cache")
    pack(str(src), url, progress=False)
    reset = Fault("*", "*/shards/*", ConnectionResetError, times=None)
    with faultfs.faults(reset), pytest.raises(StorageError):
        fetch(url, cache_dir=cache, progress=False)
    assert not [e for e in os.listdir(cache) if e.endswith(".json")], "nothing counted as cached"
    path = fetch(url, cache_dir=cache, progress=False)
    for i in range(20):
        assert (
            open(os.path.join(path, f"f{i}.bin"), "rb").read() == (src / f"f{i}.bin").read_bytes()
        )
