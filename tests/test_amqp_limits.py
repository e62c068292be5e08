"""A hostile AMQP peer against a real direct-mode process: limits hold, memory stays put.

The peer is proton's own engine over a real socket, with raw frames written
past it where proton itself would never break the rules.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOPBACK, TunnelProcess
from memory_pump import begin_frame, transfer_frame
from proton import Connection, Data, Described, Endpoint, Link, Transport
from test_hostile import _echo_backend, _still_serves, _wait_log

from tunnel.direct import MAX_SESSIONS

MiB = 1024 * 1024
_CLOSE = 0x18  # the Close performative's descriptor (AMQP 1.0 §2.7.9)


class RawPeer:
    """A blocking AMQP client: proton's engine, pumped over one socket by hand."""

    def __init__(self, port: int, idle_timeout: float = 0.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=10)
        self.connection = Connection()
        self.connection.container = "raw-peer"
        self.transport = Transport()
        self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.transport.idle_timeout = idle_timeout
        self.transport.bind(self.connection)
        self.connection.open()

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            self._flush()
            if time.monotonic() > deadline:
                raise AssertionError("the peer never got there")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self.transport.close_tail()
                return
            self._push(data)
        self._flush()

    def _push(self, data: bytes) -> None:
        # proton takes at most its capacity at a time; one read may bring more (a burst
        # of answers), and a transport that has closed its input takes nothing.
        view = memoryview(data)
        while view and (room := self.transport.capacity()) > 0:
            self.transport.push(bytes(view[:room]))
            view = view[room:]

    def _flush(self) -> None:
        # Answer the links the far end opens (an egress opens its reply sender), as a peer must.
        while (link := self.connection.link_head(Endpoint.LOCAL_UNINIT)) is not None:
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            link.open()
        while (pending := self.transport.pending()) > 0:
            self.sock.sendall(self.transport.peek(pending) or b"")
            self.transport.pop(pending)

    def sender(self, address: str) -> Link:
        """A tunnel's sender, as an ingress opens it: from a dynamic reply address."""
        session = self.connection.session()
        session.open()
        reply = session.receiver(f"{address}-reply")
        reply.source.dynamic = True
        reply.open()
        self.pump(lambda: reply.remote_source.address is not None)
        link = session.sender(f"{address}-sender")
        link.source.address = str(reply.remote_source.address)
        link.target.address = address
        link.open()
        self.pump(lambda: link.credit > 0)
        return link

    def close(self) -> None:
        self.sock.close()


def _deaf_backend() -> tuple[socket.socket, int]:
    """A backend that accepts and never reads: whatever is sent to it stays with us."""
    server = socket.create_server((LOOPBACK, 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.fixture
def deaf_egress(tmp_path: Path) -> Iterator[tuple[TunnelProcess, int]]:
    backend, backend_port = _deaf_backend()
    process = TunnelProcess(
        ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}"],
        tmp_path / "egress.log",
    )
    try:
        port = int(_wait_log(process, r"accepting AMQP on amqp://[^:]+:(\d+)").group(1))
        yield process, port
        assert process.stop() == 0
    finally:
        process.kill()
        backend.close()


@pytest.fixture
def egress(tmp_path: Path) -> Iterator[tuple[TunnelProcess, int]]:
    backend, backend_port = _echo_backend()
    process = TunnelProcess(
        [
            "--max-links-per-connection",
            "40",
            "--listen",
            f"amqp://{LOOPBACK}:0",
            f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}",
        ],
        tmp_path / "egress.log",
    )
    try:
        port = int(_wait_log(process, r"accepting AMQP on amqp://[^:]+:(\d+)").group(1))
        yield process, port
        assert process.stop() == 0
    finally:
        process.kill()
        backend.close()


def test_transfer_beyond_credit_closes_the_link_and_holds_no_memory(
    deaf_egress: tuple[TunnelProcess, int],
) -> None:
    process, port = deaf_egress
    peer = RawPeer(port)
    link = peer.sender("echo")
    granted = link.credit
    baseline = process.rss_kib()
    # proton sends only within credit: past it, the frames are written by hand.
    # A whole delivery's payload is a data section; 100 MiB in 64 KiB deliveries.
    payload = b"\x00Su\xb0" + (64 * 1024).to_bytes(4, "big") + b"x" * (64 * 1024)
    try:
        for burst in range(25):
            # Handle 1: the reply receiver took handle 0 on the same session.
            frames = (transfer_frame(0, 1, burst * 64 + n, payload) for n in range(64))
            peer.sock.sendall(b"".join(frames))
    except (BrokenPipeError, ConnectionResetError):
        pass
    peer.pump(lambda: bool(link.state & Endpoint.REMOTE_CLOSED))
    condition = link.remote_condition
    assert condition is not None and condition.name == "amqp:link:transfer-limit-exceeded"
    # The backend's stream was cut short: a reset, never a clean end.
    _wait_log(process, r"flow closed \(protocol-error\)")
    grown = process.rss_kib() - baseline
    assert grown < 30 * 1024, f"{grown} KiB held after 100 MiB sent against credit {granted}"
    peer.close()
    assert RawPeer(port).sender("echo").credit > 0  # and the next peer is served


def test_attach_flood_is_closed_with_resource_limit_exceeded(
    egress: tuple[TunnelProcess, int], tmp_path: Path
) -> None:
    _, port = egress
    peer = RawPeer(port)
    session = peer.connection.session()
    session.open()
    for n in range(200):
        link = session.receiver(f"flood-{n}")
        link.source.dynamic = True
        link.open()
    peer.pump(lambda: bool(peer.connection.state & Endpoint.REMOTE_CLOSED))
    condition = peer.connection.remote_condition
    assert condition is not None and condition.name == "amqp:resource-limit-exceeded"
    assert "40 links" in str(condition.description)
    peer.close()
    _still_serves(port, tmp_path)


def test_a_one_millisecond_idle_timeout_is_refused(egress: tuple[TunnelProcess, int]) -> None:
    _, port = egress
    peer = RawPeer(port, idle_timeout=0.002)  # proton announces half: 1 ms
    peer.pump(lambda: bool(peer.connection.state & Endpoint.REMOTE_CLOSED))
    condition = peer.connection.remote_condition
    assert condition is not None and condition.name == "amqp:resource-limit-exceeded"
    peer.close()


def test_session_flood_is_closed_with_resource_limit_exceeded(
    egress: tuple[TunnelProcess, int], tmp_path: Path
) -> None:
    process, port = egress
    peer = RawPeer(port)
    peer.pump(lambda: bool(peer.connection.state & Endpoint.REMOTE_ACTIVE))
    assert peer.transport.remote_channel_max == MAX_SESSIONS - 1  # announced in our Open
    baseline = process.rss_kib()
    # proton keeps within channel-max: the begins past it are written by hand. The
    # egress answers the ones within it, which proton, never having sent them, would
    # take for a broken peer: from here on the frames are read by hand too.
    peer.sock.sendall(b"".join(begin_frame(channel) for channel in range(30_000)))
    name, description = close_condition(peer.sock)
    # proton refuses a channel past the channel-max we announced before we count it.
    assert name == "amqp:connection:framing-error"
    assert "channel" in description
    assert process.rss_kib() - baseline < 16 * 1024
    peer.close()
    _still_serves(port, tmp_path)


def test_the_close_naming_an_error_reaches_a_peer_that_is_still_sending(
    egress: tuple[TunnelProcess, int], tmp_path: Path
) -> None:
    """The egress stops reading at a broken frame, but the peer's 32 MiB after it are
    read and dropped until it has sent them and read the Close: closing with unread
    input would send a reset, which fails the peer's send and drops the Close."""
    _, port = egress
    peer = RawPeer(port)
    peer.pump(lambda: bool(peer.connection.state & Endpoint.REMOTE_ACTIVE))
    broken = struct.pack(">IBBH", 8, 1, 0, 0)  # a frame offset of 1 word: shorter than its header
    peer.sock.sendall(broken + bytes(32 * MiB))
    name, _ = close_condition(peer.sock)
    assert name == "amqp:connection:framing-error"
    peer.close()
    _still_serves(port, tmp_path)


def close_condition(sock: socket.socket) -> tuple[str, str]:
    """Read AMQP frames to the end of the stream: the error name and description of the Close."""
    sock.settimeout(10)
    stream = bytearray()
    while data := sock.recv(65536):
        stream += data
    offset = 0
    while offset + 8 <= len(stream):
        size, doff = struct.unpack_from(">IB", stream, offset)
        if size > 4 * doff:  # not an empty (heartbeat) frame
            body = Data()
            body.decode(bytes(stream[offset + 4 * doff : offset + size]))
            body.rewind()
            body.next()
            performative = body.get_object()
            if isinstance(performative, Described) and performative.descriptor == _CLOSE:
                fields: Any = (
                    performative.value
                )  # [error], an error being [condition, description, info]
                condition, description = fields[0].value[:2]
                return str(condition), str(description)
        offset += size
    raise AssertionError(f"no Close in the {len(stream)} bytes before the end of the stream")


def remote_error_name(peer: RawPeer) -> str | None:
    condition = peer.connection.remote_condition
    return None if condition is None else str(condition.name)
