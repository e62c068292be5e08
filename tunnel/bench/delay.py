"""``python -m tunnel.bench.delay [--delay-ms MS] LISTEN=>HOST:PORT ...``: a hop with latency.

One relay hop, as ``tunnel.bench.relay``, except that each chunk read on
either side is written to the other side ``MS`` milliseconds later (default
1: 2 ms of round trip, like a path through a nearby router). A FIN follows
the bytes read before it, as late as they are. uvloop sets timers in whole
milliseconds, so a chunk leaves on the timer nearest its due time, within
about half a millisecond of it; with the default, a 1-byte echo through
this hop takes about 2.5 ms here. A stream that keeps the hop busy sees
more: the loop reads a socket up to 32 times (8 MB) before it runs a timer,
so its chunks can wait some milliseconds longer.

Each direction stops reading while its delayed bytes and those its far
side's socket has yet to take add up to more than ``BOUND`` (64 MiB). That is
sixteen times what 4 GB/s (more than loopback carries here) puts in flight
in the default 1 ms: up to delays of about 16 ms the bound caps memory,
never the rate. A lower bound, a socket's usual high-water mark, would: it
would stop the reading at each burst a timer releases, and the pipe would
run empty for a delay each time.

Prints one JSON line mapping each target to its bound port.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections import deque
from typing import cast

import uvloop

from .relay import serve

BOUND = 64 << 20
# Half a timer tick: a chunk due sooner than this leaves now rather than a
# tick late, and no timer is armed for zero (uvloop would run it at once,
# again and again until the chunk is due).
HALF_TICK = 0.0005


class Line(asyncio.Protocol):
    """One side of a delayed connection: what it reads reaches ``peer`` ``delay`` seconds later."""

    def __init__(self, delay: float, peer: Line | None = None) -> None:
        self.delay = delay
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        # One timer for the oldest chunk, not one per chunk: equal due times
        # then cannot reorder bytes, and a FIN (None) cannot pass them.
        self.held: deque[tuple[float, bytes | None]] = deque()
        self.held_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sent_eof = False
        self.reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=BOUND, low=BOUND // 2)

    def data_received(self, data: bytes) -> None:
        self._hold(data)
        self.held_bytes += len(data)
        self._gate()

    def eof_received(self) -> bool:
        self._hold(None)
        return True

    def _hold(self, data: bytes | None) -> None:
        self.held.append((time.monotonic() + self.delay, data))
        if self.timer is None:
            self._arm()

    def _arm(self) -> None:
        wait = self.held[0][0] - time.monotonic()
        self.timer = asyncio.get_running_loop().call_later(wait, self.release)

    def release(self) -> None:
        """Write what is due to the peer; the rest waits for the next tick."""
        self.timer = None
        peer = self.peer
        if peer is None or peer.transport is None:
            return  # still connecting: the connection calls again once it is up
        now = time.monotonic() + HALF_TICK
        while self.held and self.held[0][0] <= now:
            data = self.held.popleft()[1]
            if data is None:
                self._send_eof(peer)
            else:
                self.held_bytes -= len(data)
                peer.transport.write(data)
        if self.held:
            self._arm()
        self._gate()

    def _send_eof(self, peer: Line) -> None:
        """Carry our FIN to ``peer``; once both ways have ended, close both.

        See ``tunnel.bench.relay.Half.forward_eof`` for why both are closed.
        """
        assert self.transport is not None and peer.transport is not None
        peer.transport.write_eof()
        self.sent_eof = True
        if peer.sent_eof:
            self.transport.close()
            peer.transport.close()

    def _gate(self) -> None:
        """Read while what we hold and what the peer's socket has still to send is within BOUND.

        Called as either changes: at each read, at each release (every tick
        while we hold bytes), and when the peer's socket drains (over BOUND,
        what it has to send alone kept us from reading).
        """
        transport, peer = self.transport, self.peer
        if transport is None or transport.is_closing():
            return
        unsent = (
            0 if peer is None or peer.transport is None else peer.transport.get_write_buffer_size()
        )
        wanted = self.held_bytes + unsent <= BOUND
        if wanted == self.reading:
            return
        self.reading = wanted
        if wanted:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # Bytes held for either side are for a connection that is gone.
        for line in (self, self.peer):
            if line is not None and line.timer is not None:
                line.timer.cancel()
                line.timer = None
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer._gate()


class Inbound(Line):
    """A client's side: connects to the target and holds what it reads meanwhile."""

    def __init__(self, delay: float, host: str, port: int) -> None:
        super().__init__(delay)
        self.target = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, outbound = await loop.create_connection(lambda: Line(self.delay, self), *self.target)
        except OSError:
            self.transport.abort()
            return
        self.peer = outbound
        if self.transport.is_closing():  # the client went while we connected
            assert outbound.transport is not None
            outbound.transport.abort()
        elif self.timer is None and self.held:
            self.release()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tunnel.bench.delay", description=__doc__)
    parser.add_argument("--delay-ms", type=float, default=1.0, help="each way (default 1)")
    parser.add_argument("mappings", nargs="+", metavar="LISTEN=>HOST:PORT")
    args = parser.parse_args()
    uvloop.run(serve(args.mappings, functools.partial(Inbound, args.delay_ms / 1000)))


if __name__ == "__main__":
    main()
