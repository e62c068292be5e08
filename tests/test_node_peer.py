"""Direct mode beside the real node proxy's wire behaviour: a rhea peer on each side.

Each test runs one of our processes in direct mode and a rhea peer
(:mod:`node_peer`) that connects to it as skupper-proxy's bridges connect to
a router: its egress asks ``$management`` for a link route and answers each
routed attach with null termini and 1000 credit; its ingress opens a
connection per client; its HTTP bridges send whole messages.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import LOOPBACK, TunnelProcess, echo_server, eventually
from http_backend import backend, request
from node_peer import NodePeer


@pytest.fixture
async def started() -> AsyncIterator[list[TunnelProcess | NodePeer]]:
    """What a test starts, ended when it ends."""
    running: list[TunnelProcess | NodePeer] = []
    try:
        yield running
    finally:
        for part in running:
            if isinstance(part, NodePeer):
                await part.stop()
            else:
                part.kill()


async def _direct(
    tmp: Path, started: list[TunnelProcess | NodePeer], *specs: str
) -> tuple[TunnelProcess, int]:
    ours = TunnelProcess(["--listen", f"amqp://{LOOPBACK}:0", *specs], tmp / "tunnel.log")
    started.append(ours)
    return ours, await ours.amqp_port()


async def _node(
    tmp: Path, started: list[TunnelProcess | NodePeer], mode: str, *args: str | int
) -> NodePeer:
    peer = await NodePeer.start(mode, *args, log=tmp / f"{mode}.log")  # type: ignore[arg-type]
    started.append(peer)
    return peer


async def _behind_node_egress(
    tmp: Path, started: list[TunnelProcess | NodePeer], backend: int
) -> tuple[TunnelProcess, int, NodePeer]:
    """Our ingress for ``echo``, and a node egress that routes ``echo`` to ``backend``."""
    ours, amqp = await _direct(tmp, started, f"tcp:{LOOPBACK}:0=>amqp:echo")
    port = await ours.listen_port()
    node = await _node(tmp, started, "tcp-egress", amqp, "echo", backend)
    assert await node.wait_for("route") == 201
    return ours, port, node


async def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, read as many bytes back, then close: how a node client talks."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    finally:
        writer.close()


@pytest.mark.parametrize("size", [1, 1000, 300_000])
async def test_our_tcp_ingress_through_a_node_egress(
    tmp_path: Path, started: list[TunnelProcess | NodePeer], size: int
) -> None:
    """Our ingress takes the node egress's attach answer, null termini and all, and carries
    every byte, the first one too."""
    async with echo_server() as server:
        ours, port, _node = await _behind_node_egress(tmp_path, started, server.port)
        await ours.wait_for(r"serves 'echo' through a link route")
        payload = os.urandom(size)
        assert await _exchange(port, payload) == payload
        assert await _exchange(port, payload[:1]) == payload[:1]


async def test_node_egress_answers_a_half_closed_client(
    tmp_path: Path, started: list[TunnelProcess | NodePeer]
) -> None:
    """``printf hello | nc -N``: our FIN reaches the backend, and its end comes back."""
    async with echo_server() as server:
        _ours, port, _node = await _behind_node_egress(tmp_path, started, server.port)
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.readexactly(5), 20) == b"hello"
        await eventually(lambda: server.lost, "the backend's connection ended")
        assert server.lost == [None], "the backend saw a reset, not the node egress's FIN"
        # The node egress ends its return sender once its backend ends: that is our FIN.
        assert await asyncio.wait_for(reader.read(), 20) == b""
        writer.close()


async def test_a_backend_that_ends_first_ends_our_client(
    tmp_path: Path, started: list[TunnelProcess | NodePeer]
) -> None:
    """A backend that greets and closes: the client reads the greeting, then its EOF."""

    async def greet(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"welcome")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, LOOPBACK, 0)
    async with server:
        _ours, port, _node = await _behind_node_egress(
            tmp_path, started, server.sockets[0].getsockname()[1]
        )
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        assert await asyncio.wait_for(reader.read(), 20) == b"welcome"
        writer.close()


async def test_a_node_egress_that_leaves_resets_our_client(
    tmp_path: Path, started: list[TunnelProcess | NodePeer]
) -> None:
    """The routed link is lost with the node egress's connection: the client is reset."""
    async with echo_server() as server:
        ours, port, node = await _behind_node_egress(tmp_path, started, server.port)
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 20) == b"ping"
        await node.stop()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await ours.wait_for(r"the link route for 'echo' is gone")


async def test_a_node_tcp_ingress_through_our_egress(
    tmp_path: Path, started: list[TunnelProcess | NodePeer]
) -> None:
    """The node ingress's one connection per client, its amqp-value messages and its close."""
    async with echo_server() as server:
        ours, amqp = await _direct(tmp_path, started, f"amqp:echo=>tcp:{LOOPBACK}:{server.port}")
        node = await _node(tmp_path, started, "tcp-ingress", amqp, "echo")
        port = await node.wait_for("listening")
        for size in (1, 200_000):
            payload = os.urandom(size)
            assert await _exchange(port, payload) == payload
        await eventually(lambda: len(server.lost) == 2, "both backend connections ended")
        assert server.lost == [None, None], "the node ingress's close arrived as a reset"
        await ours.wait_for(r"closed \(far end closed its connection\)")


@pytest.mark.parametrize("size", [0, 1000, 2_000_000])
async def test_our_http_ingress_through_a_node_egress(
    tmp_path: Path, started: list[TunnelProcess | NodePeer], size: int
) -> None:
    """The node egress frames the request by our Content-Length: the backend gets the body."""
    with backend() as server:
        ours, amqp = await _direct(tmp_path, started, f"http:{LOOPBACK}:0=>amqp:web")
        port = await ours.listen_port()
        node = await _node(tmp_path, started, "http-egress", amqp, "web", server.server_address[1])
        assert await node.wait_for("consuming") == "web"
        body = os.urandom(size)
        status, headers, answer = await asyncio.to_thread(
            request, port, "POST", "/echo?x=1", body, [("content-type", "x/bytes")]
        )
        assert (status, answer) == (200, body)
        assert headers["x-method"] == "POST"
        assert headers["content-type"] == "x/bytes"
        status, _, answer = await asyncio.to_thread(request, port, "GET", "/nothing-here")
        assert (status, answer) == (404, b"no such path")


async def test_a_node_http_ingress_through_our_egress(
    tmp_path: Path, started: list[TunnelProcess | NodePeer]
) -> None:
    """The node ingress's requests, Content-Length and all, answered through our egress."""
    with backend() as server:
        _, amqp = await _direct(
            tmp_path, started, f"amqp:web=>http:{LOOPBACK}:{server.server_address[1]}"
        )
        node = await _node(tmp_path, started, "http-ingress", amqp, "web")
        port = await node.wait_for("listening")
        body = os.urandom(100_000)
        status, headers, answer = await asyncio.to_thread(
            request, port, "POST", "/echo", body, [("content-type", "x/bytes")]
        )
        assert (status, answer) == (200, body)
        assert headers["x-method"] == "POST"
        assert int(headers["content-length"]) == len(body)
        status, _, answer = await asyncio.to_thread(request, port, "GET", "/echo")
        assert (status, answer) == (200, b"")
