"""Does a checkpoint still fit the run that wants to resume it?

Run the same command again after editing the script or its flags, and the checkpoint meets
settings it was not made with. Some changes are harmless (more epochs, a new log interval);
some change what the run computes (the learning rate, the batch size, accumulation, the
seed), and silently continuing would produce a model no single setting describes. Those are
refused, listed one per line of the message, unless ``--resume-force``; the rest are warned
about. The same goes for the script's objects (tensors of another shape, another optimizer,
another dataset length: :func:`tensor_differences` and the checks in
:meth:`tlaunch.checkpointing.CheckpointManager.restore_prepared`), for a state.json whose
position fields are malformed, and for a resume that would collide with committed steps.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict
from typing import Any

from tlaunch.config import LaunchConfig
from tlaunch.contract import fail

#: hparams whose change alters what the run computes: refused on resume unless --resume-force.
MEANING_KEYS = re.compile(r"batch|(^|_)lr($|_)|learning_rate|schedul|warmup|accum", re.IGNORECASE)
#: Launch settings whose change alters the run; a changed world size is only warned about.
MEANING_CONFIG = ("grad_accum", "seed")
#: The settings summarized by a checkpoint's ``config_hash``.
_HASHED = ("precision", "grad_accum", "seed", "clip_grad_norm", "clip_grad_value")


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps({k: config.get(k) for k in _HASHED}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differences(
    saved_hparams: dict[str, Any],
    saved_config: dict[str, Any],
    hparams: dict[str, Any],
    config: LaunchConfig,
) -> tuple[list[str], list[str]]:
    """(every change as ``"name: old -> new"``, the names of the changes that break the run)."""
    changes, breaking = [], []
    for key in sorted(set(saved_hparams) | set(hparams)):
        before, after = saved_hparams.get(key, "<unset>"), hparams.get(key, "<unset>")
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
            if MEANING_KEYS.search(key):
                breaking.append(key)
    current = asdict(config)
    for key in MEANING_CONFIG:
        if key in saved_config and saved_config[key] != current[key]:
            flag = "--" + key.replace("_", "-")
            changes.append(f"{flag}: {saved_config[key]!r} -> {current[key]!r}")
            breaking.append(flag)
    return changes, breaking


def check_drift(loaded: Any, hparams: dict[str, Any], config: LaunchConfig, *, warn: bool) -> None:
    """Refuse (one ``tlaunch: error:`` line, exit 2) a resume whose changed settings change
    what the run computes, unless ``--resume-force``; warn about the others on rank 0."""
    changes, breaking = differences(
        loaded.state.get("hparams", {}), loaded.state.get("config", {}), hparams, config
    )
    if not changes:
        return
    listing = "; ".join(changes)
    if breaking and not config.resume_force:
        fail(
            f"the checkpoint at step {loaded.info.step} was made with different settings "
            f"({listing}); {', '.join(breaking)} change what the run computes. Restore them, "
            "start fresh with --resume never or another --checkpoint-dir, or pass --resume-force"
        )
    if warn:
        warnings.warn(f"resuming with changed settings: {listing}", stacklevel=4)


def tensor_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How a model's saved weights differ from the model the script now builds: one line per
    tensor (missing, unexpected, or another shape)."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            lines.append(f"{name}: in the checkpoint, not in the model")
        elif name not in saved:
            lines.append(f"{name}: in the model, not in the checkpoint")
        elif tuple(saved[name].shape) != tuple(current[name].shape):
            before, after = tuple(saved[name].shape), tuple(current[name].shape)
            lines.append(f"{name}: saved {before}, now {after}")
    return lines


def refuse_tensor_changes(model_name: str, lines: list[str], step: int) -> None:
    """Weights of another shape cannot be loaded, --resume-force or not."""
    if not lines:
        return
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    fail(
        f"the checkpoint at step {step} holds a {model_name} of another architecture "
        f"({len(lines)} tensor(s) differ); restore the model, or start fresh with --resume "
        "never or another --checkpoint-dir:\n" + "\n".join(f"  {line}" for line in shown)
    )


#: The position fields a resume reads from state.json: whole numbers, not negative.
_POSITION_FIELDS = ("step", "epoch", "batch_in_epoch", "samples_seen", "world_size")


def checked_state(loaded: Any) -> dict[str, Any]:
    """state.json's position fields, refused in one line when missing or of the wrong kind
    (a damaged or hand-edited record that still parses: storage checks only its shape)."""
    saved = loaded.state
    bad = [
        k
        for k in _POSITION_FIELDS
        if not isinstance(saved.get(k), int) or isinstance(saved.get(k), bool) or saved[k] < 0
    ]
    if bad or saved["world_size"] < 1 or not isinstance(saved.get("metrics", {}), dict):
        fail(
            f"the checkpoint at {loaded.info.url} has a malformed state.json "
            f"({', '.join(bad) or 'world_size or metrics'}); resume an earlier step with "
            "--resume STEP, or start fresh with --resume never"
        )
    return saved


def refuse_existing(store: Any, config: LaunchConfig) -> None:
    existing = store.committed()
    if existing:
        # Saving over another run's committed steps would destroy them: refuse instead.
        fail(
            f"--resume never, but {config.checkpoint_dir} already holds committed checkpoints "
            f"(steps {existing[0].step}..{existing[-1].step}); use a new --checkpoint-dir, "
            "or --resume auto to continue them"
        )


def refuse_older_timeline(store: Any, config: LaunchConfig, chosen: int, loaded: Any) -> None:
    later = [i.step for i in store.committed() if i.step > chosen]
    if later:
        # Continuing from an older step here would collide with (and could never overwrite)
        # the newer steps of the other timeline.
        fail(
            f"--resume {config.resume}: {config.checkpoint_dir} holds newer committed steps "
            f"({later[0]}..{later[-1]}); resume into a new directory: --resume "
            f"{loaded.info.url} --checkpoint-dir NEW_DIR"
        )
