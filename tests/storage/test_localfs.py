"""Local files appear whole or not at all, through the one helper every local write uses."""

from __future__ import annotations

import os

import pytest

from tlaunch.storage.localfs import AtomicFile, create_file, temp_path, write_atomic


class Crash(Exception):
    pass


def test_write_atomic_replaces_the_file_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "pointer.json"
    path.write_bytes(b"old")
    write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["pointer.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "shard"
    path.write_bytes(b"old")
    with pytest.raises(Crash), AtomicFile(str(path)) as f:
        f.write(b"half of it")
        raise Crash
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["shard"]


def test_copies_from_a_file_and_names_a_stream_once_it_is_hashed(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    with open(src, "rb") as f:
        write_atomic(str(tmp_path / "copy"), f, sync_dir=True)
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()

    sink = AtomicFile(str(tmp_path / "pending"))
    sink.write(b"abc")
    sink.commit(str(tmp_path / "named-by-content"))
    assert (tmp_path / "named-by-content").read_bytes() == b"abc"
    assert sorted(os.listdir(tmp_path)) == ["copy", "named-by-content", "src"]


def test_temp_names_are_hidden_beside_the_target_and_unique():
    a, b = temp_path("/data/run/model.pt"), temp_path("/data/run/model.pt")
    assert a != b
    assert os.path.dirname(a) == "/data/run"
    assert os.path.basename(a).startswith(".model.pt.tmp-")


def test_create_file_never_replaces_a_file(tmp_path):
    path = str(tmp_path / "lease")
    create_file(path, b"first")
    with pytest.raises(FileExistsError):
        create_file(path, b"second")
    assert open(path, "rb").read() == b"first"


def test_a_local_path_gets_fsspec_local_files_at_once_or_lazily_once_used(tmp_path):
    import pickle
    import subprocess
    import sys

    from tlaunch.storage import resolve

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"abc")
    fs = resolve(str(tmp_path)).fs
    assert fs.protocol == ("file", "local")
    assert fs.find(str(tmp_path), detail=False) == [str(tmp_path / "a" / "f")]
    assert fs.cat_file(str(tmp_path / "a" / "f"), start=1) == b"bc"
    assert pickle.loads(pickle.dumps(fs)).exists(str(tmp_path / "a"))
    # In a process of its own: a lazy resolve imports no fsspec until a call needs it; a plain
    # one imports it at once (a writer's thread may first use it while the interpreter exits).
    program = (
        "import sys; from tlaunch.storage import resolve\n"
        f"fs = resolve({str(tmp_path)!r}, lazy=True).fs; print('fsspec' in sys.modules, end=' ')\n"
        f"fs.ls({str(tmp_path)!r}); print('fsspec' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert out.stdout == "False True\n", out.stderr
    program = (
        "import sys; from tlaunch.storage import resolve\n"
        f"resolve({str(tmp_path)!r}); print('fsspec' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert out.stdout == "True\n", out.stderr
