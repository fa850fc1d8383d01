"""The ranks' agreement schedule: a few times a second, the same steps on every rank.

Two ranks in one process: each has its own StepAgreement, clock and flags; their sums meet in
a fake collective that, like an all-reduce, gives every rank the total of what all sent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tlaunch import agreement
from tlaunch.agreement import INTERVAL, MAX_EVERY, StepAgreement


class Collective:
    """Sums what each rank sent in its n-th agreement, returned to each rank's n-th end."""

    def __init__(self, world: int) -> None:
        self.world, self.sent = world, [[] for _ in range(world)]
        self.ended = [0] * world

    def strategy(self, rank: int) -> SimpleNamespace:
        def begin(accelerator, values):
            self.sent[rank].append(values)

        def end(accelerator):
            n = self.ended[rank]
            self.ended[rank] += 1
            rounds = [sent[n] for sent in self.sent]
            assert len(rounds) == self.world, "a rank ended an agreement another never began"
            return [sum(col) for col in zip(*rounds, strict=True)]

        return SimpleNamespace(begin_agreement=begin, end_agreement=end)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def train(monkeypatch, steps: int, step_s: list[float], raise_at: dict[int, int]):
    """``steps`` optimizer steps on len(step_s) ranks; rank r's steps take step_s[r] seconds;
    ``raise_at``: {rank: step} from which that rank's stop flag is up. Returns each rank's
    agreed stop steps, the steps that started an agreement, and each rank's last ``every``."""
    world = len(step_s)
    clocks = [Clock() for _ in range(world)]
    bus = Collective(world)
    accelerator = SimpleNamespace(num_processes=world)
    ranks = [StepAgreement(bus.strategy(r), accelerator) for r in range(world)]
    stopped: list[list[int]] = [[] for _ in range(world)]
    started: list[list[int]] = [[] for _ in range(world)]
    for step in range(1, steps + 1):
        for r, agree in enumerate(ranks):
            clocks[r].now += step_s[r]
            monkeypatch.setattr(agreement, "time", clocks[r])

            def local(r=r, step=step):
                started[r].append(step)
                return [step >= raise_at.get(r, steps + 1), False]

            agreed = agree.after_step(local)
            if agreed and agreed[0]:
                stopped[r].append(step)
    return stopped, started, [a.every for a in ranks]


def test_short_steps_agree_a_few_times_a_second_not_every_step(monkeypatch):
    # 1.9 ms steps (2 in whole ms): one agreement per INTERVAL (0.1 s), every 50 steps, not 1.
    _, started, every = train(monkeypatch, 1000, [0.0019, 0.0019], {})
    assert started[0] == started[1], "every rank starts each agreement at the same step"
    assert every == [int(INTERVAL * 1000 / 2)] * 2
    assert len(started[0]) <= 1000 / every[0] + 3


def test_the_ranks_agree_on_the_schedule_when_their_step_times_differ(monkeypatch):
    # Whole milliseconds rounded up: 3 and 8; every rank derives its schedule from their sum.
    _, started, every = train(monkeypatch, 600, [0.0025, 0.0071], {})
    assert started[0] == started[1]
    assert every[0] == every[1] == int(INTERVAL * 1000 / ((3 + 8) / 2))


def test_a_stop_on_one_rank_is_acted_on_by_every_rank_at_the_same_step(monkeypatch):
    for raised in (37, 150, 151, 299):
        stopped, started, every = train(monkeypatch, 400, [0.0019, 0.0019], {1: raised})
        first = stopped[0][0]
        assert stopped[1][0] == first, "both ranks stop at the same step"
        # Seen at the first agreement that starts at or after it, acted on one step later.
        assert raised < first <= raised + every[0] + 1, (raised, first)


@pytest.mark.parametrize(("step_s", "expected"), [(0.049, 2), (0.2, 1), (0.0001, MAX_EVERY)])
def test_slow_steps_agree_every_step_and_tiny_ones_at_most_max_every(monkeypatch, step_s, expected):
    _, _, every = train(monkeypatch, 300, [step_s, step_s], {})
    assert every == [expected, expected]
