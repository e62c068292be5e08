"""Limits are enforced: connections per bridge, idle and half-closed timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import LOOPBACK, TunnelProcess, echo_server, write_connect_json
from reactor_peer import free_port


@contextlib.asynccontextmanager
async def pair(
    tmp: Path, backend_port: int, *ingress_args: str
) -> AsyncIterator[tuple[TunnelProcess, int]]:
    egress = TunnelProcess(
        ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}"],
        tmp / "egress.log",
    )
    ingress: TunnelProcess | None = None
    try:
        config = write_connect_json(
            tmp / "connect.json", {"host": LOOPBACK, "port": await egress.amqp_port()}
        )
        ingress = TunnelProcess(
            ["--config", str(config), *ingress_args, f"tcp:{LOOPBACK}:0=>amqp:echo"],
            tmp / "ingress.log",
        )
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


async def _reset(reader: asyncio.StreamReader) -> None:
    """The tunnel resets this connection (an RST, not a FIN)."""
    with pytest.raises(ConnectionResetError):
        await reader.read()


async def _connect_from(
    port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client from ``source``, another loopback address: to the bridge, another peer."""
    return await asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0))


async def _is_reset(port: int, source: str) -> None:
    # The reset can come before asyncio has even finished the connect.
    with pytest.raises(ConnectionResetError):
        reader, writer = await _connect_from(port, source)
        try:
            await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()


async def test_connections_past_the_limit_are_reset(tmp_path: Path) -> None:
    """With --max-connections 2 a third client is reset; the first two keep working.

    Each comes from its own address, so the per-peer share (1 of 2) is not what refuses.
    """
    async with (
        echo_server() as backend,
        pair(tmp_path, backend.port, "--max-connections", "2") as (ingress, port),
    ):
        held = [await _connect_from(port, source) for source in ("127.0.0.1", "127.0.0.2")]
        for reader, writer in held:
            await _echoes(reader, writer)
        await _is_reset(port, "127.0.0.3")
        await ingress.wait_for("over the bridge's limit of 2 connections")
        for reader, writer in held:
            await _echoes(reader, writer)
            writer.close()


async def test_one_client_address_cannot_take_every_slot(tmp_path: Path) -> None:
    """With --max-connections 4 one client address gets its share of 2; a third connection
    from it is reset naming the per-peer limit, and another address still gets in."""
    async with (
        echo_server() as backend,
        pair(tmp_path, backend.port, "--max-connections", "4") as (ingress, port),
    ):
        held = [await _connect_from(port, "127.0.0.1") for _ in range(2)]
        for reader, writer in held:
            await _echoes(reader, writer)
        await _is_reset(port, "127.0.0.1")
        await ingress.wait_for(
            r"limit of 2 connections per peer \(--max-connections-per-peer\) for 127\.0\.0\.1"
        )
        other = await _connect_from(port, "127.0.0.2")
        await _echoes(*other)
        for _, writer in [*held, other]:
            writer.close()


async def test_idle_tunnels_are_reset(tmp_path: Path) -> None:
    """A tunnel that carries nothing for --idle-timeout is reset; a busy one is not."""
    async with (
        echo_server() as backend,
        pair(tmp_path, backend.port, "--idle-timeout", "1") as (ingress, port),
    ):
        quiet = await asyncio.open_connection(LOOPBACK, port)
        busy = await asyncio.open_connection(LOOPBACK, port)
        await _echoes(*quiet)
        first = asyncio.create_task(_reset(quiet[0]))
        later: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        second: asyncio.Task[None] | None = None
        # Busy all along, until a tunnel opened when the quiet one was reset is
        # reset too: a whole idle timeout more, after the busy one had lived one.
        async with asyncio.timeout(15):
            while second is None or not second.done():
                await _echoes(*busy)
                if second is None and first.done():
                    first.result()
                    later = await asyncio.open_connection(LOOPBACK, port)
                    await _echoes(*later)
                    second = asyncio.create_task(_reset(later[0]))
                await asyncio.sleep(0.1)  # paces the busy tunnel's traffic
        second.result()
        await _echoes(*busy)
        await ingress.wait_for(r"idle for \d+ s")
        assert later is not None
        for _, writer in (quiet, busy, later):
            writer.close()


async def test_half_closed_tunnels_are_reset(tmp_path: Path) -> None:
    """A client that half-closes towards a backend that never answers is reset after the timeout."""
    seen: list[bytes] = []
    done = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        seen.append(await reader.read())  # reads to EOF, then neither answers nor closes
        await done.wait()

    server = await asyncio.start_server(mute, LOOPBACK, 0)
    try:
        async with pair(
            tmp_path, server.sockets[0].getsockname()[1], "--half-closed-timeout", "1"
        ) as (ingress, port):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"request")
            writer.write_eof()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await ingress.wait_for(r"half-closed for \d+ s")
            assert seen == [b"request"]
    finally:
        done.set()
        server.close()


async def test_connections_wait_for_the_router_then_flow(tmp_path: Path) -> None:
    """A client arriving while the router is away is held, and carried once it is back."""
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))  # reserved, not listening: the router is "away"
    amqp_port = holder.getsockname()[1]
    config = write_connect_json(tmp_path / "connect.json", {"host": LOOPBACK, "port": amqp_port})
    ingress = TunnelProcess(
        ["--config", str(config), "--hold-timeout", "10", f"tcp:{LOOPBACK}:0=>amqp:echo"],
        tmp_path / "ingress.log",
    )
    egress: TunnelProcess | None = None
    try:
        port = await ingress.listen_port()
        await ingress.wait_for("unreachable")
        async with echo_server() as backend:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"sent while the router was away")
            holder.close()
            egress = TunnelProcess(
                [
                    "--listen",
                    f"amqp://{LOOPBACK}:{amqp_port}",
                    f"amqp:echo=>tcp:{LOOPBACK}:{backend.port}",
                ],
                tmp_path / "egress.log",
            )
            assert await asyncio.wait_for(reader.readexactly(30), 15) == (
                b"sent while the router was away"
            )
            writer.close()
            assert await asyncio.to_thread(ingress.stop) == 0
            assert await asyncio.to_thread(egress.stop) == 0
    finally:
        holder.close()
        ingress.kill()
        if egress is not None:
            egress.kill()


async def test_held_connections_are_reset_after_the_hold_timeout(tmp_path: Path) -> None:
    """With no router for --hold-timeout, a held client is reset, not left hanging."""
    dead = free_port()
    config = write_connect_json(tmp_path / "connect.json", {"host": LOOPBACK, "port": dead})
    ingress = TunnelProcess(
        ["--config", str(config), "--hold-timeout", "1", f"tcp:{LOOPBACK}:0=>amqp:echo"],
        tmp_path / "ingress.log",
    )
    try:
        port = await ingress.listen_port()
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        assert asyncio.get_running_loop().time() - started >= 0.9
        writer.close()
        await ingress.wait_for(r"no router connection within 1 s")
        assert await asyncio.to_thread(ingress.stop) == 0
    finally:
        ingress.kill()
