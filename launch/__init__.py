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
    from tlaunch.run import init as _init

    return _init(**kwargs)


__all__ = ["__version__", "init"]
