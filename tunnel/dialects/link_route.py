"""The link-route dialect: skupper-proxy's link pair, through Qpid Dispatch or direct mode.

Wire contract (docs/protocols.md §1, §8.1)
------------------------------------------
A TCP connection is a pair of links. The *routed* link is the one the
router ties to the far end: the ingress's sender, attached to the service
address with the ingress's dynamic reply address as its source, and so the
egress's receiver. The other link is message-routed to that dynamic
address. Each TCP read is one message, its body the bytes
(:mod:`tunnel.wire`), sent unsettled; the far end accepts it.

Flow control, TCP to AMQP
    One delivery per read of at most :data:`MAX_DELIVERY` bytes, sent only
    while the sender has credit, the AMQP socket is below its write
    high-water mark and fewer than :data:`MAX_UNSETTLED` deliveries await
    the far end's outcome (:meth:`LinkRouteCarrier.room`). Credit alone
    bounds nothing: a peer may grant a million and keep its session window
    shut, and every delivery then stays inside proton. The unsettled cap
    bounds what is held towards one peer, whatever its credit or window:
    ``MAX_UNSETTLED x MAX_DELIVERY`` (1 MiB) per connection. Each outcome
    that arrives wakes the connection, so the cap never leaves it waiting
    for nothing.

Flow control, AMQP to TCP
    The receiver keeps at most ``window`` deliveries of credit out and tops
    it up only while the TCP socket is under its high-water mark, so what is
    held for a slow reader is ``window x MAX_DELIVERY`` plus the socket's
    write high-water mark: at most :data:`CREDIT_BUDGET` (1 MiB) plus it.
    The egress answers the attach at once with the first window, while its
    backend connects, and no more until it has: the connection keeps what
    arrives meanwhile (one window) and writes it first, so the first bytes
    are never lost and cross while the backend connects, not after.

    The window starts at :data:`START_WINDOW` and grows to the budget once
    the reader has shown it keeps up: ``proof`` bytes written in a row with
    the kernel taking each write whole. The proof must outrun what the
    kernel buffers for a reader that does not read, our send buffer and,
    for a reader on the same host, its receive buffer (together up to 36 MiB
    on a current Linux), which take a slow reader's first megabytes as fast
    as a fast reader's; credit given on less would all be held once they
    fill. So the glue sizes the proof from the kernel's limits, and it is
    never under :data:`PROVEN_FAST`. Any write the kernel does not take
    whole starts the count again, and passing the socket's high-water mark
    puts the window back to the start. A fixed ``window`` (``--window``)
    turns this off.

Half-close
    Our FIN becomes an end-of-stream marker when the far end offered the
    ``tunnel:half-close`` capability. Towards a node proxy, which knows no
    marker, it becomes a clean detach of the routed link once every
    delivery is settled (at the ingress); at the egress it ends the whole
    tunnel, as the node ingress treats any end of its routed link. The far
    end's marker (or a node egress's clean detach) ends our write side.

Failure
    A delivery not accepted, a detach with an error, a far end that stops
    without the marker it promised, or an undecodable message: the far end
    failed. Our reset detaches both links with ``tunnel:reset``.
"""

from __future__ import annotations

from typing import ClassVar

from proton import Condition, Session

from .. import wire
from ..amqp.engine import close_handle
from ..amqp.handles import (
    ACCEPTED,
    REJECTED,
    Delivery,
    Link,
    PartialMessage,
    open_receiver,
    open_sender,
    outcome_name,
)
from ..census import counted
from ..peer_text import printable
from .carrier import NO_EVENTS, NO_PORT, RESET_CONDITION, AmqpPort, CarrierEvents, Failure

#: With the window, what bounds the bytes in flight: window x MAX_DELIVERY per direction.
MAX_DELIVERY = 128 * 1024
#: The credit a receiver starts with, in deliveries.
START_WINDOW = 2
#: The most credit a receiver grows to, in bytes (in flight towards one TCP connection).
CREDIT_BUDGET = 1024 * 1024
_MAX_WINDOW = CREDIT_BUDGET // MAX_DELIVERY
#: The least a reader takes, each write whole, before it gets more than the start window.
PROVEN_FAST = 8 * 1024 * 1024
#: Deliveries sent, not yet settled by the far end: past it sending waits for an outcome.
MAX_UNSETTLED = 8
#: The largest message we take in (our peers send at most MAX_DELIVERY, the
#: node proxy 64 KiB); advertised on our receivers as max-message-size.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: What a router puts on a routed link whose far end's connection closed
#: (protocols.md §8.1): a node ingress's only way to end its stream.
ROUTED_LINK_LOST = "qd:routed-link-lost"
#: What a delivery arriving in several frames is received into at first: one
#: of ours, with its headers (a node proxy's are smaller; a larger one grows it).
_EXPECTED_DELIVERY = MAX_DELIVERY + 1024


@counted("link_route_carriers")
class LinkRouteCarrier:
    """A TCP connection as a link pair; see the module docstring.

    Made by :meth:`ingress` (we attach both links) or :meth:`egress` (the
    far end's routed sender reached us, and the way back is given).
    """

    DIALECT: ClassVar[str] = "link-route"
    AWAITED: ClassVar[str] = "credit"

    __slots__ = (
        "_partial",
        "_tag",
        "address",
        "closed",
        "eos_pending",
        "eos_sent",
        "events",
        "kept_up",
        "max_window",
        "min_window",
        "name",
        "peer_half_close",
        "port",
        "prefix",
        "proof",
        "receiver",
        "reply",
        "routed_is_sender",
        "sender",
        "sender_ready",
        "session",
        "unsettled",
        "window",
    )

    def __init__(
        self,
        port: AmqpPort,
        name: str,
        *,
        routed_is_sender: bool,
        window: int | None,
        proof: int = PROVEN_FAST,
    ) -> None:
        self.port = port
        self.name = name
        self.routed_is_sender = routed_is_sender
        #: Credit kept out, in deliveries; it moves between the two bounds.
        self.window = self.min_window = START_WINDOW if window is None else window
        self.max_window = _MAX_WINDOW if window is None else window
        #: Bytes the reader must take in a row before the window grows.
        self.proof = max(proof, PROVEN_FAST)
        #: Bytes written to TCP since it last held any back (while growing).
        self.kept_up = 0
        self.events: CarrierEvents
        self.sender: Link | None = None
        self.receiver: Link | None = None
        self.sender_ready = False
        self.peer_half_close = False
        self.prefix = b""
        self.eos_pending = False
        self.eos_sent = False
        self.unsettled = 0
        self.closed = False
        self._tag = 0
        #: The start of a delivery still arriving; bounded by MAX_MESSAGE_SIZE.
        self._partial: PartialMessage | None = None
        self.address = ""
        self.session: Session | None = None
        self.reply: Link | None = None

    @classmethod
    def ingress(
        cls,
        port: AmqpPort,
        name: str,
        session: Session,
        address: str,
        *,
        window: int | None = None,
        proof: int = PROVEN_FAST,
        reply: Link | None = None,
    ) -> LinkRouteCarrier:
        """Ours to attach: a dynamic receiver (``reply``, if one is attached already), a sender."""
        carrier = cls(port, name, routed_is_sender=True, window=window, proof=proof)
        carrier.session, carrier.address, carrier.reply = session, address, reply
        return carrier

    @classmethod
    def egress(
        cls,
        port: AmqpPort,
        name: str,
        receiver: Link,
        sender: Link,
        *,
        window: int | None,
        proof: int = PROVEN_FAST,
    ) -> LinkRouteCarrier:
        """The far end's routed sender reached us as ``receiver``; ``sender`` is the way back."""
        carrier = cls(port, name, routed_is_sender=False, window=window, proof=proof)
        receiver.mirror(target_capability=wire.HALF_CLOSE, max_message_size=MAX_MESSAGE_SIZE)
        carrier.peer_half_close = wire.HALF_CLOSE in receiver.remote_capabilities(source=True)
        carrier.receiver, carrier.sender = receiver, sender
        return carrier

    # -- the connection's intents -----------------------------------------------------
    def start(self, events: CarrierEvents) -> None:
        self.events = events
        if self.routed_is_sender:
            assert self.session is not None
            reply, self.reply = self.reply, None
            if reply is not None:
                # Its dynamic address is known already: one round trip saved.
                self.receiver = reply
                reply.own(self)
                self._open_sender(reply)
            else:
                self.receiver = open_receiver(
                    self.session, f"{self.name}/reply", self, max_message_size=MAX_MESSAGE_SIZE
                )
            self.session = None
        else:
            assert self.receiver is not None and self.sender is not None
            self.receiver.own(self)
            self.sender.own(self)
            # Answered at once with the first window of credit, while the
            # backend connects: the client's first bytes cross meanwhile, and
            # the connection keeps them until it is there.
            self.receiver.open()
            self._top_up()
            if self.sender.remote_active:
                self._on_sender_ready()
        self.port.flush_soon()

    def on_tcp_connected(self) -> None:
        self._top_up()  # what arrived before is written: the rest of the window

    def room(self) -> int:
        sender = self.sender
        if sender is None or not self.sender_ready or self.eos_sent or self.port.write_paused:
            return 0
        deliveries = min(sender.credit, MAX_UNSETTLED - self.unsettled)
        return deliveries * MAX_DELIVERY if deliveries > 0 else 0

    @property
    def sending(self) -> bool:
        return self.sender is not None or not self.sender_ready

    def send(self, data: memoryview) -> None:
        while data:
            chunk, data = data[:MAX_DELIVERY], data[MAX_DELIVERY:]
            self._deliver(self.prefix + wire.body_header(len(chunk)), chunk)

    def end(self) -> None:
        if self.eos_sent or self.closed:
            return
        self.eos_pending = True
        sender = self.sender
        if sender is None or not self.sender_ready:
            return
        if self.peer_half_close:
            if self.room() <= 0:
                return
            self._deliver(wire.eos_message(self.prefix))
        elif self.unsettled:
            return  # the fallback detach must wait until the far end has everything
        else:
            self._end_without_marker()
        self.eos_pending = False
        self.eos_sent = True
        if self.closed:
            return
        self.events.log.debug(
            "end of stream sent (%s)", "marker" if self.peer_half_close else "detach"
        )
        self.port.flush_soon()

    def idle(self) -> bool:
        return self.eos_sent and not self.unsettled

    def on_tcp_drained(self) -> None:
        self._top_up()

    def on_eof_written(self) -> None:
        pass

    def on_peer_closed(self) -> None:
        """How a node ingress ends its stream (§1.2): an end towards it, not a failure."""
        self.sender = self.receiver = None
        if self.peer_half_close:
            self._failed("far end closed its connection before the stream ended", Failure.FAR_END)
        else:
            self.events.on_far_finished("far end closed its connection")

    def close(self) -> None:
        self._close_links(None)

    def reset(self, reason: str) -> None:
        self._close_links(Condition(RESET_CONDITION, reason))

    def lost(self) -> None:
        self.sender = self.receiver = None
        self.closed = True
        self._let_go()

    def _let_go(self) -> None:
        """Closed: hold neither the AMQP connection nor the connection (no cycle, no engine)."""
        self.port = NO_PORT
        self.events = NO_EVENTS

    # -- sending ---------------------------------------------------------------
    def _deliver(self, head: bytes, body: bytes | memoryview = b"") -> None:
        """One unsettled delivery on the sender: ``head`` then ``body``, uncopied."""
        assert self.sender is not None
        self._tag += 1
        self.port.engine.send_delivery(self.sender, b"%x" % self._tag, head, body)
        self.unsettled += 1
        self.port.flush_soon()

    def _end_without_marker(self) -> None:
        """Our FIN to a node proxy: it knows only a detach of the routed link."""
        if self.routed_is_sender:
            assert self.sender is not None
            close_handle(self.sender)
            self.sender = None
        else:
            # The node ingress treats any end of the routed link as the end of
            # the whole tunnel, so nothing more will arrive either.
            self.events.on_far_finished("finished")

    def _open_sender(self, receiver: Link) -> None:
        """Attach the sender, carrying the reply link's dynamic address as its source."""
        reply_to = receiver.remote_source_address
        if not reply_to:
            self._failed("the router gave no dynamic reply address", Failure.FAR_END)
            return
        self.prefix = wire.properties_section(reply_to)
        self.sender = open_sender(
            receiver.session,
            self.name,
            self,
            target=self.address,
            source=reply_to,
            source_capability=wire.HALF_CLOSE,
        )
        self._top_up()  # the first credit on the reply link

    # -- link events -------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        if link.is_sender:
            # An answer with no target is still an attach: rhea, and so the node
            # egress behind a link route, never copies the termini. A refusal
            # is the detach that follows, and that is what resets.
            self._on_sender_ready()
        elif self.routed_is_sender:
            self._open_sender(link)

    def _on_sender_ready(self) -> None:
        if self.sender is None or self.closed:
            return
        self.sender_ready = True
        if self.routed_is_sender:
            self.peer_half_close = wire.HALF_CLOSE in self.sender.remote_capabilities(source=False)
        self.events.on_far_credit()

    def on_link_flow(self, link: Link) -> None:
        if link.is_sender and not self.closed:
            if link.credit > 0:
                self.events.on_far_opened()  # the far end is there and takes bytes
            self.events.on_far_credit()

    def on_delivery(self, link: Link, delivery: Delivery) -> None:
        if self.closed:
            return
        if link.is_sender:
            self._on_outcome(delivery)
        else:
            self._on_message(link, delivery)

    def on_link_closed(self, link: Link) -> None:
        if self.closed:
            return
        condition = link.remote_condition
        is_sender = link.is_sender
        routed = is_sender == self.routed_is_sender
        if is_sender:
            self.sender = None
        else:
            self.receiver = None
        link.own(None)
        # A node proxy's only way to say "finished" is to drop its connection.
        lost_node = (
            condition is not None
            and condition.name == ROUTED_LINK_LOST
            and not self.peer_half_close
            and routed
            # At the ingress it means the far egress's connection died: a node
            # egress that finishes detaches without an error.
            and not self.routed_is_sender
        )
        if condition is not None and not lost_node:
            self._failed(
                f"far end detached: {printable(condition.name)}: "
                f"{printable(condition.description or '')}",
                Failure.FAR_END,
            )
        elif is_sender:
            self._on_sender_gone(routed)
        else:
            self._on_receiver_gone(routed)

    def on_link_failed(self, link: Link, condition: Condition) -> None:
        """The engine ended ``link`` for a fault (sent past credit, or our own error)."""
        self._failed(
            f"link ended: {printable(condition.name)}: {printable(condition.description or '')}",
            Failure.PROTOCOL,
        )

    def _on_outcome(self, delivery: Delivery) -> None:
        state = delivery.remote_state
        if not delivery.settled and state != ACCEPTED:
            return  # a non-terminal state such as received: wait for the outcome
        delivery.settle()
        self.unsettled -= 1
        if state not in (ACCEPTED, 0):
            self._failed(
                f"far end did not accept a delivery ({outcome_name(state)})", Failure.NOT_ACCEPTED
            )
            return
        self.events.on_far_credit()

    def _on_message(self, link: Link, delivery: Delivery) -> None:
        partial = self._partial
        if partial is None and not delivery.partial:
            data = link.recv(delivery.pending)  # one transfer: at most a frame
        else:
            # Take what has arrived: left in proton it would hold the session
            # window shut, and a delivery larger than the window would never end.
            if partial is None:
                partial = self._partial = PartialMessage(_EXPECTED_DELIVERY, MAX_MESSAGE_SIZE)
            partial.receive(link, delivery.pending)
            if partial.over:
                self._too_large(delivery, partial.size)
                return
            if delivery.partial:
                return
            self._partial = None
            data = partial.take()
        try:
            body, eos = wire.decode(data)
        except wire.WireError as exc:
            delivery.finish(REJECTED, condition=Condition("amqp:decode-error", str(exc)))
            self._failed(f"undecodable message: {exc}", Failure.PROTOCOL)
            return
        delivery.finish(ACCEPTED)
        events = self.events
        if not events.write_open:
            self._failed("data arrived after the end of the stream", Failure.PROTOCOL)
            return
        events.on_far_data(body)
        if eos:
            events.on_far_end()
        else:
            if self.window < self.max_window:
                self._grow(len(body))
            self._top_up()
        self.port.flush_soon()

    def _too_large(self, delivery: Delivery, size: int) -> None:
        self._partial = None
        condition = Condition("amqp:link:message-size-exceeded", f"{size} bytes so far")
        delivery.finish(REJECTED, condition=condition)
        self._failed(f"a delivery over {MAX_MESSAGE_SIZE} bytes", Failure.PROTOCOL)

    def _grow(self, written: int) -> None:
        """Count ``written`` towards proving the reader fast; the window grows on the proof."""
        if self.events.tcp_unsent:
            self.kept_up = 0
            return
        self.kept_up += written
        if self.kept_up >= self.proof:
            self.window = self.max_window

    def _top_up(self) -> None:
        receiver = self.receiver
        events = self.events
        if not events.tcp_writable and self.window > self.min_window:
            self.window = self.min_window
            self.kept_up = 0
        if (
            receiver is not None
            and not self.closed
            and events.takes_far_data
            and receiver.top_up(self.window)
        ):
            self.port.flush_soon()

    def _on_receiver_gone(self, routed: bool) -> None:
        if not self.events.write_open:
            self.events.on_far_credit()
        elif self.peer_half_close:
            self._failed("far end closed without an end-of-stream marker", Failure.FAR_END)
        elif routed:
            # A node ingress ends the tunnel as a whole (see _end_without_marker).
            self.events.on_far_finished("far end closed")
        else:
            self.events.on_far_end()

    def _on_sender_gone(self, routed: bool) -> None:
        if self.eos_sent and not self.unsettled:
            self.events.on_far_credit()
            return
        if self.peer_half_close or not routed:
            self._failed("far end closed before our stream ended", Failure.FAR_END)
            return
        # The node egress closes its links when its backend closes: that is
        # its end-of-stream. Our own client's later bytes cannot be carried,
        # and bytes it never acknowledged may be lost: that is a failure.
        if self.unsettled or self.events.parked:
            self._failed("far end closed with client bytes not yet delivered", Failure.FAR_END)
            return
        self.eos_sent = True
        self.eos_pending = False
        self.events.on_far_end()

    # -- ending -----------------------------------------------------------------------
    def _failed(self, reason: str, failure: Failure) -> None:
        self.events.on_far_failed(reason, failure)

    def _close_links(self, condition: Condition | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._partial = None
        for link in (self.sender, self.receiver):
            if link is not None:
                close_handle(link, condition)
        self.sender = self.receiver = None
        self.port.flush_soon()
        self._let_go()
