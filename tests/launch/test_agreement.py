"""The ranks' agreement schedule: a few times a second, the same steps on every rank.

Two ranks in one process, a thread each: each has its own StepAgreement, clock and flags; their
sums meet in a fake collective that, like an all-reduce, gives every rank the total of what all
sent, once all sent it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tlaunch import agreement
from tlaunch.agreement import INTERVAL, MAX_EVERY, SYNC_STEP, StepAgreement


class Collective:
    """Sums what each rank sent in its n-th agreement, returned to each rank's n-th end once
    every rank sent it (each rank runs in a thread of its own, as it would in a process)."""

    def __init__(self, world: int) -> None:
        self.world, self.sent = world, [[] for _ in range(world)]
        self.ended = [0] * world
        self.changed = threading.Condition()

    def strategy(self, rank: int) -> SimpleNamespace:
        def begin(accelerator, values):
            with self.changed:
                self.sent[rank].append(values)
                self.changed.notify_all()

        def end(accelerator):
            n = self.ended[rank]
            self.ended[rank] += 1
            with self.changed:
                began = self.changed.wait_for(lambda: all(len(s) > n for s in self.sent), 10)
            assert began, "a rank ended an agreement another never began"
            return [sum(col) for col in zip(*(sent[n] for sent in self.sent), strict=True)]

        return SimpleNamespace(begin_agreement=begin, end_agreement=end)


class Clocks(threading.local):
    """The module's ``time``: each rank's thread has its own clock."""

    now = 100.0

    def monotonic(self) -> float:
        return self.now


def train(monkeypatch, steps: int, step_s: list[float], raise_at: dict[int, int]):
    """``steps`` optimizer steps on len(step_s) ranks; rank r's steps take step_s[r] seconds;
    ``raise_at``: {rank: step} from which that rank's stop flag is up. Returns each rank's
    agreed stop steps, the steps that started an agreement, and each rank's last ``every``."""
    world = len(step_s)
    clock = Clocks()
    monkeypatch.setattr(agreement, "time", clock)
    bus = Collective(world)
    accelerator = SimpleNamespace(num_processes=world)
    ranks = [StepAgreement(bus.strategy(r), accelerator) for r in range(world)]
    stopped: list[list[int]] = [[] for _ in range(world)]
    started: list[list[int]] = [[] for _ in range(world)]

    def rank(r: int) -> None:
        for step in range(1, steps + 1):
            clock.now += step_s[r]

            def local(step=step):
                started[r].append(step)
                return [step >= raise_at.get(r, steps + 1), False]

            agreed = ranks[r].after_step(local)
            if agreed and agreed[0]:
                stopped[r].append(step)

    with ThreadPoolExecutor(world) as pool:
        for done in [pool.submit(rank, r) for r in range(world)]:
            done.result(timeout=60)
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


def test_slow_steps_act_on_a_flag_at_the_step_that_raised_it(monkeypatch):
    # A stop on a slow step costs a whole step per step of delay: the agreement is waited for
    # on the step that starts it, from the first step measured as slow on the ranks' mean.
    slow = SYNC_STEP * 1.2
    for raised in (3, 10):
        stopped, started, every = train(monkeypatch, 12, [slow, slow], {1: raised})
        assert stopped[0][0] == stopped[1][0] == raised
        assert every == [1, 1]
    # One rank slow, one not: the mean decides, the same on both; below SYNC_STEP, a step later.
    stopped, _, _ = train(monkeypatch, 12, [SYNC_STEP * 1.8, SYNC_STEP * 0.6], {0: 5})
    assert stopped[0][0] == stopped[1][0] == 5
    stopped, _, _ = train(monkeypatch, 12, [SYNC_STEP * 0.9, SYNC_STEP * 0.9], {0: 5})
    assert stopped[0][0] == stopped[1][0] == 6
