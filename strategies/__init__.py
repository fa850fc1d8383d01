"""How processes and devices are arranged; the only place that talks to Accelerate.

Strategies are found by name (``cpu``, ``gpu``, ``ddp``, ``xla`` and their aliases).
:func:`choose` turns the launcher's hardware flags into a configured strategy.
"""

from __future__ import annotations

from tlaunch.strategies import cpu, ddp, gpu, xla  # noqa: F401  (registers the strategies)
from tlaunch.strategies.base import (
    DIRECT,
    ELASTIC,
    XLA,
    LaunchPlan,
    Strategy,
    StrategyUnavailable,
    build_strategy,
    strategy_names,
)


def choose(
    *,
    gpus: str | None = None,
    cpus: int | None = None,
    tpus: int | None = None,
    nnodes: int = 1,
    override: str | None = None,
    precision: str = "no",
    grad_accum: int = 1,
) -> Strategy:
    """The strategy the hardware flags imply (``override`` wins), with its process count.

    No flag: every GPU if there is one, else one CPU process.
    """
    common = {"precision": precision, "grad_accum": grad_accum}
    if tpus is not None:
        name, n, device = "xla", tpus, None
    elif cpus is not None:
        name, n, device = ("cpu" if cpus == 1 and nnodes == 1 else "ddp"), cpus, "cpu"
    else:
        found = gpu.cuda_device_count() if gpus in (None, "all") else None
        if gpus == "all" and not found:
            raise StrategyUnavailable(
                "--gpus all requested but this machine has no CUDA GPU; use --cpus N"
            )
        n = int(gpus) if gpus not in (None, "all") else (found or 1)
        device = "cuda" if (gpus is not None or found) else "cpu"
        name = ("gpu" if device == "cuda" else "cpu") if n == 1 and nnodes == 1 else "ddp"
    if override is not None:
        name = override
    return build_strategy(name, nprocs=n, device=device or "cpu", **common)


__all__ = [
    "DIRECT",
    "ELASTIC",
    "XLA",
    "LaunchPlan",
    "Strategy",
    "StrategyUnavailable",
    "build_strategy",
    "choose",
    "strategy_names",
]
