"""Limits are enforced: connections per bridge, idle and half-closed timeouts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import LOOPBACK, TunnelProcess, echo_server, write_connect_json


@contextlib.asynccontextmanager
async def pair(tmp: Path, backend_port: int, *ingress_args: str) -> AsyncIterator[
        tuple[TunnelProcess, int]]:
    egress = TunnelProcess(["--listen", f"amqp://{LOOPBACK}:0",
                            f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}"], tmp / "egress.log")
    ingress: TunnelProcess | None = None
    try:
        config = write_connect_json(tmp / "connect.json",
                                    {"host": LOOPBACK, "port": await egress.amqp_port()})
        ingress = TunnelProcess(["--config", str(config), *ingress_args,
                                 f"tcp:{LOOPBACK}:0=>amqp:echo"], tmp / "ingress.log")
        port = await ingress.listen_port()
        await ingress.wait_for("connected")
        yield ingress, port
        # Off the loop: the backends run on it and must keep answering meanwhile.
        assert await asyncio.to_thread(ingress.stop) == 0
        assert await asyncio.to_thread(egress.stop) == 0
    finally:
        if ingress is not None:
            ingress.kill()
        egress.kill()


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"


async def test_connections_past_the_limit_are_reset(tmp_path: Path) -> None:
    """With --max-connections 2 a third client is reset; the first two keep working."""
    async with echo_server() as backend, pair(tmp_path, backend.port,
                                              "--max-connections", "2") as (ingress, port):
        held = [await asyncio.open_connection(LOOPBACK, port) for _ in range(2)]
        for reader, writer in held:
            await _echoes(reader, writer)
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await ingress.wait_for("over the bridge's limit of 2 connections")
        for reader, writer in held:
            await _echoes(reader, writer)
            writer.close()


async def test_idle_tunnels_are_reset(tmp_path: Path) -> None:
    """A tunnel that carries nothing for --idle-timeout is reset; a busy one is not."""
    async with echo_server() as backend, pair(tmp_path, backend.port,
                                              "--idle-timeout", "1") as (ingress, port):
        quiet = await asyncio.open_connection(LOOPBACK, port)
        busy = await asyncio.open_connection(LOOPBACK, port)
        await _echoes(*quiet)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.5
        while loop.time() < deadline:
            await _echoes(*busy)
            await asyncio.sleep(0.1)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(quiet[0].read(), 5)
        await _echoes(*busy)
        await ingress.wait_for(r"idle for \d+ s")
        for _, writer in (quiet, busy):
            writer.close()


async def test_half_closed_tunnels_are_reset(tmp_path: Path) -> None:
    """A client that half-closes towards a backend that never answers is reset after the timeout."""
    seen: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        seen.append(await reader.read())  # reads to EOF, then neither answers nor closes
        await asyncio.sleep(30)

    server = await asyncio.start_server(mute, LOOPBACK, 0)
    try:
        async with pair(tmp_path, server.sockets[0].getsockname()[1],
                        "--half-closed-timeout", "1") as (ingress, port):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"request")
            writer.write_eof()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await ingress.wait_for(r"half-closed for \d+ s")
            assert seen == [b"request"]
    finally:
        server.close()
