"""The HTTP/2 stream core in memory: real h2 connections pumped into each other, no sockets.

A client talks to the ingress's h2 server, whose :class:`Stream` sends
messages (encoded and decoded on the way, as on the wire) to the egress's
:class:`Stream`, whose h2 client talks to a backend. The first-message
handshake is the bridges' business and is skipped: both streams are made
knowing each other's address.
"""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame
from proton import Message, ulong

from tunnel import http2_message as m
from tunnel.codec import WireError
from tunnel.http2_egress import GoawayFilter
from tunnel.http2_glue import h2_config, local_settings
from tunnel.http2_stream import MAX_IN, STREAM_WINDOW, Over, Stream

REQUEST = [(":method", "POST"), (":path", "/svc/Call"), (":scheme", "http"), (":authority", "b")]


class MemorySide:
    """A :class:`~tunnel.http2_stream.Side` whose messages wait in a list for the pump."""

    def __init__(self, client: bool) -> None:
        self.h2 = H2Connection(h2_config(client=client))
        self.h2.initiate_connection()
        local_settings(self.h2)
        self.outbox: list[m.StreamMessage] = []
        self.over: list[Stream] = []
        self.stream: Stream | None = None

    def send(self, stream: Stream, message: m.StreamMessage) -> None:
        self.outbox.append(m.decode(m.encode(message)))
        stream.on_outcome(0x24, "")  # accepted at once, as the far side's receiver does

    def on_stream_over(self, stream: Stream) -> None:
        self.over.append(stream)

    def flush_soon(self) -> None:
        pass

    def on_reset_before_far(self, stream: Stream, code: int) -> None:
        raise AssertionError("both ends know each other from the start here")


class World:
    """client <-> ingress ~ messages ~ egress <-> backend."""

    def __init__(self) -> None:
        self.client = H2Connection(H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.backend = H2Connection(H2Configuration(client_side=False))
        self.backend.initiate_connection()
        self.ingress = MemorySide(client=False)
        self.egress = MemorySide(client=True)
        self.client_events: list[Event] = []
        self.backend_events: list[Event] = []
        self.held = False  # the client gives no window back

    def start(self, end_stream: bool = False) -> int:
        """A request from the client; returns its stream id at the backend."""
        self.client.send_headers(1, REQUEST, end_stream=end_stream)
        self.pump()
        assert self.ingress.stream is not None and self.egress.stream is not None
        return 1

    def _ingress_event(self, event: Event) -> None:
        side = self.ingress
        if isinstance(event, RequestReceived):
            side.stream = Stream(
                side, stream_id=1, correlation_id=7, group_id="a", reply_to="in", far="out"
            )
            egress = self.egress
            egress.stream = Stream(
                egress, stream_id=1, correlation_id=7, group_id="b", reply_to="out", far="in"
            )
            headers = [(k.decode(), v.decode()) for k, v in event.headers or []]
            first = m.StreamMessage(7, "a", "in", subject="POST", headers=headers)
            egress.stream.on_head([(k.encode(), v.encode()) for k, v in headers], first)
            egress.stream.announce = True
        else:
            _to_stream(side.stream, event)

    def pump(self) -> None:
        for _ in range(10_000):
            moved = self._move_bytes()
            moved = self._move_messages() or moved
            for side in (self.ingress, self.egress):
                if side.stream is not None:
                    side.stream.flush()
            if not moved:
                return
        raise AssertionError("the pump never settled")

    def _move_bytes(self) -> bool:
        moved = False
        for source, sink, on_event in (
            (self.client, self.ingress.h2, self._ingress_event),
            (self.ingress.h2, self.client, self._client_event),
            (self.egress.h2, self.backend, self.backend_events.append),
            (self.backend, self.egress.h2, self._egress_event),
        ):
            data = source.data_to_send()
            if data:
                moved = True
                for event in sink.receive_data(data):
                    on_event(event)
        return moved

    def _client_event(self, event: Event) -> None:
        self.client_events.append(event)
        if isinstance(event, DataReceived) and not self.held:
            self.client.acknowledge_received_data(
                event.flow_controlled_length or 0, event.stream_id or 0
            )

    def _move_messages(self) -> bool:
        moved = False
        for here, there in ((self.ingress, self.egress), (self.egress, self.ingress)):
            outbox, here.outbox = here.outbox, []
            for message in outbox:
                moved = True
                assert there.stream is not None
                if message.subject is not None:
                    head = [(k.encode(), v.encode()) for k, v in message.headers]
                    there.stream.on_head(head, message)
                there.stream.on_message(message)
        return moved

    def _egress_event(self, event: Event) -> None:
        stream = self.egress.stream
        assert stream is not None
        if isinstance(event, ResponseReceived):
            headers = [(k.decode(), v.decode()) for k, v in event.headers or []]
            stream.head_out = m.StreamMessage(7, "b", None, subject=m.RESPONSE, headers=headers)
        else:
            _to_stream(stream, event)

    def client_body(self) -> bytes:
        return b"".join(e.data or b"" for e in self.client_events if isinstance(e, DataReceived))


def _to_stream(stream: Stream | None, event: Event) -> None:
    if stream is None:
        return  # settings and the like, before the stream
    if isinstance(event, DataReceived):
        stream.on_h2_data(event.data or b"", event.flow_controlled_length or 0)
    elif isinstance(event, TrailersReceived):
        stream.on_h2_end([(k.decode(), v.decode()) for k, v in event.headers or []])
    elif isinstance(event, StreamEnded):
        stream.on_h2_end([])
    elif isinstance(event, StreamReset):
        stream.on_h2_reset(int(event.error_code or 0))


def test_a_response_with_trailers_crosses_whole_and_both_streams_end() -> None:
    world = World()
    world.start()
    world.client.send_data(1, b"question", end_stream=True)
    world.pump()
    body = b"".join(e.data or b"" for e in world.backend_events if isinstance(e, DataReceived))
    assert body == b"question"
    world.backend.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    world.backend.send_data(1, b"answer")
    world.backend.send_headers(1, [("grpc-status", "0")], end_stream=True)
    world.pump()
    assert world.client_body() == b"answer"
    trailers = [e for e in world.client_events if isinstance(e, TrailersReceived)]
    assert trailers and trailers[0].headers == [(b"grpc-status", b"0")]
    assert [s.over for s in world.ingress.over + world.egress.over] == [Over.COMPLETED] * 2


def test_a_client_that_reads_nothing_holds_the_backend_at_the_egress_window() -> None:
    world = World()
    world.held = True
    world.start(end_stream=True)
    world.backend.send_headers(1, [(":status", "200")])
    body = bytes(range(256)) * 4096  # 1 MiB
    sent = 0
    while sent < len(body):
        room = min(world.backend.local_flow_control_window(1), 16384, len(body) - sent)
        if room <= 0:
            break
        world.backend.send_data(1, body[sent : sent + room])
        sent += room
        world.pump()
    # The backend is stopped by the egress's window: nothing was acknowledged past it.
    assert sent == STREAM_WINDOW
    ingress = world.ingress.stream
    assert ingress is not None
    assert len(world.client_body()) == 65535  # the client's own window, h2's default
    assert len(ingress.in_pending) == STREAM_WINDOW - 65535


def test_a_client_reset_reaches_the_backend_and_ends_both_streams() -> None:
    world = World()
    world.start()
    world.client.reset_stream(1, ErrorCodes.CANCEL)
    world.pump()
    resets = [e for e in world.backend_events if isinstance(e, StreamReset)]
    assert [r.error_code for r in resets] == [ErrorCodes.CANCEL]
    assert [s.over for s in world.ingress.over + world.egress.over] == [Over.RESET] * 2


def test_a_far_end_past_the_window_is_reset_both_ways() -> None:
    world = World()
    world.start()
    ingress = world.ingress.stream
    assert ingress is not None
    ingress.on_message(m.StreamMessage(7, "b", "out", data=bytes(MAX_IN + 1)))
    world.pump()
    assert ingress.over is Over.RESET
    resets = [e for e in world.client_events if isinstance(e, StreamReset)]
    assert [r.error_code for r in resets] == [ErrorCodes.PROTOCOL_ERROR]
    backend_resets = [e for e in world.backend_events if isinstance(e, StreamReset)]
    assert [r.error_code for r in backend_resets] == [ErrorCodes.PROTOCOL_ERROR]


def test_an_ack_for_more_than_was_sent_is_a_protocol_error() -> None:
    world = World()
    world.start()
    ingress = world.ingress.stream
    assert ingress is not None
    ingress.on_message(m.StreamMessage(7, "b", "out", ack=1))
    assert ingress.over is Over.RESET


def test_messages_round_trip_with_pseudo_headers_and_trailers() -> None:
    message = m.StreamMessage(
        3,
        "site",
        "dyn/1",
        subject="POST",
        headers=[*REQUEST, ("te", "trailers"), ("x-a", "1"), ("x-a", "2"), ("content-type", "t")],
        data=b"body",
        ended=True,
        trailers=[("grpc-status", "0")],
        ack=12,
    )
    decoded = m.decode(m.encode(message))
    assert decoded.headers[:4] == REQUEST
    assert ("te", "trailers") in decoded.headers
    assert ("x-a", "1, 2") in decoded.headers
    assert ("content-type", "t") in decoded.headers
    assert (decoded.data, decoded.ended, decoded.ack) == (b"body", True, 12)
    assert decoded.trailers == [("grpc-status", "0")]
    assert (decoded.correlation_id, decoded.group_id, decoded.reply_to) == (3, "site", "dyn/1")


@pytest.mark.parametrize(
    ("props", "named"),
    [
        ({"ended": "yes"}, "'ended'"),
        ({"tunnel:ack": -1}, "tunnel:ack"),
        ({"tunnel:reset": "x"}, "tunnel:reset"),
        ({":bogus": "1"}, ":bogus"),
        ({"te": "gzip"}, "'te'"),
    ],
)
def test_a_bad_message_is_refused_naming_the_property(props: dict[str, object], named: str) -> None:
    amqp = Message(correlation_id=ulong(1), group_id="s", subject="GET", properties=props)
    with pytest.raises(WireError, match=named):
        m.decode(amqp.encode())


def test_a_message_without_a_stream_number_is_refused() -> None:
    with pytest.raises(WireError, match="not a stream number"):
        m.decode(Message(correlation_id="one", group_id="s").encode())


def _frames() -> tuple[bytes, bytes, bytes]:
    data = DataFrame(1)
    data.data = b"x" * 100
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 1
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    return data.serialize(), goaway.serialize(), ping.serialize()


def test_the_goaway_filter_takes_goaways_out_whatever_the_reads() -> None:
    data, goaway, ping = _frames()
    stream = data + goaway + ping
    for cut in range(1, len(stream)):
        kept = GoawayFilter(lambda: 16384)
        first, taken = kept.feed(stream[:cut])
        rest, more = kept.feed(stream[cut:])
        assert first + rest == data + ping, cut
        assert [g.last_stream_id for g in taken + more] == [1], cut


def test_the_goaway_filter_passes_on_what_is_no_frame_it_may_hold() -> None:
    data, goaway, _ = _frames()
    kept = GoawayFilter(lambda: 64)  # the DATA frame is longer than h2 takes
    out, taken = kept.feed(data[:20])
    rest, more = kept.feed(data[20:] + goaway)
    assert out + rest == data + goaway and not taken + more  # all h2's to refuse
    garbage = GoawayFilter(lambda: 16384)
    out, taken = garbage.feed(b"\x00\x00\x00\x04\x01\x00\x00\x00\x01" + bytes(20))
    assert len(out) == 29 and not taken  # a SETTINGS frame on a stream: h2's to refuse
