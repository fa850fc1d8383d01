"""Downloading one shard by ranged reads, several in flight, so that its frames unpack as they land.

A shard is a run of independent zstd frames (see :mod:`tlaunch.storage.archive.format`), so
a frame can be unpacked as soon as its compressed bytes are on this machine: the whole fetch
then takes about the slower of downloading and unpacking rather than their sum.
:class:`ShardStream` asks the store for ``chunk``-byte ranges, up to ``depth`` at a time on a
pool of reader threads shared by every shard, started in offset order (the store sees the shard
read forward, and a read that fails leaves every read before it started); it appends what
arrives to the shard's ``.part`` file in offset order and hashes it on the way. So the file is
always a prefix of the shard -- what a rerun resumes from -- and :meth:`ShardStream.wait_for`
lets an unpacker start on a frame the moment that prefix covers it.

Nothing else changes for the bytes: every file is still checked against its digest as it is
written (:mod:`tlaunch.storage.archive.unpack`), the shard's digest is known once its last byte
is appended, and the cache records an entry only after every shard unpacked and verified
(:mod:`tlaunch.storage.archive.fetch`, :mod:`tlaunch.storage.archive.cache`). Retries, error
messages and what a failure means are the caller's: ``read(start, end)`` is its function.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from tlaunch.storage.archive.format import hasher
from tlaunch.storage.archive.unpack import Aborted, hash_span

#: Ranged reads in flight per shard: one at a time leaves the link idle for a round trip per
#: read; four chunks of DOWNLOAD_CHUNK bound what one shard holds in memory.
READS_IN_FLIGHT = 4


class ShardStream:
    """One shard, from the store into ``part`` in order; :meth:`pump` moves it, unpackers wait.

    ``have`` bytes of ``part`` are already there (a download resumed); with none, ``part`` is
    created empty here, so an unpacker can open it before the first byte arrives.
    """

    def __init__(
        self,
        read: Callable[[int, int], bytes],
        size: int,
        part: str,
        have: int,
        chunk: int,
        readers: Executor,
        depth: int = READS_IN_FLIGHT,
    ) -> None:
        self.read, self.size, self.part, self.chunk = read, size, part, chunk
        self.readers, self.depth = readers, depth
        self.resumed = have > 0
        self.have = have
        self._digest: Any = None  # of the first ``have`` bytes; the prefix is hashed in pump
        self._cond = threading.Condition()
        self._stopped = False
        if not have:
            os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def pump(self, tick: Callable[[int], None]) -> None:
        """Download the rest of the shard into ``part``, ``tick(n)`` after each ``n`` bytes
        are appended (a tick that raises stops the download there). Call it again after it
        raised to go on from where the file ends."""
        fd = os.open(self.part, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        turns = _Turns()
        pending: deque[tuple[int, Future]] = deque()
        try:
            if self._digest is None:
                self._digest = _hash_prefix(fd, self.have)
            with self._cond:
                self._stopped = False
            issued = self.have
            while self.have < self.size:
                while len(pending) < self.depth and issued < self.size:
                    end = min(issued + self.chunk, self.size)
                    pending.append((end, turns.submit(self.readers, self.read, issued, end)))
                    issued = end
                end, job = pending[0]
                data = job.result()
                pending.popleft()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                self._digest.update(data)  # blake3 releases the GIL on large updates
                with self._cond:
                    self.have = end
                    self._cond.notify_all()
                tick(len(data))
        except BaseException:
            turns.close()
            for _, job in pending:
                job.cancel()
            self.stop()
            raise
        finally:
            os.close(fd)

    def stop(self) -> None:
        """The download ended short (failed, or the fetch is stopping): wake the waiters."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wait_for(self, end: int) -> None:
        """Return once ``part`` holds the shard's first ``end`` bytes; :class:`Aborted` if the
        download stopped before (its future says why)."""
        with self._cond:
            while self.have < end:
                if self._stopped:
                    raise Aborted
                self._cond.wait()


class _Turns:
    """Submits calls to a pool so that they start in the order they were submitted.

    A pool starts its queue in order, but two threads racing from it may call out in either
    order; each call here first waits (briefly: the one before it already left the queue) for
    the one before it to have started.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queued = 0
        self._started = 0
        self._closed = False

    def submit(self, pool: Executor, fn: Callable[..., Any], *args: Any) -> Future:
        turn, self._queued = self._queued, self._queued + 1
        return pool.submit(self._run, turn, fn, *args)

    def _run(self, turn: int, fn: Callable[..., Any], *args: Any) -> Any:
        with self._cond:
            while self._started < turn and not self._closed:
                self._cond.wait()
            if self._closed:
                raise Aborted
            self._started = turn + 1
            self._cond.notify_all()
        return fn(*args)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _hash_prefix(fd: int, size: int) -> Any:
    digest = hasher()
    hash_span(fd, digest, 0, size)
    return digest
