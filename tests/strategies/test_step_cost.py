"""Work the strategies take off every step: what Accelerate repeats per step without need.

In a subprocess, so the Accelerate singletons it touches die with it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import importlib.util, inspect, json, torch
import tlaunch

run = tlaunch.init(cpus=1)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
model, opt = run.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
probes, real_find_spec = [], importlib.util.find_spec
def find_spec(name, *args, **kwargs):
    probes.append(name)
    return real_find_spec(name, *args, **kwargs)
importlib.util.find_spec = find_spec
signatures, real_signature = [], inspect.signature
def signature(obj, *args, **kwargs):
    signatures.append(getattr(obj, "__qualname__", repr(obj)))
    return real_signature(obj, *args, **kwargs)
inspect.signature = signature
before = model.weight.detach().clone()
x = torch.ones(2, 4)
for _ in range(5):
    loss = model(x).sum()
    run.backward(loss)
    grad = model.weight.grad.clone()
    opt.step()
    opt.zero_grad()
zeroed = model.weight.grad is None
run.backward(model(x).sum())
run.accelerator.gradient_state._set_sync_gradients(False)  # inside an accumulation window
opt.zero_grad()
kept = model.weight.grad is not None
run.accelerator.gradient_state._set_sync_gradients(True)
opt.zero_grad(set_to_none=False)
print(json.dumps({
    "lomo_probes": probes.count("lomo_optim"),
    "signatures": signatures,
    "zero_grad": [zeroed, kept, model.weight.grad.abs().sum().item()],
    "grad": grad.tolist(),
    "moved": (before - model.weight.detach()).tolist(),
}))
"""


@pytest.mark.timeout(120)
def test_optimizer_steps_do_not_search_sys_path_and_still_step(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Accelerate asks twice per step() whether lomo_optim is installed; asked once, remembered.
    assert r["lomo_probes"] <= 1, r
    # Accelerate's zero_grad asks inspect.signature about the optimizer on every call; asked
    # once at prepare. zero_grad still does what Accelerate's does: grads to None, nothing
    # inside an accumulation window, set_to_none=False zeroes them in place.
    assert r["signatures"] == [], r
    assert r["zero_grad"] == [True, True, 0.0], r
    # backward without Accelerate's divide-by-one: d(sum(Wx))/dW = x summed over the batch
    assert r["grad"] == [[2.0, 2.0, 2.0, 2.0]]
    assert r["moved"] == [pytest.approx([5 * 0.1 * 2.0] * 4)]
