"""Clipping happens after unscaling and before the optimizer step, as fp16 needs.

Accelerate refuses fp16 on the CPU (it has no CPU grad scaler path), so this test puts torch's
real CPU ``GradScaler`` where Accelerate puts its CUDA one, in a subprocess so the Accelerate
singletons it touches die with it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, torch
import tlaunch

run = tlaunch.init(clip_grad_norm=0.5, cpus=1)
acc = run.accelerator
acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
acc.native_amp = True
acc.state._mixed_precision = "fp16"   # what Accelerate records for fp16 on a GPU
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=1.0)
model, opt = run.prepare(model, opt)
opt.scaler = acc.scaler            # AcceleratedOptimizer steps through the scaler when it has one
before = [p.detach().clone() for p in model.parameters()]
loss = ((model(torch.ones(4, 8)) - 5) ** 2).mean()   # gradient norm ~30, far above 0.5
run._sync_now, run._window = True, 1
run.backward(loss)
grads = [p.grad.detach().clone() for p in model.parameters()]
norm_seen_by_step = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
opt.step()
update = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
print(json.dumps({"norm_at_step": norm_seen_by_step, "update_norm": update.norm().item(),
                  "scale": acc.scaler.get_scale()}))
"""


@pytest.mark.timeout(120)
def test_gradients_are_unscaled_then_clipped_then_stepped(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Clipped after unscaling: the step sees a true norm of 0.5, not 0.5 * 256 (clipped while
    # scaled) nor the unclipped norm; and the scaler does not unscale a second time, so the
    # SGD(lr=1) update has norm 0.5 as well.
    assert r["norm_at_step"] == pytest.approx(0.5, rel=1e-4)
    assert r["update_norm"] == pytest.approx(0.5, rel=1e-4)
    assert r["scale"] == 2.0**8  # finite gradients: the step was taken, the scale kept
