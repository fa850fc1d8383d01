"""The processes of one attempt: how the workers a launch plan asks for are started and stopped.

:class:`DirectWorkers` runs one child process (no rendezvous); :class:`ElasticWorkers` runs
``nproc_per_node`` processes on each machine through torch's elastic agent, which does the
spawning, the c10d rendezvous and the teardown. The strategy's :class:`LaunchPlan` names which
(:func:`build_workers`); both offer the two calls the supervisor needs, ``start(attempt)``
(blocks until the workers are gone) and ``stop(signum)``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable

from tlaunch.config import LaunchConfig
from tlaunch.contract import RUN_ID_ENV
from tlaunch.strategies import DIRECT, ELASTIC, LaunchPlan
from tlaunch.supervisor import Attempt


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def build_workers(
    plan: LaunchPlan,
    config: LaunchConfig,
    command: list[str],
    env: dict[str, str],
    on_signal: Callable[[int], None],
) -> DirectWorkers | ElasticWorkers:
    """The workers ``plan`` asks for. Several machines always go through the elastic agent,
    whatever the per-machine count: it is what joins them."""
    if plan.launcher == DIRECT and config.nnodes == 1:
        return DirectWorkers(command, env, config.grace)
    if plan.launcher not in (DIRECT, ELASTIC):
        raise ValueError(f"launch plan names an unknown launcher {plan.launcher!r}")
    return ElasticWorkers(config, plan.nproc_per_node, command, env, on_signal)
