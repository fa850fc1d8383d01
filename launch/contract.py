"""The contract between the launcher, its workers, and the world around them.

Every environment variable, control file, run-directory file and exit code tlaunch reads or
writes is named here and nowhere else; other modules import the names. A test
(``tests/launch/test_contract.py``) fails when code anywhere spells a ``TLAUNCH_`` name this
module does not declare. Importing it costs nothing (no torch, no storage backends).

Exit codes (the launcher's, and ``tlaunch.init`` scripts' run without it)
-----------------------------------------------------------------------

=====  ==================  =====================================================================
code   name                meaning
=====  ==================  =====================================================================
0      ``EXIT_OK``         the run finished
2      ``EXIT_USAGE``      bad flags, script or checkpoint mismatch: nothing started or changed
69     ``EXIT_UNAVAILABLE`` storage unreachable after retries: nothing changed; run again later
                           (sysexits' ``EX_UNAVAILABLE``)
75     ``EXIT_PREEMPTED``  stopped with everything kept (a committed checkpoint, or nothing to
                           lose yet): run the same command again (sysexits' ``EX_TEMPFAIL``)
other                      the script's own code; ``128 + N`` when it died of signal N
=====  ==================  =====================================================================

Variables the launcher sets for each worker
-------------------------------------------

Besides torch.distributed's own (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, set by torch's elastic agent) and the
few ``ACCELERATE_*`` / ``PJRT_DEVICE`` variables the chosen strategy's plan names
(:mod:`tlaunch.strategies`):

``TLAUNCH_CONFIG``        the whole :class:`~tlaunch.config.LaunchConfig` as JSON
``TLAUNCH_LAUNCH_DIR``    this launch's run directory (log, config, metrics); rank 0 writes it
``TLAUNCH_CONTROL_DIR``   a node-local folder for the control files below; its presence tells
                          a worker that it runs under the launcher
``TLAUNCH_START_TIME``    when the launch began (epoch seconds), for ``--time-limit``
``TLAUNCH_DATA_DIR``      the local folder of the first ``--data`` archive
``TLAUNCH_DATA_DIRS``     every ``--data`` folder, joined by ``os.pathsep``
``TLAUNCH_LEASE_TOKEN``   the token of the lease the launcher holds on ``--checkpoint-dir``
                          (``LEASE.json`` there); rank 0 commits only while the lease still
                          names it. Absent: rank 0 takes the lease itself (plain ``python``)
``TLAUNCH_LAUNCHER_PID``  the launcher's pid: a worker whose parent is no longer it (the launcher
                          was killed while the worker started) leaves at once
``TLAUNCH_HOLD_SIGNALS``  the script calls ``tlaunch.init``: its workers hold stop signals from
                          interpreter start until their Run's handlers take them
                          (:mod:`tlaunch.early_signals`)
``TLAUNCH_DEFAULT_CHECKPOINT_DIR``
                          where a Run API script saves when no ``--checkpoint-dir`` was given
                          (:func:`tlaunch.config.default_checkpoint_dir`); a keyword to
                          ``tlaunch.init`` or ``--checkpoint-dir none`` wins over it
``TLAUNCH_DOCTOR``        set by ``tlaunch doctor``: the folder of its findings; the workers'
                          ``sitecustomize`` installs the doctor's hooks
                          (:mod:`tlaunch.doctor.hooks`), which write ``rank-<RANK>.json`` there
``TLAUNCH_EXIT_FD``       one worker (no elastic agent): a pipe it writes its exit code to right
                          before it leaves quickly after a stop (:mod:`tlaunch.quick_exit`); the
                          launcher then stops waiting for it while the kernel frees its memory
``TLAUNCH_EXIT_SOCKET``   workers under torch's elastic agent: the same notice, sent to a datagram
                          socket of this name in Linux's abstract namespace (the agent starts
                          its workers without inherited file descriptors)

Variables a user (or a test) sets
---------------------------------

``TLAUNCH_<FLAG>``        a default for each launcher flag (``TLAUNCH_CPUS=2``,
                          ``TLAUNCH_RUN_DIR=/logs``): see :func:`flag_env`
``TLAUNCH_RUN_ID``        the rendezvous id shared by the machines of a multi-node job
``TLAUNCH_GCE_METADATA_URL``, ``TLAUNCH_AWS_METADATA_URL``
                          the metadata endpoints the preemption watchers poll
``TLAUNCH_RUNTIME_START`` when this runtime started (epoch seconds), which
                          ``--time-limit runtime+11h30m`` counts from; default: the machine's
                          boot time (:func:`tlaunch.preemption.runtime_start`)
``TLAUNCH_CACHE_DIR``     the data-archive cache (read by :mod:`tlaunch.storage`)
``TLAUNCH_DRIVE_ROOT``    where Google Drive is mounted (read by :mod:`tlaunch.storage`)

Control files (in ``TLAUNCH_CONTROL_DIR``)
------------------------------------------

``STOP``                  launcher → workers: a stop was requested; workers poll it
``WORKERS_STOPPING``      workers → launcher: they agreed to stop on their own trigger
``preempted.json``        workers → launcher: everything is kept: the stop checkpoint is
                          committed, or no step was taken since the last one
                          (``{"step", "epoch", "batch", "nothing_new"}``); by local rank 0
``ready-<local rank>``    worker → launcher: this worker runs the Run API and its stop
                          handlers are in place; a stop then reaches it through ``STOP``
                          alone, never as a signal (which would also hit its loader workers)
``finished.json``         workers → launcher: ``run.finish()`` returned, the final checkpoint
                          committed (``{"step", "checkpoint"}``); by local rank 0. Nothing
                          polls STOP any more: a stop reaches the script as a signal, and is
                          not reported as lost work

Checkpoint-directory files (in a ``--checkpoint-dir`` on this machine's file system)
------------------------------------------------------------------------------------

``goodput.jsonl``         launcher and rank 0 → ``tlaunch ckpt ls`` and later launches: one
                          JSON record a line of each launch's start, restore, saves, progress,
                          stop and exit, from which the run's goodput is computed
                          (:mod:`tlaunch.storage.checkpoint.goodput` declares it too)

Run-directory files (in ``TLAUNCH_LAUNCH_DIR``)
-----------------------------------------------

``config.json``, ``launcher.log``, ``exit.json`` (the launcher's), ``metrics.jsonl`` (rank 0's).

The run's logs folder (``logs/`` in a local or Drive ``--checkpoint-dir``: one per run)
-----------------------------------------------------------------------------------------

``metrics.jsonl``         every ``run.log`` record of the run and the figures, each step once
                          (a resume drops the lines written after its checkpoint)
``metrics.csv``           ``--log-with csv``: ``step,name,value`` rows, trimmed the same way
``<project>/``            ``--log-with tensorboard``: TensorBoard's event files
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

# -- exit codes ----------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_PREEMPTED = 75

#: The signals that ask a run to stop (a cloud's shutdown, Ctrl-C, a batch scheduler's warning).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# -- launcher -> worker ----------------------------------------------------------------------
ENV_PREFIX = "TLAUNCH_"
CONFIG_ENV = "TLAUNCH_CONFIG"
LAUNCH_DIR_ENV = "TLAUNCH_LAUNCH_DIR"
CONTROL_DIR_ENV = "TLAUNCH_CONTROL_DIR"
START_TIME_ENV = "TLAUNCH_START_TIME"
DATA_DIR_ENV = "TLAUNCH_DATA_DIR"
DATA_DIRS_ENV = "TLAUNCH_DATA_DIRS"
LEASE_TOKEN_ENV = "TLAUNCH_LEASE_TOKEN"
DEFAULT_CHECKPOINT_DIR_ENV = "TLAUNCH_DEFAULT_CHECKPOINT_DIR"
LAUNCHER_PID_ENV = "TLAUNCH_LAUNCHER_PID"
HOLD_SIGNALS_ENV = "TLAUNCH_HOLD_SIGNALS"
DOCTOR_ENV = "TLAUNCH_DOCTOR"
EXIT_FD_ENV = "TLAUNCH_EXIT_FD"
EXIT_SOCKET_ENV = "TLAUNCH_EXIT_SOCKET"

# -- set by users and tests ------------------------------------------------------------------
RUN_ID_ENV = "TLAUNCH_RUN_ID"
GCE_URL_ENV = "TLAUNCH_GCE_METADATA_URL"
AWS_URL_ENV = "TLAUNCH_AWS_METADATA_URL"
RUNTIME_START_ENV = "TLAUNCH_RUNTIME_START"
#: Read inside tlaunch.storage, which cannot import this module; declared here for the table.
CACHE_DIR_ENV = "TLAUNCH_CACHE_DIR"
DRIVE_ROOT_ENV = "TLAUNCH_DRIVE_ROOT"

# -- control files -----------------------------------------------------------------------------
STOP_FILE = "STOP"
WORKERS_STOPPING = "WORKERS_STOPPING"
PREEMPTED_REPORT = "preempted.json"
FINISHED_REPORT = "finished.json"
READY_PREFIX = "ready-"

# -- run-directory files -----------------------------------------------------------------------
CONFIG_FILE = "config.json"
LAUNCHER_LOG = "launcher.log"
EXIT_FILE = "exit.json"
METRICS_FILE = "metrics.jsonl"

# -- checkpoint-directory files (read inside tlaunch.storage too, which declares it) -----------
GOODPUT_FILE = "goodput.jsonl"

# -- the run's logs folder (``<checkpoint-dir>/logs``: see tlaunch.trackers) -------------------
LOGS_DIR = "logs"


def ready_file(local_rank: int) -> str:
    return f"{READY_PREFIX}{local_rank}"


def flag_env(field_name: str) -> str:
    """The variable that sets a launcher flag's default: ``cpus`` → ``TLAUNCH_CPUS``."""
    return ENV_PREFIX + field_name.upper()


def declared_names() -> set[str]:
    """Every fixed ``TLAUNCH_*`` name above (flag variables come from :func:`flag_env`)."""
    return {v for k, v in globals().items() if k.endswith("_ENV") and isinstance(v, str)}


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Leave a worker the way every tlaunch error leaves: one ``tlaunch: error:`` line on
    stderr saying what went wrong and the fix, then exit ``code``."""
    print(f"tlaunch: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
