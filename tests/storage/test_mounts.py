"""A plain path on a FUSE mount (the Colab Drive mount above all) commits with MANIFEST + COMMIT:
rename there is not atomic, whatever the path looks like."""

from __future__ import annotations

import pytest

from tlaunch.storage import CheckpointStore, localfs, resolve
from tlaunch.storage.checkpoint.commit import MarkerCommit, RenameCommit, build_commit_protocol
from tlaunch.storage.store import RetryPolicy


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """A /proc/mounts-style table whose mount points are folders under tmp_path."""
    root = tmp_path / "fs"
    lines = [
        ("/dev/vda", "/", "ext4"),
        ("drive", f"{root}/content/drive", "fuse.drive"),  # Colab's drive.mount()
        ("google-drive-ocamlfuse", f"{root}/content/gdrive", "fuse.google-drive-ocamlfuse"),
        ("my-bucket", f"{root}/mnt/gcs", "fuse.gcsfuse"),
        ("rclone:", f"{root}/mnt/My\\040Drive", "fuse.rclone"),  # a space, as the kernel writes it
        ("/dev/sdb1", f"{root}/mnt/usb", "fuseblk"),  # ntfs-3g on a local disk
        ("tmpfs", f"{root}/scratch", "tmpfs"),
        ("drive", f"{root}/content/drive/local-inside", "ext4"),  # a mount inside a mount
    ]
    table = tmp_path / "mounts"
    table.write_text("".join(f"{src} {mnt} {kind} rw,relatime 0 0\n" for src, mnt, kind in lines))
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(table), raising=False)
    return root


@pytest.mark.parametrize(
    "path, atomic",
    [
        ("content/drive/MyDrive/runs/exp1", False),
        ("content/drive", False),
        ("content/gdrive/MyDrive/runs", False),
        ("mnt/gcs/runs", False),
        ("mnt/My Drive/runs", False),
        ("mnt/usb/runs", True),
        ("scratch/runs", True),
        ("content/drive/local-inside/runs", True),
        ("content/drive2/runs", True),  # a sibling whose name starts alike is not on the mount
        ("elsewhere", True),
    ],
)
def test_a_plain_path_on_a_fuse_mount_is_local_but_not_renamed_into_place(mounts, path, atomic):
    loc = resolve(str(mounts / path))
    assert loc.local is True
    assert loc.atomic_rename is atomic


def test_a_symlink_into_the_mount_is_followed(mounts, tmp_path):
    (mounts / "content" / "drive" / "MyDrive").mkdir(parents=True)
    (tmp_path / "shortcut").symlink_to(mounts / "content" / "drive" / "MyDrive")
    assert resolve(str(tmp_path / "shortcut" / "run1")).atomic_rename is False


def test_drive_urls_on_the_mount_are_not_renamed_into_place(mounts, monkeypatch):
    drive = mounts / "content" / "drive" / "MyDrive"
    drive.mkdir(parents=True)
    monkeypatch.setenv("TLAUNCH_DRIVE_ROOT", str(drive))
    loc = resolve("drive://runs/exp1")
    assert (loc.local, loc.atomic_rename) == (True, False)
    assert loc.path == str(drive / "runs" / "exp1")


def test_checkpoints_on_the_drive_mount_commit_with_a_marker(mounts):
    url = str(mounts / "content" / "drive" / "MyDrive" / "runs" / "exp1")
    assert isinstance(build_commit_protocol(resolve(url), RetryPolicy()), MarkerCommit)
    assert isinstance(
        build_commit_protocol(resolve(str(mounts / "elsewhere")), RetryPolicy()), RenameCommit
    )
    store = CheckpointStore(url)
    store.save(7, tensors={}, objects={}, rng={}, state={"step": 7})
    assert [c.step for c in store.committed()] == [7]


def test_an_unreadable_mount_table_means_plain_local_disks(tmp_path, monkeypatch):
    monkeypatch.setattr(localfs, "MOUNTS_FILE", str(tmp_path / "no-such-file"), raising=False)
    assert resolve(str(tmp_path / "run")).atomic_rename is True
