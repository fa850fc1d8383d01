"""The doctor's rules about the machine: loading, pinned memory, BatchNorm across devices, and
whether a checkpoint of the state fits the platform's preemption notice."""

from __future__ import annotations

import math
import statistics

from tlaunch.doctor.findings import (
    BATCHNORM_MIN,
    COLAB_HOURS,
    ERROR,
    INFO,
    INPUT_MIN_SECONDS,
    INPUT_SHARE,
    NOTICE_SECONDS,
    PLATFORM_NAMES,
    SAVE_SHARE,
    WARN,
    Finding,
)

#: Steps at the start of the real run left out of the timing (allocations, worker start-up).
WARMUP_STEPS = 2


def _train_loader(first: dict) -> dict | None:
    key = first.get("train_loader")
    return first.get("loaders", {}).get(key) if key else None


def _input_bound(first: dict, ranks: list[dict], platform: str | None):
    times = first.get("step_times", [])[WARMUP_STEPS:]
    loader = _train_loader(first)
    if len(times) < 3 or loader is None:
        return "too few timed steps fed by a torch DataLoader (raise --steps)"
    fetch = statistics.median(t[0] for t in times)
    interval = statistics.median(t[1] for t in times)
    share = fetch / interval if interval > 0 else 0.0
    if share <= INPUT_SHARE or fetch < INPUT_MIN_SECONDS:
        return None
    workers, cpus = loader["num_workers"], first.get("cpus") or 1
    compute = max(interval - fetch, 1e-4)
    # One batch costs a worker about `load` seconds; enough workers keep up with the compute.
    load = fetch if workers == 0 else workers * interval
    wanted = min(max(math.ceil(load / compute), workers + 1), cpus)
    return Finding(
        "input-bound",
        WARN,
        f"waiting for data took {fetch * 1000:.1f} ms of each {interval * 1000:.1f} ms step "
        f"({100 * share:.0f}%) with num_workers={workers}; {cpus} CPUs here",
        "the accelerator idles while batches load: a faster loader makes every step faster",
        f"DataLoader(dataset, ..., num_workers={wanted}, persistent_workers=True)"
        f"  # measured: {load * 1000:.1f} ms to load a batch, {compute * 1000:.1f} ms to use it",
        {"share": share, "suggested_num_workers": wanted, "num_workers": workers},
    )


def _pin_memory(first: dict, ranks: list[dict], platform: str | None):
    if not first.get("cuda"):
        return "no GPU on this host (pinned memory only speeds up copies to a GPU)"
    loader = _train_loader(first)
    if loader is None or loader["pin_memory"]:
        return None
    return Finding(
        "pin-memory",
        WARN,
        "the training loader copies batches to the GPU from pageable memory (pin_memory=False)",
        "pinned host memory makes host-to-GPU copies faster and lets them overlap compute",
        "DataLoader(dataset, ..., pin_memory=True)  # and batch.to(device, non_blocking=True)",
        {"loader": loader},
    )


def _small_batchnorm(first: dict, ranks: list[dict], platform: str | None):
    world = first.get("world_size", 1)
    if world < 2:
        return "one process: BatchNorm sees the whole batch"
    small: dict[str, int] = {}
    for r in ranks:
        for bn in r.get("batchnorm", []):
            if not bn["sync"] and bn["batch"] < BATCHNORM_MIN:
                small[bn["module"]] = min(small.get(bn["module"], bn["batch"]), bn["batch"])
    if not small:
        return None
    batch = min(small.values())
    return Finding(
        "small-batchnorm",
        WARN,
        f"{len(small)} BatchNorm layers normalise over {batch} samples per device on each of "
        f"{world} processes (global batch {batch * world}): " + ", ".join(sorted(small)[:3]),
        f"under DDP each device estimates BatchNorm statistics from its own {batch} samples: "
        "noisy statistics, a gap between training and evaluation",
        "model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before DDP wraps it\n"
        "# or replace BatchNorm by nn.GroupNorm / nn.LayerNorm",
        {"per_device_batch": batch, "modules": sorted(small)},
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _checkpoint_budget(first: dict, ranks: list[dict], platform: str | None):
    probe = first.get("checkpoint")
    if not probe:
        return "no model or optimizer state was measured (rank 0 made no step)"
    seconds, size = probe["seconds"], probe["bytes"]
    # Periodic saves whose cost is at most SAVE_SHARE of training time.
    minutes = max(5, math.ceil(seconds / SAVE_SHARE / 60))
    platforms = [platform] if platform else ["gce", "aws", "colab"]
    rows, severity = [], INFO
    for name in platforms:
        if name == "colab":
            rows.append(f"{PLATFORM_NAMES[name]}: no notice, ends at {COLAB_HOURS} h")
            continue
        notice = NOTICE_SECONDS[name]
        rows.append(f"{PLATFORM_NAMES[name]}: {seconds / notice:.1%} of its {notice:.0f} s notice")
        if platform and seconds > notice:
            severity = ERROR
        elif platform and seconds > notice / 2 and severity == INFO:
            severity = WARN
    where = "detected" if platform else "no platform detected; pass --cloud to name one"
    fix = f"tlaunch --save-every-minutes {minutes} train.py  # saves cost ≤ {SAVE_SHARE:.0%}"
    if "colab" in platforms:
        fix += "\n# Colab: tlaunch --time-limit runtime+11h30m also saves before the runtime ends"
    return Finding(
        "checkpoint-budget",
        severity,
        f"the state (models and optimizers) is {_size(size)}, saved in {seconds:.2f} s to local "
        f"disk ({where}): " + "; ".join(rows),
        "a stop-save must finish within the preemption notice; what is not saved by then is "
        "lost, and a runtime without notice keeps only what periodic saves wrote",
        fix,
        {"bytes": size, "seconds": seconds, "platforms": platforms, "save_every_minutes": minutes},
    )


RULES = [_input_bound, _pin_memory, _small_batchnorm, _checkpoint_budget]
