"""A real Jupyter kernel (ipykernel, started through jupyter_client) that tests run cells in."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from jupyter_client.manager import KernelManager

# A kernel starts with a launch's clean environment: no TLAUNCH_, ACCELERATE_ or rank variables.
from tests.e2e.helpers import clean_env as kernel_env  # noqa: F401


@dataclass
class CellResult:
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # "ExceptionName: message" when the cell raised
    outputs: list[str] = field(default_factory=list)


class Kernel:
    """One live kernel. ``run(code)`` executes a cell and returns what it printed and raised;
    ``start(code)`` only submits it (the test then interrupts it, say) and ``wait(msg_id)``
    collects it."""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=cwd, env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def start(self, code: str) -> str:
        return self.kc.execute(code)

    def wait(self, msg_id: str, timeout: float = 240) -> CellResult:
        result = CellResult()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the cell did not finish in {timeout}s:\n{result}")
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind == "error":
                result.error = f"{content['ename']}: {content['evalue']}"
            elif kind in ("execute_result", "display_data"):
                result.outputs.append(content["data"].get("text/plain", ""))
            elif kind == "status" and content["execution_state"] == "idle":
                return result

    def run(self, code: str, timeout: float = 240) -> CellResult:
        return self.wait(self.start(code), timeout)

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def alive(self) -> bool:
        return self.km.is_alive() and self.run("1 + 1", timeout=60).outputs == ["2"]

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
