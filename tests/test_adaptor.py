"""skupper-router's TCP adaptor dialect: the stream header, and a pair through a stand-in router.

The pair is two real processes, an ingress and an egress, both connected to
:class:`SkRouterPeer`, which forwards their streams as skrouterd 3.5.1 does
(protocols.md §4, §8.2) and decodes every header with proton's own decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    LOOPBACK,
    EchoServer,
    TunnelProcess,
    echo_exact,
    echo_server,
    eventually,
    expect_reset,
    round_trip,
    send_then_shutdown,
    write_connect_json,
)
from reactor_peer import free_port
from skrouter_peer import (
    CONTENT_TYPE,
    STREAMING_DELIVERIES,
    Originated,
    Policy,
    SkRouterPeer,
    StreamEnded,
    StreamSeen,
)

from tunnel import adaptor_wire
from tunnel.codec import WireError
from tunnel.dialects import tcp_adaptor
from tunnel.router import Dialect, choose_dialect

MIB = 1024 * 1024

# The client stream skrouterd 3.5.1 sent (protocols.md §8.2), assembled by
# hand: properties list with to, reply-to, correlation-id, and content-type
# as str8; application-properties {V: uint 1}; amqp-value null.
ROUTER_HEADER = (
    b"\x00\x53\x73\xc0\x42\x07"
    b"\x40\x40"
    b"\xa1\x04echo"
    b"\x40"
    b"\xa1\x17_topo/0/router/temp.abc"
    b"\xa1\x03a:1"
    b"\xa1\x18application/octet-stream"
    b"\x00\x53\x74\xc1\x09\x02\xa1\x01V\x70\x00\x00\x00\x01"
    b"\x00\x53\x77\x40"
)


# -- the header, byte by byte ---------------------------------------------------------
def test_encoded_header_layout() -> None:
    """Our header is the layout of §8.2: str8 content-type, {V: 1}, then amqp-value null."""
    head = adaptor_wire.encode_header("echo", "_topo/0/r/temp.1", "c1")
    fields = (
        b"\x40\x40"
        + b"\xa1\x04echo"
        + b"\x40"
        + b"\xa1\x10_topo/0/r/temp.1"
        + b"\xa1\x02c1"
        + b"\xa1\x18application/octet-stream"
    )
    expected = (
        b"\x00\x53\x73\xd0"
        + (len(fields) + 4).to_bytes(4, "big")
        + (7).to_bytes(4, "big")
        + fields
        + b"\x00\x53\x74\xc1\x06\x02\xa1\x01V\x52\x01"
        + b"\x00\x53\x77\x40"
    )
    assert head == expected
    counter = adaptor_wire.encode_header("_topo/0/r/temp.1")
    assert b"\x40\x40\xa1\x10_topo/0/r/temp.1\x40\x40\x40\xa1\x18" in counter


def test_parse_the_routers_header() -> None:
    """The router's own bytes parse, and the stream starts right after amqp-value null."""
    parsed = adaptor_wire.parse_header(ROUTER_HEADER + b"GET / HTTP/1.1\r\n")
    assert parsed is not None
    header, start = parsed
    assert header == adaptor_wire.StreamHeader(
        to="echo",
        reply_to="_topo/0/router/temp.abc",
        correlation_id="a:1",
        content_type=CONTENT_TYPE,
    )
    assert start == len(ROUTER_HEADER)


def test_parse_waits_for_a_whole_header() -> None:
    """Every cut-short prefix asks for more bytes instead of failing or guessing."""
    for cut in range(len(ROUTER_HEADER)):
        assert adaptor_wire.parse_header(ROUTER_HEADER[:cut]) is None, cut


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x53\x75\xa0\x03abc",  # a data section: the 2.x legacy encapsulation
        b"\x00\x53\x76\xc0\x01\x00",  # amqp-sequence
    ],
)
def test_parse_refuses_another_encapsulation(body: bytes) -> None:
    with pytest.raises(WireError, match="not this dialect"):
        adaptor_wire.parse_header(b"\x00\x53\x73\x45" + body)


def test_parse_refuses_an_endless_header() -> None:
    endless = b"\x00\x53\x72\xd1" + (10 * MIB).to_bytes(4, "big") + b"\x00" * (65 * 1024)
    with pytest.raises(WireError, match="no stream header"):
        adaptor_wire.parse_header(endless)


# -- a pair through the stand-in router -------------------------------------------------
def _both_streams(peer: SkRouterPeer) -> list[Any] | None:
    """The peer's client stream and its counter-stream, once both headers are in."""

    def look(p: SkRouterPeer) -> list[Any] | None:
        by_to = {s.header.to: s for s in p.streams.values() if s.header is not None}
        client = by_to.get("echo")
        if client is None or client.header is None:
            return None
        counter = by_to.get(client.header.reply_to)
        return None if counter is None else [client, counter]

    return peer.call(look)


@dataclass
class AdaptorPair:
    peer: SkRouterPeer
    ingress: TunnelProcess
    egress: TunnelProcess
    backend: EchoServer
    port: int

    def seen(self) -> list[StreamSeen]:
        return [e for e in self.peer.events() if isinstance(e, StreamSeen)]


@contextlib.asynccontextmanager
async def adaptor_pair(
    tmp: Path, backend_port: int | None = None, policy: Policy | None = None
) -> AsyncIterator[AdaptorPair]:
    peer = SkRouterPeer(policy)
    port = peer.start()
    config = write_connect_json(tmp / "connect.json", {"host": LOOPBACK, "port": port})
    egress = ingress = None
    try:
        async with echo_server() as backend:
            target = backend_port if backend_port is not None else backend.port
            egress = TunnelProcess(
                ["--config", str(config), f"amqp:echo=>tcp:{LOOPBACK}:{target}"], tmp / "egress.log"
            )
            await egress.wait_for(r"connected \(skupper-router 3\.5\.1\): tcp-adaptor dialect")
            ingress = TunnelProcess(
                ["--config", str(config), f"tcp:{LOOPBACK}:0=>amqp:echo"], tmp / "ingress.log"
            )
            listen = await ingress.listen_port()
            await ingress.wait_for(r"tcp-adaptor dialect")
            yield AdaptorPair(peer, ingress, egress, backend, listen)
            assert await asyncio.to_thread(ingress.stop) == 0, ingress.log()
            assert await asyncio.to_thread(egress.stop) == 0, egress.log()
    finally:
        for proc in (ingress, egress):
            if proc is not None:
                proc.kill()
        peer.stop()


async def test_dialect_is_chosen_from_the_open_and_streaming_links_offered(tmp_path: Path) -> None:
    """The first Open offers nothing; on seeing skupper-router we reconnect offering links."""
    async with adaptor_pair(tmp_path) as pair:
        assert await round_trip(pair.port, b"hello") == b"hello"
        log = pair.ingress.log()
        assert "is skupper-router 3.5.1: reconnecting to offer qd.streaming-links" in log
        assert log.count("tcp-adaptor dialect") == 1
        assert pair.peer.call(lambda peer: peer.links_opened) >= 2


async def test_echo_and_header_fields(tmp_path: Path) -> None:
    """Both streams carry the §8.2 header; the reply sender has qd.streaming-deliveries."""
    async with adaptor_pair(tmp_path) as pair:
        assert await round_trip(pair.port, b"hello, router\n") == b"hello, router\n"
        seen = pair.seen()
        assert len(seen) == 2
        client, counter = seen
        assert client.to == "echo"
        assert client.reply_to is not None and client.reply_to.startswith("_topo/0/peer/temp.")
        assert isinstance(client.correlation_id, str) and client.correlation_id
        assert counter.to == client.reply_to
        assert counter.reply_to is None
        for stream in seen:
            assert stream.content_type == CONTENT_TYPE
            assert not stream.content_type_is_symbol  # str8, as the router writes it
            assert stream.application_properties == {"V": 1}
            assert stream.body is None
            assert STREAMING_DELIVERIES in stream.target_capabilities


async def test_16_mib_each_way(tmp_path: Path) -> None:
    """16 MiB through and back, byte-exact: 16 times the window, so acknowledgements flow."""
    async with adaptor_pair(tmp_path) as pair:
        payload = os.urandom(16 * MIB)
        assert await echo_exact(pair.port, payload) == (
            len(payload),
            hashlib.sha256(payload).hexdigest(),
        )


async def test_half_close_both_ways(tmp_path: Path) -> None:
    """Client FIN ends our stream, the backend's FIN ends its stream, and both settle accepted."""
    async with adaptor_pair(tmp_path) as pair:
        reply = await asyncio.to_thread(send_then_shutdown, pair.port, b"half-closed")
        assert reply == b"half-closed"
        pair.peer.wait_until(lambda events: sum(isinstance(e, StreamEnded) for e in events) == 2)
        ended = [e for e in pair.peer.events() if isinstance(e, StreamEnded)]
        assert {e.outcome for e in ended} == {0x24}  # ACCEPTED


async def test_data_after_the_clients_fin_still_arrives(tmp_path: Path) -> None:
    """A client that has sent its FIN keeps reading what the backend sends later."""

    client_ended = asyncio.Event()

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        # Answer only once the client stream has ended and been settled.
        await client_ended.wait()
        writer.write(b"late:" + request)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(late, LOOPBACK, 0)
    async with server, adaptor_pair(tmp_path, server.sockets[0].getsockname()[1]) as pair:
        replying = asyncio.ensure_future(
            asyncio.to_thread(send_then_shutdown, pair.port, b"question")
        )
        # The client stream is over at the peer, settled by the egress, before any reply.
        await eventually(
            lambda: [e.outcome for e in pair.peer.events() if isinstance(e, StreamEnded)],
            "the client stream settled",
        )
        client_ended.set()
        reply = await asyncio.wait_for(replying, 20)
        assert reply == b"late:question"
        # The client has the bytes; the ingress settles the backend's stream after them.
        pair.peer.wait_until(lambda events: sum(isinstance(e, StreamEnded) for e in events) == 2)
        ended = [e.outcome for e in pair.peer.events() if isinstance(e, StreamEnded)]
        assert ended == [0x24, 0x24]  # ACCEPTED, ours first


async def test_50_concurrent_flows(tmp_path: Path) -> None:
    """50 flows at once, each on its own link, each gets exactly its own bytes back."""
    async with adaptor_pair(tmp_path) as pair:
        payloads = [os.urandom(200_000) + b"%d" % i for i in range(50)]
        results = await asyncio.gather(*(round_trip(pair.port, p) for p in payloads))
        assert results == payloads
        assert pair.peer.call(lambda peer: peer.links_opened) >= 100


async def test_backend_refused_resets_client(tmp_path: Path) -> None:
    """A refused backend: MODIFIED on the client stream, and the client gets an RST."""
    dead_port = free_port()
    async with adaptor_pair(tmp_path, dead_port) as pair:
        await expect_reset(pair.port)
        pair.peer.wait_until(lambda events: any(isinstance(e, StreamEnded) for e in events))
        ended = [e for e in pair.peer.events() if isinstance(e, StreamEnded)]
        assert [e.outcome for e in ended] == [0x27]  # MODIFIED
        await pair.egress.wait_for("unreachable")


async def test_backend_reset_mid_stream_resets_client(tmp_path: Path) -> None:
    """A backend RST mid-stream reaches the client as an RST, never a clean end."""

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"partial")
        await writer.drain()
        # Reset only once the client has the partial reply: an RST discards
        # what the client's kernel holds unread.
        await reader.readexactly(2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server = await asyncio.start_server(resetting, LOOPBACK, 0)
    async with server, adaptor_pair(tmp_path, server.sockets[0].getsockname()[1]) as pair:
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(7), 10) == b"partial"
        writer.write(b"ok")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()


async def test_without_acknowledgements_the_stream_stalls_then_resumes(tmp_path: Path) -> None:
    """No ``received`` from the far end: we stop at the window, stay up, and go on after."""
    policy = Policy(forward_acks=False)
    async with adaptor_pair(tmp_path, policy=policy) as pair:
        payload = os.urandom(6 * MIB)
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(payload)
        received = bytearray()

        async def read_some() -> None:
            while chunk := await reader.read(MIB):
                received.extend(chunk)

        reading = asyncio.create_task(read_some())
        # The peer holds both streams: ours towards the egress, and the counter-stream.
        streams = await eventually(
            lambda: _both_streams(pair.peer), "both streams at the peer", timeout=20
        )

        assert streams is not None

        def carried() -> list[int]:
            return pair.peer.call(lambda _: [s.forwarded + len(s.pending) for s in streams])

        # Our ingress used up its window, the egress echoed all of it back within
        # its own, and the ingress wrote that to the client.
        await eventually(
            lambda: min(carried()) >= tcp_adaptor.WINDOW and len(received) >= tcp_adaptor.WINDOW,
            "both windows used up",
            timeout=20,
        )
        assert carried() == [tcp_adaptor.WINDOW, tcp_adaptor.WINDOW]
        assert len(received) == tcp_adaptor.WINDOW
        # A further flow on the same AMQP connections: its frames come after
        # anything the stalled flow could have sent past its window.
        assert await round_trip(pair.port, b"behind the stall") == b"behind the stall"
        assert carried() == [tcp_adaptor.WINDOW, tcp_adaptor.WINDOW]
        assert len(received) == tcp_adaptor.WINDOW
        assert pair.ingress.proc.poll() is None and pair.egress.proc.poll() is None
        await asyncio.to_thread(pair.peer.set_forward_acks, True)
        await asyncio.wait_for(writer.drain(), 30)
        writer.write_eof()
        await asyncio.wait_for(reading, 30)
        writer.close()
        assert bytes(received) == payload


@pytest.mark.parametrize(
    ("properties", "dialect", "says"),
    [
        (
            {"product": "skupper-router", "version": "3.5.1"},
            Dialect.TCP_ADAPTOR,
            "skupper-router 3.5.1",
        ),
        ({"product": "skupper-router", "version": "2.7.0"}, Dialect.TCP_ADAPTOR, "legacy"),
        (
            {"product": "qpid-dispatch-router", "version": "1.19.0"},
            Dialect.LINK_ROUTE,
            "Qpid Dispatch 1.19.0",
        ),
        ({"product": "tunnel", "version": "0.1.0"}, Dialect.LINK_ROUTE, "tunnel 0.1.0"),
        ({}, Dialect.LINK_ROUTE, "unknown product"),
    ],
)
def test_dialect_from_the_routers_open(
    properties: dict[str, str], dialect: Dialect, says: str
) -> None:
    chosen, why = choose_dialect(properties)
    assert chosen is dialect
    assert says in why


async def test_forced_dialect_offers_streaming_links_at_once(tmp_path: Path) -> None:
    """``--dialect tcp-adaptor`` needs no first round trip to find the router out."""
    peer = SkRouterPeer()
    port = peer.start()
    config = write_connect_json(tmp_path / "connect.json", {"host": LOOPBACK, "port": port})
    ingress = TunnelProcess(
        ["--config", str(config), "--dialect", "tcp-adaptor", f"tcp:{LOOPBACK}:0=>amqp:echo"],
        tmp_path / "ingress.log",
    )
    try:
        await ingress.wait_for(r"chosen by --dialect\): tcp-adaptor dialect")
        assert "reconnecting to offer" not in ingress.log()
        assert peer.call(lambda p: len(p.streaming_conns)) == 1
        assert await asyncio.to_thread(ingress.stop) == 0
    finally:
        ingress.kill()
        peer.stop()


def _client_stream(content_type: bytes, data: bytes) -> bytes:
    """A client stream as a tcpListener would send it, with any content-type (str8)."""
    fields = (
        b"\x40\x40"
        + b"\xa1\x04echo"
        + b"\x40"
        + b"\xa1\x06nobody"
        + b"\xa1\x01x"
        + b"\xa1"
        + bytes((len(content_type),))
        + content_type
    )
    return b"\x00\x53\x73\xc0" + bytes((len(fields) + 1, 7)) + fields + b"\x00\x53\x77\x40" + data


async def test_another_encapsulation_is_released(tmp_path: Path) -> None:
    """A stream whose content-type is not ours is released, for another connector to take."""
    async with adaptor_pair(tmp_path) as pair:
        pair.peer.originate("echo", _client_stream(b"text/plain", b"hello"))
        pair.peer.wait_until(lambda events: any(isinstance(e, Originated) for e in events))
        outcomes = [e.outcome for e in pair.peer.events() if isinstance(e, Originated)]
        assert outcomes == [0x26]  # RELEASED
        assert pair.backend.accepted == 0
        await pair.egress.wait_for(r"stream refused \(released\): content-type 'text/plain'")


async def test_no_counter_stream_resets_the_client(tmp_path: Path) -> None:
    """With nobody serving the address, the client is reset after --open-timeout."""
    peer = SkRouterPeer()
    port = peer.start()
    config = write_connect_json(tmp_path / "connect.json", {"host": LOOPBACK, "port": port})
    ingress = TunnelProcess(
        ["--config", str(config), "--open-timeout", "1", f"tcp:{LOOPBACK}:0=>amqp:echo"],
        tmp_path / "ingress.log",
    )
    try:
        listen = await ingress.listen_port()
        await ingress.wait_for("tcp-adaptor dialect")
        await expect_reset(listen)
        await ingress.wait_for(r"no counter-stream within 1 s")
        assert await asyncio.to_thread(ingress.stop) == 0
    finally:
        ingress.kill()
        peer.stop()


async def test_many_flows_in_bursts_leave_nothing_behind(tmp_path: Path) -> None:
    """Bursts of 400 flows all echo, none is refused, and RSS stays flat after warm-up.

    proton reports on a stream once more after it is answered; taken for a
    new stream, that used to reject a later flow under load.
    """
    async with adaptor_pair(tmp_path) as pair:

        async def burst() -> None:
            payloads = [os.urandom(5000) + b"%d" % i for i in range(400)]
            results = await asyncio.gather(*(round_trip(pair.port, p) for p in payloads))
            assert results == payloads

        await burst()
        warm = (pair.ingress.rss_kib(), pair.egress.rss_kib())
        for _ in range(3):
            await burst()
        after = (pair.ingress.rss_kib(), pair.egress.rss_kib())
        growth = [(a - w) / 1024 for a, w in zip(after, warm, strict=True)]
        assert max(growth) < 6, f"RSS grew by {growth} MiB over 1200 flows"
        for proc in (pair.ingress, pair.egress):
            assert "stream refused" not in proc.log()
