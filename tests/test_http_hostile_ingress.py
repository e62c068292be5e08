"""The HTTP ingress against hostile clients and hostile response messages.

An independent proton reactor peer plays the router and the egress behind
it: it sees every request message the ingress sends and answers with
whatever the test chooses, malformed ones included. The clients are real
sockets on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import TunnelProcess, write_connect_json
from http_backend import backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proton import Data, Delivery, Message
from reactor_peer import (
    Attached,
    ConnectionClosed,
    Daemon,
    Harness,
    Outcome,
    Policy,
    Received,
    RouterPeer,
)

from tunnel.http_ingress import valid_host

pytestmark = pytest.mark.timeout(90)

LISTENING = r"listening on 127\.0\.0\.1:(\d+)"
CONNECTED = r"router amqp://127\.0\.0\.1:\d+ connected"
REQUESTS = "site-a-http-web"
MIB = 1024 * 1024


class Ingress:
    """An HTTP ingress for 'web' whose router, and egress, is a reactor peer."""

    def __init__(self, harness: Harness, *args: str) -> None:
        self.peer: RouterPeer = harness.peer(Policy(dynamic_addresses=["reply-0"]))
        self.daemon: Daemon = harness.daemon(
            self.peer, "--site-id", "site-a", *args, "http:127.0.0.1:0=>amqp:web"
        )
        self.port = int(self.daemon.wait_log(LISTENING).group(1))
        self.daemon.wait_log(CONNECTED)
        self.replies = self.peer.wait_for(
            Attached, lambda a: a.daemon_role == "receiver" and a.source.dynamic
        ).name
        self._tags = itertools.count()

    def requests(self) -> list[Received]:
        return self.peer.received(REQUESTS)

    def request(self, number: int) -> Received:
        """The ``number``-th request message (from 1), waiting for it."""
        self.peer.wait_until(lambda _: len(self.requests()) >= number)
        return self.requests()[number - 1]

    def answer(
        self, request: Received, subject: str = "200", body: bytes = b"ok", **kw: Any
    ) -> None:
        self.peer.send(
            self.replies,
            Message(
                address=request.reply_to,
                correlation_id=request.correlation_id,
                subject=subject,
                body=body,
                **kw,
            ),
        )

    def send_raw(self, data: bytes) -> None:
        """One delivery of ``data`` on the reply link, whatever the bytes are."""
        tag = str(next(self._tags)).encode()

        def act(peer: RouterPeer) -> None:
            link = peer.links[self.replies]
            link.delivery(tag)
            link.stream(data)
            link.advance()

        self.peer.call(act)

    def rss_kib(self) -> int:
        assert self.daemon.proc is not None
        status = Path(f"/proc/{self.daemon.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1))

    def assert_router_connection_held(self) -> None:
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, self.daemon.log()
        closed = [e for e in self.peer.events() if isinstance(e, ConnectionClosed)]
        assert not closed, f"the router connection dropped: {closed}\n{self.daemon.log()}"


def encoded(fields: dict[str, Any], reply_to: str | None, correlation_id: object) -> bytes:
    """A response message with ``fields``, sections written as given, whatever their
    shape (proton's Message insists on a map of application properties)."""
    message = Message(address=reply_to, correlation_id=correlation_id)
    for name in ("subject", "content_type"):
        if name in fields:
            with contextlib.suppress(Exception):  # proton refuses some values itself
                setattr(message, name, fields[name])
    data = bytes(message.encode())
    for code, key in ((0x74, "properties"), (0x77, "body")):
        if fields.get(key) is not None:
            section = Data()
            section.put_described()
            section.enter()
            section.put_ulong(code)
            section.put_object(fields[key])
            section.exit()
            data += section.encode()
    return data


class Client(threading.Thread):
    """One HTTP request from a thread, so that the test can play the far end meanwhile."""

    def __init__(
        self, port: int, path: str = "/", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.extra = port, path, headers
        self.status = 0
        self.headers: http.client.HTTPMessage | None = None
        self.body = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest("GET", self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", "svc")
            for name, value in self.extra:
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            self.status, self.headers, self.body = response.status, response.msg, response.read()
        except BaseException as exc:  # handed to the test thread
            self.error = exc
        finally:
            conn.close()

    def answer(self) -> tuple[int, http.client.HTTPMessage, bytes]:
        self.join(30)
        assert not self.is_alive(), "no answer within 30 s"
        if self.error is not None:
            raise self.error
        assert self.headers is not None
        return self.status, self.headers, self.body


def raw(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send ``data`` and read until the ingress closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def served(ingress: Ingress, path: str, number: int) -> None:
    """A client asks for ``path``; the request is message ``number``, and is answered."""
    client = Client(ingress.port, path)
    client.start()
    got = ingress.request(number)
    assert got.message is not None and got.message.address == f"svc{path}"
    ingress.answer(got, body=path.encode())
    assert client.answer()[::2] == (200, path.encode())


# -- 1. CONNECT and Upgrade ----------------------------------------------------------
def test_connect_is_refused_at_ingress(harness: Harness) -> None:
    """CONNECT is answered 501 by the ingress itself, and no message leaves for it."""
    ingress = Ingress(harness)
    answer = raw(
        ingress.port, b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 501 "), answer
    assert b"CONNECT is not carried" in answer
    served(ingress, "/after", 1)  # the first message the peer sees is the next request
    assert len(ingress.requests()) == 1


@pytest.mark.parametrize(
    "fields",
    [
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    ],
    ids=["websocket", "h2c"],
)
def test_upgrade_is_refused_at_ingress(harness: Harness, fields: bytes) -> None:
    """A request that asks for a protocol switch gets 501, and no message leaves for it."""
    ingress = Ingress(harness)
    answer = raw(ingress.port, b"GET /chat HTTP/1.1\r\nHost: svc\r\n" + fields + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 501 "), answer
    assert b"upgrades are not carried" in answer
    served(ingress, "/after", 1)
    assert len(ingress.requests()) == 1


# -- 2. response messages the client cannot be given as they are ---------------------
def test_non_ascii_response_header_reaches_client_and_spares_bystanders(harness: Harness) -> None:
    """obs-text in a response header goes to the client byte for byte; a bystander waiting
    on the same router connection is served after it."""
    ingress = Ingress(harness)
    bystander = Client(ingress.port, "/bystander")
    bystander.start()
    waiting = ingress.request(1)
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=20) as sock:
        sock.sendall(b"GET /cv HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        got = ingress.request(2)
        ingress.answer(
            got,
            body=b"pdf",
            properties={
                "content-disposition": 'attachment; filename="r\xe9sum\xe9.pdf"',
                # UTF-8 bytes read as latin-1, as the egress reads them.
                "x-utf8": "caf\u00c3\u00a9",
            },
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b'\r\ncontent-disposition: attachment; filename="r\xe9sum\xe9.pdf"\r\n' in answer
    assert b"\r\nx-utf8: caf\xc3\xa9\r\n" in answer
    ingress.answer(waiting, body=b"still here")
    assert bystander.answer()[::2] == (200, b"still here")
    ingress.assert_router_connection_held()


#: (name, message fields, whether the message itself is rejected: None when either
#: the message's decoding or the HTTP writing may be what refuses it).
MALFORMED: list[tuple[str, dict[str, Any], bool | None]] = [
    ("properties-list", {"subject": "200", "properties": ["a", "b"]}, True),
    ("properties-string", {"subject": "200", "properties": "x-a: 1"}, True),
    ("status-text", {"subject": "fine"}, True),
    ("status-1xx", {"subject": "101"}, None),
    ("header-line-break", {"subject": "200", "properties": {"x-a": "1\r\nx-injected: 2"}}, None),
    ("header-name-not-token", {"subject": "200", "properties": {"bad name": "1"}}, None),
    ("body-list", {"subject": "200", "body": [1, 2]}, True),
]


@pytest.mark.parametrize(
    ("fields", "rejected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_response_is_502_for_its_client_only(
    harness: Harness, fields: dict[str, Any], rejected: bool | None
) -> None:
    """A malformed response message: its client gets 502, the failure is logged once, and
    the router connection and a bystander go on."""
    ingress = Ingress(harness)
    bystander = Client(ingress.port, "/bystander")
    bystander.start()
    waiting = ingress.request(1)
    for number in (2, 3):
        victim = Client(ingress.port, "/victim")
        victim.start()
        got = ingress.request(number)
        ingress.send_raw(encoded({"body": b"x", **fields}, got.reply_to, got.correlation_id))
        status, _, body = victim.answer()
        assert status == 502, body
        assert body.startswith(b"Bad Gateway: ")
        assert b"x-injected" not in body.split(b"\n", 1)[0] or b"\r\n" not in body
    if rejected:
        ingress.peer.wait_until(
            lambda events: (
                sum(
                    1
                    for e in events
                    if isinstance(e, Outcome)
                    and e.link == ingress.replies
                    and e.state == Delivery.REJECTED
                )
                == 2
            )
        )
    ingress.answer(waiting, body=b"still here")
    assert bystander.answer()[::2] == (200, b"still here")
    ingress.assert_router_connection_held()
    log = ingress.daemon.log()
    assert len(re.findall(r"WARNING tunnel\.peers: .*amqp:web", log)) == 1, log


def test_garbage_response_bytes_are_settled_and_the_connection_holds(harness: Harness) -> None:
    """Bytes that are no message are settled and dropped (proton reads most of them as an
    empty message, which nobody awaits); the next good response answers the client."""
    ingress = Ingress(harness)
    client = Client(ingress.port, "/x")
    client.start()
    got = ingress.request(1)
    ingress.send_raw(b"\x00\x53\x77\xa1\xffnot a message")
    ingress.send_raw(b"\x00\x53\x73\xd0\xff\xff\xff\xff\x00")
    ingress.answer(got, body=b"good")
    assert client.answer()[::2] == (200, b"good")
    ingress.peer.wait_until(
        lambda events: (
            sum(1 for e in events if isinstance(e, Outcome) and e.link == ingress.replies) == 3
        )
    )
    ingress.assert_router_connection_held()


# -- 3. write backpressure ----------------------------------------------------------
def _read_response(sock: socket.socket, buffer: bytearray) -> int:
    """Read one response with a Content-Length off ``sock``; its status."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed before a response"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    match = re.search(rb"\r\ncontent-length: (\d+)\r\n", head)
    assert match, head
    total = end + int(match.group(1))
    while len(buffer) < total:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed within a response"
        buffer += chunk
    del buffer[:total]
    return int(head.split(b" ", 2)[1])


def test_pipelining_client_that_never_reads_is_paused(harness: Harness) -> None:
    """300 pipelined GETs of 1 MiB from a client that reads nothing: the ingress sends the
    next request only as the client reads, so its memory stays flat; then all 300 arrive."""
    ingress = Ingress(harness)
    body = bytes(MIB)
    stop = threading.Event()

    def egress() -> None:
        answered: list[Received] = []
        while not stop.is_set():
            try:
                ingress.peer.wait_until(
                    lambda _: len(ingress.requests()) > len(answered), timeout=0.5
                )
            except TimeoutError:
                continue
            for got in ingress.requests()[len(answered) :]:
                ingress.answer(got, body=body)
                answered.append(got)

    responder = threading.Thread(target=egress, daemon=True)
    responder.start()
    try:
        before = ingress.rss_kib()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        harness.sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", ingress.port))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n" * 300)
        ingress.daemon.wait_log(r"does not read its answers as fast: its next request waits")
        sent = len(ingress.requests())
        assert sent < 10, f"{sent} requests forwarded for a client that reads nothing"
        grown = (ingress.rss_kib() - before) / 1024
        assert grown < 32, f"RSS grew {grown:.0f} MiB"
        buffer = bytearray()
        statuses = [_read_response(sock, buffer) for _ in range(300)]
        assert statuses == [200] * 300
        assert len(ingress.requests()) == 300
    finally:
        stop.set()
        responder.join(5)


# -- 4. deadlines -----------------------------------------------------------------
def test_trickled_head_gets_408_within_its_deadline(harness: Harness) -> None:
    """A head sent one byte at a time gets 408 when its total deadline (here the 2 s request
    timeout) is up, however often bytes come."""
    ingress = Ingress(harness, "--http-timeout", "2")
    head = b"GET /slow HTTP/1.1\r\nHost: svc\r\nX-Filler: " + b"a" * 1000
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=20) as sock:
        answer = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # closed on us: the answer is in
            sock.settimeout(0.05)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        sock.settimeout(20)
        with _ResetIsAnEnd():
            while chunk := sock.recv(65536):
                answer += chunk
    elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"the request head did not arrive within 2 s" in answer
    assert 1.5 < elapsed < 6, elapsed
    assert not ingress.requests()


class _ResetIsAnEnd:
    """A reset after the answer ends the reading as a close does."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return isinstance(exc[1], ConnectionResetError)


def test_stalled_upload_gets_408_within_its_deadline(harness: Harness) -> None:
    """An upload that stops mid-body gets 408 when the request timeout is up, and no
    message leaves for it."""
    ingress = Ingress(harness, "--http-timeout", "2")
    start = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=20) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        with _ResetIsAnEnd():
            while chunk := sock.recv(65536):
                answer += chunk
    elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"the request body did not arrive within 2 s" in answer
    assert 1.5 < elapsed < 6, elapsed
    served(ingress, "/after", 1)
    assert len(ingress.requests()) == 1


# -- 5. Host --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("svc", True),
        ("svc:8080", True),
        ("my-svc.ns.svc.cluster.local:80", True),
        ("127.0.0.1", True),
        ("[::1]:8080", True),
        ("[fe80::1]", True),
        ("x%41y", True),
        ("", True),
        ("x/admin", False),
        ("x:80/admin", False),
        ("x?a=1", False),
        ("x#f", False),
        ("user@x", False),
        ("x:8o", False),
        ("[::1", False),
        ("[nothex]", False),
        ("[::1]x", False),
        ("[fe80::1%eth0]", False),
        ("x y", False),
        ("x\\admin", False),
        ("caf\xe9", False),
    ],
)
def test_valid_host_is_rfc9110_uri_host_and_port(host: str, valid: bool) -> None:
    assert valid_host(host) is valid


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /public/page HTTP/1.1\r\nHost: x/admin",
        b"GET http://x/admin/public/page HTTP/1.1\r\nHost: svc",  # fine: the URL's own path
        b"GET http://x@evil/public/page HTTP/1.1\r\nHost: svc",
        b"GET public/page HTTP/1.1\r\nHost: svc",
    ],
    ids=["host-path", "absolute-form", "userinfo", "relative-target"],
)
def test_host_rewrites_the_path_is_400(harness: Harness, request_line: bytes) -> None:
    """A Host (or absolute-form authority) that is not host[:port], or a target that is not
    a path, is 400 and never becomes a message; a proper absolute-form URL is forwarded."""
    ingress = Ingress(harness)
    if b"x/admin/public" in request_line:
        client_answer: list[bytes] = []
        thread = threading.Thread(
            target=lambda: client_answer.append(
                raw(ingress.port, request_line + b"\r\nConnection: close\r\n\r\n")
            ),
            daemon=True,
        )
        thread.start()
        got = ingress.request(1)
        assert got.message is not None and got.message.address == "x/admin/public/page"
        ingress.answer(got)
        thread.join(20)
        assert client_answer and client_answer[0].startswith(b"HTTP/1.1 200 ")
        return
    answer = raw(ingress.port, request_line + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    served(ingress, "/after", 1)
    assert len(ingress.requests()) == 1


# -- 6. both framings --------------------------------------------------------------
def test_both_framings_close_after_the_answer(harness: Harness) -> None:
    """Content-Length and Transfer-Encoding: the body is read chunked, and the connection
    closes after its answer, even though the client asked for keep-alive."""
    ingress = Ingress(harness)
    result: list[bytes] = []
    request = (
        b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    thread = threading.Thread(target=lambda: result.append(raw(ingress.port, request)), daemon=True)
    thread.start()
    got = ingress.request(1)
    assert got.data == b"hello"
    ingress.answer(got, body=b"done")
    thread.join(20)
    assert result, "the connection stayed open after the answer"
    assert result[0].startswith(b"HTTP/1.1 200 "), result
    assert b"\r\nconnection: close\r\n" in result[0].lower()
    assert result[0].endswith(b"\r\n\r\ndone")


# -- 7. head size --------------------------------------------------------------------
def test_complete_head_over_64k_is_431(harness: Harness) -> None:
    """A 70 KB field that arrives whole in one read is refused like an incomplete one."""
    ingress = Ingress(harness)
    answer = raw(
        ingress.port, b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    served(ingress, "/after", 1)
    assert len(ingress.requests()) == 1


# -- 8. arbitrary response messages ------------------------------------------------
_int64 = st.integers(-(2**63), 2**63 - 1)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _int64,
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(["caf\xe9", "r\xe9sum\xe9", "caf\u00c3\u00a9", "\u2603", "a\r\nb: c", ""]),
)
_properties = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(st.text(max_size=12), st.sampled_from(["set-cookie", "content-length", "host"])),
        st.one_of(_scalars, st.lists(st.text(max_size=12), max_size=3)),
        max_size=6,
    ),
    st.lists(st.text(max_size=8), max_size=3),
    st.text(max_size=20),
    _int64,
)
_subjects = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.integers(-1000, 1000).map(str),
    st.sampled_from(["200", "101", "103", "204", "304", "599", "600", "99", " 200", "2e2"]),
)
_bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.text(max_size=50),
    _int64,
    st.lists(_int64, max_size=3),
    st.dictionaries(st.text(max_size=4), _int64, max_size=3),
)


@st.composite
def _responses(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    fields = {
        "subject": draw(_subjects),
        "properties": draw(_properties),
        "content_type": draw(st.one_of(st.none(), st.text(max_size=20))),
        "body": draw(_bodies),
    }
    flips = draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3))
    return fields, flips


def test_arbitrary_response_messages_never_stop_the_ingress(harness: Harness) -> None:
    """Whatever response messages arrive (random status subjects, application-property
    shapes, non-ASCII values, bodies, flipped bytes), each client gets an HTTP answer, the
    router connection holds, and another client is served afterwards."""
    ingress = Ingress(harness, "--http-timeout", "5")
    count = itertools.count(1)

    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_responses())
    def check(case: tuple[dict[str, Any], list[tuple[int, int]]]) -> None:
        fields, flips = case
        client = Client(ingress.port, "/fuzz")
        client.start()
        got = ingress.request(next(count))
        data = bytearray(encoded(fields, got.reply_to, got.correlation_id))
        for offset, xor in flips:
            data[offset % len(data)] ^= xor
        ingress.send_raw(bytes(data))
        # Whether or not that one answered the request, this one can.
        fallback = Message(
            address=got.reply_to, correlation_id=got.correlation_id, subject="200", body=b"fb"
        )
        ingress.send_raw(fallback.encode())
        status, _, _ = client.answer()
        assert 200 <= status <= 599
        ingress.assert_router_connection_held()

    check()
    examples = next(count)
    assert examples > 50, f"only {examples - 1} examples ran"
    served(ingress, "/after", examples)
    ingress.assert_router_connection_held()


# -- 2, end to end: a real backend behind a real egress --------------------------------
async def test_non_ascii_backend_header_end_to_end_spares_bystanders(tmp_path: Path) -> None:
    """The issue's case through both processes: a backend's latin-1 and UTF-8 header bytes
    reach the client unchanged, while a bystander's request on the same router connection,
    in flight meanwhile, is answered too."""
    with backend() as server:
        egress = TunnelProcess(
            [
                "--listen",
                "amqp://127.0.0.1:0",
                f"amqp:web=>http:127.0.0.1:{server.server_address[1]}",
            ],
            tmp_path / "egress.log",
        )
        ingress: TunnelProcess | None = None
        try:
            amqp_port = await egress.amqp_port()
            config = write_connect_json(
                tmp_path / "connect.json",
                {"scheme": "amqp", "host": "127.0.0.1", "port": amqp_port},
            )
            ingress = TunnelProcess(
                ["--config", str(config), "http:127.0.0.1:0=>amqp:web"], tmp_path / "ingress.log"
            )
            port = await ingress.listen_port()
            await ingress.wait_for(r"router amqp://\S+ connected")
            bystander = Client(port, "/pause")
            bystander.start()
            await asyncio.to_thread(server.paused.wait, 10)
            answer = await asyncio.to_thread(
                raw, port, b"GET /latin1 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert b'\r\ncontent-disposition: attachment; filename="r\xe9sum\xe9.pdf"\r\n' in answer
            assert b"\r\nx-utf8: caf\xc3\xa9\r\n" in answer
            status, _, body = await asyncio.to_thread(bystander.answer)
            assert (status, body) == (200, b"after a pause")
            assert "connection lost" not in ingress.log(), ingress.log()
            assert "Traceback" not in ingress.log(), ingress.log()
            assert await asyncio.to_thread(ingress.stop) == 0, ingress.log()
            assert await asyncio.to_thread(egress.stop) == 0, egress.log()
        finally:
            if ingress is not None:
                ingress.kill()
            egress.kill()
