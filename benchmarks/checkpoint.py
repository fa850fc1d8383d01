"""Checkpoint speed: what training waits for, and what a commit to a bucket costs.

    .venv/bin/python benchmarks/checkpoint.py [--mb 500] [--reps 5] [--gcs-reps 7]

For a model + Adam state of about ``--mb`` MB, each line is the ratio of the two sides'
medians. The sides run back to back in every rep, in rotating order: the machine is shared, and
in trials here whichever upload ran third in a rep was the slowest, whatever it was, so each
side takes each position equally often.

* async stall / in-memory copy: ``cpu_snapshot`` + ``AsyncCheckpointWriter.submit`` returning,
  against a plain clone of every tensor (target <= 1.3x: training waits for a copy, no more);
* the same stall when the snapshot copies into the memory of the previous one
  (``SnapshotBuffers``, what a run saving at most a minute apart does from its second save
  on) / in-memory copy: what is left once no page is new;
* async stall / ``accelerator.save_state`` to the same local disk (what the stall replaces);
* background save / ``accelerator.save_state``: ours also fsyncs every file (for information);
* commit to fake-gcs-server / raw fsspec put of the same files (target <= 1.25x: format,
  hashing and commit protocol cost little on top of moving the bytes): our save from tensors
  to durable COMMIT against ``fs.put`` of the identical files from local disk;
* the same commit against ``fs.pipe`` of the files' bytes already in memory (the strictest
  baseline, for information);
* host memory of a save: the peak resident set of a process that builds the state and saves it
  three times as a run does (snapshot into the previous snapshot's memory, background write to
  local disk, flush), minus that of the same process
  without the saves, against the state's size (target <= 1.1x: the snapshot, and no second
  copy while the files are written). Peaks are the kernel's own high-water mark of each
  child's resident memory (``VmHWM``), not samples; each side runs ``--mem-reps`` times,
  alternating, and the medians are compared.

fake-gcs-server is started here the way tests/conftest.py starts it. About 2 minutes on a
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# gcsfs reads this at import; without it it probes a gRPC API the emulator lacks, for 60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import torch  # noqa: E402
from _gcs import start_fake_gcs  # noqa: E402 -- benchmarks/, on sys.path when a script here runs

from tlaunch.storage import (  # noqa: E402
    AsyncCheckpointWriter,
    CheckpointStore,
    SnapshotBuffers,
    cpu_snapshot,
)


def build_state(megabytes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers whose weights + Adam's two moments total about ``megabytes`` MB."""
    width = 2048
    layers = max(1, round(megabytes * 2**20 / (3 * 4 * width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def plain_copy(obj):
    """The baseline: clone every tensor of a nested state dict, nothing else."""
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: plain_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_copy(v) for v in obj)
    return obj


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def save_kwargs(model, optimizer, step: int, buffers: SnapshotBuffers | None = None) -> dict:
    """A save's parts; with ``buffers``, snapshotted into the last settled save's memory."""
    take = cpu_snapshot
    if buffers is not None:
        buffers.recycle()  # callers flush before the next save: the last one has settled
        take = buffers.snapshot
    parts = {
        "tensors": {"model": take(model.state_dict())},
        "objects": {"optimizer": take(optimizer.state_dict())},
        "rng": {0: torch.get_rng_state()},
        "state": {"step": step, "metrics": {"loss": 1.0}},
    }
    if buffers is not None:
        buffers.settle()
    return parts


def bench_local(model, optimizer, reps: int, workdir: str) -> dict[str, list[float]]:
    """Per rep: a plain copy and an async stall back to back (order alternating), then sync saves."""
    from accelerate import Accelerator

    store = CheckpointStore(os.path.join(workdir, "tlaunch"))
    writer = AsyncCheckpointWriter(store)
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model, optimizer)
    out: dict[str, list[float]] = {
        name: [] for name in ("copy", "stall", "recycled", "accelerate", "background")
    }
    plain_copy([model.state_dict(), optimizer.state_dict()])  # warm-up: first touches are dearer
    buffers = SnapshotBuffers()  # a run's: its first save allocates, as any first save does
    writer.submit(10**6, **save_kwargs(model, optimizer, 10**6, buffers))
    writer.flush()
    for rep in range(reps):
        step, other = rep + 1, 10**6 + rep + 1  # the fresh stall's step-1 is bench_gcs's files
        jobs = {
            "copy": lambda: plain_copy([model.state_dict(), optimizer.state_dict()]),
            "stall": lambda step=step: writer.submit(step, **save_kwargs(model, optimizer, step)),
            "recycled": lambda other=other: writer.submit(
                other, **save_kwargs(model, optimizer, other, buffers)
            ),
        }
        # Each side's memory is freed (the writer's snapshot by flush) before the other runs, so
        # the fresh ones allocate from the same state; the order rotates to cancel what remains.
        order = list(jobs)
        for name in order[rep % 3 :] + order[: rep % 3]:
            out[name].append(timed(jobs[name])[0])
            writer.flush()
            if name == "stall":
                out["background"].append(writer.save_durations[-1])
        shutil.rmtree(os.path.join(workdir, "tlaunch", f"step-{other - 1:09d}"))  # disk space
        target = os.path.join(workdir, f"accelerate-{rep}")
        out["accelerate"].append(timed(lambda target=target: accelerator.save_state(target))[0])
    writer.close()
    return out


def bench_gcs(model, optimizer, reps: int, local_dir: str) -> dict[str, list[float]]:
    """Per rep, in rotating order: our commit, ``fs.put`` of the same files, ``fs.pipe`` of their bytes."""
    proc, _ = start_fake_gcs()
    try:
        store = CheckpointStore("gs://tlaunch-bench/run")
        fs = store.location.fs
        fs.mkdir("tlaunch-bench")
        writer = AsyncCheckpointWriter(store)
        files = os.path.join(local_dir, "tlaunch", f"step-{1:09d}")  # the same files, from disk
        blobs = {name: open(os.path.join(files, name), "rb").read() for name in os.listdir(files)}

        def commit(rep: int) -> float:
            writer.submit(rep + 1, **save_kwargs(model, optimizer, rep + 1))
            writer.flush()
            return writer.save_durations[-1]  # the background part: serialize, hash, upload, commit

        jobs = {
            "commit": commit,
            "put": lambda rep: timed(
                lambda: fs.put(files, f"tlaunch-bench/put-{rep}", recursive=True)
            )[0],
            "pipe": lambda rep: timed(
                lambda: fs.pipe({f"tlaunch-bench/pipe-{rep}/{n}": b for n, b in blobs.items()})
            )[0],
        }
        order = list(jobs)
        out: dict[str, list[float]] = {name: [] for name in jobs}
        for rep in range(reps):
            for name in order[rep % 3 :] + order[: rep % 3]:
                out[name].append(jobs[name](rep))
                # The emulator keeps objects in its heap: each upload starts from the same state.
                fs.rm(
                    f"tlaunch-bench/{'run' if name == 'commit' else f'{name}-{rep}'}",
                    recursive=True,
                )
        writer.close()
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def memory_child(mode: str, megabytes: int, workdir: str) -> None:
    """One side of the memory measurement, in its own process: build, then save or not."""
    torch.manual_seed(0)
    model, optimizer = build_state(megabytes)
    store = CheckpointStore(os.path.join(workdir, mode))  # the same imports on both sides
    if mode == "save":
        writer, buffers = AsyncCheckpointWriter(store), SnapshotBuffers()
        for step in (1, 2, 3):
            writer.submit(step, **save_kwargs(model, optimizer, step, buffers))
            writer.flush()
        writer.close()
    # VmHWM: the kernel's high-water mark of this process's resident memory since its exec.
    # (Not the parent's rusage of it: ru_maxrss also counts the parent's pages at the fork.)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"state": state_bytes(model, optimizer), "peak": peak * 1024}))


def bench_memory(megabytes: int, reps: int, workdir: str) -> dict[str, list[float]]:
    """Peak RSS (bytes) of each side per rep, as each child's kernel accounting reports it."""
    out: dict[str, list[float]] = {"save": [], "nosave": [], "state": []}
    for rep in range(reps):
        for mode in ("save", "nosave") if rep % 2 == 0 else ("nosave", "save"):
            cmd = [sys.executable, os.path.abspath(__file__), "--mb", str(megabytes)]
            cmd += ["--memory-child", mode, "--workdir", os.path.join(workdir, f"mem-{rep}")]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"memory child {mode} failed ({proc.returncode})")
            result = json.loads(proc.stdout.splitlines()[-1])
            out[mode].append(float(result["peak"]))
            out["state"].append(float(result["state"]))
    return out


def memory_line(mem: dict[str, list[float]], target: float = 1.1) -> str:
    state = statistics.median(mem["state"])
    extra = statistics.median(mem["save"]) - statistics.median(mem["nosave"])
    ratio = extra / state
    per_rep = " ".join(
        f"{(a - b) / state:.2f}" for a, b in zip(mem["save"], mem["nosave"], strict=True)
    )
    return (
        f"host memory of a save / state size: {ratio:.2f}x (target <= {target}x)"
        f"{'  ok' if ratio <= target else '  MISSED'}   [+{extra / 2**20:.0f} MiB above "
        f"{statistics.median(mem['nosave']) / 2**20:.0f} MiB peak RSS without saves; state "
        f"{state / 2**20:.0f} MiB; per rep {per_rep}]"
    )


def report(label: str, num: list[float], den: list[float], target: float | None = None) -> str:
    """Ratio of the two sides' medians; the orders rotate, so each side met every position."""
    ratio = statistics.median(num) / statistics.median(den)
    goal = f" (target <= {target}x)" if target else ""
    verdict = "" if target is None else ("  ok" if ratio <= target else "  MISSED")
    spread = " ".join(f"{a / b:.2f}" for a, b in zip(num, den, strict=True))
    times = f"{statistics.median(num):.3f} s vs {statistics.median(den):.3f} s"
    return f"{label}: {ratio:.2f}x{goal}{verdict}   [medians {times}; per rep {spread}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=500, help="state size in MB (default 500)")
    parser.add_argument("--reps", type=int, default=5, help="local repetitions (default 5)")
    parser.add_argument(
        "--gcs-reps", type=int, default=7, help="fake-gcs-server repetitions (default 7)"
    )
    parser.add_argument(
        "--mem-reps", type=int, default=3, help="peak-memory repetitions per side (default 3)"
    )
    parser.add_argument("--memory-child", choices=("save", "nosave"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.mb, args.workdir)
        return 0
    torch.manual_seed(0)
    model, optimizer = build_state(args.mb)
    size = state_bytes(model, optimizer) / 2**20
    print(
        f"state: {size:.0f} MiB (model + Adam); load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory(prefix="tlaunch-bench-") as workdir:
        local = bench_local(model, optimizer, args.reps, workdir)
        gcs = bench_gcs(model, optimizer, args.gcs_reps, workdir)
        del model, optimizer  # the memory children need the room
        memory = bench_memory(args.mb, args.mem_reps, workdir)
    lines = [
        ("async stall / in-memory copy", local["stall"], local["copy"], 1.3),
        (
            "async stall into the last snapshot's memory / in-memory copy",
            local["recycled"],
            local["copy"],
            None,
        ),
        ("async stall / accelerator.save_state (sync)", local["stall"], local["accelerate"], None),
        (
            "background save, fsynced / accelerator.save_state",
            local["background"],
            local["accelerate"],
            None,
        ),
        (
            "commit to fake-gcs-server / raw fsspec put of the files",
            gcs["commit"],
            gcs["put"],
            1.25,
        ),
        (
            "commit to fake-gcs-server / raw fsspec pipe of the bytes",
            gcs["commit"],
            gcs["pipe"],
            None,
        ),
    ]
    for label, num, den, target in lines:
        print(report(label, num, den, target))
    print(memory_line(memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
