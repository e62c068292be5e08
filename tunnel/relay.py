"""One tunnel: one TCP connection carried over a pair of AMQP links.

Theory of operation
-------------------
A tunnel has an outgoing link (``sender``: TCP bytes to AMQP) and an
incoming link (``receiver``: AMQP to TCP bytes). One of the two is the
*routed* link, the one the router ties to the far end: the ingress's
sender, and the egress's receiver. The other is message-routed to a
dynamic address.

Flow control, TCP to AMQP
    One delivery per TCP read, sent only while the sender has credit, the
    AMQP socket is below its write high-water mark and fewer than
    :data:`MAX_UNSETTLED` deliveries await the far end's outcome. Otherwise
    reading from TCP is paused, so at most one read is ever parked here. The
    far end grants credit as its own TCP socket drains.

    Credit alone bounds nothing: a peer may grant a million and keep its
    session window shut, and every delivery then stays inside proton. The
    unsettled cap is what bounds the bytes held towards one peer, whatever
    its credit or window: at most ``MAX_UNSETTLED x MAX_DELIVERY`` (1 MiB)
    per tunnel. Each outcome that arrives wakes the tunnel, so the cap can
    never leave it waiting for nothing.

Flow control, AMQP to TCP
    The receiver keeps at most ``window`` deliveries of credit outstanding
    and tops it up only while the TCP socket is not paused for writing. So
    what can be buffered for a slow reader is ``window`` deliveries plus the
    socket's write high-water mark. Credit is granted only once the TCP
    connection exists, so the first bytes are never lost.

Half-close
    Each direction ends on its own. A TCP FIN becomes an end-of-stream
    marker (see :mod:`tunnel.wire`) when the far end offered the extension;
    towards a node proxy it becomes a clean detach of the routed link once
    every delivery has been settled, which is what the node proxy
    understands. An end-of-stream from AMQP becomes ``write_eof()``. The
    tunnel is finished once both directions have ended and every delivery
    is settled; the links are then detached without an error.

Failure
    Anything else (a TCP reset, a delivery that is not accepted, a detach
    with an error, a far end that stops without an end-of-stream marker
    although it promised one, the AMQP connection lost) resets the tunnel:
    the TCP connection is closed with an RST and both links are detached
    with a ``tunnel:reset`` error, so the far end resets its side too. A
    clean FIN is only ever passed on when the far side really ended.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from proton import Condition, Link

from . import tcp_side, wire
from .engine import (
    ACCEPTED,
    REJECTED,
    AmqpEngine,
    capabilities,
    close_link,
    outcome_name,
    receive_more,
    set_owner,
    settle,
)
from .engine import raw_lib as _lib
from .peer_text import printable
from .stats import BridgeStats

logger = logging.getLogger(__name__)

RESET_CONDITION = "tunnel:reset"
DEFAULT_WINDOW = 2
# With the window, what bounds the bytes in flight towards one tunnel:
# window x MAX_DELIVERY per direction.
MAX_DELIVERY = 128 * 1024
# Deliveries sent but not yet settled by the far end, per tunnel: past it
# reading from TCP pauses until an outcome arrives (see "Flow control").
MAX_UNSETTLED = 8
# The largest message we take in (our peers send at most MAX_DELIVERY, the
# node proxy 64 KiB); advertised on our receivers as max-message-size.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# What a router puts on a routed link whose far end's connection closed
# (protocols.md §8.1): a node ingress's only way to end its stream.
ROUTED_LINK_LOST = "qd:routed-link-lost"


class AmqpPort(Protocol):
    """The AMQP connection, as a tunnel sees it."""

    @property
    def write_paused(self) -> bool: ...
    @property
    def engine(self) -> AmqpEngine: ...
    def flush_soon(self) -> None: ...


class NoPort:
    """Stands in for the AMQP connection of a tunnel that has none (yet, or any more)."""

    write_paused = True  # so nothing is sent: the engine is never asked for

    @property
    def engine(self) -> AmqpEngine:
        raise RuntimeError("a tunnel sent without an AMQP connection")

    def flush_soon(self) -> None:
        pass


NO_PORT = NoPort()


class Failure(enum.Enum):
    """Why a tunnel was reset: a small fixed set, so metrics stay bounded."""

    TCP_RESET = "tcp-reset"
    FAR_END = "far-end-reset"
    NOT_ACCEPTED = "delivery-not-accepted"
    PROTOCOL = "protocol-error"
    NO_CREDIT = "no-credit"
    AMQP_LOST = "amqp-connection-lost"
    NO_ROUTER = "no-router"
    BACKEND = "backend-unreachable"
    SHUTDOWN = "shutdown"
    LIMIT = "connection-limit"
    IDLE = "idle-timeout"


class Phase(enum.Enum):
    """OPENING until the far end first grants credit, OPEN after, CLOSED once ended."""

    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


class TunnelLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: str, kwargs: object) -> tuple[str, object]:  # type: ignore[override]
        assert self.extra is not None
        return f"[{self.extra['tunnel']}] {msg}", kwargs


class Tunnel:
    """One TCP connection and its two AMQP links; see the module docstring."""

    DIALECT: ClassVar[str] = "link-route"

    __slots__ = (
        "__weakref__",
        "_parked",
        "_partial",
        "_rcv",
        "_snd",
        "_tag",
        "amqp",
        "bytes_in",
        "bytes_out",
        "eos_pending",
        "eos_sent",
        "failure",
        "log",
        "name",
        "on_finished",
        "peer_half_close",
        "phase",
        "prefix",
        "read_open",
        "receiver",
        "routed_is_sender",
        "sender",
        "sender_ready",
        "stats",
        "tcp",
        "tcp_write_paused",
        "unsettled",
        "window",
        "write_open",
    )

    def __init__(
        self,
        name: str,
        amqp: AmqpPort,
        *,
        routed_is_sender: bool,
        window: int = DEFAULT_WINDOW,
        on_finished: Callable[[Tunnel], None] | None = None,
    ) -> None:
        self.name = name
        self.amqp = amqp
        self.routed_is_sender = routed_is_sender
        self.window = window
        self.on_finished = on_finished
        self.stats: BridgeStats | None = None
        self.log = TunnelLog(logger, {"tunnel": name})
        self.sender: Link | None = None
        self.receiver: Link | None = None
        # The same links as proton's C handles, for the per-chunk paths.
        self._snd: Any = None
        self._rcv: Any = None
        self.sender_ready = False
        self.peer_half_close = False
        self.prefix = b""
        self.tcp: asyncio.Transport | None = None
        self.tcp_write_paused = False
        # The two directions of the stream, each open until its end-of-stream:
        # TCP to AMQP until the TCP peer's FIN, AMQP to TCP until the far end's.
        self.read_open = True
        self.write_open = True
        self.phase = Phase.OPENING
        self.eos_pending = False
        self.eos_sent = False
        self.unsettled = 0
        self.failure: Failure | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._parked: memoryview | None = None
        # The start of a delivery still arriving; bounded by max-message-size.
        self._partial: bytearray | None = None
        self._tag = 0

    # -- wiring ---------------------------------------------------------------
    def attach_links(self, sender: Link | None, receiver: Link | None) -> None:
        if sender is not None:
            self._set_sender(sender)
            set_owner(sender, self)
        if receiver is not None:
            self._set_receiver(receiver)
            set_owner(receiver, self)

    def _set_sender(self, link: Link | None) -> None:
        self.sender = link
        self._snd = None if link is None else link._impl

    def _set_receiver(self, link: Link | None) -> None:
        self.receiver = link
        self._rcv = None if link is None else link._impl

    # -- TCP events -----------------------------------------------------------
    def on_tcp_connected(self, transport: asyncio.Transport) -> None:
        if self.phase is Phase.CLOSED:
            tcp_side.reset(transport)
            return
        self.tcp = transport
        receiver = self.receiver
        if receiver is not None and receiver.state & Link.LOCAL_UNINIT:
            receiver.open()
        self._update_reading()
        self._top_up()

    def on_tcp_data(self, data: memoryview) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._snd is None and self.sender_ready:
            self.reset("TCP data arrived after the far end closed its side", Failure.FAR_END)
            return
        if self._parked is None:
            self._send_or_park(data)
            if self._parked is not None:
                self._parked = memoryview(bytes(self._parked))  # ``data`` is reused
        else:
            # Reading is paused while anything is parked; this is a read
            # that was already under way.
            self._parked = memoryview(bytes(self._parked) + data)
        self._update_reading()

    def on_tcp_eof(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.log.debug("TCP peer sent FIN")
        self.read_open = False
        self.eos_pending = True
        self._pump()
        self._check_finished()

    def on_tcp_closed(self, exc: Exception | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.tcp = None
        if exc is not None:
            self.reset(f"TCP connection failed: {exc}", Failure.TCP_RESET)
        elif self.read_open or self.write_open or self.eos_pending or self.unsettled:
            self.reset("TCP connection closed before the stream ended", Failure.TCP_RESET)

    def on_tcp_write_paused(self) -> None:
        self.tcp_write_paused = True

    def on_tcp_write_resumed(self) -> None:
        self.tcp_write_paused = False
        self._top_up()

    # -- AMQP events ----------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        # proton hands out a fresh wrapper per event, so links are told apart
        # by direction: a tunnel has one of each.
        if link.is_sender:
            self.on_sender_ready()

    def on_sender_ready(self) -> None:
        """The far end attached our sender (or it was attached already)."""
        if self.sender is None or self.phase is Phase.CLOSED:
            return
        self.sender_ready = True
        if self.routed_is_sender:
            self.peer_half_close = wire.HALF_CLOSE in capabilities(self.sender.remote_target)
        self._pump()

    def on_link_flow(self, link: Any) -> None:
        if _lib.pn_link_is_sender(link):
            if self.phase is Phase.OPENING and _lib.pn_link_credit(link) > 0:
                self.phase = Phase.OPEN  # the far end is there and will take bytes
            self._pump()

    def on_amqp_writable(self) -> None:
        self._pump()

    def on_delivery(self, link: Any, delivery: Any) -> None:
        if self.phase is Phase.CLOSED:
            return
        if _lib.pn_link_is_sender(link):
            self._on_outcome(delivery)
        else:
            self._on_message(link, delivery)

    def on_link_closed(self, link: Link) -> None:
        if self.phase is Phase.CLOSED:
            return
        condition = link.remote_condition
        is_sender = link.is_sender
        routed = is_sender == self.routed_is_sender
        if is_sender:
            self._set_sender(None)
        else:
            self._set_receiver(None)
        set_owner(link, None)
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
            self.reset(
                f"far end detached: {printable(condition.name)}: "
                f"{printable(condition.description or '')}",
                Failure.FAR_END,
            )
        elif is_sender:
            self._on_sender_gone(routed)
        else:
            self._on_receiver_gone(routed)

    def on_open_timeout(self, seconds: float) -> None:
        """Nothing granted credit in time: nothing serves the address (§8.1)."""
        if self.phase is Phase.OPENING:
            self.reset(
                f"no credit within {seconds:g} s: nothing serves the address", Failure.NO_CREDIT
            )

    def on_peer_closed(self) -> None:
        """The far end closed its whole AMQP connection cleanly.

        That is how a node ingress ends its stream (protocols.md §1.2), so
        towards a peer without the extension it is an end, not a failure.
        """
        if self.phase is Phase.CLOSED:
            return
        self._set_sender(None)
        self._set_receiver(None)
        if self.peer_half_close:
            self.reset("far end closed its connection before the stream ended", Failure.FAR_END)
            return
        self.write_open = False
        if self.tcp is not None:
            self.tcp.close()
        self._finish("far end closed its connection")

    def on_amqp_lost(self) -> None:
        """The AMQP connection is gone; the links with it."""
        if self.phase is Phase.CLOSED:
            return
        self._set_sender(None)
        self._set_receiver(None)
        self.reset("AMQP connection lost", Failure.AMQP_LOST)

    # -- sending --------------------------------------------------------------
    def _can_send(self) -> bool:
        return (
            self._snd is not None
            and self.sender_ready
            and not self.eos_sent
            and _lib.pn_link_credit(self._snd) > 0
            and self.unsettled < MAX_UNSETTLED
            and not self.amqp.write_paused
        )

    def _send_or_park(self, data: memoryview) -> None:
        """Send ``data`` in deliveries of at most ``MAX_DELIVERY`` while credit lasts.

        What credit does not cover is parked, to go on the next credit.
        """
        limit = MAX_DELIVERY
        while data:
            if not self._can_send():
                self._parked = data
                return
            chunk, data = data[:limit], data[limit:]
            self._deliver(self.prefix + wire.body_header(len(chunk)), chunk)
            self.bytes_out += len(chunk)
        self._parked = None

    def _deliver(self, head: bytes, body: bytes | memoryview = b"") -> None:
        """One unsettled delivery on the sender: ``head`` then ``body``, uncopied."""
        self._tag += 1
        self.amqp.engine.send_delivery(self._snd, b"%x" % self._tag, head, body)
        self.unsettled += 1
        self.amqp.flush_soon()

    def _pump(self) -> None:
        """Move whatever can move now: parked bytes, then the end-of-stream."""
        if self.phase is Phase.CLOSED:
            return
        if self._parked is not None:
            self._send_or_park(self._parked)
        if self.eos_pending and self._parked is None:
            self._send_eos()
        self._update_reading()

    def _send_eos(self) -> None:
        sender = self.sender
        if sender is None or not self.sender_ready:
            return
        if self.peer_half_close:
            if not self._can_send():
                return
            self._deliver(wire.eos_message(self.prefix))
        elif self.unsettled:
            return  # the fallback detach must wait until the far end has everything
        else:
            self._end_without_marker()
        self.eos_pending = False
        self.eos_sent = True
        self.log.debug("end of stream sent (%s)", "marker" if self.peer_half_close else "detach")
        self.amqp.flush_soon()
        self._check_finished()

    def _end_without_marker(self) -> None:
        """Signal our FIN to a node proxy: it knows only a detach of the routed link."""
        if self.routed_is_sender:
            assert self.sender is not None
            self._close_link(self.sender, None)
            self._set_sender(None)
        else:
            # The node ingress treats any end of the routed link as the end of
            # the whole tunnel, so nothing more will arrive either.
            self.write_open = False
            self._close_links(None)
            if self.tcp is not None:
                self.tcp.close()

    def _on_outcome(self, delivery: Any) -> None:
        state = _lib.pn_delivery_remote_state(delivery)
        if not _lib.pn_delivery_settled(delivery) and state != ACCEPTED:
            return  # a non-terminal state such as received: wait for the outcome
        _lib.pn_delivery_settle(delivery)
        self.unsettled -= 1
        if state not in (ACCEPTED, 0):
            self.reset(
                f"far end did not accept a delivery ({outcome_name(state)})", Failure.NOT_ACCEPTED
            )
            return
        self._pump()
        self._check_finished()

    # -- receiving ------------------------------------------------------------
    def _on_message(self, link: Any, delivery: Any) -> None:
        pending = _lib.pn_delivery_pending(delivery)
        if _lib.pn_delivery_partial(delivery):
            # Take what has arrived: left in proton it would hold the session
            # window shut, and a delivery larger than the window would never end.
            if pending:
                self._partial = receive_more(link, pending, self._partial)
                if len(self._partial) > MAX_MESSAGE_SIZE:
                    self.reset(f"a delivery over {MAX_MESSAGE_SIZE} bytes", Failure.PROTOCOL)
            return
        data = receive_more(link, pending, self._partial)
        self._partial = None
        try:
            body, eos = wire.decode(data)
        except wire.WireError as exc:
            settle(delivery, REJECTED, condition=Condition("amqp:decode-error", str(exc)))
            self.reset(f"undecodable message: {exc}", Failure.PROTOCOL)
            return
        settle(delivery, ACCEPTED)
        tcp = self.tcp
        if tcp is None or not self.write_open:
            self.reset("data arrived after the end of the stream", Failure.PROTOCOL)
            return
        if body:
            tcp.write(body)
            self.bytes_in += len(body)
        if eos:
            self._end_write("end-of-stream marker")
        else:
            self._top_up()
        self.amqp.flush_soon()

    def _top_up(self) -> None:
        rcv = self._rcv
        if (
            rcv is None
            or self.tcp is None
            or self.tcp_write_paused
            or not self.write_open
            or self.phase is Phase.CLOSED
        ):
            return
        credit = _lib.pn_link_credit(rcv)
        if credit <= self.window // 2:
            _lib.pn_link_flow(rcv, self.window - credit)
            self.amqp.flush_soon()

    def _end_write(self, why: str) -> None:
        self.log.debug("AMQP to TCP direction ended: %s", why)
        self.write_open = False
        if self.tcp is not None and not self.tcp.is_closing():
            try:
                self.tcp.write_eof()
            except OSError as exc:
                # The peer reset after its FIN, unseen: asyncio stops reading
                # at EOF, so the reset surfaces only here.
                self.reset(f"TCP connection failed: {exc}", Failure.TCP_RESET)
                return
        self._check_finished()

    def _on_receiver_gone(self, routed: bool) -> None:
        if not self.write_open:
            self._check_finished()
            return
        if self.peer_half_close:
            self.reset("far end closed without an end-of-stream marker", Failure.FAR_END)
        elif routed:
            # A node ingress ends the tunnel as a whole (see _end_without_marker).
            self.write_open = False
            self._close_links(None)
            if self.tcp is not None:
                self.tcp.close()
            self._finish("far end closed")
        else:
            self._end_write("far end detached")

    def _on_sender_gone(self, routed: bool) -> None:
        if self.eos_sent and not self.unsettled:
            self._check_finished()
            return
        if self.peer_half_close or not routed:
            self.reset("far end closed before our stream ended", Failure.FAR_END)
            return
        # The node egress closes its links when its backend closes: that is
        # its end-of-stream. Our own client's later bytes cannot be carried,
        # and bytes it never acknowledged may be lost: that is a failure.
        if self.unsettled or self._parked is not None:
            self.reset("far end closed with client bytes not yet delivered", Failure.FAR_END)
            return
        self.eos_sent = True
        self.eos_pending = False
        self._end_write("far end closed its routed link")

    # -- ending ---------------------------------------------------------------
    def _update_reading(self) -> None:
        want = (
            self._parked is None
            and self.read_open
            and self.phase is not Phase.CLOSED
            and self._can_send()
        )
        tcp_side.set_reading(self.tcp, want)

    def _check_finished(self) -> None:
        if (
            self.phase is Phase.CLOSED
            or self.read_open
            or self.write_open
            or not self.eos_sent
            or self.unsettled
        ):
            return
        self._close_links(None)
        if self.tcp is not None:
            self.tcp.close()
        self._finish("finished")

    def _finish(self, why: str) -> None:
        self.phase = Phase.CLOSED
        # Per connection: the flow record says it at INFO (tunnel.flows).
        self.log.debug("closed (%s): %d bytes in, %d bytes out", why, self.bytes_in, self.bytes_out)
        self._ended()

    def _ended(self) -> None:
        self.amqp.flush_soon()
        if self.stats is not None:
            self.stats.tunnel_closed(self)
        on_finished, self.on_finished = self.on_finished, None
        if on_finished is not None:
            on_finished(self)
        self._let_go()

    def _let_go(self) -> None:
        """Drop every reference a closed tunnel holds.

        A closed tunnel may live on for a while (its TCP transport holds it
        until ``connection_lost``, a flow record or a log line may too). It
        must not keep its AMQP connection, and with it proton's buffers,
        alive meanwhile, nor be part of a cycle that only the cycle
        collector would free.
        """
        self.amqp = NO_PORT
        self.tcp = None
        self._parked = None
        self._partial = None
        self._set_sender(None)
        self._set_receiver(None)

    def on_link_failed(self, link: Link, condition: Condition) -> None:
        """The engine ended ``link`` for a fault (sent past credit, or our own error)."""
        self.reset(
            f"link ended: {printable(condition.name)}: {printable(condition.description or '')}",
            Failure.PROTOCOL,
        )

    def reset(self, reason: str, failure: Failure) -> None:
        """Tear down both sides as a failure: RST on TCP, detach with an error on AMQP."""
        if self.phase is Phase.CLOSED:
            return
        self.failure = failure
        self.log.debug("reset: %s", reason)
        tcp, self.tcp = self.tcp, None
        if tcp is not None:
            tcp_side.reset(tcp)
        self._parked = None
        self._close_links(Condition(RESET_CONDITION, reason))
        self.phase = Phase.CLOSED
        self.log.debug(
            "reset (%s): %d bytes in, %d bytes out", reason, self.bytes_in, self.bytes_out
        )
        self._ended()

    def _close_links(self, condition: Condition | None) -> None:
        for link in (self.sender, self.receiver):
            if link is not None:
                self._close_link(link, condition)
        self._set_sender(None)
        self._set_receiver(None)

    def _close_link(self, link: Link, condition: Condition | None) -> None:
        close_link(link, condition)
