"""The ``cannot-overfit`` phase: the script's own step on one fixed batch, then the real run.

Why this way: a script's forward and loss are one piece of user code that hooks cannot call on
their own (the loss is whatever the script passes to ``backward``). So the doctor lets the
script run its own loop and changes only what the loader returns: the first batch fetched is
kept, and for ``--overfit-steps`` optimizer steps every fetch from that loader returns a copy of
it (the loader's real iterator does not move). The losses passed to ``backward`` on it are the
measurement. At the next fetch after those steps, the models, optimizers, schedulers and random
generators are put back as they were when the batch was fetched, gradients are cleared, and
the kept batch is returned as the first real one: the run that follows sees the same state and
the same batches as a run without the doctor. What the doctor cannot put back is the script's
own count of iterations: work it schedules by that count (an evaluation every N steps) comes
``--overfit-steps`` iterations early. Only a fetch made with autograd on starts the
phase (an evaluation loop under ``no_grad`` is not training); a loader fetched
:data:`FETCH_LIMIT` times without a step is not the training loader, and the phase is given up.
"""

from __future__ import annotations

import copy
import random
import sys
from typing import Any

#: Fetches from the fixed loader without an optimizer step after which it is taken for an
#: evaluation loop under autograd: the phase is given up and the run restored.
FETCH_LIMIT = 256


class FixedBatch:
    """Serves one batch for ``steps`` optimizer steps, then restores the state of the run."""

    def __init__(self, observer: Any, key: int, batch: Any, steps: int) -> None:
        self.observer, self.key, self.batch, self.steps = observer, key, batch, steps
        self.done = 0
        self.fetches = 0  # since the last optimizer step
        self.abandoned = False
        self.losses: list[list[float]] = [[]]
        self.active = True  # copies of the batch are being served
        self.restored = False
        self.snapshot = self._snapshot()

    def owns(self, key: int) -> bool:
        return key == self.key and not self.restored

    def next(self) -> Any:
        self.fetches += 1
        if self.active and self.fetches > FETCH_LIMIT:
            self.active, self.abandoned = False, True  # not the training loader: give up
        if self.active:
            return copy.deepcopy(self.batch)
        self._restore()
        self.restored = True
        return self.batch

    def record_loss(self, value: float) -> None:
        if self.active:
            self.losses[-1].append(value)

    def step_done(self) -> None:
        self.done, self.fetches = self.done + 1, 0
        if self.done >= self.steps:
            self.active = False
        else:
            self.losses.append([])

    def record(self) -> dict:
        per_step = [sum(v) / len(v) for v in self.losses if v]
        return {
            "steps": self.steps,
            "done": self.done,
            "losses": per_step,
            "abandoned": self.abandoned,
        }

    def _snapshot(self) -> dict[str, Any]:
        torch = self.observer.torch
        modules = list(self.observer.modules)
        inner = {id(c) for m in modules for c in m.children()}
        tops = [m for m in modules if id(m) not in inner and m.state_dict()]
        numpy = sys.modules.get("numpy")
        return {
            "modules": [
                (m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m in tops
            ],
            "optimizers": [(o, copy.deepcopy(o.state_dict())) for o in self.observer.optimizers],
            "schedulers": [(s, copy.deepcopy(s.state_dict())) for s in self.observer.schedulers],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "python_rng": random.getstate(),
            "numpy_rng": numpy.random.get_state() if numpy is not None else None,
        }

    def _restore(self) -> None:
        torch, saved = self.observer.torch, self.snapshot
        with torch.no_grad():
            for module, state in saved["modules"]:
                module.load_state_dict(state)
                for p in module.parameters():
                    p.grad = None
        for optimizer, state in saved["optimizers"]:
            optimizer.load_state_dict(state)
        for scheduler, state in saved["schedulers"]:
            scheduler.load_state_dict(state)
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        random.setstate(saved["python_rng"])
        numpy = sys.modules.get("numpy")
        if saved["numpy_rng"] is not None and numpy is not None:
            numpy.random.set_state(saved["numpy_rng"])
        self.snapshot = {}
