"""The daemon's AMQP wire contract, checked by an independent proton reactor peer.

The peer (tests/reactor_peer.py) plays a link-routing router (protocols.md
§1.1-1.6, §8.1): for the egress it answers the ``$management`` link-route
request and then forwards a routed attach as a router would; for the
ingress it plays the router and the far egress at once. The daemon runs as
a real ``python -m tunnel`` subprocess; every byte stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from helpers import eventually
from proton import Delivery, Message
from reactor_peer import (
    EOS_PROPERTY,
    HALF_CLOSE,
    LINK_ROUTE_TYPE,
    MANAGEMENT,
    AttachAnswered,
    Attached,
    Credit,
    Detached,
    Harness,
    Outcome,
    PeerEvent,
    Policy,
    Received,
    RouterPeer,
    free_port,
)

from tunnel.dialects.link_route import START_WINDOW

pytestmark = pytest.mark.timeout(30)

ADDRESS = "echo"
SITE = "SITE"
# A link name as qdrouterd delivers a routed attach: the ingress's name plus "@<container-id>".
ROUTED = "127.0.0.1:40000@site@abc@router-container"
ROUTED_SOURCE = "dyn-1"
INGRESS_DYNAMIC = "dyn-ing-1"
ROUTE_ACTIVE = r"link route for 'echo' active"
LISTENING = r"listening on 127\.0\.0\.1:(\d+)"
CONNECTED = r"router amqp://127\.0\.0\.1:\d+ connected"


def eos_marker() -> Message:
    return Message(body=b"", properties={EOS_PROPERTY: True})


def data_on(peer: RouterPeer, link: str) -> bytes:
    return b"".join(m.data for m in peer.received(link))


def wait_data(peer: RouterPeer, link: str, size: int, timeout: float = 10.0) -> None:
    """Wait until the peer has received ``size`` stream bytes on ``link``."""

    def enough(_events: list[PeerEvent]) -> bool:
        return len(data_on(peer, link)) >= size

    peer.wait_until(enough, timeout)


def wait_detached(peer: RouterPeer, link: str) -> Detached:
    def on_link(detach: Detached) -> bool:
        return detach.link == link

    return peer.wait_for(Detached, on_link)


def recv_until(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def recv_to_eof(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


# -- egress: amqp:echo=>tcp:127.0.0.1:B -----------------------------------------------
def start_egress(harness: Harness, backend_port: int) -> tuple[RouterPeer, Received]:
    """Start peer and daemon; return the peer and the management request it answered."""
    peer = harness.peer(Policy(dynamic_addresses=["dyn-mgmt"]))
    daemon = harness.daemon(peer, f"amqp:{ADDRESS}=>tcp:127.0.0.1:{backend_port}")
    mgmt = peer.wait_for(
        Attached, lambda a: a.daemon_role == "sender" and a.target.address == MANAGEMENT
    )
    request = peer.wait_for(Received, lambda m: m.link == mgmt.name)
    daemon.wait_log(ROUTE_ACTIVE)
    return peer, request


def open_routed_link(peer: RouterPeer) -> tuple[AttachAnswered, Attached]:
    """Forward a routed attach as qdrouterd does; return the answer and the reply-link attach."""
    peer.open_sender(ROUTED, target=ADDRESS, source=ROUTED_SOURCE, source_capabilities=[HALF_CLOSE])
    answer = peer.wait_for(AttachAnswered, lambda a: a.name == ROUTED)
    reply = peer.wait_for(
        Attached, lambda a: a.daemon_role == "sender" and a.target.address == ROUTED_SOURCE
    )
    return answer, reply


def test_egress_requests_connection_scoped_link_route(harness: Harness) -> None:
    """An egress asks $management, from a dynamic reply address, for an 'in' link route."""
    echo = harness.echo()
    peer, request = start_egress(harness, echo.port)

    attaches = [e for e in peer.events() if isinstance(e, Attached)]
    mgmt = [a for a in attaches if a.daemon_role == "sender" and a.target.address == MANAGEMENT]
    replies = [a for a in attaches if a.daemon_role == "receiver" and a.source.dynamic]
    assert len(mgmt) == 1, attaches
    assert len(replies) == 1, attaches
    assert request.link == mgmt[0].name

    assert request.properties == {
        "operation": "CREATE",
        "type": LINK_ROUTE_TYPE,
        "name": ADDRESS,
    }
    assert not request.inferred
    assert request.body == {"pattern": ADDRESS, "direction": "in"}
    assert request.reply_to == "dyn-mgmt"
    assert request.correlation_id is not None
    # The peer answered 201 on the daemon's dynamic receiver link; the daemon accepted it.
    outcome = peer.wait_for(Outcome, lambda o: o.link == replies[0].name)
    assert outcome.state == Delivery.ACCEPTED


def test_egress_answers_routed_attach_and_opens_reply_link(harness: Harness) -> None:
    """A routed attach is answered with mirrored termini plus half-close, and a reply sender."""
    echo = harness.echo()
    peer, _ = start_egress(harness, echo.port)
    answer, reply = open_routed_link(peer)

    assert answer.target.address == ADDRESS
    assert answer.source.address == ROUTED_SOURCE
    assert HALF_CLOSE in answer.target.capabilities
    # The way back targets the address carried in the routed attach's source, on its session.
    assert reply.target.address == ROUTED_SOURCE
    assert reply.session == answer.session
    # Credit for the client's bytes comes once the backend connection exists.
    peer.wait_for(Credit, lambda c: c.link == ROUTED and c.credit > 0)
    asyncio.run(eventually(lambda: echo.accepted == 1, "the backend connection"))


def test_egress_carries_bytes_and_half_close_both_ways(harness: Harness) -> None:
    """Egress data is amqp-value binary both ways; each FIN travels as the eos marker, lossless."""
    echo = harness.echo()
    peer, _ = start_egress(harness, echo.port)
    _, reply = open_routed_link(peer)
    peer.wait_for(Credit, lambda c: c.link == ROUTED and c.credit > 0)

    chunks = [b"hello, ", b"tunnel ", bytes(range(256)) * 1200, b"!" * 70000, b"tail"]
    payload = b"".join(chunks)
    for chunk in chunks:
        peer.send(ROUTED, Message(body=chunk))
    wait_data(peer, reply.name, len(payload), timeout=15)

    echoed = peer.received(reply.name)
    assert all(m.is_value_binary for m in echoed), [(type(m.body), m.inferred) for m in echoed]
    assert not any(m.eos for m in echoed)
    assert not any(m.settled_on_arrival for m in echoed)
    # The egress sets nothing but the body on data messages (protocols.md §1.3).
    assert all(m.reply_to is None and not m.properties for m in echoed)
    assert data_on(peer, reply.name) == payload

    # Our FIN: the daemon must half-close the backend, which answers with its own FIN.
    peer.send(ROUTED, eos_marker())
    marker = peer.wait_for(Received, lambda m: m.link == reply.name and m.eos)
    assert echo.eof_seen.is_set()
    assert marker.is_value_binary
    assert marker.data == b""
    messages = peer.received(reply.name)
    assert messages[-1] == marker
    assert b"".join(m.data for m in messages) == payload

    # Every delivery of ours accepted, then both links end cleanly.
    peer.wait_until(lambda ev: _count(ev, Outcome, ROUTED) >= len(chunks) + 1)
    outcomes = [e for e in peer.events() if isinstance(e, Outcome) and e.link == ROUTED]
    assert all(o.state == Delivery.ACCEPTED for o in outcomes), outcomes
    for name in (ROUTED, reply.name):
        detach = wait_detached(peer, name)
        assert detach.closed
        assert detach.condition is None, detach


def test_egress_backend_refused_detaches_with_error(harness: Harness) -> None:
    """When the backend refuses the connection the routed link is closed with an error naming it.

    The attach is answered at once with one window of credit, so that first
    bytes cross during the connect; no more is granted while it is under way,
    and what was sent meanwhile is refused by the detach, not by an outcome
    that would arrive first and hide the reason.
    """
    dead = free_port()
    peer, _ = start_egress(harness, dead)
    peer.open_sender(ROUTED, target=ADDRESS, source=ROUTED_SOURCE, source_capabilities=[HALF_CLOSE])
    peer.wait_for(Credit, lambda c: c.link == ROUTED and c.credit > 0)
    peer.send(ROUTED, Message(body=b"hello?"))
    detach = wait_detached(peer, ROUTED)
    assert detach.closed
    assert detach.condition == "tunnel:reset", detach
    assert f"backend 127.0.0.1:{dead} unreachable" in (detach.description or ""), detach
    credits = [e.credit for e in peer.events() if isinstance(e, Credit) and e.link == ROUTED]
    assert max(credits) <= START_WINDOW, credits
    assert not [e for e in peer.events() if isinstance(e, Outcome) and e.link == ROUTED]


# -- ingress: tcp:127.0.0.1:0=>amqp:echo ---------------------------------------------
def start_ingress(harness: Harness, policy: Policy) -> tuple[RouterPeer, int]:
    peer = harness.peer(policy)
    daemon = harness.daemon(peer, f"tcp:127.0.0.1:0=>amqp:{ADDRESS}", "--site-id", SITE)
    port = int(daemon.wait_log(LISTENING).group(1))
    daemon.wait_log(CONNECTED)
    return peer, port


def ingress_links(peer: RouterPeer, client: socket.socket) -> tuple[Attached, Attached]:
    """Wait for the daemon's routed sender and the dynamic receiver it replies through.

    The daemon keeps a few dynamic receivers attached ahead of need, so the
    one a tunnel uses is found by the address its sender carries as source.
    """
    sender = peer.wait_for(Attached, lambda a: a.daemon_role == "sender")
    assigned = peer.call(lambda p: {name: link.source.address for name, link in p.links.items()})
    [receiver] = [
        a
        for a in peer.events()
        if isinstance(a, Attached)
        and a.daemon_role == "receiver"
        and assigned.get(a.name) == sender.source.address
    ]
    assert receiver.source.dynamic
    events = peer.events()
    assert events.index(receiver) < events.index(sender)
    assert re.fullmatch(rf"127\.0\.0\.1:\d+@{SITE}@[^@]+", sender.name), sender.name
    assert sender.name.startswith(f"127.0.0.1:{client.getsockname()[1]}@")
    assert sender.target.address == ADDRESS
    assert sender.source.address
    assert HALF_CLOSE in sender.source.capabilities
    return receiver, sender


def test_ingress_carries_bytes_and_half_close_both_ways(harness: Harness) -> None:
    """Ingress sends unsettled amqp-value binary with reply-to; FINs travel as eos markers."""
    peer, port = start_ingress(
        harness,
        Policy(dynamic_addresses=[INGRESS_DYNAMIC], target_capabilities={ADDRESS: (HALF_CLOSE,)}),
    )
    client = harness.client(port)
    receiver, sender = ingress_links(peer, client)

    sent = b""
    for chunk in (b"ping-1 ", b"ping-2 " * 100, bytes(range(256)) * 64):
        client.sendall(chunk)
        sent += chunk
        wait_data(peer, sender.name, len(sent))
    messages = peer.received(sender.name)
    assert data_on(peer, sender.name) == sent
    for message in messages:
        assert message.reply_to == sender.source.address
        assert message.is_value_binary, (type(message.body), message.inferred)
        assert not message.settled_on_arrival
        assert not message.eos

    for message in messages:
        peer.send(receiver.name, Message(body=message.data))
    assert recv_until(client, len(sent)) == sent

    client.shutdown(socket.SHUT_WR)
    marker = peer.wait_for(Received, lambda m: m.link == sender.name and m.eos)
    assert marker.data == b""
    assert marker.is_value_binary
    peer.send(receiver.name, Message(body=b"after-fin"))
    peer.send(receiver.name, eos_marker())
    assert recv_to_eof(client) == b"after-fin"

    for name in (sender.name, receiver.name):
        detach = wait_detached(peer, name)
        assert detach.closed
        assert detach.condition is None, detach
    assert peer.received(sender.name)[-1] == marker


def _fin_taken(admin: str, client: str) -> bool:
    """Whether ``/flows`` shows the open flow of ``client`` with a direction ended."""
    with urllib.request.urlopen(admin + "/flows", timeout=10) as response:  # noqa: S310
        flows = json.loads(response.read())
    return any(
        not (flow["to_peer"]["open"] and flow["from_peer"]["open"])
        for flow in flows["open"]
        if flow["client"] == client
    )


def test_ingress_without_half_close_detaches_after_settlement(harness: Harness) -> None:
    """Towards a node egress a client FIN is a clean detach once every delivery is settled."""
    peer = harness.peer(
        Policy(dynamic_addresses=[INGRESS_DYNAMIC], hold_targets=frozenset({ADDRESS}))
    )
    daemon = harness.daemon(
        peer, f"tcp:127.0.0.1:0=>amqp:{ADDRESS}", "--site-id", SITE, "--admin", "127.0.0.1:0"
    )
    port = int(daemon.wait_log(LISTENING).group(1))
    admin = daemon.wait_log(r"admin endpoint on (http://127\.0\.0\.1:\d+)").group(1)
    daemon.wait_log(CONNECTED)
    client = harness.client(port)
    receiver, sender = ingress_links(peer, client)

    client.sendall(b"request")
    wait_data(peer, sender.name, len(b"request"))
    client.shutdown(socket.SHUT_WR)
    # The ingress has taken our FIN (/flows shows a direction ended) ...
    me = f"127.0.0.1:{client.getsockname()[1]}"
    asyncio.run(eventually(lambda: _fin_taken(admin, me), "the ingress took the FIN"))
    # ... and a tunnel opened after it attaches: the peer has had every frame the
    # FIN could have made the ingress send, a detach included.
    harness.client(port)
    peer.wait_for(Attached, lambda a: a.daemon_role == "sender" and a.name != sender.name)
    assert not any(isinstance(e, Detached) and e.link == sender.name for e in peer.events())
    assert peer.release_held() >= 1

    detach = wait_detached(peer, sender.name)
    assert detach.closed
    assert detach.condition is None, detach
    assert not any(m.eos for m in peer.received(sender.name))
    assert data_on(peer, sender.name) == b"request"

    # The return path still works after our FIN; the far end's detach is its FIN.
    peer.send(receiver.name, Message(body=b"response"))
    assert recv_until(client, len(b"response")) == b"response"
    peer.detach(receiver.name)
    assert recv_to_eof(client) == b""


def test_ingress_resets_client_when_link_detached_with_error(harness: Harness) -> None:
    """A detach with an error condition resets the client's TCP connection (RST, not FIN)."""
    peer, port = start_ingress(
        harness,
        Policy(dynamic_addresses=[INGRESS_DYNAMIC], target_capabilities={ADDRESS: (HALF_CLOSE,)}),
    )
    client = harness.client(port)
    receiver, sender = ingress_links(peer, client)
    client.sendall(b"hello")
    wait_data(peer, sender.name, len(b"hello"))

    peer.detach(sender.name, "amqp:not-found", "no route to the address")
    with pytest.raises(ConnectionResetError):
        while client.recv(65536):
            pass
    # The far end learns of the failure too: the reply link goes with an error.
    detach = wait_detached(peer, receiver.name)
    assert detach.closed
    assert detach.condition is not None, detach


# -- helpers ------------------------------------------------------------------------
def _count(events: list[PeerEvent], kind: type, link: str) -> int:
    return sum(1 for e in events if isinstance(e, kind) and getattr(e, "link", None) == link)


def test_ingress_reads_nothing_until_credit(harness: Harness) -> None:
    """Without credit the ingress leaves the client's bytes in the kernel, unread and unbuffered."""
    peer, port = start_ingress(harness, Policy(dynamic_addresses=[INGRESS_DYNAMIC], credit=0))
    client = harness.client(port)
    ingress_links(peer, client)
    client.setblocking(False)
    block = bytes(1 << 20)
    accepted = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and accepted < 256 << 20:
        try:
            accepted += client.send(block)
        except BlockingIOError:
            time.sleep(0.01)
    # Socket buffers on loopback hold a few MiB; a tunnel that kept reading
    # (and parking) would take all 256 MiB.
    assert accepted < 32 << 20, f"{accepted >> 20} MiB accepted without any credit"
    assert not [r for r in peer.events() if isinstance(r, Received)]


def test_ingress_resets_when_node_egress_connection_is_lost(harness: Harness) -> None:
    """qd:routed-link-lost at the ingress means the egress died: the client gets an RST."""
    peer, port = start_ingress(
        harness, Policy(dynamic_addresses=[INGRESS_DYNAMIC], hold_targets=frozenset({ADDRESS}))
    )
    client = harness.client(port)
    receiver, sender = ingress_links(peer, client)
    client.sendall(b"important request")
    peer.wait_for(Received, lambda m: m.link == sender.name)
    peer.send(receiver.name, Message(body=b"partial-resp"))
    assert recv_until(client, 12) == b"partial-resp"
    peer.detach(sender.name, "qd:routed-link-lost", "Connectivity to the peer container was lost")
    with pytest.raises(ConnectionResetError):
        while client.recv(65536):
            pass


@pytest.mark.parametrize("outcome", [Delivery.RELEASED, Delivery.REJECTED, Delivery.MODIFIED])
def test_ingress_resets_client_on_unaccepted_delivery(harness: Harness, outcome: Any) -> None:
    """A delivery released, rejected or modified resets the client (RST), never a FIN."""
    peer, port = start_ingress(
        harness,
        Policy(
            dynamic_addresses=[INGRESS_DYNAMIC],
            target_capabilities={ADDRESS: (HALF_CLOSE,)},
            hold_targets=frozenset({ADDRESS}),
        ),
    )
    client = harness.client(port)
    _, sender = ingress_links(peer, client)
    client.sendall(b"will not be accepted")
    wait_data(peer, sender.name, 20)

    def refuse(router: RouterPeer) -> None:
        for delivery in router.held:
            delivery.update(outcome)
            delivery.settle()
        router.held.clear()

    peer.call(refuse)
    with pytest.raises(ConnectionResetError):
        while client.recv(65536):
            pass


# -- a router that stalls the link-route request ---------------------------------------
@pytest.mark.parametrize(
    ("policy", "why"),
    [
        (
            Policy(uncredited_targets=frozenset({MANAGEMENT})),
            "no credit from the router on $management",
        ),
        (Policy(management_status=None), "the router has not answered its request"),
    ],
    ids=["no-credit", "no-answer"],
)
def test_a_stalled_link_route_request_is_warned_about_and_shown_in_readiness(
    harness: Harness, policy: Policy, why: str
) -> None:
    """No credit on $management, or a request never answered: a warning naming the address.

    The readiness probe stays 503 and says why, rather than only that the route is missing.
    """
    echo = harness.echo()
    peer = harness.peer(policy)
    daemon = harness.daemon(
        peer, "--admin", "127.0.0.1:0", f"amqp:{ADDRESS}=>tcp:127.0.0.1:{echo.port}"
    )
    base = daemon.wait_log(r"admin endpoint on (http://127\.0\.0\.1:\d+)").group(1)
    warned = daemon.wait_log(rf"link route for '{ADDRESS}' not active: ([^\n]+)")
    assert warned.group(1).startswith(why), warned.group(0)
    try:
        urllib.request.urlopen(base + "/readyz", timeout=10)  # noqa: S310 - loopback
    except urllib.error.HTTPError as error:
        status, body = error.code, json.loads(error.read())
    else:
        raise AssertionError("/readyz answered 200 with the link route not active")
    assert status == 503
    assert any(ADDRESS in item and why in item for item in body["missing"]), body
