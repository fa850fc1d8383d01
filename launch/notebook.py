"""Launching from a notebook cell: :func:`notebook_launch` runs a function in N worker processes
forked from the kernel, under the same supervisor as the ``tlaunch`` command.

::

    kernel (the cell) ── notebook_launch(fn, *args, cpus=2, checkpoint_dir=...)
        launcher.launch(config, workers=ForkedWorkers)   preflight, lease, run dir, watchers,
        │                                                the supervisor's state machine
        ├── fork ─▶ rank 0: setsid, env, fn(*args) ─▶ its return value (pickled)
        └── fork ─▶ rank 1: ...
    ◀── NotebookResult(status, exit_code, step, run_dir, value)

Fork, as Accelerate's ``notebook_launcher`` does, so that functions defined in cells need not
be importable. Each worker leaves the kernel's process group (a Jupyter interrupt signals the
whole group; it must reach only the kernel, which turns it into a coordinated stop), drops the
kernel's inherited exit handlers and signal handlers, and leaves with ``os._exit`` so that
nothing of the kernel's runs twice. What a worker prints reaches the cell: ipykernel's
``sys.stdout``/``sys.stderr`` send a forked process's output through the kernel. The call never raises ``SystemExit``: a stop, a failure and a success all
return a :class:`NotebookResult`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tlaunch.config import DEFAULT_CHECKPOINT_ROOT, LaunchConfig, UsageError
from tlaunch.contract import (
    CONTROL_DIR_ENV,
    DEFAULT_CHECKPOINT_DIR_ENV,
    EXIT_OK,
    EXIT_PREEMPTED,
    LAUNCH_DIR_ENV,
)
from tlaunch.supervisor import Attempt
from tlaunch.workers import StopDelivery, _free_port

#: How long the other ranks get to leave on their own after one rank failed (they may be
#: blocked in a collective with it), before they are killed.
PEER_GRACE = 5.0


@dataclass
class NotebookResult:
    """What :func:`notebook_launch` ended with."""

    #: ``finished`` (exit 0), ``stopped`` (everything kept: run the cell again to resume) or
    #: ``failed`` (see the cell's output for the error).
    status: str
    exit_code: int
    #: The newest committed checkpoint step, if any.
    step: int | None
    #: This launch's run directory (launcher.log, metrics.jsonl, config.json).
    run_dir: str | None
    #: What ``fn`` returned on rank 0 (None when it did not finish, or was not picklable).
    value: Any = None

    def __bool__(self) -> bool:
        return self.status == "finished"


def notebook_launch(
    fn: Callable[..., Any],
    *args: Any,
    cpus: int | None = None,
    gpus: int | str | None = None,
    tpus: int | None = None,
    **flags: Any,
) -> NotebookResult:
    """Run ``fn(*args)`` in ``cpus``/``gpus``/``tpus`` worker processes started from this
    kernel, supervised like ``tlaunch``: preemption notices, ``time_limit``, a coordinated
    save on a stop, ``max_restarts``. Every launcher flag is a keyword (``checkpoint_dir=``,
    ``precision=``, ``save_every=`` ...); ``TLAUNCH_<FLAG>`` variables set defaults, as for
    the CLI. Interrupting the cell is a stop: the workers save and the call returns
    ``stopped``; running the cell again resumes. Without ``checkpoint_dir`` a function that
    uses the Run API saves into ``./tlaunch-checkpoints/<fn>-<key>``.
    """
    from tlaunch.launcher import launch

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("notebook_launch must be called from the main thread (a cell)")
    _refuse_initialised_cuda(gpus)
    config = LaunchConfig(
        **{**LaunchConfig.env_defaults(), **flags, "cpus": cpus, "gpus": gpus, "tpus": tpus}
    )
    if config.nnodes > 1:
        raise UsageError("notebook_launch runs on one machine; use the tlaunch command for several")
    result_file = tempfile.NamedTemporaryFile(prefix="tlaunch-result-", delete=False)
    result_file.close()
    started: dict[str, str] = {}

    def workers(plan: Any, config: LaunchConfig, env: dict[str, str], on_signal: Any) -> Any:
        env = dict(env)
        if config.checkpoint_dir is None:
            env[DEFAULT_CHECKPOINT_DIR_ENV] = _default_checkpoint_dir(fn, args)
        started["run_dir"] = env[LAUNCH_DIR_ENV]
        return ForkedWorkers(fn, args, plan.nproc_per_node, env, config.grace, result_file.name)

    try:
        code = launch(config, workers)
        value = _read_result(result_file.name) if code == EXIT_OK else None
    finally:
        os.unlink(result_file.name)
    status = {EXIT_OK: "finished", EXIT_PREEMPTED: "stopped"}.get(code, "failed")
    return NotebookResult(
        status, code, _latest_step(config, fn, args), started.get("run_dir"), value
    )


class ForkedWorkers:
    """The workers of one attempt, forked from the kernel: ``start`` blocks until all are gone."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        nproc: int,
        env: dict[str, str],
        grace: float,
        result_path: str,
    ) -> None:
        self.fn, self.args, self.nproc, self.env = fn, args, nproc, env
        self.result_path = result_path
        # A function may or may not use the Run API: wait a little for its ready files.
        self.delivery = StopDelivery(env[CONTROL_DIR_ENV], nproc, grace, True)
        self.pids: list[int] = []

    def start(self, attempt: int) -> Attempt:
        port = str(_free_port())
        self.pids = []
        for rank in range(self.nproc):
            env = {
                **self.env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(self.nproc),
                "LOCAL_WORLD_SIZE": str(self.nproc),
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "TORCHELASTIC_RUN_ID": f"tlaunch-notebook-{os.getpid()}-{attempt}",
                "TORCHELASTIC_RESTART_COUNT": str(attempt),
            }
            if self.nproc == 1:
                env = {k: v for k, v in env.items() if not k.startswith("TORCHELASTIC")}
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                _worker_main(self.fn, self.args, env, self.result_path if rank == 0 else None)
            self.pids.append(pid)
        return self._wait()

    def _wait(self) -> Attempt:
        """Reap every worker; when one fails, the others get PEER_GRACE seconds, then SIGKILL."""
        codes: dict[int, int] = {}
        failed_at: float | None = None
        tick = threading.Event()
        while len(codes) < len(self.pids):
            for rank, pid in enumerate(self.pids):
                if rank in codes:
                    continue
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[rank] = os.waitstatus_to_exitcode(status)
                    if codes[rank] != 0 and failed_at is None:
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE:
                self.kill()
            tick.wait(0.05)
        for rank, code in sorted(codes.items()):
            if code < 0:
                return Attempt(
                    128 - code, f"rank {rank} was killed by {signal.Signals(-code).name}"
                )
            if code:
                return Attempt(code, f"rank {rank} exited with code {code}")
        return Attempt(EXIT_OK)

    def stop(self, signum: int) -> None:
        self.delivery.deliver(signum, send=self._send, kill=self.kill)

    def _send(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self._send(signal.SIGKILL)


def _worker_main(fn: Callable[..., Any], args: tuple, env: dict[str, str], result: str | None):
    """A forked worker: run ``fn`` as a process of its own and leave with its exit code."""
    code = 1
    try:
        os.setsid()  # out of the kernel's group: an interrupt reaches the kernel only
        atexit._clear()  # the kernel's exit handlers are not ours to run
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        torch = sys.modules.get("torch")
        if torch is not None:
            # The kernel's OpenMP thread pool does not survive a fork (GNU libgomp): a forked
            # process that enters a parallel region after the parent did hangs for ever. One
            # thread per worker never enters one, and is what torchrun gives each of several
            # workers anyway.
            torch.set_num_threads(1)
        import tlaunch.run

        tlaunch.run._CURRENT = None  # a Run of the kernel's own is not this process's
        try:
            if env.get("PJRT_DEVICE"):
                _xla_launch(fn, args, result)
            else:
                value = fn(*args)
                if result is not None:
                    _write_result(result, value)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # the Run's: metrics, a pending save, the lease
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _xla_launch(fn: Callable[..., Any], args: tuple, result: str | None) -> None:
    """``fn`` through torch_xla's own entry point, as its notebooks do: with several workers
    (torchelastic's variables set) it runs here, on this worker's device; with one it is
    torch_xla's ``xmp.spawn`` that places it on the PJRT device (and pickles ``fn`` by name,
    which a forked process resolves: a function from a cell is in ``__main__`` there too)."""
    import torch_xla

    torch_xla.launch(_on_xla_device, args=(fn, args, result), start_method="fork")


def _on_xla_device(index: int, fn: Callable[..., Any], args: tuple, result: str | None) -> None:
    value = fn(*args)
    if result is not None and index == 0:
        _write_result(result, value)


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it moved to the CPU: the kernel has no device context
    (an XLA tensor cannot even be unpickled there)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, _on_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _write_result(path: str, value: Any) -> None:
    try:
        data = pickle.dumps(_on_cpu(value))
    except Exception as e:
        print(
            f"tlaunch: warning: the function's return value is not picklable ({e})", file=sys.stderr
        )
        return
    with open(path, "wb") as f:
        f.write(data)


def _read_result(path: str) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    return pickle.loads(data) if data else None


def _default_checkpoint_dir(fn: Callable[..., Any], args: tuple) -> str:
    """``./tlaunch-checkpoints/<fn>-<key>``: keyed by the function's name and its arguments
    (those JSON can show; others by type), as a script's default is by its path and arguments."""
    shown = [
        a if isinstance(a, (str, int, float, bool, type(None))) else type(a).__name__ for a in args
    ]
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "fn"))
    key = hashlib.sha256(json.dumps([name, shown]).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return os.path.join(os.getcwd(), DEFAULT_CHECKPOINT_ROOT, f"{stem}-{key}")


def _latest_step(config: LaunchConfig, fn: Callable[..., Any], args: tuple) -> int | None:
    # Where the workers saved: settled by the rule tlaunch.init() applies (none, the default).
    url = config.with_checkpoint_default(_default_checkpoint_dir(fn, args)).checkpoint_dir
    if url is None:
        return None
    try:
        from tlaunch.storage import CheckpointStore

        committed = CheckpointStore(url).committed()
    except Exception:  # storage down: the cell's output has said why; the step is unknown
        return None
    return committed[-1].step if committed else None


def _refuse_initialised_cuda(gpus: int | str | None) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise UsageError(
            "CUDA was already initialised in this kernel, and a forked worker cannot use it; "
            "restart the runtime and call notebook_launch before anything touches the GPU "
            "(no .cuda(), no torch.cuda calls in earlier cells)"
        )
