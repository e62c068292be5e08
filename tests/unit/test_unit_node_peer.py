"""Our link-route ingress against a scripted far end: a node proxy behind a router.

The far end is proton's own connection, answering as a router and a node
egress would: the dynamic reply address from the router, the routed attach
answered by rhea with null termini and no capabilities, and whatever credit,
outcome or detach a test needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from proton import Condition, Data, Delivery, Endpoint, Link, Message, symbol
from unit_harness import (
    ADDRESS,
    RESET,
    FarEnd,
    MemoryPort,
    QuietHandler,
    Side,
    bodies,
    body_of,
    message,
    read_messages,
    send_message,
)

from tunnel.amqp.handles import capabilities, handle
from tunnel.connection import Connection, Open, Phase
from tunnel.dialects.carrier import Failure
from tunnel.dialects.link_route import MAX_MESSAGE_SIZE, LinkRouteCarrier
from tunnel.wire import HALF_CLOSE


@dataclass
class NodeTunnel:
    far: FarEnd
    side: Side
    #: The far end's receiver of our routed sender, and its sender on our reply link.
    routed: Link
    reply: Link
    reply_to: str

    def pump(self) -> None:
        self.far.pump()


def phase(side: Side) -> Phase:
    return side.conn.phase


def node_tunnel(
    *,
    credit: int = 10,
    half_close: bool = False,
    max_frame_size: int | None = None,
    reply_credit: bool = True,
) -> NodeTunnel:
    far = FarEnd() if max_frame_size is None else FarEnd(max_frame_size=max_frame_size)
    name = "10.0.0.2:5000@site@t-1"
    carrier = LinkRouteCarrier.ingress(far.port, name, far.session, ADDRESS, window=2)
    side = Side(Connection(name, carrier, now=0.0, open_timeout=5.0))
    side.conn.on_tcp_connected(side.tcp)
    far.handler.sides.append(side)
    far.pump()
    (reply,) = far.new_links()
    assert reply.is_sender and reply.remote_source.dynamic
    reply_to = far.answer_dynamic(reply)
    far.pump()
    (routed,) = far.new_links()
    assert routed.is_receiver and routed.remote_target.address == ADDRESS
    assert routed.remote_source.address == reply_to
    if half_close:
        far.answer_mirror(routed)
        routed.target.capabilities.put_array(False, Data.SYMBOL)
        routed.target.capabilities.enter()
        routed.target.capabilities.put_symbol(symbol("tunnel:half-close"))
        routed.target.capabilities.exit()
    else:
        far.answer_bare(routed)
    if credit:
        routed.flow(credit)
    far.pump()
    if reply_credit:
        assert reply.credit == 2  # our window, granted once TCP is there
    return NodeTunnel(far, side, routed, reply, reply_to)


def test_null_termini_and_no_capabilities_are_an_attach() -> None:
    t = node_tunnel()
    carrier = t.side.conn.carrier
    assert isinstance(carrier, LinkRouteCarrier)
    assert carrier.sender_ready and not carrier.peer_half_close
    assert t.side.conn.phase is Phase.OPEN
    t.side.data(b"hello node")
    t.pump()
    (msg,) = read_messages(t.routed)
    assert body_of(msg) == b"hello node" and msg.reply_to == t.reply_to
    send_message(t.reply, message(b"hello client"), "r1")
    t.pump()
    assert t.side.tcp.written == b"hello client"


def test_a_data_section_body_is_taken_too() -> None:
    t = node_tunnel()
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(0x75)
    data.put_binary(b"as data")
    data.exit()
    send_message(t.reply, bytes(data.encode()), "r1")
    t.pump()
    assert t.side.tcp.written == b"as data"


def test_credit_zero_forever_then_the_open_timeout() -> None:
    t = node_tunnel(credit=0)
    t.side.data(b"nobody listens")
    t.pump()
    assert t.side.conn.phase is Phase.OPENING and t.routed.current is None
    t.side.conn.on_deadline(5.0)
    assert t.side.conn.failure is Failure.NO_CREDIT and t.side.tcp.was_reset
    t.pump()
    for link in (t.routed, t.reply):
        assert link.state & Endpoint.REMOTE_CLOSED
        assert link.remote_condition is not None and link.remote_condition.name == RESET


def test_credit_that_comes_late_still_carries_the_first_bytes() -> None:
    t = node_tunnel(credit=0)
    t.side.data(b"first")
    t.pump()
    t.routed.flow(1)
    t.pump()
    assert bodies(t.routed) == [b"first"]
    assert t.side.conn.phase is Phase.OPEN


def test_far_end_detach_with_an_error_resets() -> None:
    t = node_tunnel()
    t.routed.condition = Condition("amqp:internal-error", "backend exploded")
    t.routed.close()
    t.pump()
    assert t.side.conn.failure is Failure.FAR_END and t.side.tcp.was_reset
    assert t.reply.remote_condition is not None and t.reply.remote_condition.name == RESET


def test_far_end_detach_without_an_error_is_the_node_egress_end() -> None:
    t = node_tunnel()
    send_message(t.reply, message(b"last words"), "r1")
    t.pump()
    t.routed.close()  # the node egress's backend closed: it closes both links
    t.reply.close()
    t.pump()
    assert t.side.tcp.log == ["write", "eof"]
    assert t.side.conn.failure is None and t.side.conn.open == Open.READ
    t.side.fin()
    t.pump()
    assert t.side.conn.phase is Phase.CLOSED and t.side.conn.failure is None
    assert t.side.tcp.closed and not t.side.tcp.was_reset


def test_far_end_detach_without_an_error_with_bytes_unacknowledged_resets() -> None:
    t = node_tunnel()
    t.side.data(b"never settled")
    t.pump()
    t.routed.close()
    t.pump()
    assert t.side.conn.failure is Failure.FAR_END and t.side.tcp.was_reset


def test_reply_link_detach_without_an_error_ends_our_write_side() -> None:
    t = node_tunnel()
    t.reply.close()
    t.pump()
    assert t.side.tcp.eof and t.side.conn.phase is Phase.OPEN
    t.side.data(b"still going up")
    t.pump()
    assert bodies(t.routed) == [b"still going up"]


@pytest.mark.parametrize(
    ("outcome", "failed"),
    [(Delivery.RELEASED, False), (Delivery.MODIFIED, True), (Delivery.REJECTED, False)],
    ids=["released", "modified", "rejected"],
)
def test_an_outcome_other_than_accepted_resets(outcome: int, failed: bool) -> None:
    t = node_tunnel()
    t.side.data(b"refuse me")
    t.pump()
    delivery = t.routed.current
    assert delivery is not None
    t.routed.recv(delivery.pending)
    t.routed.advance()
    if failed:
        delivery.local.failed = True
    if outcome == Delivery.REJECTED:
        delivery.local.condition = Condition("amqp:not-allowed", "no")
    delivery.update(outcome)
    delivery.settle()
    t.pump()
    assert t.side.conn.failure is Failure.NOT_ACCEPTED and t.side.tcp.was_reset
    for link in (t.routed, t.reply):
        assert link.remote_condition is not None and link.remote_condition.name == RESET


def test_received_then_accepted_is_no_failure() -> None:
    t = node_tunnel()
    t.side.data(b"slowly")
    t.pump()
    delivery = t.routed.current
    assert delivery is not None
    delivery.local.section_number = 0
    delivery.local.section_offset = 3
    delivery.update(Delivery.RECEIVED)
    t.pump()
    assert t.side.conn.failure is None
    read_messages(t.routed)
    t.pump()
    assert t.side.conn.failure is None and t.side.conn.phase is Phase.OPEN


def test_our_fin_to_a_node_proxy_is_a_detach_once_all_is_settled() -> None:
    t = node_tunnel()
    t.side.data(b"query")
    t.side.fin()
    t.pump()
    assert not t.routed.state & Endpoint.REMOTE_CLOSED  # our delivery is not settled yet
    assert bodies(t.routed) == [b"query"]
    t.pump()
    assert t.routed.state & Endpoint.REMOTE_CLOSED and t.routed.remote_condition is None
    send_message(t.reply, message(b"answer"), "r1")
    t.pump()
    assert t.side.tcp.written == b"answer" and t.side.conn.phase is Phase.OPEN
    t.reply.close()
    t.pump()
    assert t.side.tcp.log == ["write", "eof", "close"]
    assert phase(t.side) is Phase.CLOSED and t.side.conn.failure is None


def test_the_end_of_stream_marker_from_a_half_close_far_end() -> None:
    t = node_tunnel(half_close=True)
    carrier = t.side.conn.carrier
    assert isinstance(carrier, LinkRouteCarrier) and carrier.peer_half_close
    send_message(t.reply, message(b"bye"), "r1")
    send_message(t.reply, message(b"", eos=True), "r2")
    t.pump()
    assert t.side.tcp.log == ["write", "eof"]
    t.side.fin()
    t.pump()
    msgs = read_messages(t.routed)
    assert [m.properties for m in msgs] == [{"tunnel:eos": True}]
    t.pump()
    assert t.side.conn.phase is Phase.CLOSED and t.side.conn.failure is None


def test_data_after_the_marker_is_a_protocol_reset() -> None:
    t = node_tunnel(half_close=True)
    send_message(t.reply, message(b"", eos=True), "r1")
    send_message(t.reply, message(b"too late"), "r2")
    t.pump()
    assert t.side.conn.failure is Failure.PROTOCOL and t.side.tcp.was_reset
    assert t.side.tcp.log == ["eof", "reset"]


def test_an_undecodable_message_is_rejected_and_resets() -> None:
    t = node_tunnel()
    delivery = send_message(t.reply, bytes(Message(body=[1, 2, 3]).encode()), "r1")
    t.pump()
    assert delivery.remote_state == Delivery.REJECTED
    assert t.side.conn.failure is Failure.PROTOCOL and t.side.tcp.was_reset


def test_a_node_far_end_closing_its_connection_finishes_the_tunnel() -> None:
    t = node_tunnel()
    t.far.peer.connection.close()
    t.pump()
    assert t.side.conn.phase is Phase.CLOSED and t.side.conn.failure is None
    assert t.side.tcp.closed and not t.side.tcp.was_reset


def test_a_half_close_far_end_closing_its_connection_is_a_failure() -> None:
    t = node_tunnel(half_close=True)
    t.far.peer.connection.close()
    t.pump()
    assert t.side.conn.failure is Failure.FAR_END and t.side.tcp.was_reset


def test_a_message_larger_than_max_frame_is_reassembled() -> None:
    t = node_tunnel(max_frame_size=512)
    payload = random.Random(3).randbytes(100_000)
    send_message(t.reply, message(payload), "r1")
    t.side.data(payload[:70_000])
    t.pump()
    assert t.side.tcp.written == payload
    assert bodies(t.routed) == [payload[:70_000]]


def test_a_message_larger_than_our_own_deliveries_is_reassembled() -> None:
    # Past the buffer sized for our 128 KiB deliveries: it grows, nothing is lost.
    t = node_tunnel(max_frame_size=4096)
    payload = random.Random(4).randbytes(1_000_000)
    send_message(t.reply, message(payload), "r1")
    t.pump()
    assert t.side.tcp.written == payload and t.side.conn.failure is None


@pytest.mark.parametrize("over", [1, 1024 * 1024], ids=["by-the-last-transfer", "by-earlier-ones"])
def test_a_message_over_the_size_limit_resets_and_writes_nothing_of_it(over: int) -> None:
    t = node_tunnel(max_frame_size=65536)
    send_message(t.reply, message(bytes(MAX_MESSAGE_SIZE + over)), "r1")
    t.pump()
    assert t.side.conn.failure is Failure.PROTOCOL and t.side.tcp.was_reset
    assert t.side.tcp.written == b""


def test_a_slow_reader_grants_no_more_credit_until_resumed() -> None:
    t = node_tunnel()
    t.side.conn.on_tcp_write_paused()
    for n in range(2):
        send_message(t.reply, message(b"%d" % n), f"r{n}")
    t.pump()
    assert t.reply.credit == 0 and t.side.tcp.written == b"01"
    t.pump()
    assert t.reply.credit == 0
    t.side.conn.on_tcp_write_resumed()
    t.pump()
    assert t.reply.credit == 2


def test_a_paused_reader_keeps_the_far_sender_waiting() -> None:
    t = node_tunnel()
    t.side.conn.on_tcp_write_paused()
    for n in range(3):
        send_message(t.reply, message(b"x"), f"r{n}")
    t.pump()
    assert t.side.tcp.written == b"xx" and t.reply.queued == 1
    assert t.side.conn.failure is None
    t.side.conn.on_tcp_write_resumed()
    t.pump()
    assert t.side.tcp.written == b"xxx" and t.reply.queued == 0


def _phase_of_deadline(t: NodeTunnel) -> Phase:
    t.side.conn.on_deadline(10.0)
    return phase(t.side)


def test_open_with_credit_is_not_cut_by_the_deadline() -> None:
    t = node_tunnel()
    assert _phase_of_deadline(t) is Phase.OPEN


def test_a_far_end_aborting_a_message_resets_and_writes_nothing_of_it() -> None:
    t = node_tunnel(max_frame_size=512)
    delivery = t.reply.delivery("r1")
    t.reply.send(message(b"q" * 5000)[:3000])  # part of a message, in several frames
    t.pump()
    assert t.side.tcp.written == b""
    delivery.abort()
    t.pump()
    assert t.side.tcp.written == b""
    assert t.side.conn.failure is not None and t.side.tcp.was_reset


# -- our egress behind a link route, reached by a node ingress --------------------
class RoutedEgress(QuietHandler):
    """What RouterConnection does with a routed attach: a reply sender and an egress carrier."""

    def __init__(self, port: MemoryPort) -> None:
        super().__init__()
        self.port = port

    def on_link_attach(self, link: Link) -> None:
        assert link.is_receiver and link.remote_target.address == ADDRESS
        sender = link.session.sender(f"{link.name}/reply")
        reply_to = link.remote_source.address
        assert reply_to is not None
        sender.target.address = reply_to
        sender.open()
        carrier = LinkRouteCarrier.egress(
            self.port, link.name, handle(link), handle(sender), window=2
        )
        self.sides.append(Side(Connection(link.name, carrier)))


@dataclass
class NodeIngress:
    far: FarEnd
    side: Side
    routed: Link  # the node ingress's sender, routed to us
    reply: Link  # its dynamic receiver, which our reply sender reaches


def node_ingress(*, half_close: bool = False) -> NodeIngress:
    far = FarEnd()
    handler = RoutedEgress(far.port)
    far.handler = handler
    session = far.peer.connection.session()
    session.open()
    routed = session.sender("10.0.0.3:6000@node-site")
    routed.target.address = ADDRESS
    routed.source.address = "node-reply-1"
    if half_close:
        routed.source.capabilities.put_array(False, Data.SYMBOL)
        routed.source.capabilities.enter()
        routed.source.capabilities.put_symbol(symbol("tunnel:half-close"))
        routed.source.capabilities.exit()
    routed.open()
    far.pump()
    (side,) = handler.sides
    # Answered at once with the first window, while the backend connects.
    assert routed.state & Endpoint.REMOTE_ACTIVE and routed.credit == 2
    (reply,) = far.new_links()
    assert reply.is_receiver and reply.remote_target.address == "node-reply-1"
    far.answer_bare(reply)
    reply.flow(10)
    far.pump()
    side.conn.on_tcp_connected(side.tcp)
    far.pump()
    assert routed.state & Endpoint.REMOTE_ACTIVE and routed.credit == 2
    return NodeIngress(far, side, routed, reply)


def test_a_node_ingress_reaches_our_egress() -> None:
    t = node_ingress()
    send_message(t.routed, message(b"from node"), "m1")
    t.side.data(b"to node")
    t.far.pump()
    assert t.side.tcp.written == b"from node"
    assert bodies(t.reply) == [b"to node"]
    assert HALF_CLOSE in capabilities(t.routed.remote_target)  # offered, not taken up


def test_the_backend_fin_ends_the_whole_tunnel_towards_a_node_ingress() -> None:
    t = node_ingress()
    t.side.fin()
    t.far.pump()
    assert t.routed.state & Endpoint.REMOTE_CLOSED and t.routed.remote_condition is None
    assert t.reply.state & Endpoint.REMOTE_CLOSED and t.reply.remote_condition is None
    assert phase(t.side) is Phase.CLOSED and t.side.conn.failure is None
    assert t.side.tcp.closed and not t.side.tcp.was_reset


def test_a_node_ingress_detaching_cleanly_ends_the_tunnel() -> None:
    t = node_ingress()
    send_message(t.routed, message(b"last"), "m1")
    t.routed.close()
    t.far.pump()
    assert t.side.tcp.written == b"last"
    assert phase(t.side) is Phase.CLOSED and t.side.conn.failure is None
    assert t.side.tcp.closed and not t.side.tcp.was_reset


def test_a_half_close_ingress_gets_the_marker_from_our_egress() -> None:
    t = node_ingress(half_close=True)
    t.side.data(b"bye")
    t.side.fin()
    t.far.pump()
    msgs = read_messages(t.reply)
    assert [body_of(m) for m in msgs] == [b"bye", b""]
    assert msgs[1].properties == {"tunnel:eos": True}
    assert phase(t.side) is Phase.OPEN and not t.routed.state & Endpoint.REMOTE_CLOSED
