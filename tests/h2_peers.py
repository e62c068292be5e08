"""Raw HTTP/2 peers for the protocol cases gRPC hides: h2 on asyncio, in the test's loop.

:class:`H2Backend` is a server whose answer depends on the path:

- ``/trailers``: 200, ``ok``, then trailers ``x-trailer: yes``;
- ``/reset``: 200's head, then RST_STREAM with ENHANCE_YOUR_CALM (11);
- ``/hang``: nothing; a reset from the client is recorded in ``resets``;
- ``/garbage``: a frame no HTTP/2 peer may send (GOAWAY on a stream);
- ``/goaway``: a GOAWAY naming this stream as the last served, then, after
  ``GOAWAY_DELAY``, 200 ``drained`` on it;
- ``/big``: :data:`BIG` bytes of a known pattern, each frame as the
  client's window allows; ``sent`` counts them; ``/huge``: :data:`HUGE` bytes;
- ``/upload``: reads the body but never gives its window back until
  ``release_uploads()``; ``received`` counts the bytes; answers 200 with the
  body's length and SHA-256 at its end.

:class:`H2Client` is a client over one connection whose window can be held
at zero and opened later.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import GoAwayFrame

BIG = 4 * 1024 * 1024
HUGE = 64 * 1024 * 1024
GOAWAY_DELAY = 0.3


def huge() -> bytes:
    """What ``/huge`` sends."""
    return pattern(BIG) * (HUGE // BIG)


def pattern(size: int) -> bytes:
    block = hashlib.sha256(b"pattern").digest()
    return (block * (size // len(block) + 1))[:size]


class _ServerConnection(asyncio.Protocol):
    def __init__(self, backend: H2Backend) -> None:
        self.backend = backend
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.transport: asyncio.Transport | None = None
        #: Each answer being sent: bytes sent, bytes in all.
        self.big: dict[int, tuple[int, int]] = {}
        self.uploads: dict[int, hashlib._Hash] = {}
        self.held: dict[int, int] = defaultdict(int)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.backend.connections.append(self)
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            self.on_event(event)
        self.pump()
        self.flush()

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers or [])
            assert event.stream_id is not None
            self.on_request(event.stream_id, headers[b":path"].decode())
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id or 0
            if sid in self.uploads:
                self.uploads[sid].update(event.data or b"")
                self.backend.received += len(event.data or b"")
                if self.backend.uploads_released:
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, sid)
                else:
                    self.held[sid] += event.flow_controlled_length or 0
        elif isinstance(event, h2.events.StreamEnded):
            sid = event.stream_id or 0
            if sid in self.uploads:
                digest = self.uploads.pop(sid)
                body = b"%d %s" % (self.backend.received, digest.hexdigest().encode())
                self.h2.send_headers(sid, [(":status", "200")])
                self.h2.send_data(sid, body, end_stream=True)
        elif isinstance(event, h2.events.StreamReset):
            self.backend.resets.append(event.error_code or 0)

    def on_request(self, sid: int, path: str) -> None:
        self.backend.requests.append(path)
        conn = self.h2
        if path == "/trailers":
            conn.send_headers(sid, [(":status", "200")])
            conn.send_data(sid, b"ok")
            conn.send_headers(sid, [("x-trailer", "yes")], end_stream=True)
        elif path == "/reset":
            conn.send_headers(sid, [(":status", "200")])
            conn.reset_stream(sid, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        elif path == "/goaway":
            # Written past h2, which would close its state and refuse to answer after it.
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = sid
            self.flush()
            assert self.transport is not None
            self.transport.write(goaway.serialize())
            asyncio.get_running_loop().call_later(GOAWAY_DELAY, self.answer_drained, sid)
        elif path in ("/big", "/huge"):
            conn.send_headers(sid, [(":status", "200")])
            self.big[sid] = (0, BIG if path == "/big" else HUGE)
        elif path == "/upload":
            self.uploads[sid] = hashlib.sha256()
        elif path == "/garbage":
            # A GOAWAY on a stream: no valid frame, and the connection's end.
            self.flush()
            assert self.transport is not None
            self.transport.write(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + bytes(8))
        elif path != "/hang":
            conn.send_headers(sid, [(":status", "404")], end_stream=True)

    def answer_drained(self, sid: int) -> None:
        self.h2.send_headers(sid, [(":status", "200")])
        self.h2.send_data(sid, b"drained", end_stream=True)
        self.flush()
        self.backend.drained = True

    def release(self) -> None:
        for sid, size in self.held.items():
            if size:
                self.h2.acknowledge_received_data(size, sid)
        self.held.clear()
        self.flush()

    def pump(self) -> None:
        block = pattern(BIG)
        for sid, (started, total) in list(self.big.items()):
            sent = started
            while sent < total:
                room = min(
                    self.h2.local_flow_control_window(sid),
                    self.h2.max_outbound_frame_size,
                    total - sent,
                )
                if room <= 0:
                    break
                offset = sent % BIG
                chunk = block[offset : offset + room]
                self.h2.send_data(sid, chunk, end_stream=sent + len(chunk) == total)
                sent += len(chunk)
                self.backend.sent += len(chunk)
            self.big[sid] = (sent, total)
            if sent == total:
                del self.big[sid]

    def blocked(self) -> bool:
        """Whether every big answer waits for the client's window."""
        return bool(self.big) and all(
            self.h2.local_flow_control_window(sid) == 0 for sid in self.big
        )

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())


@dataclass
class H2Backend:
    connections: list[_ServerConnection] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)
    #: The paths asked, in order.
    requests: list[str] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    uploads_released: bool = False
    #: A stream was answered after a GOAWAY.
    drained: bool = False
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _ServerConnection(self), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def release_uploads(self) -> None:
        self.uploads_released = True
        for conn in self.connections:
            conn.release()

    def blocked(self) -> bool:
        return any(conn.blocked() for conn in self.connections)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()


@dataclass
class Answer:
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False
    #: With ``count_only``: the body's SHA-256, once it has ended.
    digest: str = ""
    hasher: Any = field(default_factory=hashlib.sha256)


class H2Client(asyncio.Protocol):
    """One h2c connection; ``window`` is its initial stream window (0 holds it shut)."""

    def __init__(self, window: int = 65535) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.window = window
        self.transport: asyncio.Transport | None = None
        self.answers: dict[int, Answer] = defaultdict(Answer)
        self.goaway = False
        self.goaway_code: int | None = None
        self.hold = window == 0
        self.unacked: dict[int, int] = defaultdict(int)
        self.to_send: dict[int, bytes] = {}
        #: Bodies are hashed and counted, not kept.
        self.count_only = False
        self.received = 0

    @classmethod
    async def connect(cls, port: int, window: int = 65535) -> H2Client:
        _, client = await asyncio.get_running_loop().create_connection(
            lambda: cls(window), "127.0.0.1", port
        )
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        self.h2.increment_flow_control_window(BIG)
        self.flush()

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", 0) or 0
            answer = self.answers[sid]
            if isinstance(event, h2.events.ResponseReceived):
                answer.status = int(dict(event.headers or [])[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                if self.count_only:
                    answer.hasher.update(event.data or b"")
                    self.received += len(event.data or b"")
                else:
                    answer.body += event.data or b""
                if self.hold:
                    self.unacked[sid] += event.flow_controlled_length or 0
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                answer.trailers = list(event.headers or [])
            elif isinstance(event, h2.events.StreamEnded):
                answer.digest = answer.hasher.hexdigest()
                answer.ended = True
            elif isinstance(event, h2.events.StreamReset):
                answer.reset = int(event.error_code or 0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
                self.goaway_code = int(event.error_code or 0)
        self.pump()
        self.flush()

    def request(self, path: str, body: bytes | None = None) -> int:
        sid: int = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST" if body else "GET"), (":path", path)]
        headers += [(":scheme", "http"), (":authority", "backend")]
        self.h2.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.to_send[sid] = body
        self.pump()
        self.flush()
        return sid

    def sent(self, sid: int, total: int) -> int:
        return total - len(self.to_send.get(sid, b""))

    def pump(self) -> None:
        for sid, body in list(self.to_send.items()):
            rest = body
            while rest:
                room = min(
                    self.h2.local_flow_control_window(sid),
                    self.h2.max_outbound_frame_size,
                    len(rest),
                )
                if room <= 0:
                    break
                self.h2.send_data(sid, rest[:room], end_stream=room == len(rest))
                rest = rest[room:]
            if rest:
                self.to_send[sid] = rest
            else:
                del self.to_send[sid]

    def blocked(self, sid: int) -> bool:
        return sid in self.to_send and self.h2.local_flow_control_window(sid) == 0

    def open_window(self, size: int) -> None:
        """Stop holding: give back what was held, and widen the stream windows to ``size``."""
        self.hold = False
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: size})
        for sid, held in self.unacked.items():
            self.h2.acknowledge_received_data(held, sid)
        self.unacked.clear()
        self.flush()

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
