"""benchmarks/goodput.py's arithmetic: the stop schedule and the split of a way's wall time.

Pure functions of the harness, no processes: a schedule that draws no SIGKILL, or parts of
the wall time that count a second twice, would make every figure it prints wrong.
"""

from __future__ import annotations

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCHMARKS))
goodput = pytest.importorskip("goodput")


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("every", [15.0, 60.0])
def test_every_fourth_stop_or_sooner_is_a_kill(seed: int, every: float) -> None:
    stops = goodput.schedule(seed, every, 0.25, 20 * every)
    kills = [i for i, stop in enumerate(stops) if stop.kill]
    assert kills and kills[0] < 4, [s.kill for s in stops]
    assert all(b - a == 4 for a, b in zip(kills, kills[1:], strict=False))  # the share kept
    assert not any(s.kill for s in goodput.schedule(seed, every, 0.0, 20 * every))


def test_seed_0_at_60_s_meets_a_kill_within_a_five_minute_job() -> None:
    assert any(s.kill for s in goodput.schedule(0, 60.0, 0.25, 300.0) if s.at < 300.0)


def _launch(began, ended, *, ready=None, sig=None, restore=0.0, saves=0.0, last=None, code=75):
    L = goodput.LaunchResult
    return L(began=began, ended=ended, ready=ready, signalled_at=sig, restore=restore,
             saves=saves, last_step_at=last, code=code, signalled="SIGTERM" if sig else "",
             stop=0.0 if sig is None else ended - sig)  # fmt: skip


def test_the_parts_add_up_to_the_wall_time() -> None:
    way = goodput.Way("tlaunch")
    way.launches = [
        # stopped while it started: 8 s of start-up, then 2 s of stop, nothing trained
        _launch(0.0, 10.0, sig=8.0),
        # started in 6 s (1 s of it restoring), trained 20 s (3 of them saving), 1 s to stop
        _launch(10.0, 37.0, ready=16.0, sig=36.0, restore=1.0, saves=3.0, last=35.5),
        # the last: ready after 5 s, trained to its last step, 2 s of final save and exit
        _launch(37.0, 60.0, ready=42.0, restore=0.5, last=58.0, code=0),
    ]
    parts = goodput.shares(way, step_s=0.1)
    names = ("start-up", "restore", "saves", "stop", "recomputed", "end", "kept")
    assert sum(parts[n] for n in names) == pytest.approx(way.wall)
    assert parts["start-up"] == pytest.approx(8.0 + 5.0 + 4.5)
    assert parts["stop"] == pytest.approx(2.0 + 1.0)
    assert parts["end"] == pytest.approx(2.0)
    assert parts["kept"] == pytest.approx(20.0 - 3.0 + 16.0)
