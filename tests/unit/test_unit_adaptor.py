"""The TCP-adaptor dialect against a scripted skupper-router (protocols.md §4, §8.2).

The far end is proton's own connection playing the router's part: it gives
the listener its reply address and streaming credit, sends counter-streams
and client streams with the §4 header (encoded here with proton, not with
the code under test), acknowledges with received offsets and settles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from proton import Condition, Data, Delivery, Described, Endpoint, Link
from unit_harness import ADDRESS, RESET, FarEnd, Side

from tunnel.adaptor_wire import CONTENT_TYPE, STREAMING_DELIVERIES, STREAMING_LINKS, StreamHeader
from tunnel.amqp.handles import Delivery as DeliveryHandle
from tunnel.amqp.handles import capabilities
from tunnel.connection import Connection, Phase
from tunnel.dialects.carrier import Failure
from tunnel.dialects.tcp_adaptor import ACK_EVERY, WINDOW, StreamDispatcher, TcpAdaptorCarrier

ROUTER = {"product": "skupper-router", "version": "3.5.1"}


def phase(side: Side) -> Phase:
    return side.conn.phase


def far_header(
    to: str,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    content_type: str = CONTENT_TYPE,
) -> bytes:
    """A stream header as skrouterd 3.5.1 writes it (content-type a str8)."""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(0x73)
    data.put_list()
    data.enter()
    data.put_null()
    data.put_null()
    data.put_string(to)
    data.put_null()
    for value in (reply_to, correlation_id, content_type):
        if value is None:
            data.put_null()
        else:
            data.put_string(value)
    data.exit()
    data.exit()
    data.put_described()
    data.enter()
    data.put_ulong(0x74)
    data.put_map()
    data.enter()
    data.put_string("V")
    data.put_uint(1)
    data.exit()
    data.exit()
    data.put_described()
    data.enter()
    data.put_ulong(0x77)
    data.put_null()
    data.exit()
    return bytes(data.encode())


def split_stream(buf: bytes) -> tuple[list[object], bytes]:
    """A stream's three header sections, decoded by proton, and the raw octets after them."""
    sections: list[object] = []
    offset = 0
    for _ in range(3):
        data = Data()
        offset += data.decode(buf[offset:])
        data.rewind()
        data.next()
        sections.append(data.get_object())
    return sections, buf[offset:]


@dataclass
class Stream:
    """What the far end has read of one of our streams."""

    link: Link
    data: bytearray = field(default_factory=bytearray)
    delivery: Delivery | None = None

    def read(self) -> Delivery:
        if self.delivery is None:
            self.delivery = self.link.current
        delivery = self.delivery
        assert delivery is not None
        if not delivery.aborted and delivery.pending and self.link.current == delivery:
            self.data += self.link.recv(delivery.pending) or b""
        return delivery

    def octets(self) -> bytes:
        return split_stream(bytes(self.data))[1]


@dataclass
class Listener:
    """Our listener (ingress) carrier, its stream to the far end, the far end's way back."""

    far: FarEnd
    side: Side
    carrier: TcpAdaptorCarrier
    reply: Link
    reply_to: str
    stream: Stream
    counter: Delivery | None = None

    def pump(self) -> Delivery:
        self.far.pump()
        delivery = self.stream.read()
        self.far.pump()
        return delivery

    def counter_stream(self, first: bytes = b"") -> None:
        self.counter = self.reply.delivery("counter")
        self.reply.send(far_header(self.reply_to) + first)

    def back(self, data: bytes) -> None:
        self.reply.send(data)


def make_listener(*, credit: int = 1, max_frame_size: int | None = None) -> Listener:
    far = (
        FarEnd(properties=ROUTER, offered=(STREAMING_LINKS,))
        if max_frame_size is None
        else FarEnd(properties=ROUTER, offered=(STREAMING_LINKS,), max_frame_size=max_frame_size)
    )
    dispatcher = StreamDispatcher(far.session, lambda *args: None, lambda address: None)
    name = "listener-1"
    carrier = TcpAdaptorCarrier.listener(far.port, dispatcher, name, ADDRESS)
    side = Side(Connection(name, carrier, now=0.0, open_timeout=5.0))
    side.conn.on_tcp_connected(side.tcp)
    far.pump()
    (reply,) = far.new_links()
    assert reply.is_sender and reply.remote_source.dynamic
    reply_to = far.answer_dynamic(reply)
    far.pump()
    (link,) = far.new_links()
    assert link.is_receiver and link.remote_target.address == ADDRESS
    far.answer_mirror(link)
    link.flow(credit)
    far.pump()
    listener = Listener(far, side, carrier, reply, reply_to, Stream(link))
    if credit:
        listener.stream.read()
    return listener


def test_the_listener_stream_header_and_capability() -> None:
    t = make_listener()
    assert STREAMING_DELIVERIES in capabilities(t.stream.link.remote_target)
    sections, rest = split_stream(bytes(t.stream.data))
    properties, app, body = sections
    assert isinstance(properties, Described) and properties.descriptor == 0x73
    fields = properties.value
    assert isinstance(fields, list)
    assert fields[2] == ADDRESS and fields[4] == t.reply_to and fields[5] == "listener-1"
    assert fields[6] == CONTENT_TYPE
    assert isinstance(app, Described) and app.value == {"V": 1}
    assert isinstance(body, Described) and body.value is None
    assert rest == b""
    assert t.stream.link.current is not None and t.stream.link.current.partial


def test_first_bytes_wait_for_the_counter_stream() -> None:
    t = make_listener()
    assert t.side.tcp.reading is True  # one read is taken before the far end is there
    t.side.data(b"early")
    assert t.side.conn.parked and t.side.tcp.reading is False
    t.pump()
    assert t.stream.octets() == b""  # nothing before the far end is there
    t.counter_stream(b"banner")
    t.pump()
    assert t.side.conn.phase is Phase.OPEN and t.side.tcp.written == b"banner"
    assert t.stream.octets() == b"early" and t.side.tcp.reading is True


def test_no_counter_stream_then_the_open_timeout() -> None:
    t = make_listener()
    t.side.conn.on_deadline(5.0)
    assert t.side.conn.failure is Failure.NO_CREDIT and t.side.tcp.was_reset
    delivery = t.pump()
    assert delivery.aborted
    for link in (t.stream.link, t.reply):
        assert link.remote_condition is not None and link.remote_condition.name == RESET


def test_no_streaming_credit_then_the_open_timeout() -> None:
    t = make_listener(credit=0)
    t.side.data(b"x")
    t.far.pump()
    assert t.stream.link.current is None
    t.side.conn.on_deadline(5.0)
    assert phase(t.side) is Phase.CLOSED and t.side.conn.failure is Failure.NO_CREDIT


def test_half_close_each_way_then_settled() -> None:
    t = make_listener()
    t.counter_stream()
    t.pump()
    t.side.data(b"request")
    t.side.fin()
    ours = t.pump()
    assert t.stream.octets() == b"request" and not ours.partial
    t.back(b"response")
    t.pump()
    assert t.side.tcp.written == b"response" and not t.side.tcp.eof
    t.reply.advance()  # the far end's FIN
    t.pump()
    assert t.side.tcp.log == ["write", "eof"]
    assert t.counter is not None and t.counter.remote_state == Delivery.ACCEPTED
    assert t.side.conn.phase is Phase.OPEN  # our stream is not settled yet
    ours.update(Delivery.ACCEPTED)
    ours.settle()
    t.pump()
    assert phase(t.side) is Phase.CLOSED and t.side.conn.failure is None
    assert t.side.tcp.log == ["write", "eof", "close"]


def test_the_far_end_fin_first() -> None:
    t = make_listener()
    t.counter_stream(b"bye")
    t.reply.advance()
    t.pump()
    assert t.side.tcp.log == ["write", "eof"] and t.side.conn.phase is Phase.OPEN
    t.side.data(b"after your fin")
    t.side.fin()
    ours = t.pump()
    assert t.stream.octets() == b"after your fin"
    ours.update(Delivery.ACCEPTED)
    ours.settle()
    t.pump()
    assert phase(t.side) is Phase.CLOSED and t.side.conn.failure is None


def test_rst_aborts_our_stream_and_fails_theirs() -> None:
    t = make_listener()
    t.counter_stream(b"x")
    t.pump()
    t.side.rst()
    ours = t.pump()
    assert ours.aborted
    assert t.counter is not None and t.counter.remote_state == Delivery.MODIFIED
    assert t.counter.remote.failed
    for link in (t.stream.link, t.reply):
        assert link.remote_condition is not None and link.remote_condition.name == RESET


def test_the_far_end_aborting_its_stream_resets() -> None:
    t = make_listener()
    t.counter_stream(b"partial")
    t.pump()
    assert t.counter is not None
    t.counter.abort()
    t.pump()
    assert t.side.conn.failure is Failure.FAR_END and t.side.tcp.was_reset
    assert t.side.tcp.log == ["write", "reset"]


def test_the_far_end_settling_its_stream_unfinished_resets() -> None:
    # The router's own way when its TCP side is reset (protocols.md §4.4).
    t = make_listener()
    t.counter_stream(b"partial")
    t.pump()
    assert t.counter is not None
    t.counter.update(Delivery.MODIFIED)
    t.counter.settle()  # settled before its final transfer: not a FIN
    t.pump()
    assert t.side.conn.failure is not None and t.side.tcp.was_reset
    assert not t.side.tcp.eof


def test_the_far_end_settling_our_stream_unfinished_resets() -> None:
    t = make_listener()
    t.counter_stream()
    ours = t.pump()
    ours.settle()  # no outcome, our stream not ended: §4.4's disconnect
    t.pump()
    assert t.side.conn.failure is Failure.NOT_ACCEPTED and t.side.tcp.was_reset


@pytest.mark.parametrize(
    "outcome", [Delivery.RELEASED, Delivery.MODIFIED, Delivery.REJECTED], ids=str
)
def test_our_stream_not_accepted_resets(outcome: int) -> None:
    t = make_listener()
    t.counter_stream()
    ours = t.pump()
    ours.update(outcome)
    ours.settle()
    t.pump()
    assert t.side.conn.failure is Failure.NOT_ACCEPTED and t.side.tcp.was_reset


@pytest.mark.parametrize("error", [None, "amqp:internal-error"], ids=["clean", "error"])
def test_the_far_end_detaching_our_stream_resets(error: str | None) -> None:
    t = make_listener()
    t.counter_stream()
    t.pump()
    if error is not None:
        t.stream.link.condition = Condition(error, "gone")
    t.stream.link.close()
    t.pump()
    assert t.side.conn.failure is Failure.FAR_END and t.side.tcp.was_reset
    assert t.reply.remote_condition is not None and t.reply.remote_condition.name == RESET


def test_the_window_holds_our_stream_until_the_far_end_acknowledges() -> None:
    t = make_listener()
    t.counter_stream()
    t.pump()
    chunk = b"z" * (256 * 1024)
    for _ in range(5):  # 1.25 MiB, past the 1 MiB window
        t.side.data(chunk)
    ours = t.pump()
    assert len(t.stream.octets()) == WINDOW and t.side.conn.parked
    assert t.side.tcp.reading is False
    header = len(t.stream.data) - WINDOW
    ours.local.section_number = 0
    ours.local.section_offset = header + WINDOW // 2
    ours.update(Delivery.RECEIVED)
    t.pump()
    assert len(t.stream.octets()) == 5 * len(chunk) and not t.side.conn.parked


def test_an_acknowledgement_past_what_was_framed_opens_nothing() -> None:
    t = make_listener()
    t.counter_stream()
    ours = t.pump()
    ours.local.section_number = 0
    ours.local.section_offset = 10**12  # a lie
    ours.update(Delivery.RECEIVED)
    t.pump()
    assert t.carrier.peer_acked <= t.carrier.sent
    assert t.carrier.room() >= WINDOW - (t.carrier.sent - t.carrier.peer_acked)


def test_we_acknowledge_what_we_wrote_and_not_while_paused() -> None:
    t = make_listener()
    t.counter_stream()
    t.pump()
    t.back(b"a" * (3 * ACK_EVERY))
    t.pump()
    assert t.counter is not None and t.counter.remote_state == Delivery.RECEIVED
    assert t.counter.remote.section_offset == 3 * ACK_EVERY
    t.side.conn.on_tcp_write_paused()
    t.back(b"b" * (2 * ACK_EVERY))
    t.pump()
    assert len(t.side.tcp.written) == 5 * ACK_EVERY  # written, but not acknowledged
    assert t.counter.remote.section_offset == 3 * ACK_EVERY
    t.side.conn.on_tcp_write_resumed()
    t.pump()
    assert t.counter.remote.section_offset == 5 * ACK_EVERY


def test_a_stream_in_frames_smaller_than_its_header() -> None:
    t = make_listener(max_frame_size=512)
    t.counter_stream()
    payload = bytes(range(256)) * 400
    t.back(payload)
    t.side.data(payload[::-1])
    t.pump()
    assert t.side.tcp.written == payload and t.stream.octets() == payload[::-1]


def test_a_counter_stream_with_another_content_type_is_refused() -> None:
    t = make_listener()
    t.counter = t.reply.delivery("counter")
    t.reply.send(far_header(t.reply_to, content_type="text/plain") + b"x")
    t.pump()
    assert t.counter.remote_state == Delivery.REJECTED
    assert t.side.conn.failure is Failure.PROTOCOL and t.side.tcp.was_reset


# -- the connector: a client stream arriving for one of our egress addresses --------
@dataclass
class Egress:
    far: FarEnd
    dispatcher: StreamDispatcher
    consumer: Link
    ready: list[str] = field(default_factory=list)
    sides: list[Side] = field(default_factory=list)
    refuse: bool = False

    def on_client_stream(
        self, address: str, delivery: DeliveryHandle, header: StreamHeader
    ) -> TcpAdaptorCarrier | None:
        if self.refuse or address != ADDRESS:
            return None
        name = header.correlation_id or "stream"
        carrier = TcpAdaptorCarrier.connector(
            self.far.port, self.dispatcher, name, delivery, header
        )
        self.sides.append(Side(Connection(name, carrier)))
        return carrier


def make_egress() -> Egress:
    far = FarEnd(properties=ROUTER, offered=(STREAMING_LINKS,))
    egress = Egress.__new__(Egress)
    egress.far, egress.ready, egress.sides, egress.refuse = far, [], [], False
    egress.dispatcher = StreamDispatcher(far.session, egress.on_client_stream, egress.ready.append)
    egress.dispatcher.consume(ADDRESS)
    far.pump()
    (consumer,) = far.new_links()
    assert consumer.is_sender and consumer.remote_source.address == ADDRESS
    far.answer_mirror(consumer)
    far.pump()
    egress.consumer = consumer
    return egress


def test_the_consumer_link_is_ready_with_credit() -> None:
    egress = make_egress()
    assert egress.ready == [ADDRESS] and egress.consumer.credit == 64


def test_a_client_stream_is_answered_once_the_backend_connects() -> None:
    egress = make_egress()
    client = egress.consumer.delivery("c1")
    egress.consumer.send(far_header(ADDRESS, "reply-x", "corr-1") + b"hello")
    egress.far.pump()
    (side,) = egress.sides
    assert egress.far.new_links() == [] and side.conn.phase is Phase.OPENING
    side.conn.on_tcp_connected(side.tcp)  # the backend answers: early bytes first
    assert side.tcp.written == b"hello"
    egress.far.pump()
    (back,) = egress.far.new_links()
    assert back.is_receiver and back.remote_target.address == "reply-x"
    assert STREAMING_DELIVERIES in capabilities(back.remote_target)
    assert client.remote_state == Delivery.RECEIVED  # the first acknowledgement
    egress.far.answer_mirror(back)
    back.flow(1)
    egress.far.pump()
    assert phase(side) is Phase.OPEN
    side.data(b"world")
    egress.far.pump()
    stream = Stream(back)
    ours = stream.read()
    sections, octets = split_stream(bytes(stream.data))
    properties = sections[0]
    assert isinstance(properties, Described) and isinstance(properties.value, list)
    assert properties.value[2] == "reply-x"
    assert octets == b"world"
    egress.consumer.advance()  # the client's FIN
    egress.far.pump()
    assert side.tcp.eof and client.remote_state == Delivery.ACCEPTED and client.settled
    side.fin()
    egress.far.pump()
    stream.read()
    assert not ours.partial
    ours.update(Delivery.ACCEPTED)
    ours.settle()
    egress.far.pump()
    assert phase(side) is Phase.CLOSED and side.conn.failure is None and side.tcp.closed


def test_a_backend_that_never_answers_fails_the_client_stream() -> None:
    egress = make_egress()
    client = egress.consumer.delivery("c1")
    egress.consumer.send(far_header(ADDRESS, "reply-x", "corr-1") + b"hello")
    egress.far.pump()
    (side,) = egress.sides
    side.conn.reset("backend unreachable", Failure.BACKEND)
    egress.far.pump()
    assert client.remote_state == Delivery.MODIFIED and client.remote.failed


@pytest.mark.parametrize(
    ("header", "outcome"),
    [
        (far_header(ADDRESS, None, "c"), Delivery.REJECTED),
        (far_header("elsewhere", "reply-x", "c"), Delivery.RELEASED),
        (far_header(ADDRESS, "reply-x", "c", content_type="text/plain"), Delivery.RELEASED),
        (b"\x00Sw\xa1\x05hello", Delivery.REJECTED),
    ],
    ids=["no-reply-to", "unknown-address", "other-content-type", "not-a-stream"],
)
def test_client_streams_we_cannot_take_are_refused(header: bytes, outcome: int) -> None:
    egress = make_egress()
    client = egress.consumer.delivery("c1")
    egress.consumer.send(header)
    if outcome == Delivery.REJECTED and header.startswith(b"\x00Sw"):
        egress.consumer.advance()
    egress.far.pump()
    assert client.remote_state == outcome and egress.sides == []
    assert egress.consumer.state & Endpoint.REMOTE_ACTIVE  # the consumer link goes on
