"""``tlaunch ckpt ls|verify``: table content and exit codes on good and damaged directories."""

from __future__ import annotations

import pytest
from ckpt_helpers import flip_byte, make_state, remove, rewrite

from tlaunch.storage import CheckpointStore, CheckpointWarning
from tlaunch.storage import ckpt_main as main
from tlaunch.storage.checkpoint.manifest import COMMIT


@pytest.fixture
def ckpt_dir(tmp_path) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    for step, loss in [(100, 0.75), (200, 0.5), (300, 0.25)]:
        store.save(step, **make_state(step, loss=loss))
    return store


def test_ls_lists_steps_with_time_size_status_and_metrics(ckpt_dir, capsys):
    assert main(["ls", ckpt_dir.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STEP", "COMMITTED", "(UTC)", "SIZE", "STATUS", "TAG", "METRICS"]
    assert [line.split()[0] for line in lines[1:]] == ["100", "200", "300"]
    row = lines[2].split()
    assert row[1].count("-") == 2 and row[2].endswith("Z")  # 2026-01-02 03:04:05Z
    assert row[4] == "KiB" and row[5] == "ok"
    assert "loss=0.5" in lines[2] and "acc=0.5" in lines[2]


def test_ls_shows_uncommitted_and_quarantined(ckpt_dir, capsys):
    remove(ckpt_dir, 300, COMMIT)
    rewrite(ckpt_dir, 200, "model.safetensors", flip_byte)
    with pytest.warns(CheckpointWarning, match="step 200 .*using step 100 instead"):
        assert ckpt_dir.load_latest().info.step == 100
    assert main(["ls", ckpt_dir.url]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    status = {
        row[0]: next(w for w in row if w in ("ok", "BAD", "quarantined", "uncommitted"))
        for row in rows
    }
    assert status == {"100": "ok", "200": "quarantined", "300": "uncommitted"}
    assert rows[2][1:] == ["-", "-", "uncommitted"]


def test_ls_bad_status_without_touching_anything(ckpt_dir, capsys):
    rewrite(ckpt_dir, 300, "optimizer.pt", lambda b: b[:-1])
    assert main(["ls", ckpt_dir.url]) == 0
    status = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert " BAD " in status["300"] and " ok " in status["200"]
    assert not any(i.quarantined for i in ckpt_dir.all_steps())


def test_ls_of_an_empty_place(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no checkpoints at {tmp_path}\n"


def test_verify_good(ckpt_dir, capsys):
    assert main(["verify", ckpt_dir.url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "step 100: ok",
        "step 200: ok",
        "step 300: ok",
        "3 of 3 checkpoints verify",
    ]


def test_verify_corrupt_exits_1_with_one_line_per_bad_step(ckpt_dir, capsys):
    rewrite(ckpt_dir, 100, "model.safetensors", flip_byte)
    rewrite(ckpt_dir, 300, "rng-rank00001.pt", flip_byte)
    assert main(["verify", ckpt_dir.url]) == 1
    out = capsys.readouterr().out.splitlines()
    bad = [line for line in out if "BAD" in line]
    assert bad == [
        "step 100: BAD: model.safetensors fails its sha256 check",
        "step 300: BAD: rng-rank00001.pt fails its sha256 check",
    ]
    assert out[-1] == "1 of 3 checkpoints verify"
    assert main(["verify", ckpt_dir.url, "--step", "200"]) == 0
    assert main(["verify", ckpt_dir.url, "--step", "300"]) == 1


def test_verify_step_that_does_not_exist(ckpt_dir, capsys):
    assert main(["verify", ckpt_dir.url, "--step", "150"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"tlaunch: error: step 150 is not committed at {ckpt_dir.url} (committed steps: 100, 200, 300)\n"
    )


def test_verify_nothing_there(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"tlaunch: error: no committed checkpoints at {tmp_path}\n"


def test_storage_errors_are_one_line(capsys):
    assert main(["ls", "nosuchproto://bucket/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlaunch: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate", "x"], ["ls"], ["verify", "x", "--step", "two"]]
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: tlaunch ckpt" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "ls|verify" in capsys.readouterr().out


def test_ckpt_ls_on_unreachable_storage_exits_69_with_one_line(capsys):
    from tests import faultfs
    from tlaunch.storage.checkpoint.cli import main

    rule = faultfs.Fault("*", "*", ConnectionResetError, times=None)
    with faultfs.faults(rule):
        code = main(["ls", "faulty://down/run1"])
    assert code == 69
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tlaunch: error:") and "still failing" in line
