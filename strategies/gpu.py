"""One CUDA device."""

from __future__ import annotations

from typing import Any

from tlaunch.strategies.base import DIRECT, LaunchPlan, Strategy, StrategyUnavailable, register


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_cuda(nprocs: int, precision: str) -> None:
    """Refuse a GPU request this machine cannot serve, naming what to run instead."""
    found = cuda_device_count()
    if found < nprocs:
        if found == 0:
            fix = "run on the CPU with --cpus N (gloo), or on a TPU with --tpus N"
        else:
            fix = f"use --gpus {found}"
        raise StrategyUnavailable(
            f"--gpus {nprocs} requested but this machine has {found} CUDA GPUs; {fix}"
        )
    if precision == "bf16":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise StrategyUnavailable(
                "--precision bf16 needs a GPU with bfloat16 support (Ampere or newer); use --precision fp16"
            )


@register("gpu", "cuda")
class GPUStrategy(Strategy):
    name = "gpu"

    def check(self) -> None:
        super().check()
        check_cuda(self.nprocs, self.precision)

    def plan(self) -> LaunchPlan:
        return LaunchPlan(DIRECT, 1, self.accelerate_env())

    def device_rng_state(self) -> dict[str, Any]:
        import torch

        return {"cuda": torch.cuda.get_rng_state()}

    def set_device_rng_state(self, state: dict[str, Any]) -> None:
        import torch

        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
