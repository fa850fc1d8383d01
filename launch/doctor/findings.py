"""The doctor's rules: what the workers measured (``rank-<RANK>.json``) → findings.

Each rule reads measurements only (never the script's text) and returns findings with the
numbers it saw, why they matter, and the fix as code; or says why it could not check. Severity:
``error`` (exit 1: the run is wrong or will fail), ``warn`` (slower or worse, not wrong),
``info`` (a figure worth knowing).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

ERROR, WARN, INFO = "error", "warn", "info"
SEVERITIES = (ERROR, WARN, INFO)

#: cannot-overfit: on one batch, the best loss of the phase's second half must be at most this
#: share of the first.
OVERFIT_KEEP = 0.7
#: unnormalized-inputs: the largest |mean| or std of an input feature that passes.
INPUT_LIMIT = 5.0
#: input-bound: the share of step time spent waiting for batches, and the least wait per step
#: (below it, loading costs nothing worth a worker process).
INPUT_SHARE = 0.3
INPUT_MIN_SECONDS = 0.002
#: exploding-gradients: growth of the gradient norm over its first steps, and a norm that is
#: too large whatever its history.
EXPLODE_GROWTH = 100.0
EXPLODE_NORM = 1e3
#: small-batchnorm: per-device batches below this estimate BatchNorm statistics badly.
BATCHNORM_MIN = 16
#: checkpoint-budget: seconds of warning before the VM goes away.
NOTICE_SECONDS = {"gce": 30.0, "aws": 120.0}
PLATFORM_NAMES = {"gce": "GCE spot VM", "aws": "AWS spot instance", "colab": "Colab runtime"}
COLAB_HOURS = 12
#: checkpoint-budget: periodic saves may cost at most this share of training time.
SAVE_SHARE = 0.01


@dataclass
class Finding:
    id: str
    severity: str
    seen: str
    why: str
    fix: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Diagnosis:
    findings: list[Finding]
    skipped: dict[str, str]  # id -> why it was not checked

    @property
    def failed(self) -> bool:
        return any(f.severity == ERROR for f in self.findings)


def diagnose(ranks: list[dict], platform: str | None, exit_code: int) -> Diagnosis:
    """All rules over every rank's observations. ``platform``: gce, aws, colab or None."""
    found: list[Finding] = []
    skipped: dict[str, str] = {}
    if exit_code != 0:
        found.append(_script_failed(exit_code, ranks))
    if not ranks or not any(r["steps"] for r in ranks):
        found.append(
            Finding(
                "no-training-step",
                ERROR,
                "the script made no optimizer step while the doctor watched: nothing was measured",
                "every other check needs at least one torch.optim step",
                "optimizer.step()  # inside the training loop, after loss.backward()",
            )
        )
        return Diagnosis(found, skipped)
    first = ranks[0]
    for rule in rules():
        result = rule(first, ranks, platform)
        if isinstance(result, str):
            skipped[rule.__name__.strip("_").replace("_", "-")] = result
        elif result is not None:
            found.append(result)
    ids = {f.id for f in found}
    if "exploding-gradients" in ids:  # the same cause: report the one with the fix
        found = [f for f in found if f.id != "cannot-overfit"]
    found.sort(key=lambda f: SEVERITIES.index(f.severity))
    return Diagnosis(found, skipped)


def _script_failed(code: int, ranks: list[dict]) -> Finding:
    return Finding(
        "script-failed",
        ERROR,
        f"the script exited with code {code} during the doctor's run "
        f"(after {ranks[0]['steps'] if ranks else 0} optimizer steps); its output is above",
        "the findings below cover only the steps before the failure",
        "# fix the error shown above, then run tlaunch doctor again",
    )


def _cannot_overfit(first: dict, ranks: list[dict], platform: str | None):
    phase = first.get("overfit")
    if not phase:
        return "no batch came from a torch DataLoader before the first optimizer step"
    if phase.get("abandoned"):
        return "the first loader fetched under autograd made no optimizer step (not training)"
    losses = phase["losses"]
    if len(losses) < 2:
        return "fewer than two steps on the fixed batch passed a scalar loss to backward()"
    start, best = losses[0], min(losses[len(losses) // 2 :])
    if start <= 1e-8 or best <= OVERFIT_KEEP * start:
        return None
    return Finding(
        "cannot-overfit",
        ERROR,
        f"loss on one fixed batch: {start:.4g} at step 1, best {best:.4g} in the last "
        f"{len(losses) - len(losses) // 2} of {len(losses)} steps ({100 * (1 - best / start):.0f}%"
        f" lower; at least {100 * (1 - OVERFIT_KEEP):.0f}% expected)",
        "a model that cannot memorise one batch will not learn the data set: the learning rate,"
        " the loss, the targets or the wiring is wrong (overfit one batch first)",
        "x, y = next(iter(loader))\nfor _ in range(50):  # the loss must fall towards 0\n"
        "    loss = loss_fn(model(x), y); loss.backward(); opt.step(); opt.zero_grad()",
        {"losses": losses},
    )


def _unregistered_module(first: dict, ranks: list[dict], platform: str | None):
    hidden = first.get("unregistered") or []
    if not hidden:
        return None
    where = "; ".join(
        f"{h['attribute']} is a {h['container']} of {h['modules']} modules "
        f"({h['parameters']} parameters)"
        for h in hidden
    )
    return Finding(
        "unregistered-module",
        ERROR,
        f"{where} that ran in forward but are not in model.parameters()",
        "the optimizer, .to(device), state_dict() and DDP never see those modules: they are not"
        " trained, moved, saved or synchronised",
        "self.blocks = nn.ModuleList([...])  # nn.ModuleDict({...}) for a dict",
        {"unregistered": hidden},
    )


def _params_not_optimized(first: dict, ranks: list[dict], platform: str | None):
    missing = first.get("not_optimized") or []
    if not missing:
        return None
    return Finding(
        "params-not-optimized",
        ERROR,
        f"{len(missing)} trainable tensors ({first['not_optimized_numel']} values) are in no "
        f"optimizer: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}",
        "they get gradients but never change: part of the model does not train",
        "optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # every trainable tensor",
        {"not_optimized": missing},
    )


def _unused_parameters(first: dict, ranks: list[dict], platform: str | None):
    unused = first.get("unused") or []
    if not unused:
        return None
    return Finding(
        "unused-parameters",
        WARN,
        f"{len(unused)} trainable tensors never got a gradient in {first['steps']} steps: "
        f"{', '.join(unused[:4])}{' …' if len(unused) > 4 else ''}",
        "a layer the loss does not depend on; under DDP it makes the gradient reduction wait"
        " forever (or needs find_unused_parameters=True, which costs every step)",
        "# use the layer in forward, delete it, or freeze it:\np.requires_grad_(False)",
        {"unused": unused},
    )


def _missing_zero_grad(first: dict, ranks: list[dict], platform: str | None):
    stale = sorted({s for r in ranks for s in r.get("stale_steps", [])})
    if not stale:
        return None
    checked = max(first["steps"] - 1, 1)
    return Finding(
        "missing-zero-grad",
        ERROR,
        f"gradients of the previous step were still in .grad when the next step's first backward"
        f" began, at {len(stale)} of {checked} steps (only the first micro-batch after each step"
        " is checked, so gradient accumulation is respected)",
        "gradients add up across steps: each update is the sum of all past gradients",
        "optimizer.step()\noptimizer.zero_grad(set_to_none=True)  # once per optimizer step",
        {"stale_steps": stale},
    )


def _modes(ranks: list[dict], phase: str) -> list[dict]:
    merged: dict[str, int] = {}
    for r in ranks:
        for seen in r.get("modes", {}).get(phase, []):
            merged[seen["module"]] = merged.get(seen["module"], 0) + seen["forwards"]
    return [{"module": m, "forwards": n} for m, n in sorted(merged.items())]


def _mode_text(seen: list[dict]) -> str:
    return ", ".join(f"{s['module']} ({s['forwards']} forwards)" for s in seen[:4])


def _eval_mode_training(first: dict, ranks: list[dict], platform: str | None):
    seen = _modes(ranks, "eval_in_training")
    if not seen:
        return None
    return Finding(
        "eval-mode-training",
        ERROR,
        f"Dropout/BatchNorm in eval mode while gradients were recorded: {_mode_text(seen)}",
        "in eval mode Dropout drops nothing and BatchNorm uses running statistics: the model "
        "trains without the regularisation and normalisation it was built with",
        "model.train()  # before training, and again after every evaluation",
        {"modules": seen},
    )


def _train_mode_eval(first: dict, ranks: list[dict], platform: str | None):
    seen = _modes(ranks, "train_in_eval")
    if not seen:
        return None
    return Finding(
        "train-mode-eval",
        ERROR,
        f"Dropout/BatchNorm in training mode under no_grad (evaluation): {_mode_text(seen)}",
        "evaluation in training mode drops activations at random and updates BatchNorm's "
        "running statistics with evaluation data: the scores are noisy and the model changes",
        "model.eval()\nwith torch.no_grad():\n    ...  # evaluate\nmodel.train()",
        {"modules": seen},
    )


def _unnormalized_inputs(first: dict, ranks: list[dict], platform: str | None):
    inputs = first.get("inputs") or []
    if not inputs:
        return "no floating-point input tensor came from a DataLoader"
    mean = max(i["max_abs_mean"] for i in inputs)
    std = max(i["max_std"] for i in inputs)
    if mean <= INPUT_LIMIT and std <= INPUT_LIMIT:
        return None
    low, high = min(i["min"] for i in inputs), max(i["max"] for i in inputs)
    return Finding(
        "unnormalized-inputs",
        WARN,
        f"input features over {len(inputs)} batches: largest |mean| {mean:.3g}, largest std "
        f"{std:.3g}, values in [{low:.3g}, {high:.3g}] (zero mean, unit scale expected)",
        "large, uncentred inputs make the first layers' gradients large and the loss surface "
        "badly conditioned: training is slow or unstable",
        "x = (x - mean) / std  # per-feature statistics of the training set\n"
        "# images: transforms.Normalize(mean, std) after ToTensor()",
        {"max_abs_mean": mean, "max_std": std},
    )


def _no_shuffle(first: dict, ranks: list[dict], platform: str | None):
    key = first.get("train_loader")
    loader = first.get("loaders", {}).get(key) if key else None
    if loader is None:
        return "the training batches did not come from a torch DataLoader"
    if loader["shuffle"] is None:
        return "the training loader has a sampler of the script's own"
    if loader["shuffle"]:
        return None
    return Finding(
        "no-shuffle",
        WARN,
        f"the training loader (a {loader['kind']}, batch size {loader['batch_size']}) reads its "
        "samples in the same order every epoch",
        "ordered data (sorted by class, by time) gives biased batches and a model that learns "
        "the order; every epoch repeats the same batches",
        "DataLoader(dataset, batch_size=..., shuffle=True)  # tlaunch keeps the order resumable",
        {"loader": loader},
    )


def _exploding_gradients(first: dict, ranks: list[dict], platform: str | None):
    norms = first.get("grad_norms") or []
    if not norms:
        return "no gradients were seen at an optimizer step"
    finite = [n for n in norms if math.isfinite(n)]
    start = statistics.median(finite[:3]) if finite else None
    growth = max(finite) / start if finite and start else 0.0
    bad_steps = len(norms) - len(finite)
    typical = statistics.median(finite) if finite else math.inf
    if not bad_steps and growth < EXPLODE_GROWTH and typical < EXPLODE_NORM:
        return None
    clip = _two_digits(min(start, EXPLODE_NORM) if start else 1.0)
    seen = (
        f"gradient norm over {len(norms)} steps: {start:.3g} at the start, largest "
        f"{max(finite):.3g} ({growth:.3g}x)"
        if finite
        else f"gradient norm not finite at all {len(norms)} steps"
    )
    if bad_steps and finite:
        seen += f"; not finite (inf/nan) at {bad_steps} steps"
    return Finding(
        "exploding-gradients",
        ERROR,
        seen,
        "one huge update throws the weights far off; the loss jumps or becomes nan",
        f"tlaunch --clip-grad-norm {clip} train.py  # suggested from the norms of the first steps"
        f"\n# or: torch.nn.utils.clip_grad_norm_(model.parameters(), {clip})",
        {"grad_norms": norms, "suggested_clip_grad_norm": clip},
    )


def _two_digits(value: float) -> float:
    if value <= 0:
        return 1.0
    return float(f"{value:.2g}")


def _fp16_without_scaler(first: dict, ranks: list[dict], platform: str | None):
    forwards = sum(r.get("fp16_forwards", 0) for r in ranks)
    if not forwards or any(r.get("scaler_calls", 0) for r in ranks):
        return None
    return Finding(
        "fp16-without-scaler",
        ERROR,
        f"{forwards} training forwards ran under float16 autocast and no GradScaler scaled a loss",
        "float16 gradients below 6e-8 round to zero: without loss scaling small gradients "
        "vanish and training stalls",
        "scaler = torch.amp.GradScaler()\nscaler.scale(loss).backward()\n"
        "scaler.step(optimizer); scaler.update()  # or: tlaunch --precision fp16, or bf16",
        {"fp16_forwards": forwards},
    )


def rules() -> list:
    """Every rule, in the order of the report."""
    from tlaunch.doctor import hardware

    return [
        _cannot_overfit,
        _unregistered_module,
        _params_not_optimized,
        _unused_parameters,
        _missing_zero_grad,
        _eval_mode_training,
        _train_mode_eval,
        _unnormalized_inputs,
        _no_shuffle,
        _exploding_gradients,
        _fp16_without_scaler,
        *hardware.RULES,
    ]
