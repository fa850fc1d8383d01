"""One process on the CPU."""

from __future__ import annotations

from tlaunch.strategies.base import DIRECT, LaunchPlan, Strategy, StrategyUnavailable, register

FP16_ON_CPU = (
    "--precision fp16 on the CPU would silently train in fp32 (Accelerate does no autocast "
    "and no gradient scaling there); use --precision bf16"
)


@register("cpu")
class CPUStrategy(Strategy):
    name = "cpu"
    supported_precisions = ("no", "bf16")

    def precision_hint(self) -> str:
        return FP16_ON_CPU if self.precision == "fp16" else super().precision_hint()

    def check(self) -> None:
        super().check()
        if self.nprocs != 1:
            raise StrategyUnavailable(
                f"the cpu strategy runs one process; for {self.nprocs} use --cpus {self.nprocs}"
            )

    def plan(self) -> LaunchPlan:
        # USE_TORCH_XLA=false: where torch_xla is installed (any TPU VM) Accelerate would
        # otherwise put this "CPU" run on the XLA device.
        env = {"ACCELERATE_USE_CPU": "true", "USE_TORCH_XLA": "false", **self.accelerate_env()}
        return LaunchPlan(DIRECT, 1, env)

    def accelerator_kwargs(self) -> dict:
        return {**super().accelerator_kwargs(), "cpu": True}
