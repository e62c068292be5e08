"""The one interface between a TCP connection and the dialect that carries it over AMQP.

A :class:`~tunnel.connection.Connection` knows TCP: which directions are
open, what is parked, when it is finished. A carrier knows one dialect's
wire contract (docs/protocols.md): which links, which deliveries, what
ends a stream. Between them pass only intents and events, all in bytes and
plain values:

- the connection's intents, carrier methods: ``send`` these bytes (at most
  ``room()``), ``end`` my sending side, ``close`` cleanly, ``reset``;
- the carrier's events, :class:`CarrierEvents` methods: the far end is
  there (``on_far_opened``), it can take more (``on_far_credit``), bytes
  arrived (``on_far_data``), it ended its side (``on_far_end``), it ended
  the whole stream (``on_far_finished``), it failed (``on_far_failed``).

Neither imports asyncio nor reads a clock.
"""

from __future__ import annotations

import enum
import logging
from typing import ClassVar, Protocol

from ..amqp.engine import AmqpEngine

#: The detach error a reset carries, so that the far end resets its side too.
RESET_CONDITION = "tunnel:reset"


class Failure(enum.Enum):
    """Why a connection was reset: a small fixed set, so metrics stay bounded."""

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


class AmqpPort(Protocol):
    """The AMQP connection a carrier sends on."""

    @property
    def write_paused(self) -> bool:
        """Over its write high-water mark: send nothing more until it drains."""
        ...

    @property
    def engine(self) -> AmqpEngine: ...
    def flush_soon(self) -> None:
        """Write what the engine produced, once, at the end of this turn."""
        ...


class CarrierEvents(Protocol):
    """What a carrier tells its connection, and the little it may ask of it."""

    @property
    def log(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """The connection's logger, its name on every line."""
        ...

    @property
    def bytes_in(self) -> int:
        """Bytes written to the TCP peer so far."""
        ...

    @property
    def tcp_writable(self) -> bool:
        """The TCP socket is connected and under its write high-water mark."""
        ...

    @property
    def takes_far_data(self) -> bool:
        """The far end's bytes are wanted: TCP takes them, or keeps one window until connected."""
        ...

    @property
    def tcp_unsent(self) -> int:
        """Bytes written to the TCP socket that its peer has not taken yet."""
        ...

    @property
    def write_open(self) -> bool:
        """The far end's bytes are still wanted (its side has not ended)."""
        ...

    @property
    def parked(self) -> bool:
        """TCP bytes are waiting for room."""
        ...

    def on_far_opened(self) -> None: ...
    def on_far_credit(self) -> None: ...
    def on_far_data(self, data: bytes | bytearray | memoryview) -> None: ...
    def on_far_end(self) -> None: ...
    def on_far_finished(self, why: str) -> None: ...
    def on_far_failed(self, reason: str, failure: Failure) -> None: ...


class _NoPort:
    """An AMQP connection that is gone: sends nothing, and keeps no engine alive.

    What a closed carrier holds, and what a host's socket becomes once lost.
    """

    closed = True
    transport = None
    write_paused = True

    @property
    def engine(self) -> AmqpEngine:
        raise RuntimeError("the AMQP connection is gone")

    def flush_soon(self) -> None:
        pass

    def close(self) -> None:
        pass


class _NoEvents:
    """A closed carrier's connection: hears nothing, so the two make no reference cycle."""

    log = logging.LoggerAdapter(logging.getLogger("tunnel.connection"))
    bytes_in = 0
    tcp_writable = False
    tcp_unsent = 0
    takes_far_data = False
    write_open = False
    parked = False

    def on_far_opened(self) -> None:
        pass

    def on_far_credit(self) -> None:
        pass

    def on_far_data(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def on_far_end(self) -> None:
        pass

    def on_far_finished(self, why: str) -> None:
        pass

    def on_far_failed(self, reason: str, failure: Failure) -> None:
        pass


#: What a carrier holds once closed, instead of its AMQP connection and its connection.
NO_PORT: AmqpPort = _NoPort()
NO_EVENTS: CarrierEvents = _NoEvents()


class Carrier(Protocol):
    """One dialect's way of carrying one TCP connection; see the module docstring."""

    DIALECT: ClassVar[str]
    #: What shows the far end is there, for the open timeout's message.
    AWAITED: ClassVar[str]

    def start(self, events: CarrierEvents) -> None:
        """Bound to its connection: attach what must be attached."""
        ...

    def on_tcp_connected(self) -> None:
        """The TCP socket is there: the far end's bytes have somewhere to go now."""
        ...

    def room(self) -> int:
        """How many bytes :meth:`send` takes now; 0 while it takes none."""
        ...

    @property
    def sending(self) -> bool:
        """False once the far end has closed its side for good: our bytes cannot be carried."""
        ...

    def send(self, data: memoryview) -> None:
        """Carry ``data``, at most :meth:`room` bytes."""
        ...

    def end(self) -> None:
        """Our TCP peer's FIN: end our side once everything sent is out (called again on credit)."""
        ...

    def idle(self) -> bool:
        """Our side has ended and the far end has settled all of it."""
        ...

    def on_tcp_drained(self) -> None:
        """The TCP socket went under its low-water mark: take more from the far end."""
        ...

    def on_eof_written(self) -> None:
        """The far end's end was passed on to TCP."""
        ...

    def on_peer_closed(self) -> None:
        """The far end closed its whole AMQP connection without an error."""
        ...

    def close(self) -> None:
        """Both sides ended: detach without an error."""
        ...

    def reset(self, reason: str) -> None:
        """Tear down as a failure, so the far end resets its side."""
        ...

    def lost(self) -> None:
        """The AMQP connection is gone, and its links with it."""
        ...
