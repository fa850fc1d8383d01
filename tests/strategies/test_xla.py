"""The XLA/TPU strategy, as far as a CPU host can show it.

``make test-xla`` runs the ``xla``-marked tests in their own venv (torch 2.9.0 + torch_xla
2.9.0) with ``PJRT_DEVICE=CPU``: torch_xla then drives one XLA device on the CPU through the
same PJRT path a TPU takes, and Accelerate reports ``DistributedType.XLA``. The marks sit on
the class, not the module, because one test belongs to the main lane: where torch_xla is
absent, ``--tpus`` must be refused with the install command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from tlaunch.strategies import DIRECT, ELASTIC, StrategyUnavailable, choose

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
REPORT = "XLA_REPORT "
FLAGS = shlex.split(
    "--tpus 1 --precision bf16 --grad-accum 2 --progress off --preemption-watch off"
)

# A real loop through the Run API. Everything the test asserts is measured here and printed
# as one JSON line; the test, not the script, judges it, so a failure shows every number.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import copy, io, json
    import torch
    import torch.nn.functional as F
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import tlaunch
    from tlaunch.strategies.xla import mesh_gather

    run = tlaunch.init()
    acc = run.accelerator
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    y = torch.randint(0, 4, (128,), generator=g)
    x = centers[y] + torch.randn(128, 16, generator=g)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    reference = copy.deepcopy(model)  # fp32 on the host: the gradient accumulation must match
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer_steps = [0]
    optimizer.register_step_post_hook(lambda *_: optimizer_steps.__setitem__(0, optimizer_steps[0] + 1))
    autocast = []
    model[0].register_forward_hook(lambda m, i, out: autocast.append(
        [torch.is_autocast_enabled("xla"), str(torch.get_autocast_dtype("xla")), str(out.dtype)]))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model, optimizer, loader = run.prepare(model, optimizer, loader)
    reduces = [0]
    real_all_reduce = xm.all_reduce
    def counting_all_reduce(*args, **kwargs):
        reduces[0] += 1
        return real_all_reduce(*args, **kwargs)
    xm.all_reduce = counting_all_reduce
    initial_xla_seed = xm.get_rng_state()

    losses, batches, first_window, grad_ratio = [], 0, [], None
    for epoch in run.epochs(4):
        for xb, yb in run.batches(loader):
            with run.accumulate(model):
                loss = F.cross_entropy(model(xb), yb)
                run.backward(loss)
                if len(first_window) < 2:
                    first_window.append((xb.cpu(), yb.cpu()))
                    if len(first_window) == 2:  # the window's last micro-batch, before its step
                        got = model[0].weight.grad.cpu().float()
                        sum(F.cross_entropy(reference(a), b) for a, b in first_window).div(2).backward()
                        want = reference[0].weight.grad
                        grad_ratio = float((got * want).sum() / (want * want).sum())
                optimizer.step()
                optimizer.zero_grad()
            run.log(loss=loss)
            losses.append(run.metrics["loss"])
            batches += 1
    reduces_in_loop = reduces[0]
    run.finish()
    compiles = met.metric_data("CompileTime")

    # RNG: the XLA generator is seeded, saved and restored exactly, and the saved state goes
    # through torch_xla's rendezvous and a weights_only load (the checkpoint's path).
    run.strategy.seed_device(1234)
    seeded = xm.get_rng_state()
    state = run.strategy.rng_state()
    draw = lambda: torch.rand(8, device=acc.device).cpu()
    a = draw()
    run.strategy.set_rng_state(state)
    b = draw()
    buffer = io.BytesIO()
    torch.save(mesh_gather(state), buffer)
    buffer.seek(0)
    (gathered,) = torch.load(buffer, weights_only=True)

    print("XLA_REPORT " + json.dumps({
        "distributed_type": str(acc.distributed_type),
        "device_type": acc.device.type,
        "hardware": xm.xla_device_hw(acc.device),
        "num_processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "autocast": autocast[0],
        "batches": batches,
        "run_step": run.step,
        "optimizer_steps": optimizer_steps[0],
        "grad_ratio": grad_ratio,
        "first_epoch_loss": sum(losses[:8]) / 8,
        "last_epoch_loss": sum(losses[-8:]) / 8,
        "compiles": compiles[0] if compiles else 0,
        "seeded": seeded, "reduces": reduces_in_loop, "reduces_total": reduces[0], "initial_xla_seed": initial_xla_seed,
        "rng_replays": torch.equal(a, b),
        "rng_gathered": gathered["xla"] == state["xla"],
    }), flush=True)
    """
)


# Dropout draws from the XLA generator, Adam and StepLR carry state, batches are shuffled, and
# the kill lands mid-epoch: the resumed run matches only if all of it is restored exactly.
RESUME_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import tlaunch

    kill_at = int(sys.argv[1]) if len(sys.argv) > 1 else None
    run = tlaunch.init()
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    y = torch.randint(0, 4, (96,), generator=g)
    x = centers[y] + torch.randn(96, 16, generator=g)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model, optimizer, loader, scheduler = run.prepare(model, optimizer, loader, scheduler)
    for epoch in run.epochs(3):
        for xb, yb in run.batches(loader):
            with run.accumulate(model):
                run.backward(F.cross_entropy(model(xb), yb))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if run.step == kill_at:
                # A hard kill once step 8 is committed (saves finish in the background).
                commit = os.path.join(run.config.checkpoint_dir, "step-000000008", "COMMIT")
                deadline = time.monotonic() + 120
                while not os.path.exists(commit) and time.monotonic() < deadline:
                    time.sleep(0.05)
                os._exit(1)
    run.finish()
    digest = hashlib.sha256()
    for name, t in sorted(run.accelerator.unwrap_model(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    print("XLA_REPORT " + json.dumps({"step": run.step, "digest": digest.hexdigest()}), flush=True)
    """
)


# run.log keeps device tensors unread until a flush; the script changes one in place after
# logging it, and the value logged must be the one recorded.
LOG_SCRIPT = textwrap.dedent(
    """
    import json, os
    import torch
    import tlaunch

    run = tlaunch.init()
    total = torch.zeros((), device=run.accelerator.device)
    for step in range(1, 4):
        total += step
        run.log(total=total, mean=torch.full((3,), float(step), device=total.device))
    pending = len(run._metrics._pending)
    total += 100
    latest = dict(run.metrics)
    run.finish()
    with open(os.path.join(run.run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    print("XLA_REPORT " + json.dumps({
        "device": total.device.type, "pending": pending, "latest": latest,
        "totals": [r["total"] for r in lines], "means": [r["mean"] for r in lines],
    }), flush=True)
    """
)


def tlaunch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlaunch", *args]


def launch_on_xla_cpu(tmp_path, script: str, *flags: str, script_args: tuple[str, ...] = ()):
    """One ``tlaunch`` run of ``script`` on torch_xla's CPU device; returns the process."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    command = tlaunch_command(
        *FLAGS,
        "--run-dir",
        str(tmp_path / "runs"),
        *flags,
        str(path),
        "--",
        *script_args,
    )
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def report(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(REPORT)]
    assert lines, f"no report line in stdout:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return json.loads(lines[-1][len(REPORT) :])


@pytest.mark.xla
@pytest.mark.skipif(not HAS_TORCH_XLA, reason="torch_xla is not installed (make test-xla)")
class TestXLA:
    @pytest.mark.timeout(360)
    def test_training_loop_on_the_xla_device(self, tmp_path):
        r = report(launch_on_xla_cpu(tmp_path, TRAIN_SCRIPT))

        assert r["distributed_type"] == "DistributedType.XLA"
        assert (r["device_type"], r["hardware"], r["num_processes"]) == (
            "xla",
            "CPU",
            1,
        )
        assert r["mixed_precision"] == "bf16"
        assert r["autocast"] == [True, "torch.bfloat16", "torch.bfloat16"]
        # 128 samples / batch 16 = 8 micro-batches per epoch, 4 epochs, windows of 2.
        assert r["batches"] == 32
        assert r["run_step"] == r["optimizer_steps"] == r["batches"] // 2
        # A window's gradient is the mean over its micro-batches: not half of it, not the sum
        # (bf16 autocast keeps it from being exact).
        assert r["grad_ratio"] == pytest.approx(1.0, abs=0.05)
        assert r["last_epoch_loss"] < 0.5 * r["first_epoch_loss"]
        # The graph is cut once per optimizer step, so the same few graphs are reused; uncut,
        # every step compiles a new, longer one (34 compiles for these 16 steps).
        assert r["compiles"] <= 8, r["compiles"]
        assert r["seeded"] == 1234
        assert r["reduces"] == r["optimizer_steps"], r
        assert r["initial_xla_seed"] == 0, r
        assert r["rng_replays"] and r["rng_gathered"]

    @pytest.mark.timeout(300)
    def test_logged_device_values_are_read_later_as_they_were_logged(self, tmp_path):
        r = report(launch_on_xla_cpu(tmp_path, LOG_SCRIPT))
        assert r["device"] == "xla" and r["pending"] == 3, "device values wait for a flush"
        assert r["latest"] == {"total": 6.0, "mean": 3.0}
        assert r["totals"] == [1.0, 3.0, 6.0] and r["means"] == [1.0, 2.0, 3.0]

    @pytest.mark.timeout(600)
    def test_killed_run_resumes_bitwise_on_the_xla_device(self, tmp_path):
        flags = ("--save-every", "4")
        whole = report(
            launch_on_xla_cpu(
                tmp_path / "whole",
                RESUME_SCRIPT,
                *flags,
                "--checkpoint-dir",
                str(tmp_path / "whole" / "ckpt"),
            )
        )
        ckpt = str(tmp_path / "cut" / "ckpt")
        killed = launch_on_xla_cpu(
            tmp_path / "cut",
            RESUME_SCRIPT,
            *flags,
            "--checkpoint-dir",
            ckpt,
            script_args=("10",),
        )
        assert killed.returncode == 1, killed.stderr[-4000:]
        resumed = launch_on_xla_cpu(
            tmp_path / "cut", RESUME_SCRIPT, *flags, "--checkpoint-dir", ckpt
        )
        # 96 samples / batch 8 = 12 micro-batches = 6 steps per epoch: step 8 is mid-epoch.
        assert "resuming from step 8 (epoch 1, batch 4" in resumed.stderr, resumed.stderr[-4000:]
        assert report(resumed) == whole == {"step": 18, "digest": whole["digest"]}

    def test_tpu_plan_is_n_elastic_workers_with_pjrt_device(self, monkeypatch):
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
        plan = choose(tpus=8, precision="bf16", grad_accum=4).plan()
        assert (plan.launcher, plan.nproc_per_node) == (ELASTIC, 8)
        assert plan.env["PJRT_DEVICE"] == "TPU"
        assert plan.env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert plan.env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "4"
        # Each of the N workers gets its own chip from torch_xla's xla:// rendezvous; a fixed
        # chip here would give all of them chip 0.
        assert not any(k.startswith("TPU_") for k in plan.env)

    def test_one_tpu_is_one_direct_process_pinned_to_one_chip(self, monkeypatch):
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
        for key in (
            "TPU_VISIBLE_CHIPS",
            "TPU_PROCESS_BOUNDS",
            "TPU_CHIPS_PER_PROCESS_BOUNDS",
        ):
            monkeypatch.delenv(key, raising=False)
        plan = choose(tpus=1).plan()
        assert (plan.launcher, plan.nproc_per_node) == (DIRECT, 1)
        assert plan.env["PJRT_DEVICE"] == "TPU"
        assert plan.env["TPU_VISIBLE_CHIPS"] == "0"
        assert plan.env["TPU_PROCESS_BOUNDS"] == plan.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"

    def test_pjrt_device_from_the_environment_is_kept(self, monkeypatch):
        monkeypatch.setenv("PJRT_DEVICE", "CPU")
        plan = choose(tpus=1).plan()
        assert (plan.launcher, plan.nproc_per_node) == (DIRECT, 1)
        assert plan.env["PJRT_DEVICE"] == "CPU"
        assert not any(k.startswith("TPU_") for k in plan.env)
        choose(tpus=1).check()

    def test_several_processes_on_the_cpu_device_are_refused(self, monkeypatch):
        # PJRT's CPU client is one process: N of them would be N unrelated rank-0 jobs.
        monkeypatch.setenv("PJRT_DEVICE", "CPU")
        with pytest.raises(StrategyUnavailable, match=r"--tpus 1, or --cpus N"):
            choose(tpus=2).check()

    def test_fp16_is_refused_with_bf16_suggested(self, tmp_path):
        with pytest.raises(StrategyUnavailable, match=r"use --precision bf16"):
            choose(tpus=8, precision="fp16").check()
        script = tmp_path / "train.py"
        script.write_text("raise SystemExit(3)\n")
        out = subprocess.run(
            tlaunch_command("--tpus", "8", "--precision", "fp16", str(script)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            "tlaunch: error: --precision fp16 is not supported on TPU; "
            "use --precision bf16 (the TPU's native format)"
        ]


@pytest.mark.skipif(HAS_TORCH_XLA, reason="checks the message shown where torch_xla is absent")
def test_tpus_without_torch_xla_name_the_install_command(tmp_path):
    with pytest.raises(StrategyUnavailable, match=r"pip install 'tlaunch\[tpu\]'"):
        choose(tpus=8).check()
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit(3)\n")  # must never run
    out = subprocess.run(
        tlaunch_command("--tpus", "8", str(script)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("tlaunch: error: --tpus 8 needs torch_xla")
    assert "pip install 'tlaunch[tpu]'" in line
