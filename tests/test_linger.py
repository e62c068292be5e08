"""tunnel.linger on real loopback sockets, plain and TLS, under asyncio's own loop and uvloop's."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from helpers import eventually, make_certs

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


class Tls:
    """Both ends' contexts, or none for plain TCP."""

    def __init__(self, folder: Path | None) -> None:
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        if folder is not None:
            certs = make_certs(folder)
            self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.server.load_cert_chain(certs.server_cert, certs.server_key)
            self.client = ssl.create_default_context(cafile=certs.ca)

    async def serve(self) -> tuple[asyncio.Server, Ender]:
        ender = Ender()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ender, "127.0.0.1", 0, ssl=self.server)
        return server, ender

    async def connect(
        self, server: asyncio.Server
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        port = server.sockets[0].getsockname()[1]
        hostname = "localhost" if self.client is not None else None
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.client, server_hostname=hostname
        )


async def _a_peer_still_sending_reads_the_last_words(tls: Tls) -> None:
    server, ender = await tls.serve()
    reader, writer = await tls.connect(server)
    writer.write(bytes(32 * 1024 * 1024))
    assert await reader.readexactly(7) == b"goodbye"
    await writer.drain()  # every byte was taken: none was refused with a reset
    if tls.client is None:
        assert await reader.read() == b""  # then the end of the stream, not a reset
    # Over TLS, which cannot half-close, the peer knows the end by the last words
    # themselves, as an AMQP peer knows it by the Close: it closes, and so do we.
    writer.close()
    await eventually(lambda: ender.transport is not None and ender.transport.is_closing(), "closed")
    server.close()


async def _a_peer_that_never_stops_is_cut_off(tls: Tls) -> None:
    server, ender = await tls.serve()
    _, writer = await tls.connect(server)
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


def _run(loop_name: str, test: Callable[[Tls], Coroutine[Any, Any, None]], tls: Tls) -> None:
    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(test(tls))
    finally:
        loop.close()


@pytest.fixture(params=["plain", "tls"])
def tls(request: pytest.FixtureRequest, tmp_path: Path) -> Tls:
    return Tls(tmp_path if request.param == "tls" else None)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_still_sending_reads_the_last_words(loop_name: str, tls: Tls) -> None:
    _run(loop_name, _a_peer_still_sending_reads_the_last_words, tls)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_peer_that_never_stops_is_cut_off_after_linger(loop_name: str, tls: Tls) -> None:
    _run(loop_name, _a_peer_that_never_stops_is_cut_off, tls)
