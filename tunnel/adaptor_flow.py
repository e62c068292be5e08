"""One TCP connection in skupper-router's TCP adaptor dialect: two streaming deliveries.

Theory of operation
-------------------
A :class:`Flow` carries one TCP connection as two streams (see
:mod:`tunnel.adaptor_wire`), one per direction, each a single unsettled
delivery that lasts as long as its direction does:

- *out*: bytes read from TCP, on a sender of the flow's own whose target
  carries ``qd.streaming-deliveries``;
- *in*: the far end's stream, written to TCP. It arrives on whatever link
  the router picks (our consumer link, a link it opened for the stream, or
  our dynamic receiver); the connection's :class:`StreamDispatcher` reads
  its header and hands it to its flow.

Roles
    As a *listener* (our ingress, ``tcp:P=>amqp:A``) a flow attaches a
    dynamic receiver, sends its stream to ``A`` with that address as
    ``reply-to``, and reads nothing from the client until the far end's
    counter-stream arrives, as the router's own listener does: a refused
    stream then loses nothing. As a *connector* (our egress,
    ``amqp:A=>tcp:H:P``) a flow is made for a client stream arriving for
    ``A``; it connects to the backend and only then answers with its
    stream to the client stream's ``reply-to``.

Flow control: byte windows, as the router's adaptor keeps them (§4.3)
    In: once bytes are handed to the TCP socket, and not while the socket
    is over its high-water mark, they are acknowledged with an unsettled
    ``received{section-number 0, section-offset <bytes written>}``, every
    :data:`ACK_EVERY` bytes. The far end stops at its window (≈1 MB)
    without them, so a slow TCP reader holds back the far end, not our
    memory. Out: TCP is read only while fewer than :data:`WINDOW` bytes are
    unacknowledged and the AMQP socket is below its high-water mark.

Half-close
    A TCP FIN ends the out stream: its final transfer (``more=false``).
    The end of the in stream becomes ``write_eof()`` on TCP, and the stream
    is then accepted and settled. A flow is finished once both directions
    have ended and the far end has settled our stream.

Failure
    Anything else resets the flow: an RST on TCP, our stream aborted if it
    was unfinished, the far end's stream settled ``modified`` (delivery
    failed), so the router closes its side. A clean end is only passed on
    when the far side really ended.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import cproton
from proton import Condition, Link, Sender, Session

from . import adaptor_wire, tcp_side
from .codec import WireError
from .engine import (
    ACCEPTED,
    MODIFIED,
    RECEIVED,
    REJECTED,
    RELEASED,
    add_capability,
    close_link,
    outcome_name,
    receive_delivery,
    set_owner,
    settle,
)
from .engine import raw_lib as _lib
from .peer_text import printable
from .relay import NO_PORT, RESET_CONDITION, AmqpPort, Failure, Phase, TunnelLog
from .stats import BridgeStats

logger = logging.getLogger(__name__)

#: Unacknowledged bytes we let out per flow; the router's own is ≈1,042,432.
WINDOW = 1024 * 1024
#: How often we acknowledge what we wrote (the router itself acks every ≈0.52 MB).
ACK_EVERY = 64 * 1024
#: Credit on a consumer link: streams that may start at once before we top it up.
CONSUMER_CREDIT = 64


class Role(enum.Enum):
    LISTENER = "listener"
    CONNECTOR = "connector"


class FlowHost(Protocol):
    """The AMQP connection a flow runs on."""

    @property
    def socket(self) -> AmqpPort: ...
    def add_tunnel(self, tunnel: Any) -> None: ...
    def forget_tunnel(self, tunnel: Any) -> None: ...


class Flow:
    """One TCP connection and its two streams; see the module docstring."""

    DIALECT: ClassVar[str] = "tcp-adaptor"

    __slots__ = (
        "__weakref__",
        "_early",
        "_parked",
        "_snd",
        "acked",
        "address",
        "amqp",
        "bytes_in",
        "bytes_out",
        "dispatcher",
        "failure",
        "host",
        "in_delivery",
        "in_ended",
        "log",
        "name",
        "open_timer",
        "out",
        "out_ended",
        "out_settled",
        "peer_acked",
        "phase",
        "read_open",
        "receiver",
        "reply_to",
        "role",
        "sender",
        "stats",
        "tcp",
        "tcp_write_paused",
        "write_open",
    )

    def __init__(
        self,
        name: str,
        host: FlowHost,
        dispatcher: StreamDispatcher,
        role: Role,
        address: str,
        *,
        stats: BridgeStats | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.amqp = host.socket
        self.dispatcher = dispatcher
        self.role = role
        #: Where our stream goes: the service address, or the client stream's reply-to.
        self.address = address
        self.stats = stats
        self.log = TunnelLog(logger, {"tunnel": name})
        self.phase = Phase.OPENING
        self.failure: Failure | None = None
        self.tcp: asyncio.Transport | None = None
        self.tcp_write_paused = False
        self.read_open = True
        self.write_open = True
        self.sender: Link | None = None
        self._snd: Any = None
        self.receiver: Link | None = None
        self.reply_to: str | None = None
        self.out: Any = None
        self.out_ended = False
        self.out_settled = False
        self.peer_acked = 0
        self.in_delivery: Any = None
        self.in_ended = False
        self.acked = 0
        # Bytes written to TCP and read from it: also the stream offsets that
        # acknowledgements count.
        self.bytes_in = 0
        self.bytes_out = 0
        # TCP reads that were under way when reading paused.
        self._parked: list[bytes] = []
        # A connector's stream bytes that arrived before its backend connected.
        self._early: list[bytes] = []
        self.open_timer: asyncio.TimerHandle | None = None
        host.add_tunnel(self)
        if stats is not None:
            stats.tunnel_opened(self)

    # -- starting -----------------------------------------------------------------
    def start_listener(
        self,
        session: Session,
        transport: asyncio.Transport,
        open_timeout: float,
        parked: bytes = b"",
        read_open: bool = True,
    ) -> None:
        """Our ingress: a client is connected; ask for a reply address, then send our stream.

        ``parked`` is what was read from the client already, and
        ``read_open`` False if it already sent its FIN.
        """
        self.tcp = transport
        if parked:
            self._parked.append(parked)
        self.read_open = read_open
        self._update_reading()
        receiver = session.receiver(f"{self.name}/reply")
        receiver.source.dynamic = True
        set_owner(receiver, self)
        receiver.open()
        self.receiver = receiver
        self.open_timer = asyncio.get_running_loop().call_later(
            open_timeout, self._on_open_timeout, open_timeout
        )
        self.log.debug("accepted; opening a stream to %r", self.address)
        self.amqp.flush_soon()

    def start_connector(self, delivery: Any, header: adaptor_wire.StreamHeader) -> None:
        """Our egress: a client stream arrived; it waits for the backend connect."""
        self.in_delivery = delivery
        self.reply_to = header.reply_to
        self.log.debug("client stream (correlation %s) for %r", header.correlation_id, header.to)

    # -- AMQP: link events ------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        if self.phase is Phase.CLOSED:
            return
        if link.is_receiver:
            self._on_reply_address(link)
        else:
            self._start_out()

    def _on_reply_address(self, link: Link) -> None:
        address = link.remote_source.address
        if not address:
            self.reset("the router gave no dynamic reply address", Failure.FAR_END)
            return
        self.reply_to = address
        # From here on the dispatcher reads what arrives on it, like any stream.
        self.dispatcher.expect_reply(address, self, link)
        link.flow(1)
        self._open_sender(link.session, self.address)

    def _open_sender(self, session: Session, address: str) -> None:
        sender: Sender = session.sender(self.name)
        sender.target.address = address
        add_capability(sender.target, adaptor_wire.STREAMING_DELIVERIES)
        set_owner(sender, self)
        sender.open()
        self.sender, self._snd = sender, sender._impl
        self.amqp.flush_soon()

    def on_link_flow(self, link: Any) -> None:
        if _lib.pn_link_is_sender(link):
            self._start_out()

    def on_link_closed(self, link: Link) -> None:
        if self.phase is Phase.CLOSED:
            return
        condition = link.remote_condition
        what = (
            f"{printable(condition.name)}: {printable(condition.description)}"
            if condition
            else "no error"
        )
        if link.is_sender and self.out_settled:
            return
        self.reset(
            f"the far end detached our {'sender' if link.is_sender else 'receiver'} ({what})",
            Failure.FAR_END,
        )

    def on_delivery(self, link: Any, delivery: Any) -> None:
        """An update on our own stream: the far end's acknowledgements and outcome."""
        if self.phase is Phase.CLOSED:
            return
        state = _lib.pn_delivery_remote_state(delivery)
        if state == RECEIVED:
            offset = _lib.pn_disposition_get_section_offset(_lib.pn_delivery_remote(delivery))
            # The far end cannot have received what never left proton: an
            # acknowledgement past that is a lie that would open our window
            # for good (a shut session window keeps our bytes in proton).
            offset = min(offset, self._bytes_framed())
            if offset > self.peer_acked:
                self.peer_acked = offset
                self._pump()
        if not _lib.pn_delivery_settled(delivery) and state in (0, RECEIVED):
            return
        if state not in (ACCEPTED, 0, RECEIVED) or not self.out_ended:
            self.reset(f"far end ended our stream ({outcome_name(state)})", Failure.NOT_ACCEPTED)
            return
        _lib.pn_delivery_settle(delivery)
        self.out_settled = True
        self._check_finished()

    # -- AMQP: the far end's stream (called by the dispatcher) --------------------------
    def on_in_stream(
        self, delivery: Any, header: adaptor_wire.StreamHeader, first: memoryview
    ) -> None:
        """The far end's stream began; ``first`` is what came after its header."""
        if self.role is Role.LISTENER:
            if header.content_type != adaptor_wire.CONTENT_TYPE:
                settle(delivery, REJECTED)
                self.reset(
                    f"counter-stream with content-type {header.content_type!r}", Failure.PROTOCOL
                )
                return
            self.in_delivery = delivery
            if self.open_timer is not None:
                self.open_timer.cancel()
                self.open_timer = None
            self.phase = Phase.OPEN
            self.log.debug("counter-stream arrived")
            self._pump()
        self.on_in_data(first)

    def on_in_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is Phase.CLOSED or not data:
            return
        if not self.write_open:
            self.reset("stream bytes after the end of the stream", Failure.PROTOCOL)
            return
        tcp = self.tcp
        if tcp is None:
            # A connector before its backend is connected: the far end may
            # send up to its window without our acknowledgement; keep it.
            self._early.append(bytes(data))
            return
        tcp.write(data)
        self.bytes_in += len(data)
        self._acknowledge(ACK_EVERY)

    def on_in_end(self, aborted: bool) -> None:
        """The far end's stream is complete: its final transfer arrived, or it was aborted."""
        if self.phase is Phase.CLOSED:
            return
        if aborted:
            self.reset("the far end aborted its stream", Failure.FAR_END)
            return
        self.in_ended = True
        if self.tcp is not None:
            self._end_write()

    def _end_write(self) -> None:
        assert self.tcp is not None
        self.write_open = False
        try:
            self.tcp.write_eof()
        except OSError as exc:
            # As in the relay: a reset after the peer's own FIN surfaces only here.
            self.reset(f"TCP connection failed: {exc}", Failure.TCP_RESET)
            return
        self.log.debug("far end finished its stream")
        self.dispatcher.release(self.in_delivery)
        settle(self.in_delivery, ACCEPTED)
        self.in_delivery = None
        self.amqp.flush_soon()
        self._check_finished()

    def _acknowledge(self, every: int) -> None:
        delivery = self.in_delivery
        if delivery is None or self.tcp_write_paused or self.bytes_in - self.acked < every:
            return
        local = _lib.pn_delivery_local(delivery)
        _lib.pn_disposition_set_section_number(local, 0)
        _lib.pn_disposition_set_section_offset(local, self.bytes_in)
        _lib.pn_delivery_update(delivery, RECEIVED)
        self.acked = self.bytes_in
        self.amqp.flush_soon()

    # -- TCP events -------------------------------------------------------------------
    def on_tcp_connected(self, transport: asyncio.Transport) -> None:
        """A connector's backend connected: answer the client stream."""
        if self.phase is Phase.CLOSED:
            tcp_side.reset(transport)
            return
        self.tcp = transport
        self._update_reading()
        if not self.reply_to:
            self.reset("client stream without a reply-to", Failure.PROTOCOL)
            return
        early, self._early = self._early, []
        for data in early:
            self.on_in_data(data)
        if self.in_ended:
            self._end_write()
        if self.failure is None:
            self._open_sender(self.dispatcher.session, self.reply_to)

    def on_tcp_data(self, data: memoryview) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._can_send() and not self._parked:
            self._send(data)
        else:
            # A read that was under way when reading paused; ``data`` is reused.
            self._parked.append(bytes(data))
        self._update_reading()

    def on_tcp_eof(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.log.debug("TCP peer sent FIN")
        self.read_open = False
        self._pump()

    def on_tcp_closed(self, exc: Exception | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.tcp = None
        if exc is not None:
            self.reset(f"TCP connection failed: {exc}", Failure.TCP_RESET)
        elif self.read_open or self.write_open or not self.out_ended:
            self.reset("TCP connection closed before the stream ended", Failure.TCP_RESET)

    def on_tcp_write_paused(self) -> None:
        self.tcp_write_paused = True

    def on_tcp_write_resumed(self) -> None:
        self.tcp_write_paused = False
        self._acknowledge(1)

    # -- the connection -----------------------------------------------------------------
    def on_amqp_writable(self) -> None:
        self._pump()

    def on_amqp_lost(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.reset("AMQP connection lost", Failure.AMQP_LOST)

    def _on_open_timeout(self, seconds: float) -> None:
        self.open_timer = None
        if self.phase is Phase.OPENING:
            self.reset(f"no counter-stream within {seconds:g} s", Failure.NO_CREDIT)

    # -- sending ------------------------------------------------------------------------
    def _start_out(self) -> None:
        """Begin our stream with its header once the sender has credit."""
        snd = self._snd
        if self.out is not None or snd is None or _lib.pn_link_credit(snd) <= 0:
            return
        if self.role is Role.LISTENER:
            head = adaptor_wire.encode_header(self.address, self.reply_to, self.name)
        else:
            head = adaptor_wire.encode_header(self.address)
            self.phase = Phase.OPEN
        self.out = cproton.pn_delivery(snd, b"0")
        self.amqp.engine.stream(snd, self.out, head)
        self.amqp.flush_soon()
        self._pump()

    def _bytes_framed(self) -> int:
        """Bytes of our stream that proton has framed: what the far end may have had."""
        if self.out is None:
            return 0
        return self.bytes_out - int(_lib.pn_delivery_pending(self.out))

    def _can_send(self) -> bool:
        return (
            self.out is not None
            and not self.out_ended
            and self.phase is Phase.OPEN
            and self.bytes_out - self.peer_acked < WINDOW
            and not self.amqp.write_paused
        )

    def _send(self, data: bytes | memoryview) -> None:
        self.amqp.engine.stream(self._snd, self.out, data)
        self.bytes_out += len(data)
        self.amqp.flush_soon()

    def _pump(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        while self._parked and self._can_send():
            self._send(self._parked.pop(0))
        if not self.read_open and not self._parked and self.out is not None and not self.out_ended:
            _lib.pn_link_advance(self._snd)  # the final transfer: our FIN
            self.out_ended = True
            self.log.debug("end of stream sent")
            self.amqp.flush_soon()
        self._update_reading()
        self._check_finished()

    def _update_reading(self) -> None:
        tcp_side.set_reading(self.tcp, self.read_open and not self._parked and self._can_send())

    # -- ending -------------------------------------------------------------------------
    def _check_finished(self) -> None:
        if (
            self.phase is Phase.CLOSED
            or self.read_open
            or self.write_open
            or not self.out_ended
            or not self.out_settled
        ):
            return
        self._close_links(None)
        if self.tcp is not None:
            self.tcp.close()
        self.phase = Phase.CLOSED
        self.log.debug(
            "closed (finished): %d bytes in, %d bytes out", self.bytes_in, self.bytes_out
        )
        self._ended()

    def on_link_failed(self, link: Link, condition: Condition) -> None:
        """The engine ended ``link`` for a fault (sent past credit, or our own error)."""
        self.reset(
            f"link ended: {printable(condition.name)}: {printable(condition.description or '')}",
            Failure.PROTOCOL,
        )

    def reset(self, reason: str, failure: Failure) -> None:
        """Tear down both sides as a failure; see the module docstring."""
        if self.phase is Phase.CLOSED:
            return
        self.failure = failure
        tcp, self.tcp = self.tcp, None
        if tcp is not None:
            tcp_side.reset(tcp)
        self._parked.clear()
        if self.out is not None and not self.out_settled:
            if self.out_ended:
                _lib.pn_delivery_settle(self.out)
            else:
                _lib.pn_delivery_abort(self.out)
        if self.in_delivery is not None:
            self.dispatcher.release(self.in_delivery)
            settle(self.in_delivery, MODIFIED, failed=True)
            self.in_delivery = None
        self._close_links(Condition(RESET_CONDITION, reason))
        self.phase = Phase.CLOSED
        self.log.debug(
            "reset (%s): %d bytes in, %d bytes out", reason, self.bytes_in, self.bytes_out
        )
        self._ended()

    def _close_links(self, condition: Condition | None) -> None:
        if self.sender is not None:
            close_link(self.sender, condition)
            self.sender = self._snd = None
        if self.receiver is not None:
            close_link(self.receiver, condition)
            self.receiver = None

    def _ended(self) -> None:
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        self.dispatcher.forget(self)
        self.host.forget_tunnel(self)
        self.amqp.flush_soon()
        if self.stats is not None:
            self.stats.tunnel_closed(self)
        # As a closed Tunnel does (see relay.Tunnel._let_go): keep nothing alive.
        self.amqp = NO_PORT
        self.tcp = None
        self._parked.clear()
        self._early.clear()
        self.out = self.in_delivery = None
        self.sender = self._snd = self.receiver = None


class StreamDispatcher:
    """Reads the header of every stream arriving on one connection and gives it its flow.

    It owns every receiving link of an adaptor-dialect connection: the
    consumer links of egress bridges, the links the router opens per stream
    (``qd.streaming-links``), and the listeners' dynamic receivers once their
    address is known. A stream for a listener's reply address goes to that
    flow; one for an egress address starts a connector flow; any other is
    released, so the router can try elsewhere.
    """

    def __init__(
        self,
        session: Session,
        on_client_stream: Callable[[str, Any, adaptor_wire.StreamHeader], Flow | None],
        on_consumer_ready: Callable[[str], None],
    ) -> None:
        self.session = session
        self.on_client_stream = on_client_stream
        self.on_consumer_ready = on_consumer_ready
        self.replies: dict[str, Flow] = {}
        # Every stream handed to a flow, until the flow settles it: proton
        # may report on it again after its last byte, and reuses its memory
        # for a new delivery only once it is settled.
        self.flows: dict[Any, Flow] = {}
        self.ended: set[Any] = set()
        # Streams whose header is still arriving, with the link they arrive on.
        self.heads: dict[Any, tuple[Any, bytearray]] = {}
        self.consumers: dict[str, Link] = {}
        self._consumer_links: set[Any] = set()

    def consume(self, address: str) -> None:
        receiver = self.session.receiver(f"tunnel-consumer-{address}")
        receiver.source.address = address
        set_owner(receiver, self)
        receiver.open()
        receiver.flow(CONSUMER_CREDIT)
        self.consumers[address] = receiver
        self._consumer_links.add(receiver._impl)

    def accept_link(self, link: Link) -> None:
        """A link the router opened towards us to carry one stream at a time."""
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        set_owner(link, self)
        link.open()
        link.flow(1)

    def expect_reply(self, address: str, flow: Flow, link: Link) -> None:
        self.replies[address] = flow
        set_owner(link, self)

    def release(self, delivery: Any) -> None:
        """``delivery`` is about to be settled by its flow."""
        self.flows.pop(delivery, None)
        self.ended.discard(delivery)

    def forget(self, flow: Flow) -> None:
        if flow.reply_to is not None and self.replies.get(flow.reply_to) is flow:
            del self.replies[flow.reply_to]
        for delivery in [d for d, f in self.flows.items() if f is flow]:
            self.release(delivery)

    # -- LinkOwner ----------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        for address, consumer in self.consumers.items():
            if consumer.name == link.name:
                self.on_consumer_ready(address)

    def on_link_flow(self, link: Any) -> None:
        pass

    def on_link_closed(self, link: Link) -> None:
        # proton reuses a freed delivery's memory: forget the link's unfinished headers.
        gone = link._impl
        for delivery in [d for d, (on, _) in self.heads.items() if on == gone]:
            del self.heads[delivery]
        condition = link.remote_condition
        if condition is not None and link.name.startswith("tunnel-consumer-"):
            logger.error(
                "router closed the consumer link %s: %s: %s",
                printable(link.name),
                printable(condition.name),
                printable(condition.description),
            )

    def on_delivery(self, link: Any, delivery: Any) -> None:
        flow = self.flows.get(delivery)
        if flow is None:
            self._on_new_stream(link, delivery)
            return
        if delivery in self.ended:
            return  # read to the end; its flow settles it
        pending = _lib.pn_delivery_pending(delivery)
        if pending:
            flow.on_in_data(receive_delivery(link, pending))
        self._check_end(link, delivery, flow)

    def _on_new_stream(self, link: Any, delivery: Any) -> None:
        if _lib.pn_delivery_local_state(delivery):
            # One we answered already: proton may report on it once more
            # (the far end settling it, its link closing) before freeing it.
            return
        if _lib.pn_delivery_aborted(delivery) or _lib.pn_delivery_settled(delivery):
            # Given up by the far end before we knew whose it was.
            self.heads.pop(delivery, None)
            _lib.pn_delivery_settle(delivery)
            return
        buf = self.heads.setdefault(delivery, (link, bytearray()))[1]
        pending = _lib.pn_delivery_pending(delivery)
        if pending:
            buf += receive_delivery(link, pending)
        try:
            parsed = adaptor_wire.parse_header(buf)
        except WireError as exc:
            self._refuse(link, delivery, REJECTED, f"not a TCP adaptor stream: {exc}")
            return
        if parsed is None:
            if not _lib.pn_delivery_partial(delivery):
                self._refuse(link, delivery, REJECTED, "a stream that ended inside its header")
            return
        header, start = parsed
        del self.heads[delivery]
        flow = self._flow_for(link, delivery, header)
        if flow is not None and flow.phase is not Phase.CLOSED:
            self.flows[delivery] = flow
            self._top_up(link)
            flow.on_in_stream(delivery, header, memoryview(buf)[start:])
            self._check_end(link, delivery, flow)

    def _flow_for(self, link: Any, delivery: Any, header: adaptor_wire.StreamHeader) -> Flow | None:
        """A listener's counter-stream, or a new connector flow; None once refused."""
        flow = self.replies.get(header.to or "")
        if flow is not None:
            return flow
        if not header.reply_to:
            self._refuse(link, delivery, REJECTED, "a client stream without a reply-to")
            return None
        if header.content_type != adaptor_wire.CONTENT_TYPE:
            # Another encapsulation: the router may have a connector that speaks it.
            self._refuse(
                link, delivery, RELEASED, f"content-type {header.content_type!r} is not ours"
            )
            return None
        flow = self.on_client_stream(header.to or "", delivery, header)
        if flow is None:
            self._refuse(link, delivery, RELEASED, f"no bridge for address {header.to!r}")
        return flow

    def _check_end(self, link: Any, delivery: Any, flow: Flow) -> None:
        if (
            _lib.pn_delivery_partial(delivery)
            or _lib.pn_delivery_pending(delivery)
            or delivery not in self.flows
        ):
            return
        self.ended.add(delivery)
        flow.on_in_end(bool(_lib.pn_delivery_aborted(delivery)))
        self._top_up(link)

    def _refuse(self, link: Any, delivery: Any, outcome: int, why: str) -> None:
        logger.info("stream refused (%s): %s", outcome_name(outcome), printable(why))
        self.heads.pop(delivery, None)
        settle(delivery, outcome, failed=outcome == MODIFIED)
        self._top_up(link)

    def _top_up(self, link: Any) -> None:
        # A consumer link keeps credit for many streams; a link the router
        # opened, or a reply link, carries one stream at a time.
        want = CONSUMER_CREDIT if link in self._consumer_links else 1
        credit = _lib.pn_link_credit(link)
        if credit <= want // 2:
            _lib.pn_link_flow(link, want - credit)
