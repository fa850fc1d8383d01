"""A run's goodput across its launches, from ``goodput.jsonl`` beside its checkpoints.

Goodput is the share of wall time that became training progress the run kept. A run on
preemptible machines spends the rest starting processes, restoring checkpoints, waiting for
saves, stopping, and training steps again that a hard kill lost. The launcher and the
workers' rank 0 append what they saw, one JSON object a line, to ``goodput.jsonl`` in the
checkpoint directory (when it is on this machine's file system: a local disk or Drive's
mount); the launcher reads it back at its end, and ``tlaunch ckpt ls`` for the run so far.
This module holds the file's format and the arithmetic, so both reach the same numbers (the
storage layer imports nothing of the launcher).

Records, each with ``event``, ``launch`` (the launch's run-directory name) and ``t`` (epoch
seconds)::

    start     the launcher began (before its checks and the workers' start)
    ready     rank 0 restored (or found nothing to restore) and prepared: training begins;
              ``step`` it resumes from, ``restore_s`` seconds spent loading the checkpoint
    progress  rank 0's ``step``, at most every PROGRESS_SECONDS while training
    save      a save training waited ``seconds`` for, at ``step``
    stop      rank 0 begins its stop (or ``run.finish``) at ``step``: the rest is stopping
    exit      the launcher leaves with ``code``

A launch killed outright leaves no ``exit``: its end is its last record, so up to
PROGRESS_SECONDS of its time (and the steps in them) go unseen. Steps a launch took beyond
the step the next launch resumed from were trained again: their share of the launch's
training time (at its mean step time) is counted as recomputed, not as training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

#: The file's name in the checkpoint directory (``tlaunch.contract`` declares it too).
GOODPUT_FILE = "goodput.jsonl"
#: How often rank 0 records its step while training.
PROGRESS_SECONDS = 2.0


def append_record(directory: str, record: dict) -> None:
    """Append one record as one line, in one ``write`` (the launcher and rank 0 share the file;
    O_APPEND keeps short lines whole)."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(
        os.path.join(directory, GOODPUT_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_records(directory: str) -> list[dict]:
    """Every well-formed record of ``directory``'s file, in order (none when it has no file).
    A torn last line (a machine that died mid-write) is skipped."""
    try:
        with open(os.path.join(directory, GOODPUT_FILE), encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("t"), (int, float)):
            records.append(record)
    return records


@dataclass
class LaunchTimes:
    """One launch, as its records tell it. Times are epoch seconds."""

    launch: str
    start: float
    end: float
    code: int | None = None  # None: no exit record (killed, or still running)
    ready: float | None = None
    resumed_step: int = 0
    restore: float = 0.0
    saves: float = 0.0
    stop_at: float | None = None
    last_step: int = 0

    @property
    def training(self) -> float:
        """Seconds from ready to the stop (or the end), less the waits for saves."""
        if self.ready is None:
            return 0.0
        end = self.stop_at if self.stop_at is not None else self.end
        return max(0.0, end - self.ready - self.saves)

    @property
    def startup(self) -> float:
        return max(0.0, (self.ready if self.ready is not None else self.end) - self.start)

    @property
    def stopping(self) -> float:
        return 0.0 if self.stop_at is None else max(0.0, self.end - self.stop_at)


@dataclass
class Goodput:
    """A run's time across its launches, split by what it was spent on."""

    launches: list[LaunchTimes] = field(default_factory=list)
    recomputed_steps: int = 0
    recomputed: float = 0.0  # seconds of training spent on steps trained before

    def _sum(self, name: str) -> float:
        return sum(getattr(launch, name) for launch in self.launches)

    @property
    def restarts(self) -> int:
        return max(0, len(self.launches) - 1)

    @property
    def wall(self) -> float:
        return self._sum("end") - self._sum("start")

    @property
    def shares(self) -> dict[str, float]:
        """Seconds per use: kept training, recomputed, start-up, restore, saves, stop."""
        return {
            "training": self._sum("training") - self.recomputed,
            "recomputed": self.recomputed,
            "start-up": self._sum("startup") - self._sum("restore"),
            "restore": self._sum("restore"),
            "saves": self._sum("saves"),
            "stop": self._sum("stopping"),
        }

    @property
    def goodput(self) -> float:
        return self.shares["training"] / self.wall if self.wall > 0 else 0.0

    def lines(self) -> list[str]:
        """What the launcher prints at its end and ``tlaunch ckpt ls`` under its table."""
        if not self.launches:
            return []
        wall = self.wall
        parts = ", ".join(
            f"{name} {seconds / wall:.1%}" if wall > 0 else f"{name} 0"
            for name, seconds in self.shares.items()
        )
        launches = len(self.launches)
        return [
            f"goodput {self.goodput:.3f} over {launches} launch{'es' if launches > 1 else ''} "
            f"({self.restarts} restart{'' if self.restarts == 1 else 's'}, {wall:.1f} s): "
            f"{parts}",
            f"steps recomputed: {self.recomputed_steps} ({self.recomputed:.1f} s)",
        ]


def summarize(records: Iterable[dict]) -> Goodput:
    """The run's goodput from its records (see the module's docstring for what each means)."""
    by_launch: dict[str, LaunchTimes] = {}
    for r in records:
        key, t = str(r.get("launch")), float(r["t"])
        launch = by_launch.setdefault(key, LaunchTimes(launch=key, start=t, end=t))
        launch.start, launch.end = min(launch.start, t), max(launch.end, t)
        event, step = r.get("event"), _int(r.get("step"))
        if step is not None:
            launch.last_step = max(launch.last_step, step)
        if event == "ready":
            launch.ready, launch.resumed_step = t, step or 0
            launch.restore = float(r.get("restore_s") or 0.0)
        elif event == "save":
            launch.saves += float(r.get("seconds") or 0.0)
        elif event == "stop" and launch.stop_at is None:
            launch.stop_at = t
        elif event == "exit":
            launch.code = _int(r.get("code"))
    result = Goodput(launches=sorted(by_launch.values(), key=lambda x: x.start))
    trained = [launch for launch in result.launches if launch.ready is not None]
    for launch, following in zip(trained, trained[1:], strict=False):
        # Steps past the point the next launch resumed from were trained again there.
        redone = launch.last_step - max(following.resumed_step, launch.resumed_step)
        if redone > 0:
            steps = max(1, launch.last_step - launch.resumed_step)
            result.recomputed_steps += redone
            result.recomputed += launch.training * redone / steps
    return result


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_goodput(directory: str) -> Goodput:
    """:func:`summarize` of ``directory``'s records."""
    return summarize(read_records(directory))
