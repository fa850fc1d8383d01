"""TPU cores through torch_xla (PJRT). On a CPU host ``PJRT_DEVICE=CPU`` runs the same path.

One core: the script runs as a single child process, pinned to one chip by the topology
variables below. N cores: the launcher's elastic path starts N processes with ``PJRT_DEVICE``
set, and each worker joins torch_xla's ``xla://`` rendezvous before touching the device; that
call is what gives each process its own chip (it reads ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and
sets the ``TPU_*`` topology variables). Without it, every process would claim every chip.
Accelerate then reports ``DistributedType.XLA``. bf16 is the TPU's native reduced precision;
fp16 is refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tlaunch.strategies.base import (
    DIRECT,
    ELASTIC,
    LaunchPlan,
    Strategy,
    StrategyUnavailable,
    register,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

#: torch_xla's names for one process owning exactly one chip (``configure_one_chip_topology``).
ONE_CHIP_TOPOLOGY = {
    "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
    "TPU_PROCESS_BOUNDS": "1,1,1",
    "TPU_VISIBLE_CHIPS": "0",
}


def torch_xla_installed() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def pjrt_device() -> str:
    return os.environ.get("PJRT_DEVICE", "TPU").upper()


@register("xla", "tpu")
class XLAStrategy(Strategy):
    name = "xla"
    supported_precisions = ("no", "bf16")

    def precision_hint(self) -> str:
        return (
            f"--precision {self.precision} is not supported on TPU; "
            "use --precision bf16 (the TPU's native format)"
        )

    def check(self) -> None:
        super().check()
        if not torch_xla_installed():
            raise StrategyUnavailable(
                f"--tpus {self.nprocs} needs torch_xla, which is not installed; "
                "run: pip install 'tlaunch[tpu]' (or use --cpus N / --gpus N)"
            )
        # PJRT's CPU client is one device in one process: N processes would each see a
        # world of one and train N separate copies, all believing they are rank 0.
        if pjrt_device() == "CPU" and self.nprocs > 1:
            raise StrategyUnavailable(
                f"--tpus {self.nprocs} with PJRT_DEVICE=CPU: torch_xla's CPU device runs one "
                "process; use --tpus 1, or --cpus N for N CPU processes over gloo"
            )

    def plan(self) -> LaunchPlan:
        env = {**self.accelerate_env(), "PJRT_DEVICE": pjrt_device()}
        if self.nprocs == 1:
            if env["PJRT_DEVICE"] == "TPU":
                env.update({k: os.environ.get(k, v) for k, v in ONE_CHIP_TOPOLOGY.items()})
            return LaunchPlan(DIRECT, 1, env)
        return LaunchPlan(ELASTIC, self.nprocs, env)

    # -- worker side -----------------------------------------------------------------------
    def build_accelerator(self, *, own_accumulation: bool = False, **trackers: Any) -> Accelerator:
        # PJRT_DEVICE (in the plan's env) must be set before torch_xla first touches a device.
        for key, value in self.plan().env.items():
            os.environ.setdefault(key, value)
        maybe_join_xla_rendezvous()
        return super().build_accelerator(own_accumulation=own_accumulation, **trackers)

    def end_step(self, accelerator: Accelerator) -> None:
        # Cut the lazy graph once per optimizer step. Uncut, every step's graph would extend
        # the previous one, and each `.item()` would compile and run the whole history again.
        import torch_xla

        torch_xla.sync()

    @contextlib.contextmanager
    def no_sync(self, accelerator: Accelerator, model: Any) -> Iterator[None]:
        # Accelerate's optimizer all-reduces XLA gradients on every step() call, also on the
        # micro-batches that do not step; marking them synced skips that reduce.
        state = accelerator.gradient_state
        state.is_xla_gradients_synced = True
        try:
            with accelerator.no_sync(model):
                yield
        finally:
            state.is_xla_gradients_synced = False

    def gather_object(self, accelerator: Accelerator, obj: Any) -> list[Any]:
        # Accelerate's gather_object raises NotImplementedError on XLA.
        if accelerator.num_processes == 1:
            return [obj]
        return mesh_gather(obj)

    def seed_device(self, seed: int) -> None:
        """torch.manual_seed does not reach the XLA generator (it starts at 101 in every
        process); seed it explicitly, like the host RNGs."""
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed)

    def device_rng_state(self) -> dict[str, Any]:
        import torch_xla.core.xla_model as xm

        return {"xla": xm.get_rng_state()}

    def set_device_rng_state(self, state: dict[str, Any]) -> None:
        if "xla" in state:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(state["xla"])


def maybe_join_xla_rendezvous() -> None:
    """Under torch's elastic agent with several workers, join torch_xla's ``xla://`` process
    group before the device is first used, so torch_xla assigns this process its chip."""
    import torch.distributed as dist

    if not dist.is_torchelastic_launched() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if dist.is_initialized():
        return
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// handler)

    dist.init_process_group("xla", init_method="xla://")


def mesh_gather(obj: Any) -> list[Any]:
    """``obj`` from every XLA process, in ordinal order, through torch_xla's out-of-graph
    rendezvous (pickled with torch.save, so CPU tensors and plain Python values only)."""
    import torch_xla.core.xla_model as xm

    return xm.mesh_reduce("tlaunch.gather_object", obj, list)
