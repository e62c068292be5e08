"""The engine's own defences against a hostile AMQP peer, in memory.

Each test pumps our server-side engine against a proton peer that opens too
much, sends past its credit, or asks for a heartbeat storm, and checks what
the peer is told and that everything else goes on.
"""

from __future__ import annotations

import struct

import pytest
from memory_pump import Peer, begin_frame, feed, pump, remote_error, transfer_frame
from proton import Condition, Endpoint, Link

from tunnel.amqp.engine import AmqpEngine, EngineOptions, set_owner
from tunnel.amqp.handles import ACCEPTED, Delivery
from tunnel.amqp.handles import Link as LinkHandle
from tunnel.peer_text import PEER_LOG

# A message whose only section is amqp-value "x": enough for proton to count a delivery.
MESSAGE = b"\x00Sw\xa1\x01x"


class Owner:
    """A link owner that reads and accepts each delivery, or fails on purpose."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.received: list[bytes] = []
        self.closed = False
        self.failed: str | None = None

    def on_link_opened(self, link: LinkHandle) -> None:
        pass

    def on_link_flow(self, link: LinkHandle) -> None:
        pass

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        if self.fail:
            raise RuntimeError("owner bug")
        self.received.append(bytes(link.recv(1024)))
        delivery.finish(ACCEPTED)

    def on_link_closed(self, link: LinkHandle) -> None:
        self.closed = True

    def on_link_failed(self, link: LinkHandle, condition: Condition) -> None:
        self.failed = str(condition.name)


class Handler:
    """Accepts every link the peer attaches, granting ``credit``."""

    def __init__(self, credit: int = 2, fail: bool = False) -> None:
        self.credit = credit
        self.fail = fail
        self.links: list[Link] = []
        self.owners: list[Owner] = []

    def on_connection_opened(self) -> None:
        pass

    def on_connection_closed(self, condition: Condition | None) -> None:
        pass

    def on_link_attach(self, link: Link) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        owner = Owner(fail=self.fail and not self.owners)
        set_owner(link, owner)
        link.open()
        if link.is_receiver:
            link.flow(self.credit)
        self.links.append(link)
        self.owners.append(owner)

    def on_transport_error(self, condition: Condition | None) -> None:
        pass


def _connected(max_links: int = 64, **peer_options: float) -> tuple[AmqpEngine, Handler, Peer]:
    engine = AmqpEngine(EngineOptions(server=True, max_links=max_links))
    handler = Handler()
    peer = Peer()
    for name, value in peer_options.items():
        setattr(peer.transport, name, value)
    peer.connection.open()
    pump(engine, handler, peer)
    return engine, handler, peer


def _sender(peer: Peer, name: str) -> Link:
    session = peer.connection.session()
    session.open()
    link = session.sender(name)
    link.target.address = "echo"
    link.open()
    return link


def test_attach_flood_is_closed_with_resource_limit_exceeded() -> None:
    engine, handler, peer = _connected(max_links=10)
    session = peer.connection.session()
    session.open()
    for n in range(11):
        link = session.receiver(f"flood-{n}")
        link.source.address = "echo"
        link.open()
    pump(engine, handler, peer)
    assert len(handler.links) == 10
    assert remote_error(peer.connection) == "amqp:resource-limit-exceeded"
    assert "10 links" in str(getattr(peer.connection.remote_condition, "description", ""))
    assert engine.finished


def test_freed_links_no_longer_count_towards_the_limit() -> None:
    engine, handler, peer = _connected(max_links=4)
    session = peer.connection.session()
    session.open()
    for n in range(12):
        link = session.receiver(f"churn-{n}")
        link.source.address = "echo"
        link.open()
        pump(engine, handler, peer)
        link.close()
        pump(engine, handler, peer)
    assert len(handler.links) == 12
    assert peer.connection.remote_condition is None
    assert not engine.finished


def test_session_flood_is_closed_with_resource_limit_exceeded() -> None:
    engine, handler, peer = _connected(max_links=4)
    assert peer.transport.remote_channel_max == 3  # our Open says so
    for _ in range(3):
        peer.connection.session().open()
    pump(engine, handler, peer)
    assert peer.connection.remote_condition is None
    # proton keeps within channel-max; a hostile peer need not.
    for channel in range(3, 8):
        feed(engine, handler, begin_frame(channel))
    pump(engine, handler, peer)
    assert remote_error(peer.connection) in {
        "amqp:resource-limit-exceeded",
        "amqp:connection:framing-error",
    }
    assert engine.finished


def test_transfer_beyond_credit_closes_the_link() -> None:
    engine, handler, peer = _connected()
    sender = _sender(peer, "greedy")
    bystander = _sender(peer, "bystander")
    pump(engine, handler, peer)
    assert sender.credit == 2
    owner = handler.owners[0]
    # Two transfers within credit, then a burst past it, written as frames
    # since proton would never send them.
    delivery_id = 0
    for _ in range(2):
        feed(engine, handler, transfer_frame(0, 0, delivery_id, MESSAGE))
        delivery_id += 1
    assert len(owner.received) == 2
    for _ in range(4):
        feed(engine, handler, transfer_frame(0, 0, delivery_id, MESSAGE))
        delivery_id += 1
    pump(engine, handler, peer)
    assert len(owner.received) == 2
    assert remote_error(sender) == "amqp:link:transfer-limit-exceeded"
    assert owner.failed == "amqp:link:transfer-limit-exceeded"  # not a clean end
    assert peer.connection.remote_condition is None
    delivery = bystander.delivery("b")
    bystander.send(MESSAGE)
    bystander.advance()
    pump(engine, handler, peer)
    assert handler.owners[1].received == [MESSAGE]
    assert delivery.remote_state == ACCEPTED


def test_an_owner_exception_is_contained_to_its_link(caplog: pytest.LogCaptureFixture) -> None:
    engine = AmqpEngine(EngineOptions(server=True))
    handler = Handler(fail=True)
    peer = Peer()
    peer.connection.open()
    pump(engine, handler, peer)
    broken, healthy = _sender(peer, "broken"), _sender(peer, "healthy")
    pump(engine, handler, peer)
    for link in (broken, broken, healthy):
        link.delivery(f"{link.name}-{link.unsettled}")
        link.send(MESSAGE)
        link.advance()
    pump(engine, handler, peer)
    assert remote_error(broken) == "amqp:internal-error"
    assert handler.owners[0].failed == "amqp:internal-error"
    assert handler.owners[1].received == [MESSAGE]
    assert peer.connection.state & Endpoint.REMOTE_ACTIVE
    assert peer.connection.remote_condition is None
    errors = [r for r in caplog.records if "contained" in r.getMessage()]
    assert len(errors) == 1, "logged once, not per event"


def test_a_one_millisecond_idle_timeout_is_refused() -> None:
    engine, _, peer = _connected(idle_timeout=0.002)  # proton announces half: 1 ms
    assert remote_error(peer.connection) == "amqp:resource-limit-exceeded"
    assert "idle-time-out" in str(getattr(peer.connection.remote_condition, "description", ""))
    assert engine.finished


def test_a_one_second_idle_timeout_is_kept() -> None:
    _, _, peer = _connected(idle_timeout=2.0)
    assert peer.connection.remote_condition is None
    assert peer.connection.state & Endpoint.REMOTE_ACTIVE


def test_a_peer_refused_again_is_counted_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    before = PEER_LOG.suppressed["amqp:resource-limit-exceeded"]
    for _ in range(3):
        _connected(idle_timeout=0.002)  # the same container id each time
    said = [r for r in caplog.records if "idle-time-out" in r.getMessage()]
    assert len(said) <= 1
    assert PEER_LOG.suppressed["amqp:resource-limit-exceeded"] >= before + 2


@pytest.mark.parametrize("header", [b"AMQP\x00\x01\x00\x00", b"AMQP\x03\x01\x00\x00"])
def test_a_peer_gone_before_its_open_is_finished_at_once(header: bytes) -> None:
    engine = AmqpEngine(EngineOptions(server=True))
    handler = Handler()
    feed(engine, handler, header + struct.pack(">IBBH", 64, 2, 0, 0) + b"\x00\x53")
    engine.eof_in()
    engine.run_events(handler)
    while engine.bytes_to_send() is not None:
        pass
    assert engine.finished
