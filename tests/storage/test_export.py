"""Getting the model out: `tlaunch ckpt export`, `load_weights`, and the `best`/`last` names.

Export only reads: a damaged step is refused in one line naming the step, nothing is written
(neither the output nor a QUARANTINED marker), and wrapper prefixes (``module.``, ``_orig_mod.``)
are removed so the weights load strictly into a plain model.
"""

from __future__ import annotations

import os

import pytest
import torch
from ckpt_helpers import flip_byte, make_state, remove, rewrite

from tlaunch.storage import CheckpointError, CheckpointStore, load_weights, resolve_step
from tlaunch.storage import ckpt_main as main
from tlaunch.storage.checkpoint.export import strip_wrappers
from tlaunch.storage.checkpoint.manifest import COMMIT

LOSSES = {100: 0.5, 200: 0.25, 300: 0.4, 400: 0.25, 500: 0.9}


def plain_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def save_single(store: CheckpointStore, step: int, state_dict: dict, **metrics: float) -> None:
    """One model under the name the Run API gives the first model, plus a recorded config."""
    config = {"monitor": "val_loss", "mode": "min"}
    store.save(
        step,
        tensors={"model": state_dict},
        objects={"optimizer": {"step": step}},
        state={"step": step, "metrics": metrics, "config": config},
    )


@pytest.fixture
def runs(tmp_path) -> CheckpointStore:
    """Five single-model steps whose val_loss is best (lowest) at 200 and 400 (a tie)."""
    store = CheckpointStore(str(tmp_path / "ckpt"))
    model = plain_model()
    for step, loss in LOSSES.items():
        with torch.no_grad():
            model[0].bias.fill_(step)
        save_single(store, step, model.state_dict(), val_loss=loss, acc=1 - loss)
    return store


def listing(root) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns), to prove nothing was written."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return found


# -- wrapper prefixes ---------------------------------------------------------------------------


def test_wrapper_prefixes_are_removed_so_a_plain_model_loads_strictly():
    model = plain_model()
    compiled_ddp = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    stripped = strip_wrappers(compiled_ddp)
    assert list(stripped) == list(model.state_dict())
    plain_model().load_state_dict(stripped, strict=True)
    nested = {"encoder._orig_mod.weight": 1, "head._checkpoint_wrapped_module.bias": 2}
    assert strip_wrappers(nested) == {"encoder.weight": 1, "head.bias": 2}


def test_a_user_attribute_named_module_is_kept_unless_every_key_has_it():
    mixed = {"module.weight": 1, "head.bias": 2}
    assert strip_wrappers(mixed) == mixed


def test_keys_that_collide_once_stripped_are_refused():
    with pytest.raises(CheckpointError, match="both become 'weight'"):
        strip_wrappers({"_orig_mod.weight": 1, "weight": 2})


# -- best and last ------------------------------------------------------------------------------


def test_last_is_the_newest_committed_step_and_skips_uncommitted_and_quarantined(runs):
    assert resolve_step(runs, "last").step == 500
    assert resolve_step(runs, None).step == 500
    remove(runs, 500, COMMIT)
    runs.quarantine(400, "test")
    assert resolve_step(runs, "last").step == 300


def test_best_follows_the_recorded_monitor_and_ties_keep_the_newer_step(runs):
    assert resolve_step(runs, "best").step == 400  # val_loss 0.25 at 200 and 400: the newer
    assert resolve_step(runs, "best", monitor="acc", mode="max").step == 400
    assert resolve_step(runs, "best", monitor="val_loss", mode="max").step == 500
    assert resolve_step(runs, 300).step == 300


def test_best_without_a_monitor_anywhere_says_it_needs_one(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.save(5, **make_state(5))  # records no config
    with pytest.raises(CheckpointError, match="best.*needs.*--monitor") as e:
        resolve_step(store, "best")
    assert "\n" not in str(e.value)
    assert resolve_step(store, "best", monitor="loss").step == 5


def test_best_when_no_step_recorded_the_metric(runs):
    with pytest.raises(CheckpointError, match="no committed step .* records 'bleu'"):
        resolve_step(runs, "best", monitor="bleu")


def test_names_on_an_empty_place(tmp_path):
    with pytest.raises(CheckpointError, match="no committed checkpoints at"):
        resolve_step(CheckpointStore(str(tmp_path)), "last")
    assert not os.listdir(tmp_path)


# -- load_weights -------------------------------------------------------------------------------


def test_load_weights_gives_cpu_tensors_that_load_strictly(runs):
    weights = load_weights(runs.url, step="best")
    model = plain_model()
    model.load_state_dict(weights, strict=True)
    assert torch.equal(model[0].bias, torch.full((4,), 400.0))
    assert all(t.device.type == "cpu" for t in weights.values())
    assert torch.equal(load_weights(runs.url)["0.bias"], torch.full((4,), 500.0))
    assert torch.equal(load_weights(runs.url, step=200)["0.bias"], torch.full((4,), 200.0))


def test_several_models_need_a_choice_and_the_error_lists_them(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    state = make_state(3)
    store.save(3, **state)
    with pytest.raises(CheckpointError, match=r"2 models: 0 \(model\), 1 \(model_1\)"):
        load_weights(store.url)
    head = load_weights(store.url, model=1)
    assert head.keys() == state["tensors"]["model_1"].keys()
    assert all(torch.equal(head[k], v) for k, v in state["tensors"]["model_1"].items())
    assert load_weights(store.url, model="model_1").keys() == head.keys()
    with pytest.raises(CheckpointError, match=r"no model 2; it holds 0 \(model\), 1 \(model_1\)"):
        load_weights(store.url, model=2)


def test_a_damaged_step_is_refused_and_nothing_is_written(runs):
    rewrite(runs, 400, "model.safetensors", flip_byte)
    before = listing(runs.location.path)
    with pytest.raises(CheckpointError) as e:
        load_weights(runs.url, step="best")
    message = str(e.value)
    assert "step 400" in message and f"tlaunch ckpt verify {runs.url} --step 400" in message
    assert "quarantined" not in message
    assert listing(runs.location.path) == before
    assert not any(i.quarantined for i in runs.all_steps())


# -- the CLI ------------------------------------------------------------------------------------


def test_export_writes_stripped_weights_and_says_what_it_wrote(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    model = plain_model()
    save_single(store, 9, {f"_orig_mod.{k}": v for k, v in model.state_dict().items()})
    out = tmp_path / "out" / "model.safetensors"
    assert main(["export", store.url, str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("exported step 9") and str(out) in said
    import safetensors.torch

    loaded = plain_model()
    loaded.load_state_dict(safetensors.torch.load_file(out), strict=True)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True)
    )


def test_export_of_a_damaged_step_fails_in_one_line_and_writes_nothing(runs, tmp_path, capsys):
    rewrite(runs, 500, "model.safetensors", flip_byte)
    before = listing(runs.location.path)
    out = tmp_path / "model.safetensors"
    assert main(["export", runs.url, "--step", "last", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tlaunch: error: ")
    assert "step 500" in err and "tlaunch ckpt verify" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert listing(runs.location.path) == before


def test_export_best_and_verify_last(runs, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    assert main(["export", runs.url, "--step", "best", str(out)]) == 0
    assert "exported step 400" in capsys.readouterr().out
    assert main(["verify", runs.url, "--step", "last"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "step 500: ok"


def test_ls_marks_best_and_last(runs, capsys):
    assert main(["ls", runs.url]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["STEP"] == ["STEP", "COMMITTED", "(UTC)", "SIZE", "STATUS", "TAG", "METRICS"]
    assert rows["400"][6] == "best" and rows["500"][6] == "last"
    assert rows["200"][6].startswith("acc=")
    assert main(["ls", runs.url, "--monitor", "val_loss", "--mode", "max"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["500"][6] == "best,last" and rows["400"][6].startswith("acc=")


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "x"],
        ["export", "x", "out", "--step", "worst"],
        ["export", "x", "out", "--mode", "median"],
        ["verify", "x", "--step", "-3"],
    ],
)
def test_export_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: tlaunch ckpt" in capsys.readouterr().err
