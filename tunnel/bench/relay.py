"""``python -m tunnel.bench.relay LISTEN=>HOST:PORT ...``: the plain relay baseline.

Two protocols per connection, each writing straight into the other's
transport, with pause/resume in both directions and half-close carried as
``write_eof``: the fastest correct byte relay asyncio and uvloop allow.
Prints one JSON line mapping each target to its bound port.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
from collections.abc import Callable
from typing import cast

import uvloop

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class Half(asyncio.Protocol):
    """One side of a relayed connection."""

    def __init__(self, peer: Half | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.got_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer is not None and self.peer.transport is not None:
            self.forward_eof(self.peer)
        return True

    def forward_eof(self, peer: Half) -> None:
        """Carry our FIN to ``peer``; once both ways have ended, close both.

        A connection left open after both FINs is referenced only by its own
        protocol cycle, and uvloop crashes if the garbage collector frees a
        transport whose shutdown request is still pending.
        """
        assert self.transport is not None and peer.transport is not None
        peer.transport.write_eof()
        if peer.got_eof:
            self.transport.close()
            peer.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Inbound(Half):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.target = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, outbound = await loop.create_connection(lambda: Half(self), *self.target)
        except OSError:
            assert self.transport is not None
            self.transport.abort()
            return
        self.peer = outbound
        assert outbound.transport is not None and self.transport is not None
        for chunk in self.early:
            outbound.transport.write(chunk)
        self.early.clear()
        if self.got_eof:
            self.forward_eof(outbound)
        self.transport.resume_reading()


async def serve(
    mappings: list[str], inbound: Callable[[str, int], asyncio.Protocol] = Inbound
) -> None:
    """Listen for each ``LISTEN=>HOST:PORT``; ``inbound(HOST, PORT)`` takes each connection."""
    loop = asyncio.get_running_loop()
    ports = {}
    for mapping in mappings:
        listen, _, target = mapping.partition("=>")
        host, _, port = target.rpartition(":")
        server = await loop.create_server(
            functools.partial(inbound, host, int(port)), "127.0.0.1", int(listen), backlog=4096
        )
        ports[target] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1:]))
