"""Several processes, one per device, gradients all-reduced by DistributedDataParallel.

On CUDA hosts each process owns a GPU and talks NCCL; on CPU hosts processes talk gloo.
``ACCELERATE_USE_CPU=true`` is what makes Accelerate treat CPU processes started by an
elastic agent as one job: without it each process runs as a separate non-distributed job.
"""

from __future__ import annotations

import os
from typing import Any

from tlaunch.strategies.base import ELASTIC, LaunchPlan, Strategy, register
from tlaunch.strategies.cpu import FP16_ON_CPU
from tlaunch.strategies.gpu import check_cuda


@register("ddp", "ddp_cpu", "ddp_gpu", "multi_gpu", "multi_cpu")
class DDPStrategy(Strategy):
    name = "ddp"

    @property
    def supported_precisions(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("no", "bf16") if self.device == "cpu" else ("no", "bf16", "fp16")

    def precision_hint(self) -> str:
        if self.device == "cpu" and self.precision == "fp16":
            return FP16_ON_CPU
        return super().precision_hint()

    def check(self) -> None:
        super().check()
        if self.device == "cuda":
            check_cuda(self.nprocs, self.precision)

    def plan(self) -> LaunchPlan:
        env = {**self.accelerate_env(), "USE_TORCH_XLA": "false"}  # see cpu.py
        if self.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
            # Share the cores instead of oversubscribing them (torchrun sets 1 and warns).
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(
                max(1, (os.cpu_count() or 1) // self.nprocs)
            )
        return LaunchPlan(ELASTIC, self.nprocs, env)

    def accelerator_kwargs(self) -> dict[str, Any]:
        kwargs = super().accelerator_kwargs()
        return {**kwargs, "cpu": True} if self.device == "cpu" else kwargs

    def device_rng_state(self) -> dict[str, Any]:
        if self.device != "cuda":
            return {}
        import torch

        return {"cuda": torch.cuda.get_rng_state()}

    def set_device_rng_state(self, state: dict[str, Any]) -> None:
        if "cuda" in state:
            import torch

            torch.cuda.set_rng_state(state["cuda"])
