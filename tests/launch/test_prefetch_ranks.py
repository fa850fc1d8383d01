"""Every rank of a resumed run starts its checkpoint read at the top of ``tlaunch.init``.

The other ranks load the step rank 0 picked and broadcast; a rank that waited for that
broadcast before it read held the run's first collective for its whole read. Here the read
that ``tlaunch.prefetch.maybe_start`` starts on rank 1 is the one its unverified load takes.
"""

from __future__ import annotations

import threading

import pytest

from tests.storage.ckpt_helpers import NO_WAIT, make_state
from tlaunch import prefetch as ahead
from tlaunch.storage import CheckpointStore
from tlaunch.storage.checkpoint.reading import StepReader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    for name in ("TLAUNCH_CONFIG", "TLAUNCH_CHECKPOINT_DIR", "TLAUNCH_RESUME"):
        monkeypatch.delenv(name, raising=False)
    yield
    ahead.discard()


@pytest.mark.parametrize("rank", ["0", "1", "3"])
def test_each_rank_reads_ahead_and_its_load_takes_that_read(tmp_path, monkeypatch, rank):
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url, retry=NO_WAIT)
    for step in (1, 2):
        store.save(step, **make_state(step))
    monkeypatch.setenv("RANK", rank)
    threads: list[str] = []
    read = StepReader.read

    def recorded(self, name, expect, **kw):
        threads.append(threading.current_thread().name)
        return read(self, name, expect, **kw)

    monkeypatch.setattr(StepReader, "read", recorded)
    assert ahead.maybe_start({"checkpoint_dir": url}), "no read started on this rank"
    ahead.parse_ahead()
    loaded = CheckpointStore(url, retry=NO_WAIT).load(2, verify=rank == "0")
    assert loaded.state["step"] == 2
    by_load = [t for t in threads if t != "tlaunch-prefetch"]
    assert threads and not by_load, f"the load read {len(by_load)} file(s) again"
