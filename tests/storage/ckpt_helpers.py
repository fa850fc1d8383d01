"""Checkpoint test helpers: small states, tampering on any backend, stores whose storage fails."""

from __future__ import annotations

import errno
import random

from tests.faultfs import Fault, FaultyFS, torn
from tlaunch.storage import CheckpointStore, Location, resolve
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


def raw_fs(store: CheckpointStore):
    """The store's filesystem without the fault layer: tests tamper and look through this."""
    fs = store.location.fs
    return fs.fs if isinstance(fs, FaultyFS) else fs


def rewrite(store: CheckpointStore, step: int, name: str, change) -> None:
    """Replace a file of a saved step with ``change(old_bytes)``, on any backend."""
    fs, path = raw_fs(store), file_path(store, step, name)
    fs.pipe_file(path, change(fs.cat_file(path)))
    fs.invalidate_cache(store.location.path)


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def remove(store: CheckpointStore, step: int, name: str) -> None:
    raw_fs(store).rm_file(file_path(store, step, name))
    raw_fs(store).invalidate_cache(store.location.path)


def faulty_location(url: str, *rules: Fault) -> Location:
    """``url`` resolved as usual, its filesystem wrapped by the fault layer with ``rules``."""
    loc = resolve(url)
    return Location(FaultyFS(loc.fs, *rules), loc.path, loc.url, loc.local)


def write_faults(match: str, error: BaseException, times: int | None = None) -> list[Fault]:
    """Writes of files whose path contains ``match`` fail: an object store's PUT, or a local
    write after the file was opened (as a full disk fails)."""
    return [
        Fault("pipe_file", f"*{match}*", error, times),
        torn("open", f"*{match}*", keep=0, error=error, times=times),
    ]


def faulty_store(
    base_url: str, error: BaseException, match: str, times: int | None = None, retry=NO_WAIT
) -> CheckpointStore:
    """A store over the same place as ``base_url`` whose writes to ``match`` files fail."""
    return CheckpointStore(
        faulty_location(base_url, *write_faults(match, error, times)), retry=retry
    )


def injected(store: CheckpointStore) -> int:
    """How many faults the store's fault layer injected so far."""
    return sum(len(rule.calls) for rule in store.location.fs.rules)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def reseal(store: CheckpointStore, step: int, name: str, data: bytes) -> None:
    """Write ``data`` as file ``name`` of ``step`` and re-sign what seals it, as a hostile writer
    would: a data file's MANIFEST entry, MANIFEST's sha256 (and the size) in COMMIT. COMMIT
    itself is written as given."""
    import json

    from tlaunch.storage.checkpoint.manifest import COMMIT, MANIFEST, encode_json, sha256

    fs = raw_fs(store)
    fs.pipe_file(file_path(store, step, name), data)
    if name == COMMIT:
        fs.invalidate_cache(store.location.path)
        return
    manifest = data
    if name != MANIFEST:
        table = json.loads(fs.cat_file(file_path(store, step, MANIFEST)))
        table["files"][name] = {"size": len(data), "sha256": sha256(data)}
        manifest = encode_json(table)
        fs.pipe_file(file_path(store, step, MANIFEST), manifest)
    commit = json.loads(fs.cat_file(file_path(store, step, COMMIT)))
    commit["manifest_sha256"] = sha256(manifest)
    try:
        files = json.loads(manifest)["files"]
        commit["size"] = sum(entry["size"] for entry in files.values()) + len(manifest)
    except Exception:  # a hostile table: keep the old size, the seal is what matters
        pass
    fs.pipe_file(file_path(store, step, COMMIT), encode_json(commit))
    fs.invalidate_cache(store.location.path)


def saved_files(*steps: int) -> dict[int, dict[str, bytes]]:
    """The files of ``steps`` as save() writes them (make_state), to plant copies cheaply."""
    url = f"memory://tl-template-{'-'.join(map(str, steps))}-{random.getrandbits(32):08x}"
    store = CheckpointStore(url)
    out = {}
    for step in steps:
        store.save(step, **make_state(step))
        folder = store.location.join(step_dir(step))
        out[step] = {
            p.rsplit("/", 1)[-1]: store.location.fs.cat_file(p)
            for p in store.location.fs.find(folder)
        }
    for step in steps:
        store.delete(step)
    return out


def plant(url: str, files: dict[int, dict[str, bytes]]) -> CheckpointStore:
    """Write ``saved_files`` output under ``url`` (any backend); returns a plain store there."""
    store = CheckpointStore(url)
    for step, named in files.items():
        store.location.fs.makedirs(store.location.join(step_dir(step)), exist_ok=True)
        for name, data in named.items():
            store.location.fs.pipe_file(file_path(store, step, name), data)
    store.location.fs.invalidate_cache(store.location.path)
    return store
