"""Checkpoint test helpers: small states, tampering on any backend, filesystems that fail."""

from __future__ import annotations

import errno
import random

from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from tlaunch.storage import CheckpointStore, Location
from tlaunch.storage.checkpoint.manifest import step_dir
from tlaunch.storage.store import RetryPolicy

NO_WAIT = RetryPolicy(attempts=4, base_delay=0.0, sleep=lambda _: None)


def make_state(step: int, loss: float | None = None) -> dict:
    """Keyword arguments for ``save``: two models, an Adam state, RNG of two ranks, state."""
    import torch

    torch.manual_seed(step)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)
    )
    head = torch.nn.Linear(3, 3).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    metrics = {"loss": 1.0 / (step + 1) if loss is None else loss, "acc": 0.5}
    return {
        "tensors": {"model": model.state_dict(), "model_1": head.state_dict()},
        "objects": {"optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": step}},
        "rng": {0: torch.get_rng_state(), 1: {"python": random.Random(step).getstate()}},
        "state": {"step": step, "epoch": step // 10, "metrics": metrics, "hparams": {"lr": 1e-3}},
    }


def file_path(store: CheckpointStore, step: int, name: str) -> str:
    return store.location.join(step_dir(step), name)


def rewrite(store: CheckpointStore, step: int, name: str, change) -> None:
    """Replace a file of a saved step with ``change(old_bytes)``, on any backend."""
    fs, path = store.location.fs, file_path(store, step, name)
    fs.pipe_file(path, change(fs.cat_file(path)))
    fs.invalidate_cache(store.location.path)


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def remove(store: CheckpointStore, step: int, name: str) -> None:
    store.location.fs.rm_file(file_path(store, step, name))
    store.location.fs.invalidate_cache(store.location.path)


class _Faults:
    """Make writes of files whose path contains ``match`` raise ``error`` (``times`` times)."""

    match = "\0"
    error: BaseException | None = None
    times = 10**9
    calls = 0

    def _maybe_fail(self, path: str) -> None:
        if self.error is not None and self.match in path and self.calls < self.times:
            self.calls += 1
            raise self.error


class FaultyLocalFS(_Faults, LocalFileSystem):
    """Local disk whose file writes fail on demand (after opening, like a real full disk)."""

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            real_write = f.write

            def write(data):
                self._maybe_fail(path)
                return real_write(data)

            f.write = write
        return f


class FaultyMemoryFS(_Faults, MemoryFileSystem):
    """fsspec's memory store whose uploads fail on demand, as an object store's would."""

    def pipe_file(self, path, value, *args, **kwargs):
        self._maybe_fail(path)
        return super().pipe_file(path, value, *args, **kwargs)


def faulty_store(
    base_url: str, error: BaseException, match: str, times: int = 10**9, retry=NO_WAIT
):
    """A store over the same place as ``base_url`` whose writes to ``match`` files fail."""
    if base_url.startswith("memory://"):
        fs, path, local = FaultyMemoryFS(skip_instance_cache=True), "/" + base_url[9:], False
    else:
        fs, path, local = FaultyLocalFS(skip_instance_cache=True), base_url, True
    fs.error, fs.match, fs.times = error, match, times
    return CheckpointStore(Location(fs, path, base_url, local=local), retry=retry)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")
