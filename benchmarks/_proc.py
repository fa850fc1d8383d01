"""Running a benchmark's launcher so that a hang cannot outlive the benchmark, and with
tlaunch's modules compiled as an installed package has them; glibc's malloc with fixed
thresholds, for a benchmark's own process or the ones it starts."""

from __future__ import annotations

import compileall
import ctypes
import os
import signal
import subprocess

#: Fixed thresholds for glibc's malloc: blocks up to 32 MB come from the heap, which is not
#: trimmed below 1 GB. Its adaptive mmap threshold follows the sizes a process has freed, so
#: otherwise the same allocation may be served from the heap in one run and from fresh,
#: zero-filled pages in another.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30
#: The same, for a process started with this environment.
FIXED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def fix_malloc() -> bool:
    """The fixed thresholds for this process from now on (inherited by the processes it
    forks); False where ``mallopt`` is not glibc's."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return bool(
        mallopt
        and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def run_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new process group.

    On timeout the whole group is killed -- the launcher and the workers it started, which
    ``subprocess.run`` would leave running -- and the benchmark stops with the command's
    stderr so far.
    """
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise SystemExit(
            f"{' '.join(cmd)} did not finish in {timeout:.0f} s; killed it and its workers:\n"
            f"{err[-2000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def compile_tlaunch() -> None:
    """Write the bytecode of tlaunch's modules, as installing a wheel does.

    An editable install (``make install``) writes it at a module's first import, unless
    ``PYTHONDONTWRITEBYTECODE`` is set, as on the development machine: every launcher and
    worker would then compile each tlaunch module from source on every start (~0.1 s each),
    while torch and Accelerate, installed from wheels, load theirs. Start-up benchmarks call
    this first so that both sides start as a user's install would.
    """
    import tlaunch
    import tlaunch.storage
    import tlaunch.strategies

    for package in (tlaunch, tlaunch.storage, tlaunch.strategies):
        compileall.compile_dir(os.path.dirname(package.__file__), quiet=1)
