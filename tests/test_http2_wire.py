"""The HTTP/2 cases gRPC hides, with raw h2 peers at both ends of a real tunnel pair:
trailers, resets each way, a backend's GOAWAY, and windows held shut each way."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import h2.errors
import pytest
from h2_peers import BIG, HUGE, H2Backend, H2Client, huge, pattern
from helpers import eventually
from message_router import MessageRouter
from proton import Message, ulong
from proton.utils import BlockingConnection, SendException
from test_http2 import Pair, http2_pair

from tunnel.http2_ingress import MAX_RESETS
from tunnel.http2_stream import STREAM_WINDOW


@pytest.fixture
async def raw_backend() -> AsyncIterator[H2Backend]:
    backend = H2Backend()
    await backend.start()
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
async def raw_pair(tmp_path: Path, raw_backend: H2Backend) -> AsyncIterator[Pair]:
    async with http2_pair(tmp_path, raw_backend.port) as running:
        yield running


async def test_trailers_arrive_after_the_body(raw_pair: Pair) -> None:
    client = await H2Client.connect(raw_pair.port)
    sid = client.request("/trailers")
    answer = client.answers[sid]
    await eventually(lambda: answer.ended, "the answer ends", detail=lambda: answer)
    assert (answer.status, bytes(answer.body)) == (200, b"ok")
    assert answer.trailers == [(b"x-trailer", b"yes")]
    client.close()


async def test_a_backend_reset_reaches_the_client_with_its_code(raw_pair: Pair) -> None:
    client = await H2Client.connect(raw_pair.port)
    sid = client.request("/reset")
    answer = client.answers[sid]
    await eventually(lambda: answer.reset is not None, "a reset", detail=lambda: answer)
    assert answer.reset == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    client.close()


async def test_a_client_reset_reaches_the_backend(raw_pair: Pair, raw_backend: H2Backend) -> None:
    client = await H2Client.connect(raw_pair.port)
    sid = client.request("/hang")
    await eventually(lambda: raw_backend.connections, "the backend is asked")
    client.reset(sid)
    await eventually(lambda: raw_backend.resets, "the backend hears the reset")
    assert raw_backend.resets == [h2.errors.ErrorCodes.CANCEL]
    client.close()


async def test_a_backend_goaway_drains_and_new_streams_go_on(
    raw_pair: Pair, raw_backend: H2Backend
) -> None:
    client = await H2Client.connect(raw_pair.port)
    draining = client.answers[client.request("/goaway")]
    await eventually(lambda: draining.ended, "the last stream is served", detail=lambda: draining)
    assert (draining.status, bytes(draining.body)) == (200, b"drained")
    after = client.answers[client.request("/trailers")]
    await eventually(lambda: after.ended, "a stream after the GOAWAY", detail=lambda: after)
    assert after.status == 200
    assert len(raw_backend.connections) == 2
    assert not client.goaway  # the client's own connection was never told to go
    client.close()


async def test_a_window_held_at_zero_holds_the_backend(
    raw_pair: Pair, raw_backend: H2Backend
) -> None:
    """A client that reads nothing: the backend is stopped by its window, nothing piles up."""
    client = await H2Client.connect(raw_pair.port, window=0)
    answer = client.answers[client.request("/big")]
    await eventually(raw_backend.blocked, "the backend waits for its window")
    # What the egress lets the backend send: its own stream window, not a byte more.
    assert raw_backend.sent == STREAM_WINDOW
    assert not answer.body
    client.open_window(BIG)
    await eventually(lambda: answer.ended, "the whole answer", timeout=30)
    assert bytes(answer.body) == pattern(BIG)
    client.close()


async def test_an_upload_faster_than_the_backend_reads_is_held_by_its_window(
    raw_pair: Pair, raw_backend: H2Backend
) -> None:
    client = await H2Client.connect(raw_pair.port)
    body = pattern(BIG)
    sid = client.request("/upload", body)
    # The backend takes its window's worth (h2's default, 65,535 bytes) and gives none back.
    await eventually(
        lambda: client.blocked(sid) and raw_backend.received == 65535,
        "the client waits for its window",
    )
    # A round trip on the same connection behind any window the tunnel still had to give.
    behind = client.answers[client.request("/trailers")]
    await eventually(lambda: behind.ended, "a stream beside the upload")
    # The client sent at most the ingress's window and what the backend took (h2 gives
    # windows back in batches, so perhaps a little less): nothing more is held anywhere.
    assert client.blocked(sid)
    assert STREAM_WINDOW <= client.sent(sid, len(body)) <= STREAM_WINDOW + 65535
    raw_backend.release_uploads()
    answer = client.answers[sid]
    await eventually(lambda: answer.ended, "the upload's answer", timeout=30)
    assert bytes(answer.body) == b"%d %s" % (BIG, hashlib.sha256(body).hexdigest().encode())
    client.close()


async def test_a_reset_before_the_egress_answered_still_reaches_the_backend(
    tmp_path: Path, raw_backend: H2Backend
) -> None:
    """The client resets while the egress's first message, which names where the rest of
    the stream goes, is still on its way back: the egress is told once it arrives."""
    router = MessageRouter()
    try:
        async with http2_pair(tmp_path, raw_backend.port, router=router.start()) as pair:
            await asyncio.to_thread(router.pause, True)
            client = await H2Client.connect(pair.port)
            first = client.request("/hang")
            await eventually(lambda: raw_backend.requests == ["/hang"], "the backend is asked")
            client.reset(first)
            # Frames of one connection are read in order: once the next request is at the
            # backend, the ingress has taken the reset.
            client.request("/hang")
            await eventually(lambda: len(raw_backend.requests) == 2, "a second request")
            assert not raw_backend.resets
            await asyncio.to_thread(router.pause, False)
            await eventually(lambda: raw_backend.resets, "the backend hears the reset")
            assert raw_backend.resets == [h2.errors.ErrorCodes.CANCEL]
            client.close()
    finally:
        router.stop()


async def test_a_64_mib_response_passes_in_constant_memory(
    raw_pair: Pair, raw_backend: H2Backend
) -> None:
    """Neither tunnel process grows by more than a few windows while 64 MiB go through."""
    client = await H2Client.connect(raw_pair.port)
    client.count_only = True
    before = {p: p.rss_kib() for p in (raw_pair.ingress, raw_pair.egress)}
    peak = dict(before)
    answer = client.answers[client.request("/huge")]

    def done() -> bool:
        for process, highest in peak.items():
            peak[process] = max(highest, process.rss_kib())
        return answer.ended

    await eventually(done, "64 MiB through", timeout=120)
    assert client.received == HUGE and answer.digest == hashlib.sha256(huge()).hexdigest()
    for process, start in before.items():
        assert peak[process] - start < 8 * 1024, (process.args[-1], start, peak[process])
    client.close()


async def test_a_backend_that_breaks_http2_resets_its_streams_and_the_next_is_served(
    raw_pair: Pair, raw_backend: H2Backend
) -> None:
    client = await H2Client.connect(raw_pair.port)
    broken = client.answers[client.request("/garbage")]
    await eventually(lambda: broken.reset is not None, "the stream is reset", detail=lambda: broken)
    assert broken.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
    after = client.answers[client.request("/trailers")]
    await eventually(lambda: after.ended, "the next stream, on a new backend connection")
    assert after.status == 200 and len(raw_backend.connections) == 2
    assert "the backend broke HTTP/2" in raw_pair.egress.log()
    client.close()


async def test_a_client_that_breaks_http2_loses_its_connection_only(raw_pair: Pair) -> None:
    """The GOAWAY naming the error reaches the client although 16 MiB more follow the
    broken frame: the ingress reads and drops them rather than close with them unread,
    which would send a reset and could drop the GOAWAY at the client."""
    reader, writer = await asyncio.open_connection("127.0.0.1", raw_pair.port)
    ping_on_a_stream = b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + bytes(8)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + ping_on_a_stream + bytes(16 * 1024 * 1024))
    received = bytearray()
    async with asyncio.timeout(10):
        while data := await reader.read(65536):
            received += data
    writer.close()
    assert goaway_code(bytes(received)) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    client = await H2Client.connect(raw_pair.port)
    answer = client.answers[client.request("/trailers")]
    await eventually(lambda: answer.ended, "another client is served")
    client.close()


def goaway_code(received: bytes) -> int:
    """The error code of the GOAWAY among HTTP/2 frames (RFC 9113 §6.8)."""
    offset = 0
    while offset + 9 <= len(received):
        length = int.from_bytes(received[offset : offset + 3], "big")
        if received[offset + 3] == 0x7:
            return int.from_bytes(received[offset + 13 : offset + 17], "big")
        offset += 9 + length
    raise AssertionError(f"no GOAWAY in the {len(received)} bytes before the end of the stream")


async def test_a_client_that_resets_stream_after_stream_is_cut_off(raw_pair: Pair) -> None:
    """Rapid reset: each stream opened, let go to the egress, then reset, over and over."""
    client = await H2Client.connect(raw_pair.port)
    for _ in range(MAX_RESETS + 1):
        sid = client.request("/hang")
        await asyncio.sleep(0)  # its own batch: the first message leaves
        client.reset(sid)
        await asyncio.sleep(0)
        if client.goaway:
            break
    await eventually(lambda: client.goaway, "the ingress sends GOAWAY")
    assert client.goaway_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert f"reset {MAX_RESETS + 1} streams within 10 s" in raw_pair.ingress.log()
    client.close()


def _send_head(amqp_port: int, message: Message) -> str:
    """Send a stream's first message as any AMQP peer could; what the egress said."""
    connection = BlockingConnection(f"amqp://127.0.0.1:{amqp_port}", timeout=10)
    try:
        sender = connection.create_sender("grpc")
        try:
            sender.send(message)
        except SendException as refused:
            return f"refused: {refused}"
        return "accepted"
    finally:
        connection.close()


async def test_a_malformed_stream_head_is_refused_and_the_egress_goes_on(
    raw_pair: Pair, raw_backend: H2Backend
) -> None:
    """A head no HTTP/2 request can carry (no :path) is rejected, naming why; nothing
    reaches the backend, and the next client is served."""
    head = Message(
        subject="GET",
        correlation_id=ulong(1),
        group_id="intruder",
        reply_to="dynamic/nowhere",
        properties={":method": "GET", ":scheme": "http", "ended": True},
    )
    said = await asyncio.to_thread(_send_head, raw_pair.amqp_port, head)
    assert said.startswith("refused") and "cannot be sent as HTTP/2" in raw_pair.egress.log()
    assert raw_backend.requests == []
    client = await H2Client.connect(raw_pair.port)
    answer = client.answers[client.request("/trailers")]
    await eventually(lambda: answer.ended, "the next client is served")
    client.close()
