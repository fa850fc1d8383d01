"""Google Drive found wherever Colab mounted it, from the mount table; what counts as Drive.

``drive.mount('/gdrive')`` puts Drive at ``/gdrive/MyDrive``, not at the usual
``/content/drive/MyDrive``: the mount table (``drive /gdrive fuse.drive ...``) says where.
``TLAUNCH_DRIVE_ROOT`` still wins over it.
"""

from __future__ import annotations

import pytest

from tlaunch.storage import Lease, StorageError, local_path, localfs, on_drive, resolve, store
from tlaunch.storage.store import DRIVE_ROOT_ENV


@pytest.fixture
def table(tmp_path, monkeypatch):
    """``write(*lines)``: the machine's mount table, as (source, mount point, type) rows."""
    monkeypatch.delenv(DRIVE_ROOT_ENV, raising=False)
    # Not this machine's /content/drive/MyDrive, whatever is there.
    monkeypatch.setattr(store, "COLAB_DRIVE_ROOT", str(tmp_path / "no-colab" / "MyDrive"))
    path = tmp_path / "mounts"
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(path))

    def write(*rows: tuple[str, str, str]) -> None:
        text = "".join(
            f"{src} {point} {kind} rw,nosuid,nodev,relatime 0 0\n" for src, point, kind in rows
        )
        path.write_text("/dev/root / ext4 rw,relatime 0 0\n" + text)

    return write


def test_drive_urls_find_colabs_mount_wherever_it_was_mounted(table, tmp_path):
    (tmp_path / "gdrive" / "MyDrive").mkdir(parents=True)
    table(("drive", f"{tmp_path}/gdrive", "fuse.drive"))
    loc = resolve("drive://runs/exp1")
    assert loc.path == str(tmp_path / "gdrive" / "MyDrive" / "runs" / "exp1")
    assert (loc.local, loc.atomic_rename) == (True, False)


@pytest.mark.parametrize(
    "source, kind, folder",
    [
        ("drive", "fuse", "MyDrive"),  # the FUSE mount named "drive", whatever its type says
        ("drive", "fuse.drive", "My Drive"),  # the folder's name in older Colab runtimes
    ],
)
def test_other_spellings_of_the_colab_mount(table, tmp_path, source, kind, folder):
    (tmp_path / "mnt" / "g d" / folder).mkdir(parents=True)
    table((source, f"{tmp_path}/mnt/g\\040d", kind))  # the kernel writes a space as \040
    assert resolve("drive://x").path == str(tmp_path / "mnt" / "g d" / folder / "x")


def test_the_drive_root_variable_wins_over_the_mount_table(table, tmp_path, monkeypatch):
    (tmp_path / "gdrive" / "MyDrive").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    table(("drive", f"{tmp_path}/gdrive", "fuse.drive"))
    monkeypatch.setenv(DRIVE_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert resolve("drive://x").path == str(tmp_path / "elsewhere" / "x")


def test_fuse_mounts_that_are_not_colabs_drive_are_not_taken_for_it(table, tmp_path):
    for name in ("gcs", "rclone", "ext"):
        (tmp_path / name / "MyDrive").mkdir(parents=True)
    table(
        ("my-bucket", f"{tmp_path}/gcs", "fuse.gcsfuse"),
        ("gdrive:", f"{tmp_path}/rclone", "fuse.rclone"),
        ("drive", f"{tmp_path}/ext", "ext4"),  # named drive, but a disk
    )
    assert local_path("drive://x") is None
    # So drive:// falls back to the gdrive backend (not installed here: the pip hint).
    with pytest.raises(StorageError, match=r"tlaunch\[drive\]"):
        resolve("drive://x")


def test_a_drive_mount_without_its_my_drive_folder_is_skipped(table, tmp_path):
    (tmp_path / "half").mkdir()  # mounted, but not (yet) Drive's layout
    (tmp_path / "gdrive" / "MyDrive").mkdir(parents=True)
    table(
        ("drive", f"{tmp_path}/half", "fuse.drive"), ("drive", f"{tmp_path}/gdrive", "fuse.drive")
    )
    assert local_path("drive://x") == str(tmp_path / "gdrive" / "MyDrive" / "x")


def test_what_counts_as_saving_to_drive(table, tmp_path, monkeypatch):
    (tmp_path / "gdrive" / "MyDrive").mkdir(parents=True)
    (tmp_path / "gcs").mkdir()
    table(("drive", f"{tmp_path}/gdrive", "fuse.drive"), ("b", f"{tmp_path}/gcs", "fuse.gcsfuse"))
    assert on_drive("drive://runs/exp1")
    assert on_drive(f"{tmp_path}/gdrive/MyDrive/runs/exp1")  # a plain path on the mount
    assert on_drive(f"file://{tmp_path}/gdrive/MyDrive/runs")
    assert not on_drive(f"{tmp_path}/gcs/runs")
    assert not on_drive(str(tmp_path / "local"))
    assert not on_drive("gs://bucket/runs")
    # A folder named by TLAUNCH_DRIVE_ROOT is Drive (however it got there).
    (tmp_path / "root").mkdir()
    monkeypatch.setenv(DRIVE_ROOT_ENV, str(tmp_path / "root"))
    assert on_drive(str(tmp_path / "root" / "runs"))
    assert not on_drive(str(tmp_path / "root-sibling"))


def test_local_path_is_where_a_url_lives_on_this_machine(table, tmp_path, monkeypatch):
    table()
    assert local_path(str(tmp_path / "ck")) == str(tmp_path / "ck")
    assert local_path(f"file://{tmp_path}/ck") == str(tmp_path / "ck")
    assert local_path("gs://bucket/ck") is None
    assert local_path("memory://ck") is None
    assert local_path("drive://ck") is None  # no Drive mounted: the gdrive backend's
    monkeypatch.setenv(DRIVE_ROOT_ENV, str(tmp_path))
    assert local_path("drive://ck") == str(tmp_path / "ck")


def test_an_unreadable_mount_table_keeps_the_colab_default(tmp_path, monkeypatch):
    monkeypatch.delenv(DRIVE_ROOT_ENV, raising=False)
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(tmp_path / "no-such-table"))
    (tmp_path / "content" / "drive" / "MyDrive").mkdir(parents=True)
    monkeypatch.setattr(store, "COLAB_DRIVE_ROOT", str(tmp_path / "content" / "drive" / "MyDrive"))
    assert local_path("drive://x") == str(tmp_path / "content" / "drive" / "MyDrive" / "x")


def test_a_fresh_checkpoint_folder_on_the_drive_mount_takes_its_lease(table, tmp_path):
    # Rename is not atomic on the mount, so the lease is created in place: its folder, which
    # the launch's write probe made and removed again, must be made first.
    (tmp_path / "gdrive" / "MyDrive").mkdir(parents=True)
    table(("drive", f"{tmp_path}/gdrive", "fuse.drive"))
    for url in ("drive://runs/exp1", f"{tmp_path}/gdrive/MyDrive/runs/exp2"):
        lease = Lease(url)
        assert lease.acquire() is None
        assert lease.read().token == lease.token
