"""Before any worker starts: can this launch write everywhere it will write, and is it the only
writer of its checkpoint directory?

A checkpoint URL that cannot be written used to be found out at the first save, after the
training up to it (half an hour of paid GPU time with ``--save-every-minutes 30``). Now every
URL the launch will write (``--checkpoint-dir``, each ``--sync-dir`` URL) is probed first
(:func:`tlaunch.storage.probe_writable`: the bucket or folder is there or can be made, a
hidden test object can be written and removed), then the checkpoint directory's lease is
taken (:mod:`tlaunch.lease`). Any failure is one line naming the flag, the URL, what failed and
the fix: exit 2 (no bucket, no permission, a missing backend, another run holds the lease), or
69 when the storage stayed unreachable through the retries. Nothing was started then, and the
probe leaves nothing behind.

On a multi-machine job every machine probes, and the machine with ``--node-rank 0`` (where
rank 0, the one checkpoint writer, runs) takes the lease.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tlaunch.config import NO_CHECKPOINTS, LaunchConfig
from tlaunch.contract import LEASE_TOKEN_ENV
from tlaunch.lease import LeaseHold, held_message, take_lease


def checkpoint_url(config: LaunchConfig) -> str | None:
    """The checkpoint directory this launch writes, if any (``--fast-dev-run`` saves nothing).

    Without ``--checkpoint-dir`` a Run API script saves into its default folder on local disk
    (:func:`tlaunch.config.default_checkpoint_dir`): rank 0 takes that folder's lease itself,
    as under plain ``python``, since only the script knows whether it uses the Run API."""
    url = config.checkpoint_dir
    return None if not url or url == NO_CHECKPOINTS or config.fast_dev_run else url


def written_urls(config: LaunchConfig) -> list[tuple[str, str]]:
    """(flag, URL) of every place this launch writes to."""
    url = checkpoint_url(config)
    urls = [] if url is None else [("--checkpoint-dir", url)]
    urls += [("--sync-dir", spec.split("=", 1)[1]) for spec in config.sync_dir]
    return urls


@dataclass
class Preflight:
    """What the checks left for the launch: the lease it holds, if any."""

    hold: LeaseHold | None = None

    def worker_env(self) -> dict[str, str]:
        return {} if self.hold is None else {LEASE_TOKEN_ENV: self.hold.token}

    def start(self, log: Callable[[str], None]) -> None:
        """Say what the checks decided and keep the lease fresh while the workers run."""
        if self.hold is None:
            return
        if self.hold.note:
            log(self.hold.note)
        self.hold.keep_alive(log)

    def release(self) -> None:
        if self.hold is not None:
            self.hold.release()


def preflight(config: LaunchConfig) -> Preflight:
    """Probe every written URL, then take the checkpoint lease; StorageError in one line."""
    from tlaunch.storage import (
        LeaseHeld,
        StorageError,
        StorageUnavailable,
        probe_writable,
        redact,
    )

    def refused(flag: str, e: StorageError) -> StorageError:
        cls = StorageUnavailable if isinstance(e, StorageUnavailable) else StorageError
        return cls(redact(f"{flag}: {e}; nothing was started"))

    for flag, url in written_urls(config):
        try:
            probe_writable(url)
        except StorageError as e:
            raise refused(flag, e) from e
    checkpoints = checkpoint_url(config)
    if checkpoints is None or config.node_rank != 0:
        return Preflight()
    try:
        return Preflight(take_lease(checkpoints, takeover=config.takeover))
    except LeaseHeld as e:
        raise StorageError(redact(f"--checkpoint-dir: {held_message(e)}")) from e
    except StorageError as e:
        raise refused("--checkpoint-dir", e) from e
