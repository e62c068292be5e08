"""The TCP-adaptor dialect: skupper-router 3.x's two streaming deliveries per connection.

Wire contract (docs/protocols.md §4, :mod:`tunnel.adaptor_wire`)
----------------------------------------------------------------
A TCP connection is two streams, one per direction, each a single
unsettled delivery that lasts as long as its direction does:

- *out*: bytes read from TCP, on a sender of the carrier's own whose
  target carries ``qd.streaming-deliveries``;
- *in*: the far end's stream, written to TCP. It arrives on whatever link
  the router picks (our consumer link, a link it opened for the stream, or
  our dynamic receiver); the AMQP connection's :class:`StreamDispatcher`
  reads its header and hands it to its carrier.

Roles
    As a *listener* (our ingress, ``tcp:P=>amqp:A``) the carrier attaches a
    dynamic receiver, sends its stream to ``A`` with that address as
    ``reply-to``, and takes nothing from the client until the far end's
    counter-stream arrives, as the router's own listener does: a refused
    stream then loses nothing. As a *connector* (our egress,
    ``amqp:A=>tcp:H:P``) it is made for a client stream arriving for ``A``;
    once the backend is connected it answers with its stream to the client
    stream's ``reply-to``.

Flow control: byte windows, as the router's adaptor keeps them (§4.3)
    In: bytes handed to the TCP socket are acknowledged with an unsettled
    ``received{section-number 0, section-offset <bytes written>}`` every
    :data:`ACK_EVERY` bytes, and not while the socket is over its
    high-water mark. The far end stops at its window (about 1 MB) without
    them, so a slow TCP reader holds back the far end, not our memory.
    Out: at most :data:`WINDOW` bytes unacknowledged, and nothing while the
    AMQP socket is over its high-water mark.

Half-close
    Our FIN ends the out stream: its final transfer (``more=false``). The
    end of the in stream ends our write side; once that is passed to TCP the
    in stream is accepted and settled. The carrier is idle once the far end
    has settled our stream.

Failure
    Our reset aborts our stream if it is unfinished and settles the far
    end's ``modified`` (delivery-failed), so the router closes its side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

from proton import Condition, Session

from .. import adaptor_wire
from ..amqp.engine import close_handle
from ..amqp.handles import (
    ACCEPTED,
    MODIFIED,
    RECEIVED,
    REJECTED,
    RELEASED,
    Delivery,
    Link,
    open_receiver,
    open_sender,
    outcome_name,
)
from ..census import counted
from ..codec import WireError
from ..peer_text import printable
from .carrier import NO_EVENTS, NO_PORT, RESET_CONDITION, AmqpPort, CarrierEvents, Failure

logger = logging.getLogger(__name__)

#: Unacknowledged bytes we let out per connection; the router's own is about 1,042,432.
WINDOW = 1024 * 1024
#: How often we acknowledge what we wrote (the router itself acks every 0.52 MB or so).
ACK_EVERY = 64 * 1024
#: Credit on a consumer link: streams that may start at once before we top it up.
CONSUMER_CREDIT = 64


@counted("tcp_adaptor_carriers")
class TcpAdaptorCarrier:
    """A TCP connection as two streams; see the module docstring.

    Made by :meth:`listener` (our ingress) or :meth:`connector` (a client
    stream for one of our egress addresses).
    """

    DIALECT: ClassVar[str] = "tcp-adaptor"
    AWAITED: ClassVar[str] = "counter-stream"

    __slots__ = (
        "acked",
        "address",
        "closed",
        "dispatcher",
        "events",
        "in_delivery",
        "is_listener",
        "name",
        "opened",
        "out",
        "out_ended",
        "out_settled",
        "peer_acked",
        "port",
        "receiver",
        "reply_to",
        "sender",
        "sent",
    )

    def __init__(
        self, port: AmqpPort, dispatcher: StreamDispatcher, name: str, address: str
    ) -> None:
        self.port = port
        self.dispatcher = dispatcher
        self.name = name
        #: Where our stream goes: the service address, or the client stream's reply-to.
        self.address = address
        self.events: CarrierEvents
        self.is_listener = True
        self.opened = False
        self.closed = False
        self.sender: Link | None = None
        self.receiver: Link | None = None
        self.reply_to: str | None = None
        self.out: Delivery | None = None
        self.out_ended = False
        self.out_settled = False
        #: Bytes of our stream given to proton, and how many of them the far end has.
        self.sent = 0
        self.peer_acked = 0
        self.in_delivery: Delivery | None = None
        #: Bytes of the far end's stream we have acknowledged.
        self.acked = 0

    @classmethod
    def listener(
        cls, port: AmqpPort, dispatcher: StreamDispatcher, name: str, address: str
    ) -> TcpAdaptorCarrier:
        return cls(port, dispatcher, name, address)

    @classmethod
    def connector(
        cls,
        port: AmqpPort,
        dispatcher: StreamDispatcher,
        name: str,
        delivery: Delivery,
        header: adaptor_wire.StreamHeader,
    ) -> TcpAdaptorCarrier:
        carrier = cls(port, dispatcher, name, header.reply_to or "")
        carrier.is_listener = False
        carrier.in_delivery = delivery
        carrier.reply_to = header.reply_to
        return carrier

    # -- the connection's intents -----------------------------------------------------
    def start(self, events: CarrierEvents) -> None:
        self.events = events
        if self.is_listener:
            self.receiver = open_receiver(self.dispatcher.session, f"{self.name}/reply", self)
            events.log.debug("accepted; opening a stream to %r", self.address)
            self.port.flush_soon()

    def on_tcp_connected(self) -> None:
        if self.is_listener or self.closed:
            return
        # A connector's backend is there: answer the client stream.
        if not self.reply_to:
            self._failed("client stream without a reply-to", Failure.PROTOCOL)
            return
        self._acknowledge(1)
        self._open_sender(self.dispatcher.session, self.reply_to)

    def room(self) -> int:
        if (
            self.out is None
            or self.out_ended
            or not self.opened
            or self.closed
            or self.port.write_paused
        ):
            return 0
        return max(0, WINDOW - (self.sent - self.peer_acked))

    @property
    def sending(self) -> bool:
        return True

    def send(self, data: memoryview) -> None:
        assert self.sender is not None and self.out is not None
        self.port.engine.stream(self.sender, self.out, data)
        self.sent += len(data)
        self.port.flush_soon()

    def end(self) -> None:
        if self.out is None or self.out_ended or self.closed:
            return
        assert self.sender is not None
        self.sender.advance()  # the final transfer: our FIN
        self.out_ended = True
        self.events.log.debug("end of stream sent")
        self.port.flush_soon()

    def idle(self) -> bool:
        return self.out_ended and self.out_settled

    def on_tcp_drained(self) -> None:
        self._acknowledge(1)

    def on_eof_written(self) -> None:
        delivery, self.in_delivery = self.in_delivery, None
        if delivery is not None:
            self.dispatcher.release(delivery)
            delivery.finish(ACCEPTED)
            self.port.flush_soon()

    def on_peer_closed(self) -> None:
        self._failed("far end closed its connection", Failure.FAR_END)

    def close(self) -> None:
        self._close_links(None)

    def reset(self, reason: str) -> None:
        if self.closed:
            return
        out = self.out
        if out is not None and not self.out_settled:
            if self.out_ended:
                out.settle()
            else:
                out.abort()
        delivery, self.in_delivery = self.in_delivery, None
        if delivery is not None:
            self.dispatcher.release(delivery)
            delivery.finish(MODIFIED, failed=True)
        self._close_links(Condition(RESET_CONDITION, reason))

    def lost(self) -> None:
        self.closed = True
        self.out = self.in_delivery = None
        self.sender = self.receiver = None
        self.dispatcher.forget(self)
        self._let_go()

    def _let_go(self) -> None:
        """Closed: hold neither the AMQP connection nor the connection (no cycle, no engine)."""
        self.port = NO_PORT
        self.events = NO_EVENTS

    # -- opening ----------------------------------------------------------------
    def _open_sender(self, session: Session, address: str) -> None:
        self.sender = open_sender(
            session, self.name, self, target=address,
            target_capability=adaptor_wire.STREAMING_DELIVERIES,
        )  # fmt: skip
        self.port.flush_soon()

    def _on_reply_address(self, link: Link) -> None:
        address = link.remote_source_address
        if not address:
            self._failed("the router gave no dynamic reply address", Failure.FAR_END)
            return
        self.reply_to = address
        # From here on the dispatcher reads what arrives on it, like any stream.
        self.dispatcher.expect_reply(address, self, link)
        link.flow(1)
        self._open_sender(link.session, self.address)

    def _start_out(self) -> None:
        """Begin our stream with its header once the sender has credit."""
        sender = self.sender
        if self.out is not None or sender is None or sender.credit <= 0 or self.closed:
            return
        if self.is_listener:
            head = adaptor_wire.encode_header(self.address, self.reply_to, self.name)
        else:
            head = adaptor_wire.encode_header(self.address)
            self.opened = True
            self.events.on_far_opened()
        engine = self.port.engine
        self.out = engine.begin_stream(sender, b"0")
        engine.stream(sender, self.out, head)
        self.port.flush_soon()
        self.events.on_far_credit()

    # -- link events --------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        if self.closed:
            return
        if link.is_sender:
            self._start_out()
        else:
            self._on_reply_address(link)

    def on_link_flow(self, link: Link) -> None:
        if link.is_sender:
            self._start_out()

    def on_link_closed(self, link: Link) -> None:
        if self.closed or (link.is_sender and self.out_settled):
            return
        condition = link.remote_condition
        what = (
            f"{printable(condition.name)}: {printable(condition.description)}"
            if condition
            else "no error"
        )
        side = "sender" if link.is_sender else "receiver"
        self._failed(f"the far end detached our {side} ({what})", Failure.FAR_END)

    def on_link_failed(self, link: Link, condition: Condition) -> None:
        """The engine ended ``link`` for a fault (sent past credit, or our own error)."""
        self._failed(
            f"link ended: {printable(condition.name)}: {printable(condition.description or '')}",
            Failure.PROTOCOL,
        )

    def on_delivery(self, link: Link, delivery: Delivery) -> None:
        """An update on our own stream: the far end's acknowledgements and outcome."""
        if self.closed:
            return
        state = delivery.remote_state
        if state == RECEIVED:
            # The far end cannot have received what never left proton: an
            # acknowledgement past that is a lie that would open our window
            # for good (a shut session window keeps our bytes in proton).
            offset = min(delivery.remote_offset, self._bytes_framed())
            if offset > self.peer_acked:
                self.peer_acked = offset
                self.events.on_far_credit()
                if self.closed:
                    return
        if not delivery.settled and state in (0, RECEIVED):
            return
        if state not in (ACCEPTED, 0, RECEIVED) or not self.out_ended:
            self._failed(f"far end ended our stream ({outcome_name(state)})", Failure.NOT_ACCEPTED)
            return
        delivery.settle()
        self.out_settled = True
        self.events.on_far_credit()

    def _bytes_framed(self) -> int:
        """Bytes of our stream that proton has framed: what the far end may have had."""
        return 0 if self.out is None else self.sent - self.out.pending

    # -- the far end's stream (from the dispatcher) ---------------------------------------
    def on_in_stream(
        self, delivery: Delivery, header: adaptor_wire.StreamHeader, first: memoryview
    ) -> None:
        """The far end's stream began; ``first`` is what came after its header."""
        if self.is_listener:
            if header.content_type != adaptor_wire.CONTENT_TYPE:
                delivery.finish(REJECTED)
                self._failed(
                    f"counter-stream with content-type {header.content_type!r}", Failure.PROTOCOL
                )
                return
            self.in_delivery = delivery
            self.opened = True
            self.events.log.debug("counter-stream arrived")
            self.events.on_far_opened()
            self.events.on_far_credit()
        self.on_in_data(first)

    def on_in_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or not data:
            return
        self.events.on_far_data(data)
        self._acknowledge(ACK_EVERY)

    def on_in_end(self, failure: str | None) -> None:
        """The far end's stream is over: its final transfer arrived, or ``failure`` says how not."""
        if self.closed:
            return
        if failure is not None:
            self._failed(f"the far end {failure}", Failure.FAR_END)
        else:
            self.events.on_far_end()

    def _acknowledge(self, every: int) -> None:
        delivery = self.in_delivery
        events = self.events
        if delivery is None or self.closed or not events.tcp_writable:
            return
        written = events.bytes_in
        if written - self.acked >= every:
            delivery.received(written)
            self.acked = written
            self.port.flush_soon()

    # -- ending -----------------------------------------------------------------------
    def _failed(self, reason: str, failure: Failure) -> None:
        self.events.on_far_failed(reason, failure)

    def _close_links(self, condition: Condition | None) -> None:
        if self.closed:
            return
        self.closed = True
        for link in (self.sender, self.receiver):
            if link is not None:
                close_handle(link, condition)
        self.sender = self.receiver = None
        self.out = self.in_delivery = None
        self.dispatcher.forget(self)
        self.port.flush_soon()
        self._let_go()


class StreamDispatcher:
    """Reads the header of every stream arriving on one AMQP connection and finds its carrier.

    It owns every receiving link of a TCP-adaptor connection: the consumer
    links of egress bridges, the links the router opens per stream
    (``qd.streaming-links``), and the listeners' dynamic receivers once
    their address is known. A stream for a listener's reply address goes to
    that carrier; one for an egress address makes a connector; any other is
    released, so the router can try elsewhere.

    Bounds: ``heads`` holds streams whose header is still arriving, at most
    one per link with credit (the consumer links' :data:`CONSUMER_CREDIT`,
    one on each other link), and a header is at most the peer's
    max-message-size (§4.1); ``carriers`` one entry per live stream.
    """

    def __init__(
        self,
        session: Session,
        on_client_stream: Callable[
            [str, Delivery, adaptor_wire.StreamHeader], TcpAdaptorCarrier | None
        ],
        on_consumer_ready: Callable[[str], None],
    ) -> None:
        self.session = session
        self.on_client_stream = on_client_stream
        self.on_consumer_ready = on_consumer_ready
        self.replies: dict[str, TcpAdaptorCarrier] = {}
        # Every stream handed to a carrier, until the carrier settles it: proton
        # may report on it again after its last byte, and reuses its memory
        # for a new delivery only once it is settled.
        self.carriers: dict[Delivery, TcpAdaptorCarrier] = {}
        self.ended: set[Delivery] = set()
        # Streams whose header is still arriving, with the link they arrive on.
        self.heads: dict[Delivery, tuple[Link, bytearray]] = {}
        self.consumers: dict[str, Link] = {}

    def consume(self, address: str) -> None:
        receiver = open_receiver(self.session, f"tunnel-consumer-{address}", self, source=address)
        receiver.flow(CONSUMER_CREDIT)
        self.consumers[address] = receiver

    def accept_link(self, link: Link) -> None:
        """A link the router opened towards us to carry one stream at a time."""
        link.mirror()
        link.own(self)
        link.open()
        link.flow(1)

    def expect_reply(self, address: str, carrier: TcpAdaptorCarrier, link: Link) -> None:
        self.replies[address] = carrier
        link.own(self)

    def release(self, delivery: Delivery) -> None:
        """``delivery`` is about to be settled by its carrier."""
        self.carriers.pop(delivery, None)
        self.ended.discard(delivery)

    def forget(self, carrier: TcpAdaptorCarrier) -> None:
        if carrier.reply_to is not None and self.replies.get(carrier.reply_to) is carrier:
            del self.replies[carrier.reply_to]
        for delivery in [d for d, c in self.carriers.items() if c is carrier]:
            self.release(delivery)

    # -- LinkOwner ----------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        for address, consumer in self.consumers.items():
            if consumer == link:
                self.on_consumer_ready(address)

    def on_link_flow(self, link: Link) -> None:
        pass

    def on_link_closed(self, link: Link) -> None:
        # proton reuses a freed delivery's memory: forget the link's unfinished headers.
        for delivery in [d for d, (on, _) in self.heads.items() if on == link]:
            del self.heads[delivery]
        condition = link.remote_condition
        if condition is not None and link in self.consumers.values():
            logger.error(
                "router closed the consumer link %s: %s: %s",
                printable(link.name),
                printable(condition.name),
                printable(condition.description),
            )

    def on_delivery(self, link: Link, delivery: Delivery) -> None:
        carrier = self.carriers.get(delivery)
        if carrier is None:
            self._on_new_stream(link, delivery)
            return
        if delivery in self.ended:
            return  # read to the end; its carrier settles it
        # An aborted delivery reports one byte pending, which reads as nothing.
        if not delivery.aborted and (pending := delivery.pending):
            carrier.on_in_data(link.recv(pending))
        self._check_end(link, delivery, carrier)

    def _on_new_stream(self, link: Link, delivery: Delivery) -> None:
        if delivery.local_state:
            # One we answered already: proton may report on it once more
            # (the far end settling it, its link closing) before freeing it.
            return
        if delivery.aborted or delivery.settled:
            # Given up by the far end before we knew whose it was.
            self.heads.pop(delivery, None)
            delivery.settle()
            return
        buf = self.heads.setdefault(delivery, (link, bytearray()))[1]
        pending = delivery.pending
        if pending:
            buf += link.recv(pending)
        try:
            parsed = adaptor_wire.parse_header(buf)
        except WireError as exc:
            self._refuse(link, delivery, REJECTED, f"not a TCP adaptor stream: {exc}")
            return
        if parsed is None:
            if not delivery.partial:
                self._refuse(link, delivery, REJECTED, "a stream that ended inside its header")
            return
        header, start = parsed
        del self.heads[delivery]
        carrier = self._carrier_for(link, delivery, header)
        if carrier is not None and not carrier.closed:
            self.carriers[delivery] = carrier
            self._top_up(link)
            carrier.on_in_stream(delivery, header, memoryview(buf)[start:])
            self._check_end(link, delivery, carrier)

    def _carrier_for(
        self, link: Link, delivery: Delivery, header: adaptor_wire.StreamHeader
    ) -> TcpAdaptorCarrier | None:
        """A listener's counter-stream, or a new connector; None once refused."""
        carrier = self.replies.get(header.to or "")
        if carrier is not None:
            return carrier
        if not header.reply_to:
            self._refuse(link, delivery, REJECTED, "a client stream without a reply-to")
            return None
        if header.content_type != adaptor_wire.CONTENT_TYPE:
            # Another encapsulation: the router may have a connector that speaks it.
            self._refuse(
                link, delivery, RELEASED, f"content-type {header.content_type!r} is not ours"
            )
            return None
        carrier = self.on_client_stream(header.to or "", delivery, header)
        if carrier is None:
            self._refuse(link, delivery, RELEASED, f"no bridge for address {header.to!r}")
        return carrier

    def _check_end(self, link: Link, delivery: Delivery, carrier: TcpAdaptorCarrier) -> None:
        if delivery not in self.carriers:
            return
        failure = _given_up(delivery)
        if failure is None and (delivery.partial or delivery.pending):
            return
        self.ended.add(delivery)
        carrier.on_in_end(failure)
        self._top_up(link)

    def _refuse(self, link: Link, delivery: Delivery, outcome: int, why: str) -> None:
        logger.info("stream refused (%s): %s", outcome_name(outcome), printable(why))
        self.heads.pop(delivery, None)
        delivery.finish(outcome, failed=outcome == MODIFIED)
        self._top_up(link)

    def _top_up(self, link: Link) -> None:
        # A consumer link keeps credit for many streams; a link the router
        # opened, or a reply link, carries one stream at a time.
        link.top_up(CONSUMER_CREDIT if link in self.consumers.values() else 1)


def _given_up(delivery: Delivery) -> str | None:
    """How the far end gave up a stream it sends us, or None while it has not.

    An abort, or a settlement before ours: the receiver settles a stream,
    and skupper-router settles its own (``modified``) only when its TCP side
    drops (protocols.md §4.4). proton then reports the delivery as no longer
    partial, and often without the outcome, which must not pass for a FIN.
    """
    if delivery.aborted:
        return "aborted its stream"
    state = delivery.remote_state
    if delivery.settled and state != ACCEPTED:
        outcome = outcome_name(state) if state else "no outcome"
        return f"settled its stream before we did ({outcome})"
    return None
