"""tlaunch's exit hook, loaded by Python at the start of every worker tlaunch starts.

The launcher puts this folder first on the workers' ``PYTHONPATH``, so Python's ``site`` module
imports this file as ``sitecustomize``. It registers one ``atexit`` function, then runs the
``sitecustomize`` that Python would have imported without it (a user's or the environment's,
found further along ``sys.path``), so that one keeps working.

Why: a script that never destroys its process group (Lightning's ``Trainer``, most torchrun
scripts) leaves gloo's worker threads to free the collectives they still hold while the
interpreter shuts down. A thread that needs the GIL for that once finalization has begun is
ended with ``pthread_exit``, whose unwinding through a ``noexcept`` destructor aborts the process:
"terminate called without an active exception", SIGABRT, after the script finished. At exit,
still with a whole interpreter, the hook ends such a group (see
``tlaunch.strategies.base.end_default_group``).

Under ``tlaunch doctor`` (``TLAUNCH_DOCTOR`` set) it also arms the doctor's hooks, which wait
for the script to import torch (:mod:`tlaunch.doctor.hooks`).

In every worker it arranges for the script's DataLoader workers to live through stop signals
not sent by their rank, once the script imports torch (:mod:`tlaunch.loader_workers`).

In a Run API worker it asks Linux to end the worker with its launcher (from the first line, not
only once the Run began) and starts the resume's checkpoint read (:mod:`tlaunch.prefetch`) in a
background thread, so that it overlaps the script's imports.

Importing this costs next to nothing: no torch, and of tlaunch only its contract (a Run API
worker's rank 0: its configuration too, to tell which checkpoint to read). The hook does
nothing when ``torch.distributed`` was never imported, when no gloo group of more than one process
is left (a single process, a script that ended its group, NCCL), or when an uncaught exception ends
the process (a crashed rank exits as it did, at once). It never changes the exit code and runs after
the script's own exit functions. It waits for the other ranks to reach their exit too (at most 5 s,
through the group's store), so that a peer still blocked in a collective is never the one reported
for this rank's failure.
"""

import atexit
import os
import sys


def _group_left_open() -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size() > 1 and str(dist.get_backend()) == "gloo"


def _end_group_at_exit() -> None:
    if not _group_left_open():
        return
    if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None:
        # An uncaught exception ends this process: the group stays open (ending it would fail
        # a peer waiting in a collective first, and that peer would be reported instead), but
        # gloo's threads finish freeing their collectives before the teardown, which would
        # otherwise abort the process (SIGABRT in place of the script's own exit code).
        from tlaunch.strategies.base import _settle_gloo_threads

        _settle_gloo_threads()
        return
    from tlaunch.strategies.base import end_default_group

    timeout = 10.0
    if not end_default_group(timeout=timeout):
        print(
            f"tlaunch: warning: the process group did not end within {timeout:g} s at exit: a "
            "peer never completed a collective; exiting without ending it",
            file=sys.stderr,
            flush=True,
        )


def _run_next_sitecustomize() -> None:
    """Import the ``sitecustomize`` that this one shadows, under that name, if there is one."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.realpath(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["sitecustomize"]  # as a failed import leaves it; site reports the error
        raise


def _maybe_arm_doctor() -> None:
    """Under ``tlaunch doctor``: its hooks, installed when the script imports torch."""
    from tlaunch.contract import DOCTOR_ENV

    findings = os.environ.get(DOCTOR_ENV)
    if findings:
        from tlaunch.doctor.hooks import arm

        arm(findings)


def _hold_stop_signals() -> None:
    """A stop signal while a Run API worker still starts is held for its Run, not fatal
    (:mod:`tlaunch.early_signals`); only in the launcher's own children."""
    from tlaunch.contract import HOLD_SIGNALS_ENV, LAUNCHER_PID_ENV

    if os.environ.get(HOLD_SIGNALS_ENV) and os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid()):
        from tlaunch.early_signals import hold

        hold()


def _die_with_the_launcher() -> None:
    """A Run API worker dies with its launcher from its first line, not only once its Run
    began: one killed while the worker still imports torch or builds a model would leave it
    running on until then (``tlaunch.stopping`` asks again, and exits if the launcher is gone)."""
    from tlaunch.contract import HOLD_SIGNALS_ENV, LAUNCHER_PID_ENV

    launcher = os.environ.get(LAUNCHER_PID_ENV)
    # only in the launcher's own children (not a process the script started), while it lives
    if os.environ.get(HOLD_SIGNALS_ENV) and launcher == str(os.getppid()):
        from tlaunch.early_signals import die_with

        die_with(int(launcher))


def _prefetch_checkpoint() -> None:
    """A Run API worker starts reading the checkpoint its restore will load while the script
    still imports torch (:mod:`tlaunch.prefetch`; ``tlaunch.init`` keeps that read)."""
    from tlaunch.contract import HOLD_SIGNALS_ENV, LAUNCHER_PID_ENV

    if os.environ.get(HOLD_SIGNALS_ENV) and os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid()):
        from tlaunch.prefetch import maybe_start

        maybe_start({})


def _shield_loader_workers() -> None:
    """The DataLoader workers of every script tlaunch starts live through stop signals their
    rank did not send (:mod:`tlaunch.loader_workers`), once the script imports torch: a script
    that handles SIGTERM itself still has its loader when it saves. Only in the launcher's own
    children (a process the script started is the script's business)."""
    from tlaunch.contract import LAUNCHER_PID_ENV

    if os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid()):
        from tlaunch.after_import import after_import
        from tlaunch.loader_workers import install_worker_hook

        after_import("torch", install_worker_hook)


def _leave_quickly_after_a_stop() -> None:
    """First of the exit functions, so it runs last (tlaunch.quick_exit)."""
    from tlaunch.quick_exit import install

    install()


_hold_stop_signals()
_die_with_the_launcher()
_prefetch_checkpoint()
_shield_loader_workers()
_leave_quickly_after_a_stop()
atexit.register(_end_group_at_exit)
_maybe_arm_doctor()
_run_next_sitecustomize()
