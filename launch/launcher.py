"""From a validated ``LaunchConfig`` to running workers, on one machine.

One process: the script runs as a child process, nothing else. Several processes or several
machines: torch's elastic agent (``elastic_launch``, c10d rendezvous) spawns, rendezvouses and
tears down the workers; tlaunch does not reimplement it. Around either sits the
:class:`~tlaunch.supervisor.Supervisor`, which owns restarts, stop triggers and exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from tlaunch.config import LaunchConfig, UsageError, default_checkpoint_dir
from tlaunch.contract import (
    CONFIG_ENV,
    CONTROL_DIR_ENV,
    DATA_DIR_ENV,
    DATA_DIRS_ENV,
    DEFAULT_CHECKPOINT_DIR_ENV,
    EXIT_FILE,
    EXIT_PREEMPTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    LAUNCH_DIR_ENV,
    LAUNCHER_LOG,
    LAUNCHER_PID_ENV,
    LEASE_TOKEN_ENV,
    START_TIME_ENV,
)
from tlaunch.goodput import LaunchRecord
from tlaunch.preemption import Deadline, Watcher, check_time_left, detect, time_limit_span
from tlaunch.preflight import Preflight, preflight
from tlaunch.run_io import make_run_dir
from tlaunch.storage import StorageError, StorageUnavailable
from tlaunch.strategies.base import HOST_ENV
from tlaunch.supervisor import Supervisor
from tlaunch.syncdir import SyncDirs
from tlaunch.workers import build_workers


def script_command(config: LaunchConfig) -> list[str]:
    target = ["-m", config.module] if config.module else [config.script]
    return [sys.executable, "-u", *target, *config.script_args]


def _check_strategy(config: LaunchConfig):
    from tlaunch.strategies import StrategyUnavailable, choose

    try:
        strategy = choose(
            gpus=config.gpus,
            cpus=config.cpus,
            tpus=config.tpus,
            nnodes=config.nnodes,
            override=config.strategy,
            precision=config.precision,
            grad_accum=config.grad_accum,
        )
        strategy.check()
    except StrategyUnavailable as e:
        raise UsageError(str(e)) from None
    return strategy


def worker_env(
    config: LaunchConfig, plan_env: dict[str, str], run_dir: str, control_dir: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(plan_env)
    for key, value in HOST_ENV.items():
        env.setdefault(key, value)  # the user's own setting wins
    env[CONFIG_ENV] = config.to_json()
    env[LAUNCH_DIR_ENV] = run_dir
    env[CONTROL_DIR_ENV] = control_dir
    env.setdefault(START_TIME_ENV, str(time.time()))
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers' parent (direct, elastic or forked)
    env.pop(LEASE_TOKEN_ENV, None)  # only this launch's own lease (Preflight.worker_env)
    env.pop(DEFAULT_CHECKPOINT_DIR_ENV, None)
    if config.checkpoint_dir is None:  # a Run API script saves here (Run API scripts only)
        env[DEFAULT_CHECKPOINT_DIR_ENV] = default_checkpoint_dir(config)
    return env


#: Builds an attempt's workers: ``(plan, config, env, on_signal) -> workers`` with
#: ``start(attempt)``, ``stop(signum)`` and ``kill()`` (see :mod:`tlaunch.workers`).
WorkersFactory = Callable[..., Any]


def _script_workers(plan, config: LaunchConfig, env: dict[str, str], on_signal) -> Any:
    return build_workers(plan, config, script_command(config), env, on_signal)


def launch(config: LaunchConfig, workers: WorkersFactory = _script_workers) -> int:
    """Start the workers of ``config`` on this machine and supervise them. Returns the exit code.

    ``workers`` builds the processes: the script's command by default; functions forked from
    a notebook's kernel for :func:`tlaunch.notebook.notebook_launch`.
    """
    with _LaunchSignals() as signals:
        try:
            return _launch(config, workers)
        except StoppedBeforeStart as e:
            signals.decided = True
            print(
                f"tlaunch: stopped by {signal.Signals(e.signum).name} before any worker started: "
                "nothing to lose; run the same command again",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_PREEMPTED


def _launch(config: LaunchConfig, workers: WorkersFactory) -> int:
    started = time.time()  # the launch's start-up counts in the run's goodput
    try:
        check_time_left(config.time_limit, time.time())
        strategy = _check_strategy(config)
    except UsageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        checked = preflight(config)
    except StorageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(e, StorageUnavailable) else EXIT_USAGE
    try:
        return _supervise(config, strategy, checked, workers, started)
    finally:
        checked.release()  # whatever the exit: 0, 75, a failure, an exception


def _supervise(
    config: LaunchConfig, strategy, checked: Preflight, build: WorkersFactory, started: float
) -> int:
    """Everything after the checks: run directory, data, sync dirs, the supervisor."""
    plan = strategy.plan()
    run_dir = make_run_dir(config)
    goodput = LaunchRecord(config, run_dir, started)
    control_dir = tempfile.mkdtemp(prefix="tlaunch-control-")
    log_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    log_file = open(os.open(os.path.join(run_dir, LAUNCHER_LOG), log_flags, 0o600), "a")

    def log(line: str) -> None:
        from tlaunch.storage import redact

        line = redact(line)  # URLs in flags and errors may carry credentials
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"tlaunch: {line}", file=sys.stderr, flush=True)
        log_file.write(f"{stamp} {line}\n")
        log_file.flush()

    checked.start(log)
    env = worker_env(config, plan.env, run_dir, control_dir)
    env.update(checked.worker_env())
    try:
        env.update(_stage_data(config, log))
        syncs = SyncDirs(config.sync_dir, log)
        syncs.restore()
    except StorageError as e:
        log(f"error: {e}")
        # Unreachable storage is worth another try later; anything else (no such archive,
        # no permission, a missing backend) needs the user to change something first.
        return EXIT_UNAVAILABLE if isinstance(e, StorageUnavailable) else EXIT_USAGE
    supervisor: Supervisor
    workers = build(plan, config, env, lambda s: supervisor.request_stop(s))
    supervisor = Supervisor(
        start_workers=workers.start,
        stop_workers=workers.stop,
        control_dir=control_dir,
        # Multi-node restarts are the agent's (it re-rendezvouses every machine at once).
        max_restarts=0 if getattr(workers, "agent_restarts", 0) else config.max_restarts,
        log=log,
        after_stop=syncs.flush if syncs.mirrors else None,
        force_workers=workers.kill,
        never_started=getattr(getattr(workers, "delivery", None), "never_ready", None),
        outside_run_api=getattr(getattr(workers, "delivery", None), "outside_run_api", None),
    )
    log(
        f"{strategy.name} strategy, {plan.nproc_per_node} process(es) per machine x {config.nnodes} machine(s); run dir {run_dir}"
    )
    watchers = _start_watchers(config, supervisor, float(env[START_TIME_ENV]))
    syncs.start()
    assert _LaunchSignals.current is not None, "launch() holds the launcher's signals"
    code = _LaunchSignals.current.supervise(supervisor)
    for w in watchers:
        w.close()
    if syncs.mirrors and supervisor.stop_signal is None:
        syncs.flush(complete=code == 0)  # exited 0 on its own: every file it wrote is whole
    with open(os.path.join(run_dir, EXIT_FILE), "w") as f:
        json.dump({"exit_code": code, "states": [s.value for s in supervisor.history]}, f)
    for line in goodput.finish(code):
        log(line)
    log_file.close()
    return code


def _stage_data(config: LaunchConfig, log: Callable[[str], None]) -> dict[str, str]:
    """Fetch every --data archive into the local cache (once per machine) before start."""
    if not config.data:
        return {}
    paths = [_fetch_data(spec, log) for spec in config.data]
    return {DATA_DIR_ENV: paths[0], DATA_DIRS_ENV: os.pathsep.join(paths)}


def _fetch_data(spec: str, log: Callable[[str], None]) -> str:
    """``--data URL[=DEST]``. A URL may hold ``=`` itself (``s3://b/lr=0.1/ds.tlar``), so the
    whole spec is tried as a URL first, then split at its last ``=`` into URL and DEST."""
    from tlaunch.storage import ArchiveMissing, fetch

    url, sep, dest = spec.rpartition("=")
    try:
        path = fetch(spec, None, progress=True)
        url = spec
    except ArchiveMissing:
        if not sep:
            raise
        try:
            path = fetch(url, dest or None, progress=True)
        except ArchiveMissing:
            raise ArchiveMissing(
                f"no tlaunch data archive at {spec!r}, nor at {url!r} (read as URL=DEST); "
                "check the URL, or create one with `tlaunch data pack DIR URL`"
            ) from None
    log(f"data {url} ready at {path}")
    return path


def _start_watchers(config: LaunchConfig, supervisor: Supervisor, started: float) -> list:
    def trigger(reason: str) -> None:
        supervisor.request_stop(signal.SIGTERM, reason)

    watchers: list = []
    kind = detect(config.preemption_watch)
    if kind is not None:
        watchers.append(Watcher(kind, trigger).start())
    span = time_limit_span(config.time_limit, started)
    if span is not None:
        watchers.append(Deadline(span, trigger, started).start())
    return watchers


class StoppedBeforeStart(BaseException):
    """A stop signal before any worker started: unwinds the checks, the lease and data staging
    (a BaseException, so that no ``except Exception`` on the way takes it for a failure)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _LaunchSignals:
    """SIGTERM, SIGINT and SIGUSR1 to the launcher, from its first line to its exit code.

    Before the workers start (the checks, the storage probe, the lease, data staging), the
    first one unwinds the launch (:class:`StoppedBeforeStart`): nothing ran, nothing is lost,
    exit 75. While the supervisor runs, each goes to :meth:`Supervisor.request_stop` (SIGUSR1
    as SIGTERM). Once the exit code is decided they are ignored, so that the launcher writes its
    records, releases the lease and exits with that code instead of dying by the signal; only
    a second Ctrl-C, more than a second after the first, ends it at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    #: The launch in progress in this process (``launch`` holds one at a time).
    current: _LaunchSignals | None = None

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        #: The exit code is known: signals no longer change it.
        self.decided = False
        self._unwinding = False
        self._sigint_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._outer: _LaunchSignals | None = None

    def supervise(self, supervisor: Supervisor) -> int:
        """Run the supervisor with the signals routed to it; its exit code is final."""
        self.supervisor = supervisor
        try:
            return supervisor.run()
        finally:
            self.supervisor, self.decided = None, True

    def _handle(self, signum: int, frame: Any) -> None:
        signum = signal.SIGTERM if signum == signal.SIGUSR1 else signum
        if self.supervisor is not None:
            self.supervisor.request_stop(signum)
        elif self.decided or self._unwinding:
            self._second_ctrl_c(signum)
        else:
            self._unwinding = True
            raise StoppedBeforeStart(signum)

    def _second_ctrl_c(self, signum: int) -> None:
        if signum != signal.SIGINT:
            return
        now = time.monotonic()
        if self._sigint_at is not None and now - self._sigint_at > 1.0:
            raise SystemExit(128 + signal.SIGINT)
        self._sigint_at = self._sigint_at or now

    def __enter__(self) -> _LaunchSignals:
        self._outer, _LaunchSignals.current = _LaunchSignals.current, self
        if threading.current_thread() is threading.main_thread():  # only there can Python
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        _LaunchSignals.current = self._outer
