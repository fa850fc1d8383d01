"""From a validated ``LaunchConfig`` to running workers, on one machine.

One process: the script runs as a child process, nothing else. Several processes or several
machines: torch's elastic agent (``elastic_launch``, c10d rendezvous) spawns, rendezvouses and
tears down the workers; tlaunch does not reimplement it. Around either sits the
:class:`~tlaunch.supervisor.Supervisor`, which owns restarts, stop triggers and exit codes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

from tlaunch.config import LaunchConfig, UsageError
from tlaunch.contract import (
    CONFIG_ENV,
    CONFIG_FILE,
    CONTROL_DIR_ENV,
    DATA_DIR_ENV,
    DATA_DIRS_ENV,
    EXIT_FILE,
    EXIT_USAGE,
    LAUNCH_DIR_ENV,
    LAUNCHER_LOG,
    RUN_ID_ENV,
    START_TIME_ENV,
)
from tlaunch.preemption import Deadline, Watcher, detect
from tlaunch.storage import StorageError
from tlaunch.supervisor import Attempt, Supervisor
from tlaunch.syncdir import SyncDirs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_command(config: LaunchConfig) -> list[str]:
    target = ["-m", config.module] if config.module else [config.script]
    return [sys.executable, "-u", *target, *config.script_args]


def make_run_dir(config: LaunchConfig) -> str:
    """A fresh folder for this launch's log, config and metrics (kept across restarts)."""
    from tlaunch.storage import is_remote

    if config.run_dir:
        base = config.run_dir
    elif config.checkpoint_dir and not is_remote(config.checkpoint_dir):
        base = os.path.join(config.checkpoint_dir, "runs")
    else:
        base = os.path.join(os.getcwd(), "tlaunch-runs")
    name = time.strftime("%Y%m%d-%H%M%S") + f"-node{config.node_rank}-{os.getpid()}"
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        f.write(config.to_json())
    return path


class DirectWorkers:
    """One child process. It gets its own session so a terminal's Ctrl-C reaches it once, via us."""

    def __init__(self, command: list[str], env: dict[str, str], grace: float) -> None:
        self.command, self.env, self.grace = command, env, grace
        self.proc: subprocess.Popen | None = None

    def start(self, attempt: int) -> Attempt:
        self.proc = subprocess.Popen(self.command, env=self.env, start_new_session=True)
        code = self.proc.wait()
        if code < 0:
            return Attempt(128 - code, f"the script was killed by {signal.Signals(-code).name}")
        return Attempt(code, f"the script exited with code {code}" if code else "")

    def stop(self, signum: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signum)
        timer = threading.Timer(self.grace, lambda: proc.poll() is None and proc.kill())
        timer.daemon = True
        timer.start()


class ElasticWorkers:
    """``nproc_per_node`` workers on each of ``nnodes`` machines through torch's elastic agent.

    The agent handles SIGTERM/SIGINT itself while it runs: it forwards the signal to the
    workers, waits up to ``shutdown_timeout`` and raises ``SignalException``, which we turn
    into the supervisor's stop instead of a traceback.
    """

    def __init__(
        self,
        config: LaunchConfig,
        nproc: int,
        command: list[str],
        env: dict[str, str],
        on_signal: Callable[[int], None],
    ) -> None:
        self.config, self.nproc, self.command, self.env = config, nproc, command, env
        self.on_signal = on_signal
        # Every machine of a job must name the same rendezvous: derive it from the endpoint.
        self.run_id = os.environ.get(RUN_ID_ENV) or (
            "tlaunch-" + config.rdzv_endpoint.replace(":", "-")
            if config.rdzv_endpoint
            else uuid.uuid4().hex[:12]
        )
        # Multi-node restarts are the agent's job: it re-rendezvouses every machine at once.
        self.agent_restarts = config.max_restarts if config.nnodes > 1 else 0

    def _elastic_config(self, attempt: int):
        from torch.distributed.launcher.api import LaunchConfig as ElasticConfig

        endpoint = self.config.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
        kwargs = dict(
            min_nodes=self.config.nnodes,
            max_nodes=self.config.nnodes,
            nproc_per_node=self.nproc,
            run_id=f"{self.run_id}-{attempt}" if self.config.nnodes == 1 else self.run_id,
            rdzv_backend="c10d",
            rdzv_endpoint=endpoint,
            rdzv_configs={"rank": self.config.node_rank} if self.config.nnodes > 1 else {},
            max_restarts=self.agent_restarts,
            monitor_interval=0.1,
            start_method="spawn",
        )
        if "shutdown_timeout" in ElasticConfig.__dataclass_fields__:
            kwargs["shutdown_timeout"] = int(self.config.grace)
        return ElasticConfig(**kwargs)

    def start(self, attempt: int) -> Attempt:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import elastic_launch

        # The agent is chatty at INFO/WARNING (rendezvous details, per-signal notices); the
        # supervisor prints the transitions that matter.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
        os.environ.update(self.env)  # the agent passes its own environment to the workers
        handlers = {
            s: signal.getsignal(s)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
        }
        self.running, self.agent_stopped = True, False
        try:
            elastic_launch(self._elastic_config(attempt), self.command[0])(*self.command[1:])
            return Attempt(0)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            code = failure.exitcode
            if code < 0:
                return Attempt(
                    128 - code, f"rank {rank} was killed by {signal.Signals(-code).name}"
                )
            return Attempt(code, f"rank {rank} exited with code {code}")
        except SignalException as e:
            self.agent_stopped = True
            self.on_signal(int(e.sigval))
            return Attempt(128 + int(e.sigval), f"stopped by {signal.Signals(e.sigval).name}")
        finally:
            self.running = False
            # The agent leaves its handlers installed; between attempts the supervisor's apply.
            for s, h in handlers.items():
                signal.signal(s, h)

    def stop(self, signum: int) -> None:
        # A trigger the agent did not see (a watcher thread, SIGUSR1): signal ourselves so the
        # agent forwards SIGTERM to the workers and shuts them down its usual way.
        if getattr(self, "running", False) and not self.agent_stopped:
            os.kill(os.getpid(), signal.SIGTERM)


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
    env[CONFIG_ENV] = config.to_json()
    env[LAUNCH_DIR_ENV] = run_dir
    env[CONTROL_DIR_ENV] = control_dir
    env.setdefault(START_TIME_ENV, str(time.time()))
    return env


def launch(config: LaunchConfig) -> int:
    """Start the workers of ``config`` on this machine and supervise them. Returns the exit code."""
    try:
        strategy = _check_strategy(config)
    except UsageError as e:
        print(f"tlaunch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    plan = strategy.plan()
    run_dir = make_run_dir(config)
    control_dir = tempfile.mkdtemp(prefix="tlaunch-control-")
    log_file = open(os.path.join(run_dir, LAUNCHER_LOG), "a")

    def log(line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"tlaunch: {line}", file=sys.stderr, flush=True)
        log_file.write(f"{stamp} {line}\n")
        log_file.flush()

    env = worker_env(config, plan.env, run_dir, control_dir)
    try:
        env.update(_stage_data(config, log))
        syncs = SyncDirs(config.sync_dir, log)
        syncs.restore()
    except StorageError as e:
        log(f"error: {e}")
        return 2
    command = script_command(config)
    supervisor: Supervisor
    if plan.nproc_per_node == 1 and config.nnodes == 1:
        workers = DirectWorkers(command, env, config.grace)
    else:
        workers = ElasticWorkers(
            config,
            plan.nproc_per_node,
            command,
            env,
            on_signal=lambda s: supervisor.request_stop(s),
        )
    supervisor = Supervisor(
        start_workers=workers.start,
        stop_workers=workers.stop,
        control_dir=control_dir,
        max_restarts=0
        if isinstance(workers, ElasticWorkers) and workers.agent_restarts
        else config.max_restarts,
        log=log,
        after_stop=syncs.flush if syncs.mirrors else None,
    )
    log(
        f"{strategy.name} strategy, {plan.nproc_per_node} process(es) per machine x {config.nnodes} machine(s); run dir {run_dir}"
    )
    watchers = _start_watchers(config, supervisor, float(env[START_TIME_ENV]))
    syncs.start()
    with _stop_signals(supervisor):
        code = supervisor.run()
    for w in watchers:
        w.close()
    if syncs.mirrors and supervisor.stop_signal is None:
        syncs.flush()
    with open(os.path.join(run_dir, EXIT_FILE), "w") as f:
        json.dump({"exit_code": code, "states": [s.value for s in supervisor.history]}, f)
    log_file.close()
    return code


def _stage_data(config: LaunchConfig, log: Callable[[str], None]) -> dict[str, str]:
    """Fetch every --data archive into the local cache (once per machine) before start."""
    if not config.data:
        return {}
    from tlaunch.storage import fetch

    paths = []
    for spec in config.data:
        url, sep, dest = spec.rpartition("=")
        url, dest = (url, dest) if sep else (spec, "")
        paths.append(fetch(url, dest or None, progress=True))
        log(f"data {url} ready at {paths[-1]}")
    return {DATA_DIR_ENV: paths[0], DATA_DIRS_ENV: os.pathsep.join(paths)}


def _start_watchers(config: LaunchConfig, supervisor: Supervisor, started: float) -> list:
    def trigger(reason: str) -> None:
        supervisor.request_stop(signal.SIGTERM, reason)

    watchers: list = []
    kind = detect(config.preemption_watch)
    if kind is not None:
        watchers.append(Watcher(kind, trigger).start())
    if config.time_limit_seconds is not None:
        watchers.append(Deadline(config.time_limit_seconds, trigger, started).start())
    return watchers


class _stop_signals:
    """Route SIGTERM, SIGINT and SIGUSR1 to the supervisor while the workers run."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.supervisor.request_stop(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    def __enter__(self) -> _stop_signals:
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
