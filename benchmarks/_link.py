"""A network link of a set bandwidth between a client and a loopback server, for benchmarks.

On loopback a download costs only the CPU of both ends, so a fetch that overlaps downloading
with unpacking has nothing to overlap. :class:`Link` is a TCP proxy in front of the server
that delivers the server's bytes to the client no faster than ``rate`` bytes per second in all,
shared by every connection as one machine's network interface is (parallel connections buy
nothing), and no faster than ``stream_rate`` on any one connection (what a store gives one
stream; parallel ranged reads buy up to ``rate``). The client's bytes to the server pass
unpaced; no latency is added. It runs in a process of its own, so that its work shares no
interpreter lock with the client's being measured (``python _link.py PORT RATE STREAM_RATE``
prints the port it listens on).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

_CHUNK = 256 << 10
_SLACK = 0.01


class Link:
    """``with Link(port, rate=r) as link:`` -- ``link.url`` reaches ``127.0.0.1:port`` through it."""

    def __init__(
        self, upstream_port: int, *, rate: float | None = None, stream_rate: float | None = None
    ) -> None:
        self._argv = [sys.executable, __file__, str(upstream_port), str(rate or 0),
                      str(stream_rate or 0)]  # fmt: skip
        self._proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> Link:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        port = self._proc.stdout.readline().strip()
        if not port.isdigit():
            self._proc.kill()
            raise RuntimeError("the link's proxy did not start")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait()


class _Proxy:
    def __init__(
        self, upstream_port: int, *, rate: float | None = None, stream_rate: float | None = None
    ) -> None:
        self.upstream_port, self.rate, self.stream_rate = upstream_port, rate, stream_rate
        self._server: asyncio.AbstractServer | None = None
        self._shared_clock = [0.0]  # when the link is free again, in loop time

    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        print(self._server.sockets[0].getsockname()[1], flush=True)
        await self._server.serve_forever()

    def _pacer(self) -> Callable[[int], Awaitable[None]]:
        limits = [(clock, rate) for clock, rate in ((self._shared_clock, self.rate),
                  ([0.0], self.stream_rate)) if rate]  # fmt: skip
        loop = asyncio.get_running_loop()

        async def pace(n: int) -> None:
            # n bytes occupy a link for n / rate seconds after it is next free; the sleep ends
            # when they would have arrived over the slower. A link idle for up to _SLACK
            # seconds is still counted busy, so that a sleep the event loop overran (its timer
            # has a resolution of a millisecond, a 64 KiB chunk takes less) is made up later.
            now = until = loop.time()
            for clock, rate in limits:
                clock[0] = max(now - _SLACK, clock[0]) + n / rate
                until = max(until, clock[0])
            if until > now:
                await asyncio.sleep(until - now)

        return pace

    async def _connect(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        pipes = [
            asyncio.ensure_future(_pipe(client_r, server_w, None)),
            asyncio.ensure_future(_pipe(server_r, client_w, self._pacer())),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for writer in (client_w, server_w):
                writer.close()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    pace: Callable[[int], Awaitable[None]] | None,
) -> None:
    try:
        while data := await reader.read(_CHUNK):
            if pace is not None:
                await pace(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


if __name__ == "__main__":
    port, rate, stream_rate = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    asyncio.run(_Proxy(port, rate=rate or None, stream_rate=stream_rate or None).serve())
