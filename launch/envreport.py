"""``tlaunch env``: what a bug report needs, in one paste.

Usage::

    tlaunch env

Prints ``name: value`` lines in sections: versions (tlaunch, Python, torch, accelerate,
torch_xla, fsspec and its backends, read from the installed packages' metadata), the platform
as the preemption watcher would detect it (Colab, a GCE/AWS VM, a TPU VM, Slurm), the
``TLAUNCH_*``, ``ACCELERATE_*``, ``PJRT_*`` and a few other variables that change how a launch
runs, and last the devices. Only that last section imports torch, so everything above it is on
the screen before torch has loaded.

Secrets are never printed: a variable whose name says it holds one (``*TOKEN*``, ``*SECRET*``,
``*KEY*``, ``*PASSWORD*``, ``*CREDENTIAL*``) shows ``<redacted>``, and a URL's user and
password are replaced the same way, whatever the variable.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata

from tlaunch import __version__

REDACTED = "<redacted>"
#: Distributions whose versions a report names (fsspec backends included).
PACKAGES = ("torch", "accelerate", "torch_xla", "torchdata", "fsspec", "gcsfs", "s3fs", "numpy")
#: Prefixes and names of the variables that change what a launch does.
VARIABLE_PREFIXES = ("TLAUNCH_", "ACCELERATE_", "PJRT_", "XLA_", "TPU_", "NCCL_", "SLURM_JOB_")
VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "THP_MEM_ALLOC_ENABLE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "STORAGE_EMULATOR_HOST",
    "PYTHONPATH",
)
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(name: str, value: str) -> str:
    """``value`` as a report may show it: whole secrets hidden, URL credentials removed."""
    if SECRET_NAME.search(name):
        return REDACTED
    return URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def detect_platform() -> str:
    """Where this runs, as the preemption watcher and the deadline see it."""
    from tlaunch.preemption import detect

    found = []
    if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") is not None:
        found.append("Colab")
    cloud = detect("auto")
    if cloud:
        found.append(f"{cloud.upper()} VM (preemption watcher: {cloud})")
    tpu_env = os.environ.get("TPU_NAME") or os.environ.get("TPU_ACCELERATOR_TYPE")
    if tpu_env or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        found.append("TPU VM")
    if os.environ.get("SLURM_JOB_ID"):
        found.append(f"Slurm job {os.environ['SLURM_JOB_ID']}")
    return ", ".join(found) or "none detected (a local machine or an unknown cloud)"


def header_lines() -> list[str]:
    """Every section but the devices: nothing here imports torch."""
    lines = [
        "[versions]",
        f"tlaunch: {__version__}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"os: {platform.platform()}",
    ]
    lines += [f"{dist}: {_version(dist)}" for dist in PACKAGES]
    lines += ["", "[platform]", f"platform: {detect_platform()}", f"cpus: {os.cpu_count()}", ""]
    lines.append("[environment]")
    names = sorted(
        name for name in os.environ if name.startswith(VARIABLE_PREFIXES) or name in VARIABLES
    )
    lines += [f"{name}: {redact(name, os.environ[name])}" for name in names] or ["(none set)"]
    return lines


def device_lines() -> list[str]:
    """torch's build and the devices it finds (imports torch)."""
    try:
        import torch
    except ImportError:
        return ["[devices]", "torch: not installed"]
    lines = ["[devices]", f"torch.cuda: {torch.version.cuda or 'not built with CUDA'}"]
    if torch.cuda.is_available():
        lines.append(f"cudnn: {torch.backends.cudnn.version()}")
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        lines.append(f"nccl: {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("cuda devices: none")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("mps: available")
    lines.append(f"cpu threads: {torch.get_num_threads()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv:
        print(
            f"tlaunch: error: tlaunch env takes no arguments (got {argv[0]!r}); run: tlaunch env",
            file=sys.stderr,
        )
        return 2
    print("\n".join(header_lines()), flush=True)
    print()
    print("\n".join(device_lines()), flush=True)
    return 0
