"""A hostile peer in front of the HTTP egress: what it sends must cost it, not the process.

The daemon under test is an ``amqp:web=>http:...`` egress connected to a
reactor peer that plays the router and sends request messages straight to
the egress's consumer link, shaped as no ingress would shape them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import eventually
from http_backend import backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proton import Data, Delivery, Message, ulong
from reactor_peer import (
    Attached,
    ConnectionClosed,
    Credit,
    Daemon,
    Harness,
    Outcome,
    Policy,
    Received,
    RouterPeer,
)

from tunnel import http_message as hm
from tunnel.http_egress import BackendConnection, BackendError

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
ADMIN = r"admin endpoint on http://127\.0\.0\.1:(\d+)"


class RawBackend:
    """A TCP server that reads each request head and answers ``reply`` (None: never), and
    counts its connections and the bytes they sent."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
                with self._lock:
                    self.received += len(chunk)
            if self.reply is not None:
                conn.sendall(self.reply)
            # Kept open, and read: the tunnel must end it, not the backend.
            while chunk := conn.recv(1 << 20):
                with self._lock:
                    self.received += len(chunk)
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()


@contextmanager
def raw_backend(reply: bytes | None) -> Iterator[RawBackend]:
    server = RawBackend(reply)
    try:
        yield server
    finally:
        server.close()


class Egress:
    """An egress daemon for 'web' and the peer in front of it, with helpers to send."""

    def __init__(self, harness: Harness, backend_port: int, *args: str) -> None:
        self.peer: RouterPeer = harness.peer(Policy())
        self.daemon: Daemon = harness.daemon(
            self.peer, "--admin", "127.0.0.1:0", *args, f"amqp:web=>http:127.0.0.1:{backend_port}"
        )
        self.consumer = self.peer.wait_for(
            Attached, lambda a: a.daemon_role == "receiver" and a.source.address == "web"
        ).name
        self.responses = self.peer.wait_for(
            Attached, lambda a: a.daemon_role == "sender" and a.target.address is None
        ).name
        self.daemon.wait_log(r"consuming 'web'")
        self.admin_port = int(self.daemon.wait_log(ADMIN).group(1))
        self.ids = iter(range(1_000_000, 2_000_000))

    def send_raw(self, data: bytes) -> None:
        """Send ``data`` as one delivery, however malformed, once there is credit."""

        def credit(peer: RouterPeer) -> int:
            return int(peer.links[self.consumer].credit)

        asyncio.run(eventually(lambda: self.peer.call(credit) > 0, "credit from the egress"))

        def act(peer: RouterPeer) -> None:
            link = peer.links[self.consumer]
            link.delivery(f"raw-{id(data)}-{len(peer.events())}".encode())
            link.send(data)
            link.advance()

        self.peer.call(act)

    def outcomes(self) -> list[Outcome]:
        return [e for e in self.peer.events() if isinstance(e, Outcome) and e.link == self.consumer]

    def next_outcome(self, before: int) -> Outcome:
        """The first outcome after the ``before`` ones already seen."""
        self.peer.wait_for(Outcome, lambda _: len(self.outcomes()) > before)
        return self.outcomes()[before]

    def response(self, correlation_id: object, timeout: float = 10.0) -> Message:
        got = self.peer.wait_for(
            Received,
            lambda r: r.link == self.responses and r.correlation_id == correlation_id,
            timeout,
        )
        assert got.message is not None
        return got.message

    def get(self, path: str = "/headers", **fields: Any) -> Message:
        """A well-formed GET; its response, which must come."""
        correlation_id = next(self.ids)
        self.peer.send(
            self.consumer,
            Message(
                address=f"svc{path}",
                subject="GET",
                correlation_id=ulong(correlation_id),
                reply_to="reply-ok",
                **fields,
            ),
        )
        return self.response(correlation_id)

    def healthz(self) -> int:
        url = f"http://127.0.0.1:{self.admin_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            status: int = answer.status
        return status

    def still_serving(self) -> None:
        """The process, its AMQP connection and its admin endpoint all still work."""
        assert self.get().subject == "200"
        assert self.healthz() == 200
        assert not [e for e in self.peer.events() if isinstance(e, ConnectionClosed)]
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None


def _body(message: Message) -> bytes:
    body = message.body
    assert isinstance(body, bytes | memoryview), body
    return bytes(body)


def _request(correlation_id: int, **fields: Any) -> Message:
    fields.setdefault("address", "svc/headers")
    fields.setdefault("subject", "GET")
    return Message(correlation_id=ulong(correlation_id), reply_to="reply-x", **fields)


# -- finding 1: CONNECT and Upgrade -------------------------------------------
def test_connect_is_refused_at_the_egress(harness: Harness) -> None:
    """CONNECT, with a backend that would answer 200: 501, the backend never contacted,
    and the egress goes on (it used to spin at 100 % CPU for good)."""
    with raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as server:
        egress = Egress(harness, server.port)
        egress.peer.send(
            egress.consumer,
            _request(1, address="internal.example:22", subject="CONNECT"),
        )
        answer = egress.response(1)
        assert answer.subject == "501"
        assert b"CONNECT is not carried" in _body(answer)
        assert server.accepted == 0
        egress.still_serving()


def test_upgrade_is_not_carried_to_the_backend(harness: Harness) -> None:
    """A request asking for an Upgrade (a node ingress passes it on) is served as plain
    HTTP/1.1: the field is hop-by-hop, so the backend never sees it and cannot switch."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])
        answer = egress.get(properties={"upgrade": "h2c", "connection": "Upgrade"})
        assert answer.subject == "200"
        seen = json.loads(_body(answer))["headers"]
        assert "upgrade" not in seen
        egress.still_serving()


def test_unexpected_h11_state_ends_the_request_not_the_loop() -> None:
    """The response loop given a state it has no branch for (PAUSED after a CONNECT's 200)
    raises BackendError for that request instead of spinning without awaiting."""

    async def scenario() -> None:
        async def answer_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await reader.read()  # held open

        server = await asyncio.start_server(answer_200, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = BackendConnection(reader, writer)
        request = hm.HttpRequest("CONNECT", "internal.example:22", [("host", "x")], b"")
        with pytest.raises(BackendError, match="unexpected"):
            await asyncio.wait_for(conn.exchange(request, "x", 1024), 5)
        conn.close()
        server.close()

    asyncio.run(scenario())


# -- finding 2: header bytes, malformed messages, contained failures ----------
def test_non_ascii_request_headers_reach_the_backend_as_sent(harness: Harness) -> None:
    """A Latin-1 header value goes out as its bytes, a UTF-8 string as UTF-8: one attempt,
    a 200, no ERROR (they used to raise, eleven times, then give 502)."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])
        answer = egress.get(
            properties={
                "content-disposition": 'attachment; filename="r\xe9sum\xe9.pdf"',
                "x-utf8": "caf\u00e9 \u2603",
            }
        )
        assert answer.subject == "200"
        seen = json.loads(_body(answer))["headers"]
        # http.server reads header bytes as Latin-1.
        assert seen["content-disposition"] == ['attachment; filename="r\xe9sum\xe9.pdf"']
        assert seen["x-utf8"] == ["caf\u00e9 \u2603".encode().decode("latin-1")]
        assert egress.next_outcome(0).state == Delivery.ACCEPTED
        assert len(egress.outcomes()) == 1
        assert "ERROR" not in egress.daemon.log()


def test_non_ascii_response_headers_are_carried_as_latin1(harness: Harness) -> None:
    """A backend's obs-text header bytes come back as the characters of their Latin-1
    reading, which the ingress writes back as the same bytes."""
    reply = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
        b'content-disposition: attachment; filename="r\xe9sum\xe9.pdf"\r\n\r\n'
    )
    with raw_backend(reply) as server:
        egress = Egress(harness, server.port)
        answer = egress.get()
        assert answer.subject == "200"
        properties: dict[str, object] = answer.properties or {}
        value = properties["content-disposition"]
        assert value == 'attachment; filename="r\xe9sum\xe9.pdf"'
        assert hm.wire_bytes(str(value)) == b'attachment; filename="r\xe9sum\xe9.pdf"'


def _with_app_properties(correlation_id: int, value: object) -> bytes:
    """A GET whose application-properties section holds ``value``, map or not."""
    data = hm.encode(_request(correlation_id, body=b"MARK"))
    mark = b"\x00Sw\xa0\x04MARK"
    assert data.endswith(mark)
    section = Data()
    section.put_object(value)
    return data[: -len(mark)] + b"\x00St" + section.encode() + mark


@pytest.mark.parametrize("props", [["a", "b"], "a string", 7])
def test_application_properties_that_are_not_a_map_get_400(harness: Harness, props: object) -> None:
    """An application-properties section that is a list or a string: a 400 naming it, and
    the connection goes on (the AttributeError used to drop it)."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])
        before = len(egress.outcomes())
        egress.send_raw(_with_app_properties(4, props))
        answer = egress.response(4)
        assert answer.subject == "400"
        assert b"application properties are a" in _body(answer)
        assert egress.next_outcome(before).state == Delivery.ACCEPTED
        egress.still_serving()


def test_a_header_that_would_break_the_head_gets_400(harness: Harness) -> None:
    """A CR LF in a property: 400 naming the header, and the backend is not contacted."""
    with raw_backend(b"HTTP/1.1 204 No Content\r\n\r\n") as server:
        egress = Egress(harness, server.port)
        egress.peer.send(egress.consumer, _request(5, properties={"x-a": "1\r\nx-b: 2"}))
        answer = egress.response(5)
        assert answer.subject == "400"
        assert b"header 'x-a' holds a control character" in _body(answer)
        assert server.accepted == 0


def test_an_undecodable_message_is_rejected_and_logged_once(harness: Harness) -> None:
    """Bytes that are no message, twice: both rejected, naming the fault, one log line."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])
        data = bytearray(hm.encode(_request(6, subject="G\xc9T")))
        data[data.index("\xc9".encode())] = 0xFF  # the subject is no longer UTF-8
        for attempt in range(2):
            before = len(egress.outcomes())
            egress.send_raw(bytes(data))
            outcome = egress.next_outcome(before)
            assert outcome.state == Delivery.REJECTED, attempt
            assert outcome.why == "message property subject is not UTF-8: invalid start byte"
        egress.still_serving()
        assert egress.daemon.log().count("refused a request from") == 1


def test_a_correlation_id_that_cannot_be_echoed_is_rejected(harness: Harness) -> None:
    """A long as correlation id is no message-id type (proton reads it as none), so no
    answer could be matched to it: REJECTED, naming it, and the backend is not called
    (it used to be served, and answered with no correlation id at all)."""
    with raw_backend(b"HTTP/1.1 204 No Content\r\n\r\n") as server:
        egress = Egress(harness, server.port)
        good = hm.encode(_request(7))
        # ulong 7 (smallulong 0x53 0x07) made long -7 (0x81 and eight bytes).
        at = good.index(b"\x53\x07")
        data = good[:at] + b"\x81" + (-7).to_bytes(8, "big", signed=True) + good[at + 2 :]
        before = len(egress.outcomes())
        egress.send_raw(data)
        outcome = egress.next_outcome(before)
        assert outcome.state == Delivery.REJECTED
        assert outcome.why is not None and "correlation id None cannot be echoed" in outcome.why
        assert server.accepted == 0
        assert egress.get().subject == "204"


# -- finding 3: the egress window in bytes -------------------------------------
def test_egress_requests_held_are_bounded_in_bytes(harness: Harness) -> None:
    """Twenty 8 MiB requests to a backend that never answers: what the 64 MiB budget
    holds reaches the backend, the rest are released for the sender to offer again, and
    credit never exceeds the window (it used to take all twenty, whatever their size)."""
    count, size = 20, 8 * MIB
    with raw_backend(None) as server:
        egress = Egress(
            harness, server.port, "--http-max-body", str(9 * MIB), "--http-timeout", "60"
        )
        body = bytes(size)
        for n in range(count):
            egress.peer.send(
                egress.consumer,
                _request(
                    100 + n,
                    subject="POST",
                    properties={"content-length": str(size)},
                    body=body,
                ),
            )

        def released() -> int:
            return sum(1 for o in egress.outcomes() if o.state == Delivery.RELEASED)

        asyncio.run(
            eventually(
                lambda: server.accepted + released() == count,
                "every request held or released",
                timeout=30,
            )
        )
        assert server.accepted <= hm.DEFAULT_HELD_BYTES // size, server.accepted
        assert released() >= count - hm.DEFAULT_HELD_BYTES // size
        granted = [
            e.credit
            for e in egress.peer.events()
            if isinstance(e, Credit) and e.link == egress.consumer
        ]
        assert granted and max(granted) <= hm.DEFAULT_WINDOW
        assert egress.healthz() == 200


def test_small_requests_keep_the_whole_window(harness: Harness) -> None:
    """The byte budget costs small requests nothing: the egress gives the full window of
    credit while little is held (reckoning every request at the largest size gave 3)."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])
        assert egress.get().subject == "200"
        granted = [
            e.credit
            for e in egress.peer.events()
            if isinstance(e, Credit) and e.link == egress.consumer
        ]
        assert max(granted) == hm.DEFAULT_WINDOW


# -- finding 4: no content type --------------------------------------------------
def test_a_missing_content_type_is_not_sent_as_none(harness: Harness) -> None:
    """A request without a content type reaches the backend without one (it used to carry
    ``Content-Type: None``)."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])
        seen = json.loads(_body(egress.get()))["headers"]
        assert "content-type" not in seen, seen


# -- finding 5: anything at all --------------------------------------------------
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=40),
    st.binary(max_size=40),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
_PROPERTIES = st.one_of(
    st.dictionaries(
        st.one_of(
            st.sampled_from(["host", "upgrade", "content-length", "set-cookie"]),
            st.text(max_size=12),
        ),
        _VALUES,
        max_size=5,
    ),
    _VALUES,
)
_SUBJECTS = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "CONNECT", "OPTIONS", "", "G E T"]),
    st.text(max_size=12),
    st.none(),
)
_CORRELATION_IDS = st.one_of(
    st.integers(min_value=0, max_value=2**64 - 1).map(ulong),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.uuids(),
    st.none(),
)


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    """An encoded request message with arbitrary fields, a few bytes of it perhaps flipped."""
    correlation_id = draw(_CORRELATION_IDS)
    message = Message(
        address=draw(st.text(max_size=30)),
        subject=draw(_SUBJECTS),
        correlation_id=correlation_id,
        reply_to=draw(st.sampled_from(["reply-x", ""])),
        body=draw(st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=20), _VALUES)),
    )
    content_type = draw(st.one_of(st.none(), st.text(max_size=20)))
    if content_type is not None:
        message.content_type = content_type
    data = hm.encode(message)
    props = draw(_PROPERTIES)
    if props is not None:
        section = Data()
        section.put_object(props)
        at = data.rfind(b"\x00Sw")  # before the body, where the section belongs
        data = data[:at] + b"\x00St" + section.encode() + data[at:]
    flips = draw(
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), max_size=3)
    )
    flipped = bytearray(data)
    for offset, mask in flips:
        flipped[offset] ^= mask
    return bytes(flipped)


def test_arbitrary_request_messages_do_not_hurt_the_egress(harness: Harness) -> None:
    """Fifty arbitrary messages (any application-properties shape, subject, body, id, bytes
    flipped): after each, the process answers a good request on the same connection, and
    /healthz."""
    with backend() as server:
        egress = Egress(harness, server.server_address[1])

        @settings(
            max_examples=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(hostile_messages())
        def survives(data: bytes) -> None:
            egress.send_raw(data)
            assert egress.get().subject == "200"

        survives()
        egress.still_serving()
        assert "Traceback" not in egress.daemon.log(), egress.daemon.log()
