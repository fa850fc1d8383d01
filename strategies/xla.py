"""TPU cores through torch_xla (PJRT). On a CPU host ``PJRT_DEVICE=CPU`` runs the same path.

torch_xla's own launcher spawns one process per core; Accelerate then reports
``DistributedType.XLA``. bf16 is the TPU's native reduced precision; fp16 is refused.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from tlaunch.strategies.base import XLA, LaunchPlan, Strategy, StrategyUnavailable, register


def torch_xla_installed() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


@register("xla", "tpu")
class XLAStrategy(Strategy):
    name = "xla"
    supported_precisions = ("no", "bf16")

    def precision_hint(self) -> str:
        return "--precision fp16 is not supported on TPU; use --precision bf16 (the TPU's native format)"

    def check(self) -> None:
        super().check()
        if not torch_xla_installed():
            raise StrategyUnavailable(
                f"--tpus {self.nprocs} needs torch_xla, which is not installed; "
                "run: pip install 'tlaunch[tpu]' (or use --cpus N / --gpus N)"
            )

    def plan(self) -> LaunchPlan:
        env = {**self.accelerate_env(), "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "TPU")}
        if self.nprocs == 1:
            env["TPU_PROCESS_BOUNDS"] = os.environ.get("TPU_PROCESS_BOUNDS", "1,1,1")
            env["TPU_VISIBLE_CHIPS"] = os.environ.get("TPU_VISIBLE_CHIPS", "0")
        return LaunchPlan(XLA, self.nprocs, env)

    def device_rng_state(self) -> dict[str, Any]:
        import torch_xla.core.xla_model as xm

        return {"xla": xm.get_rng_state()}

    def set_device_rng_state(self, state: dict[str, Any]) -> None:
        if "xla" in state:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(state["xla"])
