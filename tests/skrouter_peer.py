"""A stand-in for skupper-router 3.x's core, built on proton's reactor, for the TCP adaptor dialect.

It accepts any number of AMQP connections (our ingress and our egress
processes both connect to it) and forwards streaming deliveries between
them as protocols.md §4 and §8.2 describe skrouterd 3.5.1 doing it:

- its Open says ``product: skupper-router, version: 3.5.1`` and offers
  ``qd.streaming-links``;
- a receiver attached with a source address is a consumer of it; a dynamic
  receiver gets a fresh address;
- a sender gets credit only once its target address has a consumer;
- a stream is passed on as it arrives only if its sender's target carries
  ``qd.streaming-deliveries``; otherwise it is held until it is complete;
- towards a connection that offered ``qd.streaming-links`` every stream
  goes on a new link the peer opens (``qdlink.N``, all on one session it
  opens for them); otherwise on the consumer's link, one stream at a time;
- it stops passing bytes on at ``WINDOW`` unacknowledged bytes, as the
  router's adaptor does, and forwards ``received`` acknowledgements and
  outcomes back to the stream's sender.

It parses every stream header with proton's own decoder, independently of
the code under test, and records it. Threading is
:mod:`tests.reactor_thread`'s.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any

from proton import Data, Delivery, Described, Endpoint, Handler, SymbolList, symbol
from reactor_peer import terminus_info
from reactor_thread import ReactorThread

STREAMING_LINKS = "qd.streaming-links"
STREAMING_DELIVERIES = "qd.streaming-deliveries"
CONTENT_TYPE = "application/octet-stream"
# The router's TCP_MAX_CAPACITY_BYTES (protocols.md §4.3).
WINDOW = 1_042_432


@dataclass(frozen=True)
class StreamSeen:
    """The header of a stream as the peer decoded it."""

    target_capabilities: frozenset[str]
    to: str | None
    reply_to: str | None
    correlation_id: object
    content_type: object
    content_type_is_symbol: bool
    application_properties: dict[str, object]
    body: object


@dataclass(frozen=True)
class StreamEnded:
    """A stream's delivery was settled; ``outcome`` is the consumer's outcome."""

    outcome: int


@dataclass(frozen=True)
class Originated:
    """The consumer's outcome for a stream the peer sent itself, as a tcpListener would."""

    outcome: int


@dataclass
class Policy:
    forward_acks: bool = True


class _Stream:
    """One stream being forwarded (reactor thread only)."""

    def __init__(self, link: Any, delivery: Any) -> None:
        self.in_link = link
        self.in_delivery = delivery
        self.buf = bytearray()
        self.header: StreamSeen | None = None
        self.out_link: Any = None
        self.out_delivery: Any = None
        self.pending = bytearray()
        self.forwarded = 0
        self.consumer_acked = 0
        self.last_ack = 0
        self.complete = False
        self.ended = False


def _decode_header(buf: bytes) -> tuple[dict[str, Any], int] | None:
    """Sections up to the body, with proton's decoder; None while incomplete."""
    fields: dict[str, Any] = {}
    pos = 0
    while pos < len(buf):
        data = Data()
        try:
            used = data.decode(buf[pos:])
        except Exception:  # proton raises DataException on a cut-short value
            return None
        data.rewind()
        data.next()
        value: Any = data.get_object()
        pos += used
        if not isinstance(value, Described):
            raise ValueError(f"not a message section: {value!r}")
        descriptor: Any = value.descriptor
        code = int(descriptor)
        section: Any = value.value
        if code == 0x73:
            items = list(section) + [None] * 7
            fields.update(
                to=items[2], reply_to=items[4], correlation_id=items[5], content_type=items[6]
            )
        elif code == 0x74:
            fields["application_properties"] = dict(section)
        elif code == 0x77:
            fields["body"] = section
            return fields, pos
        else:
            raise ValueError(f"unexpected section 0x{code:02x} before the body")
    return None


class SkRouterPeer(ReactorThread, Handler):
    """See the module docstring."""

    container_id = "skrouter-peer"

    def __init__(self, policy: Policy | None = None) -> None:
        Handler.__init__(self)
        ReactorThread.__init__(self)
        self.policy = policy or Policy()
        # Reactor-thread state.
        self._numbers = itertools.count(1)
        self.streaming_conns: set[Any] = set()
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        self.streams: dict[Any, _Stream] = {}
        self.by_out: dict[Any, _Stream] = {}
        self.waiting_links: dict[Any, list[_Stream]] = collections.defaultdict(list)
        self.waiting_senders: list[Any] = []
        self.links_opened = 0
        self.streaming_sessions: dict[Any, Any] = {}
        self.originating: dict[Any, bytes] = {}
        self.originated: set[Any] = set()

    def shut_down(self) -> None:
        for conn in list(self.streaming_conns) + [
            link.connection for links in self.consumers.values() for link in links
        ]:
            if not conn.state & Endpoint.LOCAL_CLOSED:
                conn.close()
        super().shut_down()

    # -- actions (test thread) --------------------------------------------------------
    def originate(self, address: str, message: bytes) -> None:
        """Send ``message``, a whole stream, to the consumer of ``address`` on a new link."""

        def act(peer: SkRouterPeer) -> None:
            conn = peer.consumers[address][0].connection
            link = peer._streaming_session(conn).sender(f"qdlink.{next(peer._numbers)}")
            link.open()
            peer.originating[link] = message

        self.call(act)

    def set_forward_acks(self, on: bool) -> None:
        def act(peer: SkRouterPeer) -> None:
            peer.policy.forward_acks = on
            if on:
                for stream in list(peer.streams.values()):
                    peer._ack_upstream(stream)

        self.call(act)

    def on_connection_init(self, event: Any) -> None:
        conn = event.connection
        conn.container = self.container_id
        conn.properties = {
            symbol("product"): "skupper-router",
            symbol("version"): "3.5.1",
            symbol("qd.conn-id"): next(self._numbers),
        }
        conn.offered_capabilities = SymbolList(["ANONYMOUS-RELAY", STREAMING_LINKS])

    def on_connection_remote_open(self, event: Any) -> None:
        conn = event.connection
        offered = conn.remote_offered_capabilities or []
        if STREAMING_LINKS in [str(c) for c in offered]:
            self.streaming_conns.add(conn)
        if conn.state & Endpoint.LOCAL_UNINIT:
            conn.open()

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_connection_remote_close(self, event: Any) -> None:
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        # proton makes a new wrapper per event: its objects compare with ==, never `is`.
        conn = event.connection
        self.streaming_conns.discard(conn)
        self.streaming_sessions.pop(conn, None)
        for links in self.consumers.values():
            links[:] = [link for link in links if link.connection != conn]
        # As the router core does when an outbound link is lost: a stream
        # forwarded there, and not finished, goes back to its sender as
        # modified (delivery-failed), so that the sender's client is closed.
        for key, stream in list(self.streams.items()):
            out = stream.out_link
            if out is None or out.connection != conn or stream.in_link.connection == conn:
                continue
            if not stream.in_delivery.settled:
                stream.in_delivery.local.failed = True
                stream.in_delivery.update(Delivery.MODIFIED)
                stream.in_delivery.settle()
            del self.streams[key]
            self.by_out.pop(stream.out_delivery, None)
            self.waiting_links.pop(out, None)

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return  # one of our own qdlink.N links, answered
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if link.is_sender:  # a client's receiver: a consumer
            if link.remote_source.dynamic:
                link.source.address = f"_topo/0/peer/temp.{next(self._numbers)}"
            self.consumers[link.source.address].append(link)
            link.open()
            self._grant_waiting()
            return
        link.open()
        self.waiting_senders.append(link)
        self._grant_waiting()

    def on_link_remote_close(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_CLOSED:
            link.close()
        for links in self.consumers.values():
            if link in links:
                links.remove(link)

    def _grant_waiting(self) -> None:
        for link in list(self.waiting_senders):
            address = link.remote_target.address
            if self.consumers.get(address):
                self.waiting_senders.remove(link)
                link.flow(1)

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        if link.is_sender:
            for stream in list(self.waiting_links.get(link, [])):
                self._start_out(stream)
            if link in self.originating and link.credit > 0:
                self.originated.add(link.delivery(str(next(self._numbers))))
                link.stream(self.originating.pop(link))
                link.advance()

    def on_delivery(self, event: Any) -> None:
        delivery, link = event.delivery, event.link
        if link.is_receiver:
            self._on_stream_bytes(link, delivery)
        else:
            self._on_consumer_update(delivery)

    # -- a stream arriving --------------------------------------------------------------
    def _on_stream_bytes(self, link: Any, delivery: Any) -> None:
        stream = self.streams.get(delivery)
        if stream is None:
            stream = self.streams[delivery] = _Stream(link, delivery)
        if delivery.aborted:
            self._abort(stream)
            return
        if delivery.pending:
            data = link.recv(delivery.pending) or b""
            (stream.pending if stream.header else stream.buf).extend(data)
        stream.complete = not delivery.partial
        if stream.header is None:
            parsed = _decode_header(bytes(stream.buf))
            if parsed is None:
                return
            fields, size = parsed
            caps = terminus_info(link.remote_target).capabilities
            content_type = fields.get("content_type")
            stream.header = StreamSeen(
                target_capabilities=caps,
                to=fields.get("to"),
                reply_to=fields.get("reply_to"),
                correlation_id=fields.get("correlation_id"),
                content_type=str(content_type) if content_type is not None else None,
                content_type_is_symbol=isinstance(content_type, symbol),
                application_properties={
                    str(k): v for k, v in fields.get("application_properties", {}).items()
                },
                body=fields.get("body"),
            )
            self._record(stream.header)
            stream.pending.extend(stream.buf[size:])
            stream.buf = stream.buf[:size]
            self._route(stream)
        self._forward(stream)

    def _route(self, stream: _Stream) -> None:
        assert stream.header is not None
        address = stream.in_link.remote_target.address or stream.header.to
        consumers = self.consumers.get(address or "")
        if not consumers:
            stream.in_delivery.update(Delivery.RELEASED)
            stream.in_delivery.settle()
            del self.streams[stream.in_delivery]
            return
        consumer = consumers[0]
        conn = consumer.connection
        if conn in self.streaming_conns:
            out = self._streaming_session(conn).sender(f"qdlink.{next(self._numbers)}")
            out.open()
            self.links_opened += 1
            stream.out_link = out
        else:
            stream.out_link = consumer
        self.waiting_links[stream.out_link].append(stream)
        self._start_out(stream)

    def _streaming_session(self, conn: Any) -> Any:
        """The one session a connection's per-stream links share."""
        session = self.streaming_sessions.get(conn)
        if session is None:
            session = self.streaming_sessions[conn] = conn.session()
            session.open()
        return session

    def _start_out(self, stream: _Stream) -> None:
        link = stream.out_link
        queue = self.waiting_links[link]
        if not queue or queue[0] is not stream or stream.out_delivery is not None:
            return
        if link.credit <= 0:
            return
        stream.out_delivery = link.delivery(str(next(self._numbers)))
        self.by_out[stream.out_delivery] = stream
        link.stream(bytes(stream.buf))
        self._forward(stream)

    def _forward(self, stream: _Stream) -> None:
        out = stream.out_delivery
        if out is None or stream.ended:
            return
        assert stream.header is not None
        streaming = STREAMING_DELIVERIES in stream.header.target_capabilities
        if not streaming and not stream.complete:
            return  # the router holds an incomplete message it may not stream
        room = WINDOW - (stream.forwarded - stream.consumer_acked)
        if room > 0 and stream.pending:
            chunk = bytes(stream.pending[:room])
            del stream.pending[:room]
            stream.out_link.stream(chunk)
            stream.forwarded += len(chunk)
        if stream.complete and not stream.pending:
            stream.out_link.advance()
            stream.ended = True

    def _abort(self, stream: _Stream) -> None:
        if stream.out_delivery is not None and not stream.ended:
            stream.out_delivery.abort()
            stream.ended = True
        self.streams.pop(stream.in_delivery, None)

    # -- the consumer's answers -----------------------------------------------------------
    def _on_consumer_update(self, delivery: Any) -> None:
        if delivery in self.originated and delivery.settled:
            self.originated.discard(delivery)
            self._record(Originated(int(delivery.remote_state)))
            delivery.settle()
            return
        stream = self.by_out.get(delivery)
        if stream is None:
            return
        state = delivery.remote_state
        if state == Delivery.RECEIVED:
            offset = delivery.remote.section_offset
            if offset > stream.consumer_acked:
                stream.consumer_acked = offset
                self._forward(stream)
                self._ack_upstream(stream)
        if delivery.settled or state in (
            Delivery.ACCEPTED,
            Delivery.REJECTED,
            Delivery.RELEASED,
            Delivery.MODIFIED,
        ):
            incoming = stream.in_delivery
            if state == Delivery.MODIFIED:
                incoming.local.failed = delivery.remote.failed
                incoming.local.undeliverable = delivery.remote.undeliverable
            incoming.update(state)
            incoming.settle()
            delivery.settle()
            self.streams.pop(incoming, None)
            del self.by_out[delivery]
            link = stream.out_link
            self.waiting_links[link].remove(stream)
            if link.name.startswith("qdlink."):
                link.close()
            elif self.waiting_links[link]:
                self._start_out(self.waiting_links[link][0])
            self._record(StreamEnded(int(state)))

    def _ack_upstream(self, stream: _Stream) -> None:
        if not self.policy.forward_acks or stream.consumer_acked <= stream.last_ack:
            return
        incoming = stream.in_delivery
        incoming.local.section_number = 0
        incoming.local.section_offset = stream.consumer_acked
        incoming.update(Delivery.RECEIVED)
        stream.last_ack = stream.consumer_acked
