"""The HTTP bridges' messages, field by field against protocols.md §2.1-2.2.

An independent proton reactor peer plays the router and, for each side,
the node proxy at the other end: it reads every field of what the daemon
sends and answers with messages shaped as skupper-proxy shapes them
(multi-valued headers as lists, content type as a symbol).
"""

from __future__ import annotations

import http.client
import json
import threading

import pytest
from http_backend import backend
from proton import Delivery, Message, symbol, ulong
from reactor_peer import (
    Attached,
    Daemon,
    Harness,
    Outcome,
    Policy,
    Received,
    RouterPeer,
    free_port,
)

pytestmark = pytest.mark.timeout(60)

LISTENING = r"listening on 127\.0\.0\.1:(\d+)"
CONNECTED = r"router amqp://127\.0\.0\.1:\d+ connected"


class Client(threading.Thread):
    """One HTTP request from a thread, so that the test can play the far end meanwhile."""

    def __init__(
        self, port: int, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> None:
        super().__init__(daemon=True)
        self.args = (port, method, path, body, headers)
        self.status = 0
        self.headers: http.client.HTTPMessage | None = None
        self.body = b""

    def run(self) -> None:
        port, method, path, body, headers = self.args
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        self.status, self.headers, self.body = response.status, response.msg, response.read()
        conn.close()

    def answer(self) -> tuple[int, http.client.HTTPMessage, bytes]:
        self.join(30)
        assert self.headers is not None, "no answer"
        return self.status, self.headers, self.body


def start_ingress(
    harness: Harness, policy: Policy, *args: str, connected: str = CONNECTED
) -> tuple[RouterPeer, int]:
    """An HTTP ingress for 'web' connected to a peer, and the port it serves HTTP on."""
    peer = harness.peer(policy)
    daemon = harness.daemon(peer, *args, "http:127.0.0.1:0=>amqp:web")
    port = int(daemon.wait_log(LISTENING).group(1))
    daemon.wait_log(connected)
    return peer, port


def test_ingress_request_message_fields(harness: Harness) -> None:
    """A request becomes the §2.1 message; a node-style response becomes the HTTP answer."""
    peer, port = start_ingress(
        harness, Policy(dynamic_addresses=["reply-7"]), "--site-id", "site-a"
    )
    client = Client(
        port,
        "POST",
        "/items?id=3",
        b"hello",
        [
            ("Host", "myservice:8080"),
            ("Content-Type", "text/plain"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
            ("Connection", "keep-alive"),
        ],
    )
    client.start()

    got = peer.wait_for(Received, lambda r: r.link == "site-a-http-web")
    message = got.message
    assert message is not None
    sender = peer.wait_for(Attached, lambda a: a.name == "site-a-http-web")
    assert sender.daemon_role == "sender" and sender.target.address == "web"
    replies = peer.wait_for(Attached, lambda a: a.daemon_role == "receiver" and a.source.dynamic)
    assert message.address == "myservice/items?id=3"
    assert message.subject == "POST"
    assert message.content_type == "text/plain"
    assert isinstance(message.content_type, symbol)
    # Every other end-to-end header, names in lower case, values simple strings;
    # Connection describes the hop, not the request. Content-Length is the body's
    # own, which a node egress needs to frame the request.
    assert message.properties == {
        "host": "myservice:8080",
        "x-multi": "a, b",
        "content-length": "5",
    }
    assert message.group_id == "site-a"
    assert message.correlation_id == 1
    assert message.reply_to == "reply-7"
    assert got.is_value_binary and got.data == b"hello"
    assert not got.settled_on_arrival

    peer.send(
        replies.name,
        Message(
            address="reply-7",
            correlation_id=ulong(1),
            subject="201",
            content_type=symbol("application/json"),
            group_id="site-b",
            properties={"set-cookie": ["a=1", "b=2"], "x-answer": "yes"},
            body=b'{"id": 3}',
        ),
    )
    status, headers, body = client.answer()
    assert status == 201
    assert headers.get_all("set-cookie") == ["a=1", "b=2"]
    assert headers["x-answer"] == "yes"
    assert headers["content-type"] == "application/json"
    assert body == b'{"id": 3}'
    outcome = peer.wait_for(Outcome, lambda o: o.link == replies.name)
    assert outcome.state == Delivery.ACCEPTED


def test_http_is_the_same_through_skupper_router(harness: Harness) -> None:
    """With a skupper-router 3.x (TCP adaptor dialect, qd.streaming-links offered), HTTP still
    travels as ordinary messages: same links, same fields."""
    peer, port = start_ingress(
        harness,
        Policy(dynamic_addresses=["r-0", "r-1"], product=("skupper-router", "3.5.1")),
        "--site-id",
        "site-a",
        connected=r"connected \(skupper-router 3\.5\.1\): tcp-adaptor dialect",
    )
    client = Client(port, "GET", "/x", b"", [("Host", "svc")])
    client.start()
    got = peer.wait_for(Received, lambda r: r.link == "site-a-http-web")
    assert got.message is not None
    assert (got.message.address, got.message.subject) == ("svc/x", "GET")
    replies = [
        a
        for a in peer.events()
        if isinstance(a, Attached) and a.daemon_role == "receiver" and a.source.dynamic
    ]
    peer.send(
        replies[-1].name,
        Message(address=got.reply_to, correlation_id=got.correlation_id, subject="204", body=None),
    )
    status, _, body = client.answer()
    assert (status, body) == (204, b"")


def test_ingress_retries_released_and_modified(harness: Harness) -> None:
    """Released and modified requests are sent again, same correlation id, until one is taken."""
    policy = Policy(
        dynamic_addresses=["reply-1"], outcomes={"web": [Delivery.RELEASED, Delivery.MODIFIED]}
    )
    peer, port = start_ingress(harness, policy, "--site-id", "site-a")
    client = Client(port, "GET", "/", b"", [("Host", "svc")])
    client.start()
    peer.wait_until(lambda _: len(peer.received("site-a-http-web")) == 3)
    copies = peer.received("site-a-http-web")
    assert {c.correlation_id for c in copies} == {1}
    replies = peer.wait_for(Attached, lambda a: a.daemon_role == "receiver" and a.source.dynamic)
    peer.send(
        replies.name,
        Message(address="reply-1", correlation_id=ulong(1), subject="200", body=b"third time"),
    )
    assert client.answer()[::2] == (200, b"third time")


def test_ingress_rejected_is_502_with_the_error(harness: Harness) -> None:
    """A rejected request is not retried: the client gets 502 naming the rejection."""
    peer, port = start_ingress(harness, Policy(outcomes={"web": [Delivery.REJECTED]}))
    client = Client(port, "GET", "/", b"", [("Host", "svc")])
    client.start()
    status, _, body = client.answer()
    assert status == 502
    assert b"rejected the request (amqp:internal-error: refused by the test)" in body
    assert len([e for e in peer.events() if isinstance(e, Received)]) == 1


def test_ingress_without_consumer_is_504_and_never_sent_later(harness: Harness) -> None:
    """No credit (nobody consumes the address): 504 naming that, and the request is not
    sent when credit comes after the client was answered."""
    peer, port = start_ingress(
        harness, Policy(credit=0), "--site-id", "site-a", "--http-timeout", "1"
    )
    client = Client(port, "GET", "/", b"", [("Host", "svc")])
    client.start()
    status, _, body = client.answer()
    assert status == 504
    assert b"no consumer of amqp:web took the request within 1 s" in body
    peer.flow("site-a-http-web", 10)
    client = Client(port, "GET", "/second", b"", [("Host", "svc")])
    client.start()
    got = peer.wait_for(Received, lambda r: r.link == "site-a-http-web")
    assert got.message is not None and got.message.address == "svc/second"
    replies = peer.wait_for(Attached, lambda a: a.daemon_role == "receiver" and a.source.dynamic)
    peer.send(
        replies.name,
        Message(
            address=got.reply_to, correlation_id=got.correlation_id, subject="200", body=b"second"
        ),
    )
    assert client.answer()[::2] == (200, b"second")
    assert len(peer.received("site-a-http-web")) == 1


def start_egress(
    harness: Harness, backend_port: int, *args: str
) -> tuple[RouterPeer, Daemon, Attached]:
    """An HTTP egress for 'web' connected to a peer, and the consumer link it attached."""
    peer = harness.peer(Policy())
    daemon = harness.daemon(peer, *args, f"amqp:web=>http:127.0.0.1:{backend_port}")
    consumer = peer.wait_for(
        Attached, lambda a: a.daemon_role == "receiver" and a.source.address == "web"
    )
    daemon.wait_log(r"consuming 'web'")
    return peer, daemon, consumer


def test_egress_response_message_fields(harness: Harness) -> None:
    """A §2.2 request reaches the backend; the response goes to reply_to before the accept."""
    with backend() as server:
        peer, _, consumer = start_egress(harness, server.server_address[1], "--site-id", "site-b")
        responses = peer.wait_for(
            Attached, lambda a: a.daemon_role == "sender" and a.target.address is None
        )
        peer.send(
            consumer.name,
            Message(
                address="svc/headers?q=1",
                subject="GET",
                group_id="site-a",
                properties={"x-multi": ["a", "b"], "host": "svc:80", "x-single": "1"},
                correlation_id=ulong(7),
                reply_to="reply-9",
                body=None,
            ),
        )
        got = peer.wait_for(Received, lambda r: r.link == responses.name)
        outcome = peer.wait_for(Outcome, lambda o: o.link == consumer.name)

    message = got.message
    assert message is not None
    assert message.address == "reply-9"
    assert message.correlation_id == 7
    assert message.subject == "200"
    assert message.content_type == "application/json"
    assert message.group_id == "site-b"
    properties: dict[str, object] = message.properties or {}
    assert all(isinstance(v, str) for v in properties.values())
    assert got.is_value_binary
    assert properties["content-length"] == str(len(got.data))
    seen = json.loads(got.data)
    assert seen["path"] == "/headers?q=1"
    assert seen["headers"]["x-multi"] == ["a", "b"]
    assert seen["headers"]["host"] == ["svc:80"]
    assert seen["headers"]["x-single"] == ["1"]
    assert outcome.state == Delivery.ACCEPTED and outcome.settled
    events = peer.events()
    assert events.index(got) < events.index(outcome), "accepted before the response was sent"


def test_egress_backend_down_is_modified(harness: Harness) -> None:
    """A backend that cannot be reached: the request is settled MODIFIED and nothing is sent."""
    peer, _, consumer = start_egress(harness, free_port())
    peer.send(
        consumer.name,
        Message(
            address="svc/", subject="GET", correlation_id=ulong(1), reply_to="reply-1", body=b""
        ),
    )
    outcome = peer.wait_for(Outcome, lambda o: o.link == consumer.name)
    assert outcome.state == Delivery.MODIFIED
    assert not [e for e in peer.events() if isinstance(e, Received)]


def test_egress_rejects_a_message_that_is_not_a_request(harness: Harness) -> None:
    """No method in the subject: REJECTED, naming the field, and the backend is not called."""
    peer, daemon, consumer = start_egress(harness, free_port())
    peer.send(
        consumer.name,
        Message(address="svc/", correlation_id=ulong(1), reply_to="reply-1", body=b""),
    )
    outcome = peer.wait_for(Outcome, lambda o: o.link == consumer.name)
    assert outcome.state == Delivery.REJECTED
    assert outcome.why == "subject None is not an HTTP method"  # on the wire, not just logged
    assert "subject None is not an HTTP method" in daemon.log()
