"""tests/e2e/scripts/resume_train.py on CUDA, printing what the GPU tests check.

The training is the e2e reference run itself (same flags: ``--out``, ``--signal-at-batch``);
this wrapper only adds ``GPU_TEST_DETERMINISTIC=1`` (deterministic CUDA kernels) and, once the
run has finished, one line per rank: ``RESULT rank= world= backend= device= linear_dtype=
scaler= digest=`` (of the parameters). ``linear_dtype`` is what the Linear layers computed in during training:
it shows whether ``--precision`` really reached the forward pass.
"""

import hashlib
import os
import runpy

import torch

import tlaunch

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "..", "e2e", "scripts", "resume_train.py")

if os.environ.get("GPU_TEST_DETERMINISTIC") == "1":
    # Needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment (set by the test).
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False

facts = {"backend": "none", "linear_dtypes": set()}
_init = tlaunch.init


def init(*args, **kwargs):
    run = _init(*args, **kwargs)
    if torch.distributed.is_initialized():  # read now: run.finish() ends the process group
        facts["backend"] = torch.distributed.get_backend()
    return run


def record_dtype(module, inputs, output):
    if isinstance(module, torch.nn.Linear) and module.training:
        facts["linear_dtypes"].add(str(output.dtype).removeprefix("torch."))


tlaunch.init = init
torch.nn.modules.module.register_module_forward_hook(record_dtype)
trained = runpy.run_path(TRAIN, run_name="__main__")  # a stop raises SystemExit out of here

run = trained["run"]
model = run.accelerator.unwrap_model(trained["model"])
# Parameters only: BatchNorm's running statistics are each rank's own after its last forward.
flat = torch.cat([p.detach().float().cpu().flatten() for p in model.parameters()])
print(
    f"RESULT rank={run.rank} world={run.world_size} backend={facts['backend']}"
    f" device={next(model.parameters()).device}"
    f" linear_dtype={','.join(sorted(facts['linear_dtypes']))}"
    f" scaler={run.accelerator.scaler is not None} digest={hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]}",
    flush=True,
)
