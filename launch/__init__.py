"""tlaunch: run a PyTorch training script anywhere, and resume it exactly after preemption.

The script-side API (``tlaunch.init``) is imported lazily so that ``import tlaunch`` and
``tlaunch --help`` never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tlaunch.run import Run


def init(**kwargs: Any) -> Run:
    """Start (or resume) a run in this process. See :func:`tlaunch.run.init`."""
    from tlaunch import prefetch

    # The checkpoint's read overlaps the imports and set-up before the restore needs it.
    prefetch.maybe_start({k: v for k, v in kwargs.items() if k != "hparams"})
    try:
        from tlaunch.run import init as _init

        prefetch.parse_ahead()  # torch is imported now
        return _init(**kwargs)
    finally:
        prefetch.discard()


def notebook_launch(fn: Any, *args: Any, **flags: Any) -> Any:
    """Run ``fn(*args)`` in worker processes started from a notebook's kernel, supervised like
    the ``tlaunch`` command. See :func:`tlaunch.notebook.notebook_launch`."""
    from tlaunch.notebook import notebook_launch as _launch

    return _launch(fn, *args, **flags)


def load_weights(url: str, step: int | str | None = None, **options: Any) -> dict[str, Any]:
    """A trained model's state dict from the checkpoints at ``url``, read-only, wrapper
    prefixes removed. See :func:`tlaunch.storage.checkpoint.export.load_weights`."""
    from tlaunch.storage import load_weights as _load

    return _load(url, step, **options)


def __getattr__(name: str) -> Any:
    if name == "Stopped":
        from tlaunch.stopping import Stopped

        return Stopped
    raise AttributeError(f"module 'tlaunch' has no attribute {name!r}")


__all__ = ["__version__", "Stopped", "init", "load_weights", "notebook_launch"]
