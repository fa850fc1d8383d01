"""Rules whose trigger this machine cannot produce (a GPU, a slow save, a named cloud), fed the
measurements a worker would have written."""

from __future__ import annotations

from tlaunch.doctor.findings import ERROR, INFO, WARN, diagnose


def _rank(**changes) -> dict:
    rank = {
        "rank": 0,
        "world_size": 1,
        "steps": 30,
        "cuda": False,
        "cpus": 2,
        "grad_norms": [1.0] * 30,
        "loaders": {"1": {"num_workers": 0, "pin_memory": False, "batch_size": 16,
                          "shuffle": True, "kind": "TensorDataset"}},
        "train_loader": "1",
        "overfit": {"steps": 10, "done": 10, "losses": [1.0] + [0.1] * 9, "abandoned": False},
        "checkpoint": {"bytes": 4e9, "seconds": 45.0},
    }  # fmt: skip
    rank.update(changes)
    return rank


def _finding(diagnosis, name):
    return next(f for f in diagnosis.findings if f.id == name)


def test_a_save_longer_than_the_gce_notice_is_an_error_and_fits_aws():
    budget = _finding(diagnose([_rank()], "gce", 0), "checkpoint-budget")
    assert budget.severity == ERROR
    assert "4.0 GB, saved in 45.00 s" in budget.seen and "150.0% of its 30 s notice" in budget.seen
    # 45 s of saving is at most 1% of training time every 75 minutes.
    assert budget.data["save_every_minutes"] == 75 and "--save-every-minutes 75" in budget.fix
    assert _finding(diagnose([_rank()], "aws", 0), "checkpoint-budget").severity == INFO
    # Over half of the notice: a stop-save with no margin for a slow write.
    slow = _rank(checkpoint={"bytes": 4e9, "seconds": 70.0})
    assert _finding(diagnose([slow], "aws", 0), "checkpoint-budget").severity == WARN
    colab = _finding(diagnose([_rank()], "colab", 0), "checkpoint-budget")
    assert colab.severity == INFO and "runtime+11h30m" in colab.fix
    # No platform known: every notice listed, no verdict on any.
    unknown = _finding(diagnose([_rank()], None, 0), "checkpoint-budget")
    assert unknown.severity == INFO and unknown.data["platforms"] == ["gce", "aws", "colab"]


def test_pin_memory_is_checked_on_gpu_hosts_only():
    assert "no GPU" in diagnose([_rank()], None, 0).skipped["pin-memory"]
    on_gpu = _finding(diagnose([_rank(cuda=True)], None, 0), "pin-memory")
    assert on_gpu.severity == WARN and "pin_memory=True" in on_gpu.fix


def test_a_failed_script_and_a_script_without_steps_are_errors():
    failed = diagnose([_rank()], None, 3)
    assert failed.failed and failed.findings[0].id == "script-failed"
    assert "code 3" in failed.findings[0].seen
    idle = diagnose([_rank(steps=0)], None, 0)
    assert [f.id for f in idle.findings] == ["no-training-step"] and idle.failed
