"""Strategies found by name and chosen from the hardware flags; their launch plans."""

from __future__ import annotations

import pytest

from tlaunch.strategies import (
    DIRECT,
    ELASTIC,
    StrategyUnavailable,
    build_strategy,
    choose,
    strategy_names,
)


def test_registry_knows_names_and_aliases():
    assert {"cpu", "gpu", "ddp", "xla", "tpu", "cuda", "multi_cpu"} <= set(strategy_names())
    assert type(build_strategy("tpu")) is type(build_strategy("xla"))
    with pytest.raises(StrategyUnavailable, match="unknown strategy 'fsdp9'; choose one of"):
        build_strategy("fsdp9")


@pytest.mark.parametrize(
    "flags, name, nprocs, launcher",
    [
        ({}, "cpu", 1, DIRECT),
        ({"cpus": 1}, "cpu", 1, DIRECT),
        ({"cpus": 4}, "ddp", 4, ELASTIC),
        ({"cpus": 1, "nnodes": 2}, "ddp", 1, ELASTIC),
    ],
)
def test_flags_imply_a_strategy_on_a_cpu_host(flags, name, nprocs, launcher):
    s = choose(**flags)
    s.check()
    plan = s.plan()
    assert (s.name, s.nprocs, plan.launcher, plan.nproc_per_node) == (
        name,
        nprocs,
        launcher,
        nprocs,
    )
    # Without ACCELERATE_USE_CPU, CPU processes under an elastic agent run as separate jobs.
    assert plan.env["ACCELERATE_USE_CPU"] == "true"


def test_strategy_flag_overrides_the_choice():
    assert choose(cpus=1, override="ddp").name == "ddp"


def test_accelerate_variables_carry_precision_and_accumulation():
    env = choose(cpus=2, precision="bf16", grad_accum=8).plan().env
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "8"


@pytest.mark.parametrize("cpus", [1, 2])
def test_fp16_on_cpu_is_refused_with_bf16_suggested(cpus):
    with pytest.raises(
        StrategyUnavailable, match="would silently train in fp32.*use --precision bf16"
    ):
        choose(cpus=cpus, precision="fp16").check()


def test_gpu_request_on_a_cpu_host_names_the_alternative():
    with pytest.raises(
        StrategyUnavailable,
        match=r"--gpus 2 requested but this machine has 0 CUDA GPUs; run on the CPU with --cpus N",
    ):
        choose(gpus="2").check()
    with pytest.raises(
        StrategyUnavailable, match="--gpus all requested but this machine has no CUDA GPU"
    ):
        choose(gpus="all")
