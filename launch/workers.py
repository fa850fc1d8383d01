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
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

from tlaunch.config import LaunchConfig
from tlaunch.contract import (
    CONTROL_DIR_ENV,
    EXIT_FD_ENV,
    EXIT_SOCKET_ENV,
    FINISHED_REPORT,
    HOLD_SIGNALS_ENV,
    RUN_ID_ENV,
    ready_file,
)
from tlaunch.strategies import DIRECT, ELASTIC, LaunchPlan
from tlaunch.supervisor import Attempt

#: Put first on the workers' ``PYTHONPATH``: its ``sitecustomize`` ends a process group that a
#: finished script left open, at exit, and then runs the script's own ``sitecustomize``.
EXIT_HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")


def with_exit_hook(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`EXIT_HOOK_DIR` first on ``PYTHONPATH`` (once)."""
    current = env.get("PYTHONPATH", "")
    if EXIT_HOOK_DIR in current.split(os.pathsep):
        return env
    return {**env, "PYTHONPATH": EXIT_HOOK_DIR + (os.pathsep + current if current else "")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DirectWorkers:
    """One child process. It gets its own session so a terminal's Ctrl-C reaches it once, via us."""

    def __init__(self, command: list[str], env: dict[str, str], delivery: StopDelivery) -> None:
        self.command, self.env, self.delivery = command, env, delivery
        self.proc: subprocess.Popen | None = None

    def start(self, attempt: int) -> Attempt:
        if not hasattr(os, "pidfd_open"):  # no way to wait for either: the exit alone
            self.proc = subprocess.Popen(self.command, env=self.env, start_new_session=True)
            return self._attempt(self.proc.wait())
        notice, tell = os.pipe()
        try:
            self.proc = subprocess.Popen(
                self.command,
                env={**self.env, EXIT_FD_ENV: str(tell)},
                start_new_session=True,
                pass_fds=(tell,),
            )
        finally:
            os.close(tell)
        try:
            return self._attempt(_notice_or_exit(self.proc, notice))
        finally:
            os.close(notice)

    def _attempt(self, code: int) -> Attempt:
        if code < 0:
            return Attempt(128 - code, f"the script was killed by {signal.Signals(-code).name}")
        return Attempt(code, f"the script exited with code {code}" if code else "")

    def stop(self, signum: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.delivery.deliver(signum, send=proc.send_signal, kill=self.kill)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


class ElasticWorkers:
    """``nproc_per_node`` workers on each of ``nnodes`` machines through torch's elastic agent.

    While it runs, the agent owns SIGTERM, SIGINT, SIGHUP and SIGQUIT: its handler raises
    ``SignalException`` in the main thread, and the agent then forwards the signal to the
    workers, waits up to ``shutdown_timeout`` (``--grace``) and SIGKILLs what is left. Its
    handler raises on *every* signal, so a second SIGTERM (the shutdown's, after a cloud
    notice) would break off that wait and with it the workers' save. We put our own function
    in its place (:meth:`_agent_signal`): every signal goes to the supervisor, and only the
    first stop raises ``SignalException``, once.
    """

    def __init__(
        self,
        config: LaunchConfig,
        nproc: int,
        command: list[str],
        env: dict[str, str],
        on_signal: Callable[[int], None],
        delivery: StopDelivery,
    ) -> None:
        self.config, self.nproc, self.command, self.env = config, nproc, command, env
        self.on_signal, self.delivery = on_signal, delivery
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
        self._raise_stop = self._in_handler = False
        agent_api = _agent_multiprocessing_api()
        torch_handler, agent_api._terminate_process_handler = (
            agent_api._terminate_process_handler,
            self._agent_signal,
        )
        agent_loop = _agent_server_api()
        spawner = _agent_subprocess_api()
        notices = _ExitNotices.open() if hasattr(spawner, "Popen") else None
        if notices is not None:  # the workers say their exit code (see _ExitNotices)
            os.environ[EXIT_SOCKET_ENV] = notices.name
            torch_popen, spawner.Popen = spawner.Popen, notices.popen
        else:
            os.environ.pop(EXIT_SOCKET_ENV, None)
        wake = _WakeOnChildExit(notices)
        clock, agent_loop.time = agent_loop.time, wake
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
            agent_api._terminate_process_handler = torch_handler
            agent_loop.time = clock
            wake.close()
            if notices is not None:
                spawner.Popen = torch_popen
                notices.close()
                os.environ.pop(EXIT_SOCKET_ENV, None)
            # The agent leaves its handlers installed; between attempts the supervisor's apply.
            for s, h in handlers.items():
                signal.signal(s, h)

    def _agent_signal(self, signum: int, frame: object) -> None:
        """The agent's signal handler while it runs (see the class docstring)."""
        self._in_handler = True
        try:
            self.on_signal(signum)  # the supervisor: the first stop calls stop() below
        finally:
            self._in_handler = False
        if self._raise_stop:
            from torch.distributed.elastic.multiprocessing.api import SignalException

            self._raise_stop = False
            self.agent_stopped = True
            sig = signal.Signals(signum)
            raise SignalException(f"tlaunch stop ({sig.name})", sigval=sig)

    def stop(self, signum: int) -> None:
        if not getattr(self, "running", False) or self.agent_stopped:
            return
        self.delivery.deliver(signum, send=self._agent_forward, kill=self.kill)

    def _agent_forward(self, signum: int) -> None:
        """Have the agent forward ``signum`` to the workers and wait for them (once)."""
        self._raise_stop = True
        if not self._in_handler:
            # A trigger the agent's handler did not see (a watcher thread, SIGUSR1, the
            # delivery's wait): the agent's wait runs in the main thread; interrupt it there.
            os.kill(os.getpid(), signal.SIGTERM)

    def kill(self) -> None:
        """End every worker now (a second Ctrl-C): SIGKILL to this process's children."""
        for pid in _children(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _agent_multiprocessing_api():
    import torch.distributed.elastic.multiprocessing.api as agent_api

    return agent_api


def _notice_or_exit(proc: subprocess.Popen, notice: int) -> int:
    """The child's exit code: from its notice when it leaves quickly after a stop (it ran its
    last line; the kernel then frees its memory, 0.3 s and more for a large state, which this
    launcher does not wait for: :mod:`tlaunch.quick_exit`), else from its exit. A pidfd tells
    of the exit, not the pipe's end: a process the script forked may hold the pipe open."""
    try:
        exited = os.pidfd_open(proc.pid)
    except OSError:  # gone already (reaped it cannot be: only proc.wait reaps it)
        return proc.wait()
    try:
        ready, _, _ = select.select([notice, exited], [], [])
        if notice in ready:
            told = os.read(notice, 1)
            if told:
                return told[0]
        return proc.wait()
    finally:
        os.close(exited)


def _agent_server_api():
    import torch.distributed.elastic.agent.server.api as agent_loop

    return agent_loop


def _agent_subprocess_api():
    """The module whose ``Popen`` torch's agent starts each worker with (None in a torch that
    has none: its workers' exits are waited for)."""
    try:
        import torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler as m
    except ImportError:
        return None
    return m


class _ExitNotices:
    """The exit codes the elastic agent's workers say right before they leave quickly after a
    stop (:mod:`tlaunch.quick_exit`), so that neither the agent nor the launcher waits while
    the kernel frees their memory (0.1-0.2 s for a 500 MB state), as :class:`DirectWorkers`
    does not wait for its one worker.

    The agent starts its workers without inherited file descriptors, so the notice goes to a
    datagram socket in Linux's abstract namespace, named in the workers' environment
    (``TLAUNCH_EXIT_SOCKET``). The kernel says who sent each datagram (``SO_PASSCRED``): only
    a worker this object started (:meth:`popen` stands in for the agent's ``Popen``) is
    heard, and only about itself. A worker's word is taken once no other worker is left
    running that has not told its code or exited: the agent ends the others when one fails,
    and a worker still running its exit functions must not get that signal. Its code then
    becomes its ``Popen``'s ``returncode``, which is what the agent's next look reads, and a
    thread reaps the process when the kernel is done with it.
    """

    def __init__(self) -> None:
        self.name = f"tlaunch-exit-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind("\0" + self.name)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.procs: dict[int, subprocess.Popen] = {}  # pid -> the worker's process
        self.told: dict[int, int] = {}  # pid -> the exit code it said

    @classmethod
    def open(cls) -> _ExitNotices | None:
        """A listening socket, or None where the kernel cannot say who sent a datagram."""
        if not sys.platform.startswith("linux") or not hasattr(socket, "SO_PASSCRED"):
            return None
        try:
            return cls()
        except OSError:
            return None

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(*args, **kwargs)
        self.told.pop(proc.pid, None)  # a reaped worker's pid, used again
        self.procs[proc.pid] = proc
        return proc

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> None:
        """Take every notice waiting on the socket."""
        creds = struct.calcsize("3i")
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(8, socket.CMSG_SPACE(creds))
            except (BlockingIOError, InterruptedError):
                return
            for level, kind, payload in ancillary:
                if level != socket.SOL_SOCKET or kind != socket.SCM_CREDENTIALS:
                    continue
                pid, _, _ = struct.unpack("3i", payload[:creds])  # pid, uid, gid
                proc = self.procs.get(pid)
                if proc is not None and proc.returncode is None and len(data) == 1:
                    self.told[pid] = data[0]

    def settle(self) -> None:
        """Give the workers that told their code that code, once every other worker has too
        or has exited."""
        if not self.told:
            return
        running = [p for p in self.procs.values() if p.returncode is None]
        if any(p.pid not in self.told for p in running if p.poll() is None):
            return
        for proc in running:
            if proc.returncode is None:  # told, and not seen exiting by the poll above
                proc.returncode = self.told.pop(proc.pid)
                threading.Thread(target=_reap, args=(proc.pid,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class _WakeOnChildExit:
    """The ``time`` module of torch's agent while it runs, but for ``sleep``: the agent's
    monitor loop sleeps ``monitor_interval`` (0.1 s) between looks at its workers, and a
    stopped run's launcher can only exit once the agent saw them gone. This sleep ends as soon
    as a child of this process exits: it waits on a pidfd of each (Linux 5.3+; elsewhere, or
    with no child, it is ``time.sleep``), or when a worker tells its exit code (``notices``).
    No signal handler, so nothing else is interrupted."""

    def __init__(self, notices: _ExitNotices | None = None) -> None:
        self.notices = notices
        self._fds: dict[int, int] = {}  # child pid -> its pidfd
        self._woke: set[int] = set()  # children that ended a sleep already (zombies or reaped)

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        watched = self._watch()
        listen = [self.notices.fileno()] if self.notices is not None else []
        if not watched and not listen:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([*watched, *listen], [], [], seconds)
        for fd in ready:
            if fd in watched:
                self._woke.add(watched[fd])
                os.close(self._fds.pop(watched[fd]))
        if self.notices is not None:
            if listen[0] in ready:
                self.notices.read()
            self.notices.settle()

    def _watch(self) -> dict[int, int]:
        """pidfd -> pid for the children not seen exiting yet."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            children = _children(os.getpid())
            self._woke.intersection_update(children)  # reaped ones go: their pids may return
            for pid in children:
                if pid not in self._fds and pid not in self._woke:
                    try:
                        self._fds[pid] = pidfd_open(pid)
                    except OSError:  # gone already, or pidfds unsupported: polled as before
                        self._woke.add(pid)
        return {fd: pid for pid, fd in self._fds.items()}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc``; elsewhere none are found)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


class StopDelivery:
    """How a stop reaches the workers of one machine.

    Workers that run the Run API poll the launcher's STOP file at every step, and say so with
    a ready file once their handlers are in place: they are stopped through STOP alone. A
    signal would add nothing for them and would also reach their DataLoader workers, whose
    death ends the rank before it can save. Other scripts get the signal, as under torchrun.
    A stop that comes while a Run API script is still starting (importing torch, building its
    model) ends its workers at once if none of them has its Run yet: no step can have been
    taken (the first needs every rank), so finishing the start-up only to stop would cost a
    restart's worth of time for nothing. STOP is written before the ready files are looked at,
    so a rank whose Run begins in between sees it and takes no step either. If some ranks are
    ready, the others are waited for a little; once its run has finished (finished.json:
    nothing polls STOP any more) the script gets the signal. Either way the workers get
    ``--grace`` seconds to save and exit, then SIGKILL.
    """

    #: At most this long (or half the grace) for starting Run API workers to become ready.
    READY_WAIT = 10.0

    def __init__(self, control_dir: str, nproc: int, grace: float, expects_run_api: bool) -> None:
        self.control_dir, self.nproc, self.grace = control_dir, nproc, grace
        self.expects_run_api = expects_run_api
        self._ended_before_ready = False

    def ready(self) -> bool:
        return all(
            os.path.exists(os.path.join(self.control_dir, ready_file(r))) for r in range(self.nproc)
        )

    def deliver(
        self, signum: int, *, send: Callable[[int], None], kill: Callable[[], None]
    ) -> None:
        timer = threading.Timer(self.grace, kill)
        timer.daemon = True
        timer.start()
        if self.finished():
            send(signum)
        elif self.ready():  # through STOP; unless the run finishes first (then STOP is unread)
            threading.Thread(
                target=self._send_once_finished, args=(signum, send), daemon=True
            ).start()
        elif not self.expects_run_api:
            send(signum)
        elif self.never_ready():  # nothing to lose: don't let them finish starting first
            self._ended_before_ready = True
            kill()
        else:
            waiter = threading.Thread(target=self._wait_then_send, args=(signum, send), daemon=True)
            waiter.start()

    def never_ready(self) -> bool:
        """A Run API script none of whose workers got as far as its Run: whatever ended them,
        no step was taken (the first needs every rank), so nothing can have been lost."""
        if self._ended_before_ready:
            return True
        return self.expects_run_api and not any(
            os.path.exists(os.path.join(self.control_dir, ready_file(r))) for r in range(self.nproc)
        )

    def outside_run_api(self) -> bool:
        """A script that is not a Run API script and none of whose workers began a Run: its
        checkpoints, if it saves any, are its own."""
        return not self.expects_run_api and not any(
            os.path.exists(os.path.join(self.control_dir, ready_file(r))) for r in range(self.nproc)
        )

    def finished(self) -> bool:
        return os.path.exists(os.path.join(self.control_dir, FINISHED_REPORT))

    def _send_once_finished(self, signum: int, send: Callable[[int], None]) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            if self.finished():
                send(signum)
                return
            time.sleep(0.05)

    def _wait_then_send(self, signum: int, send: Callable[[int], None]) -> None:
        deadline = time.monotonic() + min(self.READY_WAIT, self.grace / 2)
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.05)
        send(signum)  # not a Run API script after all, or one that starts very slowly


#: ``tlaunch.init(`` or ``from tlaunch import ... init``: a script that starts a Run.
_CALLS_INIT = re.compile(rb"\btlaunch\s*\.\s*init\s*\(|\bfrom\s+tlaunch\s+import\b[^\n]*\binit\b")


def calls_run_api(config: LaunchConfig) -> bool:
    """Whether the script's source starts a Run (calls ``tlaunch.init``): a guess from its
    text, which decides whether a stop while the workers start waits a few seconds for them,
    whether they hold stop signals until their Run is ready, and whether workers that never
    got to it lost nothing (see StopDelivery). Merely naming tlaunch is not enough: a plain
    script must die of its signal as it would under torchrun."""
    path = config.script
    if config.module:
        import importlib.util

        try:
            spec = importlib.util.find_spec(config.module)
        except (ImportError, ValueError):
            return False
        path = spec.origin if spec is not None else None
    try:
        with open(path or "", "rb") as f:
            return _CALLS_INIT.search(f.read()) is not None
    except OSError:
        return False


def build_workers(
    plan: LaunchPlan,
    config: LaunchConfig,
    command: list[str],
    env: dict[str, str],
    on_signal: Callable[[int], None],
) -> DirectWorkers | ElasticWorkers:
    """The workers ``plan`` asks for. Several machines always go through the elastic agent,
    whatever the per-machine count: it is what joins them."""
    delivery = StopDelivery(
        env[CONTROL_DIR_ENV], plan.nproc_per_node, config.grace, calls_run_api(config)
    )
    env = with_exit_hook(env)
    if delivery.expects_run_api:  # stop signals at start-up are held for its Run (early_signals)
        env[HOLD_SIGNALS_ENV] = "1"
    if plan.launcher == DIRECT and config.nnodes == 1:
        return DirectWorkers(command, env, delivery)
    if plan.launcher not in (DIRECT, ELASTIC):
        raise ValueError(f"launch plan names an unknown launcher {plan.launcher!r}")
    return ElasticWorkers(config, plan.nproc_per_node, command, env, on_signal, delivery)
