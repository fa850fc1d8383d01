"""URL resolution and backend hints: the fsspec boundary."""

from __future__ import annotations

import pytest

from tlaunch.storage import StorageError, is_remote, redact, resolve
from tlaunch.storage.store import DRIVE_ROOT_ENV


def test_round_trip_bytes_on_every_backend(any_store_url):
    loc = resolve(any_store_url)
    loc.fs.makedirs(loc.path, exist_ok=True)
    target = loc.join("hello.bin")
    loc.fs.pipe_file(target, b"\x00payload")
    assert loc.fs.cat_file(target) == b"\x00payload"


def test_local_paths_commit_by_rename_and_object_stores_do_not(tmp_path, memory_url):
    assert resolve(str(tmp_path)).atomic_rename
    assert resolve(f"file://{tmp_path}").atomic_rename
    assert not resolve(memory_url).atomic_rename


def test_drive_url_maps_onto_the_mount_without_rename(tmp_path, monkeypatch):
    monkeypatch.setenv(DRIVE_ROOT_ENV, str(tmp_path))
    loc = resolve("drive://runs/exp1")
    assert loc.path == str(tmp_path / "runs" / "exp1")
    assert not loc.atomic_rename


def test_locality_is_one_predicate(tmp_path, memory_url, monkeypatch):
    for url in (str(tmp_path), "relative/dir", f"file://{tmp_path}"):
        assert not is_remote(url) and resolve(url).local
    for url in (memory_url, "gs://bucket/x", "s3://bucket/x", "drive://runs"):
        assert is_remote(url)
    assert not resolve(memory_url).local
    # The Drive mount is local (os calls work) but named by a remote URL: no atomic rename.
    monkeypatch.setenv(DRIVE_ROOT_ENV, str(tmp_path))
    mounted = resolve("drive://runs")
    assert mounted.local and not mounted.atomic_rename


def test_missing_backend_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_s3fs(name, *args, **kwargs):
        if name == "s3fs":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_s3fs)
    with pytest.raises(StorageError, match=r"pip install 'tlaunch\[s3\]'"):
        resolve("s3://bucket/x")


def test_credentials_are_redacted():
    assert redact("failed for s3://AKIA:secret@bucket/x") == "failed for s3://***@bucket/x"
