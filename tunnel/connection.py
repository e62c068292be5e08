"""One TCP connection carried over AMQP, whatever the dialect: :class:`Connection`.

Theory of operation
-------------------
A connection moves bytes between one TCP socket (a :class:`TcpPort`) and
one carrier (:mod:`tunnel.dialects`), which speaks a dialect's wire
contract. It knows which directions are open and what is parked; the
carrier knows links, deliveries and credit. It imports no asyncio and reads
no clock: the glue (:mod:`tunnel.tcp_side`, :mod:`tunnel.bridge`) calls its
``on_tcp_*`` methods, the carrier its ``on_far_*`` methods, and time comes
in as :meth:`Connection.on_deadline`'s argument, against the
:attr:`Connection.deadline` the glue arms a timer for.

State: :attr:`Connection.open`, the directions still open (``READ``: TCP to
AMQP, until the TCP peer's FIN; ``WRITE``: AMQP to TCP, until the far end's
end), and :attr:`Connection.phase`: ``OPENING`` until the far end is there
(first credit, or its counter-stream), ``OPEN``, then ``CLOSED``. A
``CLOSED`` connection ignores every event: each handler's first test.

Transitions (``carrier.idle()``: our side ended, all of it settled)::

    event                     state              next / effects
    ------------------------  -----------------  ----------------------------------------
    on_tcp_data               READ               send up to room(), park the rest;
                                                 read only while nothing is parked
                                                 (and, once OPEN, room() > 0)
    on_tcp_data               not sending        reset (far end closed its side)
    on_tcp_eof                READ               -READ; carrier.end() once unparked
    on_far_data               WRITE              TCP write (kept until TCP connects)
    on_far_data               -WRITE             reset (protocol)
    on_far_end                WRITE              -WRITE; TCP write_eof()
    any of the above          -READ -WRITE idle  carrier.close(); TCP close: CLOSED
    on_far_finished           any                -READ -WRITE; TCP close: CLOSED
    on_far_opened             OPENING            OPEN; no deadline
    on_deadline(now)          OPENING, past it   reset (no-credit)
    on_tcp_closed(error)      any                reset (tcp-reset)
    on_tcp_closed(None)       open or not idle   reset (tcp-reset)
    on_far_failed, amqp lost  any                reset
    reset                     any                TCP RST; carrier.reset(): CLOSED

Bounds: what is parked is at most two TCP reads
(:data:`~tunnel.tcp_side.READ_SIZE` each: reading pauses at the first that
does not fit, and one may already be under way). What the far end sends
before the TCP socket exists (an egress whose backend is still connecting:
a TCP-adaptor client stream, or the first credit window of a link-route
one) is kept up to :data:`MAX_EARLY` bytes, the most either window lets
the far end send; past it the connection resets.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from .census import counted
from .dialects.carrier import Carrier, Failure

if TYPE_CHECKING:
    from .stats import BridgeStats
    from .tcp_side import TcpPort

logger = logging.getLogger(__name__)

#: What the far end may send before our TCP socket exists (the TCP-adaptor window).
MAX_EARLY = 1024 * 1024


class Open(enum.IntFlag):
    """The directions of a connection still open.

    Kept as a plain ``int`` (:attr:`Connection.open`): an enum operation per
    chunk costs more than the chunk's own bookkeeping.
    """

    NONE = 0
    #: TCP to AMQP: the TCP peer has not sent its FIN.
    READ = enum.auto()
    #: AMQP to TCP: the far end has not ended its side.
    WRITE = enum.auto()
    BOTH = READ | WRITE


_READ, _WRITE, _BOTH = int(Open.READ), int(Open.WRITE), int(Open.BOTH)


class Phase(enum.Enum):
    """OPENING until the far end is first there, OPEN after, CLOSED once ended."""

    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


_OPENING, _CLOSED = Phase.OPENING, Phase.CLOSED


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Log lines of one connection, prefixed with its name."""

    def process(self, msg: str, kwargs: object) -> tuple[str, object]:  # type: ignore[override]
        assert self.extra is not None
        return f"[{self.extra['tunnel']}] {msg}", kwargs


@counted("tcp_connections")
class Connection:
    """One TCP connection and its carrier; see the module docstring."""

    __slots__ = (
        "__weakref__",
        "_early",
        "_parked",
        "bytes_in",
        "bytes_out",
        "carrier",
        "deadline",
        "failure",
        "name",
        "on_finished",
        "on_opened",
        "open",
        "open_timeout",
        "phase",
        "stats",
        "tcp",
        "tcp_connected",
        "tcp_paused",
    )

    def __init__(
        self,
        name: str,
        carrier: Carrier,
        *,
        stats: BridgeStats | None = None,
        peer: Hashable | None = None,
        on_finished: Callable[[Connection], None] | None = None,
        on_opened: Callable[[Connection], None] | None = None,
        now: float = 0.0,
        open_timeout: float | None = None,
    ) -> None:
        self.name = name
        self.carrier = carrier
        self.stats = stats
        self.on_finished = on_finished
        #: Told when the deadline goes (the far end is there), so a timer can go too.
        self.on_opened = on_opened
        #: The directions still open, as :class:`Open` bits.
        self.open = _BOTH
        self.phase = Phase.OPENING
        self.failure: Failure | None = None
        self.tcp: TcpPort | None = None
        #: Set once the TCP socket is there; it stays set after the socket goes.
        self.tcp_connected = False
        self.tcp_paused = False
        #: Bytes written to the TCP peer, and read from it.
        self.bytes_in = 0
        self.bytes_out = 0
        self.open_timeout = open_timeout
        #: When the far end must be there by (monotonic seconds), while OPENING.
        self.deadline = None if open_timeout is None else now + open_timeout
        self._parked: memoryview | None = None
        # Made at first need: most connections never have any.
        self._early: list[bytes] | None = None
        if stats is not None:
            stats.tunnel_opened(self, peer=peer)
        carrier.start(self)

    @property
    def log(self) -> ConnectionLog:
        # Made at need: it logs at DEBUG only, and an adapter per idle
        # connection would cost more than the connection's own fields.
        return ConnectionLog(logger, {"tunnel": self.name})

    @property
    def dialect(self) -> str:
        return self.carrier.DIALECT

    @property
    def read_open(self) -> bool:
        return bool(self.open & _READ)

    @property
    def write_open(self) -> bool:
        return bool(self.open & _WRITE)

    @property
    def parked(self) -> bool:
        return self._parked is not None

    @property
    def tcp_unsent(self) -> int:
        return 0 if self.tcp is None else self.tcp.unsent()

    @property
    def tcp_writable(self) -> bool:
        return self.tcp is not None and not self.tcp_paused and self.phase is not Phase.CLOSED

    @property
    def takes_far_data(self) -> bool:
        if self.phase is _CLOSED or not self.open & _WRITE:
            return False
        if self.tcp_connected:
            return self.tcp is not None and not self.tcp_paused
        return self._early is None  # one window is kept until TCP connects, no more

    # -- TCP events (TcpEvents) ----------------------------------------------------
    def on_tcp_connected(self, port: TcpPort) -> None:
        if self.phase is _CLOSED:
            port.reset()
            return
        self.tcp = port
        self.tcp_connected = True
        early, self._early = self._early, None
        for data in early or ():
            self._write(data)
        self.carrier.on_tcp_connected()
        if not self.write_open and self.phase is not _CLOSED:
            self._write_eof()  # the far end ended before TCP was there
        self._pump()

    def on_tcp_data(self, data: memoryview) -> None:
        if self.phase is _CLOSED:
            return
        if not self.carrier.sending:
            self.reset("TCP data arrived after the far end closed its side", Failure.FAR_END)
            return
        if self._parked is None:
            rest = self._send(data)
            if rest:
                self._parked = memoryview(bytes(rest))  # ``data`` is reused after this call
        else:
            # Reading pauses while anything is parked; this read was under way.
            self._parked = memoryview(b"".join((self._parked, data)))
        self._update_reading()

    def on_tcp_eof(self) -> None:
        if self.phase is _CLOSED:
            return
        self.log.debug("TCP peer sent FIN")
        self.open &= ~_READ
        self._pump()

    def on_tcp_closed(self, exc: Exception | None) -> None:
        if self.phase is _CLOSED:
            return
        self.tcp = None
        if exc is not None:
            self.reset(f"TCP connection failed: {exc}", Failure.TCP_RESET)
        elif self.open or not self.carrier.idle():
            self.reset("TCP connection closed before the stream ended", Failure.TCP_RESET)

    def on_tcp_write_paused(self) -> None:
        self.tcp_paused = True

    def on_tcp_write_resumed(self) -> None:
        self.tcp_paused = False
        if self.phase is not _CLOSED:
            self.carrier.on_tcp_drained()

    # -- carrier events (CarrierEvents) ----------------------------------------------
    def on_far_opened(self) -> None:
        if self.phase is Phase.OPENING:
            self.phase = Phase.OPEN
            self.deadline = None
            on_opened, self.on_opened = self.on_opened, None
            if on_opened is not None:
                on_opened(self)

    def on_far_credit(self) -> None:
        if self.phase is not _CLOSED:
            self._pump()

    def on_far_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase is _CLOSED or not data:
            return
        if not self.open & _WRITE:
            self.reset("data arrived after the end of the stream", Failure.PROTOCOL)
        elif self.tcp is not None:
            self._write(data)
        elif self._early is None:
            self._early = [bytes(data)]
        elif sum(map(len, self._early)) + len(data) > MAX_EARLY:
            self.reset(f"over {MAX_EARLY} bytes before the TCP connection", Failure.PROTOCOL)
        else:
            self._early.append(bytes(data))

    def on_far_end(self) -> None:
        if self.phase is _CLOSED or not self.write_open:
            return
        self.open &= ~_WRITE
        if self.tcp is not None:
            self._write_eof()

    def on_far_finished(self, why: str) -> None:
        if self.phase is _CLOSED:
            return
        self.open = 0
        self.carrier.close()
        if self.tcp is not None:
            self.tcp.close()
        self._finish(why)

    def on_far_failed(self, reason: str, failure: Failure) -> None:
        self.reset(reason, failure)

    # -- the AMQP connection and time ---------------------------------------------------
    def on_amqp_writable(self) -> None:
        if self.phase is not _CLOSED:
            self._pump()

    def on_amqp_lost(self) -> None:
        if self.phase is not _CLOSED:
            self.carrier.lost()
            self.reset("AMQP connection lost", Failure.AMQP_LOST)

    def on_peer_closed(self) -> None:
        if self.phase is not _CLOSED:
            self.carrier.on_peer_closed()

    def on_deadline(self, now: float) -> None:
        """Time has come to ``now``: past the deadline, nothing served the address."""
        if self.phase is Phase.OPENING and self.deadline is not None and now >= self.deadline:
            self.reset(
                f"no {self.carrier.AWAITED} within {self.open_timeout:g} s: "
                "nothing serves the address",
                Failure.NO_CREDIT,
            )

    # -- moving bytes -----------------------------------------------------------------
    def _send(self, data: memoryview) -> memoryview:
        """Give the carrier what it has room for; returns the rest."""
        room = self.carrier.room()
        if room <= 0:
            return data
        taken = data[:room]
        self.carrier.send(taken)
        self.bytes_out += len(taken)
        return data[len(taken) :]

    def _pump(self) -> None:
        """Move whatever can move now: parked bytes, then our end, then see if we are done."""
        if self._parked is not None:
            rest = self._send(self._parked)
            # A view of what is left: sending part of it copies nothing.
            self._parked = rest if rest else None
        if not self.open & _READ and self._parked is None and self.phase is not _CLOSED:
            self.carrier.end()
        if self.phase is not _CLOSED:
            self._update_reading()
            self._check_finished()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.tcp is not None
        self.tcp.write(data)
        self.bytes_in += len(data)

    def _write_eof(self) -> None:
        assert self.tcp is not None
        self.log.debug("far end finished its side")
        try:
            self.tcp.write_eof()
        except OSError as exc:
            # The peer reset after its FIN, unseen: asyncio stops reading at
            # EOF, so the reset surfaces only here.
            self.reset(f"TCP connection failed: {exc}", Failure.TCP_RESET)
            return
        self.carrier.on_eof_written()
        self._check_finished()

    def _update_reading(self) -> None:
        if self.tcp is not None:
            # While opening, one read is taken and parked: the client's first
            # bytes then leave with the far end's first credit, not a loop turn
            # and a socket read after it.
            self.tcp.set_reading(
                bool(self.open & _READ)
                and self._parked is None
                and (self.phase is _OPENING or self.carrier.room() > 0)
            )

    # -- ending -------------------------------------------------------------------------
    def _check_finished(self) -> None:
        if self.phase is not _CLOSED and not self.open and self.carrier.idle():
            self.carrier.close()
            if self.tcp is not None:
                self.tcp.close()
            self._finish("finished")

    def _finish(self, why: str) -> None:
        self.phase = Phase.CLOSED
        # Per connection: the flow record says it at INFO (tunnel.flows).
        self.log.debug("closed (%s): %d bytes in, %d bytes out", why, self.bytes_in, self.bytes_out)
        self._ended()

    def reset(self, reason: str, failure: Failure) -> None:
        """Tear down both sides as a failure: RST on TCP, the carrier's reset on AMQP."""
        if self.phase is _CLOSED:
            return
        self.failure = failure
        tcp, self.tcp = self.tcp, None
        if tcp is not None:
            tcp.reset()
        self._parked = None
        self.phase = Phase.CLOSED
        self.carrier.reset(reason)
        self.log.debug(
            "reset (%s): %d bytes in, %d bytes out", reason, self.bytes_in, self.bytes_out
        )
        self._ended()

    def _ended(self) -> None:
        self.deadline = None
        if self.stats is not None:
            self.stats.tunnel_closed(self)
        on_finished, self.on_finished = self.on_finished, None
        self.on_opened = None
        if on_finished is not None:
            on_finished(self)
        # A closed connection may live on a while (its TCP transport holds it
        # until connection_lost, a flow record may too): it keeps nothing alive.
        self.tcp = None
        self._parked = None
        self._early = None
