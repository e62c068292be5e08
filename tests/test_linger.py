"""tunnel.linger on real loopback sockets, under asyncio's own loop and uvloop's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
import uvloop
from helpers import eventually

from tunnel.linger import LINGER, close_after_written

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Ender(asyncio.BufferedProtocol):
    """Reads like the tunnel's sockets (into its own buffer), and at the first byte
    ends the connection with its last words."""

    def __init__(self) -> None:
        self.buffer = bytearray(65536)
        self.transport: asyncio.Transport | None = None
        self.ended_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None and not self.ended_at
        self.transport.write(b"goodbye")
        close_after_written(self.transport)
        self.ended_at = time.monotonic()


async def _serve() -> tuple[asyncio.Server, Ender]:
    ender = Ender()
    server = await asyncio.get_running_loop().create_server(lambda: ender, "127.0.0.1", 0)
    return server, ender


async def _a_peer_still_sending_reads_the_last_words() -> None:
    server, _ = await _serve()
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.write(bytes(32 * 1024 * 1024))
    assert await reader.read() == b"goodbye"  # then the end of the stream, not a reset
    await writer.drain()  # every byte was taken: none was refused with a reset
    writer.close()
    server.close()


async def _a_peer_that_never_stops_is_cut_off() -> None:
    server, ender = await _serve()
    _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.write(b"x")
    await eventually(lambda: ender.ended_at, "the connection ended")
    assert ender.transport is not None and not ender.transport.is_closing()
    chunk = bytes(65536)
    with pytest.raises(ConnectionError):  # reset, or a broken pipe once it was
        async with asyncio.timeout(LINGER + 5):
            while True:  # sending, never reading, never closing
                writer.write(chunk)
                await writer.drain()
    assert time.monotonic() - ender.ended_at >= LINGER - 0.1
    writer.close()
    server.close()


def _run(loop_name: str, test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(test())
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_still_sending_reads_the_last_words(loop_name: str) -> None:
    _run(loop_name, _a_peer_still_sending_reads_the_last_words)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_never_stops_is_cut_off_after_linger(loop_name: str) -> None:
    _run(loop_name, _a_peer_that_never_stops_is_cut_off)
