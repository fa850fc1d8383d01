"""The resume's checkpoint read, started at the top of ``tlaunch.init`` on every rank.

Everything ``tlaunch.init`` does before its restore reads the checkpoint (importing the Run
API and Accelerate, building the Accelerator, the stop handlers, the process group) needs none
of its bytes, so each rank starts reading them first: the step the restore will very likely pick
(:mod:`tlaunch.storage.checkpoint.prefetch`, which reads and verifies in background threads
and hands bytes over only by their MANIFEST sha256). No torch, no storage import here: the
thread imports what it needs while this one goes on.

The guess follows the restore's rules (``CheckpointManager._load_target``) with the same
settled configuration as :func:`tlaunch.run.init`: no checkpoints, ``--fast-dev-run`` or
``--resume never``: nothing read; ``--resume auto``: the newest committed step; ``--resume N``:
step N. ``best``, ``last`` and another directory's step are left to the restore. A guess the
restore does not follow costs reads, never correctness, and the bytes it did not take are
dropped once ``tlaunch.init`` returns.

The other ranks guess the same step and load the one rank 0 picked and verified (it broadcasts
the step): a rank that waited for that broadcast to start reading held the first collective
(DDP's parameter broadcast in ``run.prepare``) for its whole read, which the goodput
benchmark's resumed 2-process launches showed as start-up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from tlaunch.config import LaunchConfig
from tlaunch.contract import DEFAULT_CHECKPOINT_DIR_ENV


def maybe_start(overrides: Mapping[str, Any]) -> bool:
    """Start reading the checkpoint this process's ``tlaunch.init(**overrides)`` will resume
    from; whether a read started. Never raises: ``tlaunch.init`` reports bad input."""
    try:
        target = _target(overrides)
    except Exception:
        return False
    if target is None:
        return False
    from tlaunch.storage.checkpoint import prefetch

    prefetch.start(*target)
    return True


def parse_ahead() -> None:
    """Torch is imported: the prefetch may parse the files it read, too."""
    from tlaunch.storage.checkpoint import prefetch

    prefetch.parse_ahead()


def discard() -> None:
    """Drop what the restore did not take."""
    from tlaunch.storage.checkpoint import prefetch

    prefetch.discard()


def _target(overrides: Mapping[str, Any]) -> tuple[str, int | None] | None:
    config = LaunchConfig.from_env()
    if config is None:
        config = LaunchConfig(**{**LaunchConfig.env_defaults(), **overrides})
    else:
        config = config.with_overrides(overrides)[0]
    config = config.with_checkpoint_default(os.environ.get(DEFAULT_CHECKPOINT_DIR_ENV))
    if not config.checkpoint_dir or config.fast_dev_run:
        return None
    if config.resume == "auto":
        return config.checkpoint_dir, None
    if re.fullmatch("[0-9]+", config.resume):
        return config.checkpoint_dir, int(config.resume)
    return None
