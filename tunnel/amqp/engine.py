"""A sans-IO AMQP 1.0 connection: proton's engine, with no sockets and no clock.

Theory of operation
-------------------
:class:`AmqpEngine` owns one proton ``Connection``, its ``Transport`` and a
``Collector``. It is driven from three directions, and never does I/O itself:

- bytes from the network go in with :meth:`AmqpEngine.receive_bytes`
  (and :meth:`AmqpEngine.eof_in` at end of input);
- bytes for the network come out of :meth:`AmqpEngine.bytes_to_send`;
- time goes in through :meth:`AmqpEngine.tick`, which returns the next
  deadline (heartbeats, idle timeout) for the caller to arm a timer at.

Everything proton reports (a link attached, credit arrived, a delivery
changed) is acted on by :meth:`AmqpEngine.run_events`, which routes each
event either to the connection's handler or, for links that have one, to
the link's owner (one :class:`LinkOwner` per tunnel), so per-tunnel code
never sees another tunnel's events.

Memory: proton keeps a connection's settled deliveries in a pool for reuse,
and a pooled delivery keeps its byte buffer at the largest size it ever
held; the pool lives as long as the connection. So no delivery is let to
hold much at once. :meth:`AmqpEngine.send_delivery` frames each
:data:`SLICE` as it is written, moving proton's output aside to make room
when it must, and input goes in slices of the same size with the events run
in between (:meth:`AmqpEngine.receive_bytes` takes at most one slice), so
received bytes are read out as each slice lands. Otherwise a long-lived
connection grows by pool size x delivery size and never gives it back.

Hostile peers: what the peer opens is checked here, once, for every link
owner. A peer that opens more than ``max_links`` links or
``max_sessions`` sessions, or asks for an idle timeout under :data:`MIN_PEER_IDLE_TIMEOUT`,
is closed with ``amqp:resource-limit-exceeded``; its further input is
discarded, unread, until our Close is out. The limit bounds proton's own
cost too: it finds an incoming attach by name with a linear scan. proton
does not enforce link credit, so a transfer beyond the credit we granted
closes its link with ``amqp:link:transfer-limit-exceeded``. An exception raised while an owner
handles its link's event is contained to that link: logged once, the link
closed with ``amqp:internal-error``, its owner told the link ended, and the
connection and every other link go on.

This module imports no asyncio: the glue in :mod:`tunnel.amqp_link` moves
the bytes and supplies the time.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, cast

import cproton
from proton import (
    Collector,
    Condition,
    Connection,
    Endpoint,
    Event,
    Link,
    Session,
    SymbolList,
    Transport,
    symbol,
)

from .. import __version__
from ..peer_text import PEER_LOG, LogLimiter, printable
from .handles import RELEASED, LinkOwner, forget, handle, link_of, owned
from .handles import Delivery as DeliveryHandle
from .handles import Link as LinkHandle

# proton's Python binding copies every byte in and out up to three times
# (a zeroed bytearray, the C copy, then a slice); the hot paths below call
# the binding's own cffi functions so each byte is copied once.
_ffi = raw_ffi = cproton.ffi
_lib = raw_lib = cproton.lib
_alloc_unzeroed = _ffi.new_allocator(should_clear_after_alloc=False)

logger = logging.getLogger(__name__)

# Large frames cost nothing when unused; what we send is framed a SLICE at a time.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
# The most one delivery holds inside proton at once (see the module docstring).
SLICE = 16 * 1024
DEFAULT_IDLE_TIMEOUT = 16.0
_FREED_ATTR = "tunnel_freed"
_SESSION_WINDOW_ATTR = "tunnel_session_window"
PRODUCT = "tunnel"
#: Links and sessions a peer may open on one connection: two links per tunnel at
#: the default connection limit (16384), plus some for replies and management.
DEFAULT_MAX_LINKS = 2 * 16384 + 64
#: The shortest idle timeout a peer may ask us to keep (seconds): each peer's
#: heartbeats cost us CPU, at twice the rate it asks for.
MIN_PEER_IDLE_TIMEOUT = 1.0
_COUNTED_ATTR = "tunnel_counted"
_RESOURCE_LIMIT = "amqp:resource-limit-exceeded"
_TRANSFER_LIMIT = "amqp:link:transfer-limit-exceeded"
_INTERNAL_ERROR = "amqp:internal-error"
#: Our own failures while handling one link: the first of each kind with its traceback.
FAILURES = LogLimiter(logger)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """How to open the connection.

    ``mechanisms`` is the space-separated SASL mechanisms we allow; as a
    client proton picks EXTERNAL, then PLAIN (with a password), then
    ANONYMOUS among those the server offers.
    """

    server: bool = False
    container_id: str = ""
    hostname: str | None = None
    user: str | None = None
    password: str | None = None
    mechanisms: str = "ANONYMOUS"
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Bytes a session takes in before the peer must wait for us (0: proton's default).
    session_window: int = 0
    # Set when TLS is done outside proton: proton cannot see it and would
    # otherwise refuse PLAIN as if it were on a cleartext socket.
    outer_tls: bool = False
    #: Connection capabilities offered in our Open.
    offered_capabilities: tuple[str, ...] = ()
    #: Links the peer may have open at once.
    max_links: int = DEFAULT_MAX_LINKS
    #: Sessions the peer may have open at once (None: as many as links). A
    #: router's TCP adaptor begins a session per stream; a direct-mode peer needs one.
    max_sessions: int | None = None


class AmqpEngine:
    """One AMQP connection's protocol state, driven by its caller.

    Drivers: the caller's bytes in, the caller's clock, and the caller's own
    changes to links (sending, granting credit) made between calls.
    """

    __slots__ = (
        "__weakref__",
        "_collector_impl",
        "_ended_in",
        "_flows",
        "_max_links",
        "_max_sessions",
        "_outbox",
        "_outbox_bytes",
        "_peer_links",
        "_peer_sessions",
        "_refused",
        "_transport_impl",
        "collector",
        "connection",
        "transport",
    )

    def __init__(self, options: EngineOptions) -> None:
        self.connection = Connection()
        self.connection.container = options.container_id or f"tunnel-{uuid.uuid4()}"
        self.connection.properties = {
            symbol("product"): PRODUCT,
            symbol("version"): __version__,
        }
        if options.offered_capabilities:
            self.connection.offered_capabilities = SymbolList(list(options.offered_capabilities))
        self.transport = Transport(Transport.SERVER if options.server else Transport.CLIENT)
        self.transport.max_frame_size = options.max_frame_size
        sessions = options.max_links if options.max_sessions is None else options.max_sessions
        # Channels are numbered from 0: channel-max caps the sessions in the Open
        # (proton itself allows at most 32767).
        self.transport.channel_max = min(sessions, 32768) - 1
        self._max_links = options.max_links
        self._max_sessions = sessions
        self._peer_links = 0
        self._peer_sessions = 0
        self._refused = False
        setattr(self.connection, _SESSION_WINDOW_ATTR, options.session_window)
        self.transport.idle_timeout = options.idle_timeout
        sasl = self.transport.sasl()
        sasl.allowed_mechs(options.mechanisms)
        # PLAIN over cleartext is refused unless the password was given on
        # purpose; under our own TLS proton just cannot see the encryption.
        sasl.allow_insecure_mechs = options.outer_tls or bool(options.password)
        if options.server:
            self.transport.require_auth(False)
        else:
            if options.hostname:
                self.connection.hostname = options.hostname
            if options.user:
                self.connection.user = options.user
            if options.password:
                self.connection.password = options.password
        self.transport.bind(self.connection)
        self._transport_impl = self.transport._impl
        self.collector = Collector()
        self._collector_impl = self.collector._impl
        self.connection.collect(self.collector)
        self._ended_in = False
        _LIVE_ENGINES.add(self)
        #: C links with a flow event not yet told to their owner (see run_events).
        self._flows: dict[Any, None] = {}
        # Output taken out of proton early, to make room (see send_delivery);
        # bounded by its caller, which stops sending once output_held is high.
        self._outbox: deque[memoryview] = deque()
        self._outbox_bytes = 0

    # -- bytes in -------------------------------------------------------------
    def receive_bytes(self, data: bytes | memoryview) -> int:
        """Feed network input, at most one :data:`SLICE`; returns how many bytes proton took.

        Run the events before feeding more, so received bytes leave proton
        slice by slice.
        """
        impl = self._transport_impl
        view = memoryview(data)[:SLICE]
        if self._refused:
            return len(view)  # a refused peer's input is not even parsed
        taken = 0
        total = len(view)
        while taken < total:
            room = _lib.pn_transport_capacity(impl)
            if room <= 0:
                break
            chunk = view[taken : taken + room]
            pushed = _lib.pn_transport_push(impl, _ffi.from_buffer(chunk), len(chunk))
            if pushed < 0:
                break  # the tail is closed; proton reports why as a transport error
            taken += pushed
        return taken

    def eof_in(self) -> None:
        """The network input ended."""
        if not self._ended_in:
            self._ended_in = True
            self.transport.close_tail()
            if self.connection.state & Endpoint.REMOTE_UNINIT:
                # Gone before its Open (a truncated first frame, say): proton
                # would wait for output nobody reads, holding the socket.
                self.transport.close_head()

    # -- bytes out ------------------------------------------------------------
    def bytes_to_send(self) -> memoryview | None:
        """The next piece of output, for the caller to write; ``None`` if there is none.

        proton hands its output out one buffer at a time; call until ``None``.
        """
        if not self._outbox:
            self._take_output()
            if not self._outbox:
                if self._refused:
                    # Our Close is out: end the input too, so the socket closes.
                    self.eof_in()
                return None
        out = self._outbox.popleft()
        self._outbox_bytes -= len(out)
        return out

    @property
    def output_held(self) -> int:
        """Output produced and not yet handed out by :meth:`bytes_to_send`, in bytes."""
        return self._outbox_bytes

    def _take_output(self) -> None:
        """Move proton's pending output (one buffer of it) to the outbox, copied once."""
        impl = self._transport_impl
        pending = _lib.pn_transport_pending(impl)
        if pending > 0:
            # Not zeroed first, as a bytearray would be: the copy is the one pass.
            raw = _alloc_unzeroed("char[]", pending)
            _lib.pn_transport_peek(impl, raw, pending)
            _lib.pn_transport_pop(impl, pending)
            out = memoryview(_ffi.buffer(raw))  # keeps ``raw`` alive
            self._outbox.append(out)
            self._outbox_bytes += pending

    # -- sending --------------------------------------------------------------
    def send_delivery(
        self,
        sender: LinkHandle,
        tag: bytes,
        head: bytes | bytearray,
        body: bytes | bytearray | memoryview = b"",
    ) -> DeliveryHandle:
        """One whole delivery on a C sender handle: ``head`` then ``body``, uncopied; returns it.

        Each slice is framed as soon as it is in, taking proton's output
        aside when its buffer is full, so the delivery never holds more than
        a slice unless the peer's session window is shut.
        """
        link = sender.raw
        delivery = cproton.pn_delivery(link, tag)
        _lib.pn_link_send(link, _ffi.from_buffer(head), len(head))
        view = memoryview(body)
        first = SLICE - len(head)
        # The last slice is framed after the advance, so it goes in the final
        # transfer: no empty transfer after it, and a small delivery is one frame.
        last = 0 if len(view) <= first else first + (len(view) - first - 1) // SLICE * SLICE
        self._send_sliced(link, delivery, view[:last], first)
        tail = view[last:]
        _lib.pn_link_send(link, _ffi.from_buffer(tail), len(tail))
        _lib.pn_link_advance(link)
        self._frame(delivery)
        return DeliveryHandle(delivery)

    def begin_stream(self, sender: LinkHandle, tag: bytes) -> DeliveryHandle:
        """A new delivery on ``sender`` that :meth:`stream` adds to until ``advance()``."""
        return DeliveryHandle(cproton.pn_delivery(sender.raw, tag))

    def stream(
        self, sender: LinkHandle, delivery: DeliveryHandle, data: bytes | bytearray | memoryview
    ) -> None:
        """Add ``data`` to ``delivery``, the current one on ``sender``, leaving it open."""
        self._send_sliced(sender.raw, delivery.raw, data, SLICE)

    def _send_sliced(
        self, link: Any, delivery: Any, data: bytes | bytearray | memoryview, first: int
    ) -> None:
        view = memoryview(data)  # slices of bytes would be copies
        start, end = 0, first
        while start < len(view):
            chunk = view[start:end]
            _lib.pn_link_send(link, _ffi.from_buffer(chunk), len(chunk))
            self._frame(delivery)
            start, end = end, end + SLICE

    def _frame(self, delivery: Any) -> None:
        impl = self._transport_impl
        _lib.pn_transport_pending(impl)
        if _lib.pn_delivery_pending(delivery):
            self._take_output()
            _lib.pn_transport_pending(impl)

    def eof_out(self) -> None:
        """The network can take no more output."""
        self.transport.close_head()

    # -- time -----------------------------------------------------------------
    def tick(self, now: float) -> float | None:
        """Process timers at ``now`` (seconds); returns the next deadline, if any."""
        deadline = self.transport.tick(now)
        return float(deadline) if deadline else None

    @property
    def finished(self) -> bool:
        """No more input will be taken and no more output will be produced."""
        return bool(self.transport.closed)

    # -- events ---------------------------------------------------------------
    def run_events(self, handler: ConnectionHandler) -> None:
        """Act on every pending event.

        Deliveries and credit, the per-chunk events, go to their link's owner
        as proton's C handles: wrapping them in proton's Python objects costs
        more than handling them. Events nobody needs are dropped unwrapped.
        Flows are told once per link and batch, at its end (see _flowed).
        """
        collector = self._collector_impl
        peek, pop, event_type = _lib.pn_collector_peek, _lib.pn_collector_pop, _lib.pn_event_type
        null = _ffi.NULL
        while True:
            while (raw := peek(collector)) != null:
                etype = event_type(raw)
                try:
                    if etype == _DELIVERY:
                        _on_raw_delivery(_lib.pn_event_delivery(raw))
                    elif etype == _LINK_FLOW:
                        self._flowed(_lib.pn_event_link(raw))
                    elif etype == _LINK_REMOTE_OPEN:
                        self._on_link_remote_open(wrap_link(_lib.pn_event_link(raw)), handler)
                    elif etype in _LINK_REMOTE_END:
                        _on_link_remote_close(wrap_link(_lib.pn_event_link(raw)), handler)
                    elif (action := _CONNECTION_EVENTS.get(etype)) is not None:
                        event: Event = Event.wrap(raw)  # type: ignore[no-untyped-call]
                        pop(collector)
                        action(self, event, handler)
                        continue
                except Exception as exc:  # contained to the event's link
                    self._contain(_lib.pn_event_link(raw), exc)
                pop(collector)
            if not self._flows:
                return
            self._tell_flows()

    def _flowed(self, link: Any) -> None:
        # proton reports a flow on a sender after each transfer it frames, as
        # well as when credit arrives: a 128 KiB delivery makes eight. The
        # owner hears once per batch, after the batch's other events; what it
        # does with it depends only on the link's state then.
        if link not in self._flows:
            _lib.pn_incref(link)  # the link outlives the event until told
            self._flows[link] = None

    def _tell_flows(self) -> None:
        flows, self._flows = self._flows, {}
        for link in flows:
            try:
                if (found := owned(link)) is not None and found.owner is not None:
                    found.owner.on_link_flow(found)
            except Exception as exc:  # contained to the link
                self._contain(link, exc)
            finally:
                _lib.pn_decref(link)

    def _contain(self, link: Any, exc: Exception) -> None:
        """An exception while handling ``link``'s event (or the connection's, for NULL)."""
        owner = None if link == _ffi.NULL else link_of(link).owner
        where = type(owner).__name__ if owner is not None else "link" if link else "connection"
        FAILURES.log(
            logging.ERROR,
            where,
            type(exc).__name__,
            "internal error while handling a %s event, contained to it: %s",
            where,
            printable(repr(exc)),
            exc_info=exc,
        )
        condition = Condition(_INTERNAL_ERROR, f"{type(exc).__name__} while handling the {where}")
        if link == _ffi.NULL:
            if not self.connection.state & _LOCAL_CLOSED:
                self.connection.condition = condition
                self.connection.close()
            return
        wrapped = wrap_link(link)
        close_link(wrapped, condition)
        if owner is not None:
            try:
                _tell_failed(owner, wrapped, condition)
            except Exception:  # the link is gone already
                logger.debug("owner failed again as its link closed", exc_info=True)

    def _refuse_peer(self, description: str) -> None:
        """Close the connection for going past a limit, and stop reading it."""
        if self._refused:
            return
        self._refused = True
        peer = printable(self.connection.remote_container)
        PEER_LOG.log(
            logging.WARNING, peer, _RESOURCE_LIMIT, "closing AMQP peer %s: %s", peer, description
        )
        if not self.connection.state & _LOCAL_CLOSED:
            self.connection.condition = Condition(_RESOURCE_LIMIT, description)
            self.connection.close()

    def _on_link_remote_open(self, link: Link, handler: ConnectionHandler) -> None:
        owner = owner_of(link)
        if owner is not None:
            owner.on_link_opened(handle(link))
        elif link.state & Endpoint.LOCAL_UNINIT and not self._refused:
            if self._peer_links >= self._max_links:
                self._refuse_peer(f"more than {self._max_links} links on one connection")
                return
            self._peer_links += 1
            setattr(link, _COUNTED_ATTR, self)
            handler.on_link_attach(link)

    def link_freed(self) -> None:
        """A link the peer opened has been freed."""
        self._peer_links -= 1

    def session_freed(self) -> None:
        """A session the peer opened has been freed."""
        self._peer_sessions -= 1

    def _on_session_remote_open(self, event: Event, handler: ConnectionHandler) -> None:
        session = cast(Session, event.session)
        if session.state & Endpoint.LOCAL_UNINIT and not self._refused:
            if self._peer_sessions >= self._max_sessions:
                self._refuse_peer(f"more than {self._max_sessions} sessions on one connection")
                return
            self._peer_sessions += 1
            setattr(session, _COUNTED_ATTR, self)
            open_session(session)

    def _on_connection_remote_open(self, event: Event, handler: ConnectionHandler) -> None:
        asked = self.transport.remote_idle_timeout
        if 0 < asked < MIN_PEER_IDLE_TIMEOUT:
            self._refuse_peer(
                f"idle-time-out of {asked * 1000:.0f} ms is under the"
                f" {MIN_PEER_IDLE_TIMEOUT * 1000:.0f} ms we keep"
            )
            return
        _on_connection_remote_open(event, handler)

    def release(self) -> None:
        """Free proton's objects now, in the order proton needs, not at garbage collection.

        Owners are cleared first: an owner kept in a link's record (which
        proton holds, out of the garbage collector's sight) keeps its tunnel,
        and through it this engine and its buffers, alive for good.
        """
        link = self.connection.link_head(0)
        while link is not None:
            set_owner(link, None)
            setattr(link, _COUNTED_ATTR, None)
            link = link.next(0)
        session = self.connection.session_head(0)
        while session is not None:
            setattr(session, _COUNTED_ATTR, None)
            session = session.next(0)  # type: ignore[no-untyped-call]
        _LIVE_ENGINES.discard(self)
        self.collector.release()
        self.transport.unbind()
        self.connection.free()


#: Every engine whose proton objects are not yet freed (see proton_census).
_LIVE_ENGINES: weakref.WeakSet[AmqpEngine] = weakref.WeakSet()


def proton_census() -> dict[str, int]:
    """proton's live objects over every engine not yet released, for leak hunting.

    Connections, sessions and links are walked on each connection; deliveries
    are the unsettled ones on those links (a settled delivery is freed or
    pooled, and the pool is not visible); ``python_refs`` is the number of
    Python objects proton's binding keeps alive for its C objects. The walk
    costs about a microsecond per link: a scrape's worth, not a per-event one.
    """
    counts = {"connections": 0, "sessions": 0, "links": 0, "deliveries": 0}
    null = _ffi.NULL
    for engine in list(_LIVE_ENGINES):
        connection = engine.connection._impl
        counts["connections"] += 1
        session = _lib.pn_session_head(connection, 0)
        while session != null:
            counts["sessions"] += 1
            session = _lib.pn_session_next(session, 0)
        link = _lib.pn_link_head(connection, 0)
        while link != null:
            counts["links"] += 1
            counts["deliveries"] += _lib.pn_link_unsettled(link)
            link = _lib.pn_link_next(link, 0)
    counts["python_refs"] = cproton.retained_count()
    return counts


class FailingOwner(LinkOwner, Protocol):
    """An owner that can tell a link we ended for the peer's fault (or ours) from a clean end.

    The engine calls ``on_link_failed`` instead of ``on_link_closed`` when it
    closes a link itself: a transfer past credit, or an exception while the
    owner handled the link. Owners without it hear ``on_link_closed``.
    """

    def on_link_failed(self, link: LinkHandle, condition: Condition) -> None: ...


def _tell_failed(owner: LinkOwner, link: Link, condition: Condition) -> None:
    failed = getattr(owner, "on_link_failed", None)
    if failed is not None:
        cast(FailingOwner, owner).on_link_failed(handle(link), condition)
    else:
        owner.on_link_closed(handle(link))


class ConnectionHandler(Protocol):
    """What owns a connection: the router client, or a direct-mode peer."""

    def on_connection_opened(self) -> None: ...
    def on_connection_closed(self, condition: Condition | None) -> None: ...
    def on_link_attach(self, link: Link) -> None: ...
    def on_transport_error(self, condition: Condition | None) -> None: ...


def set_owner(link: Link, owner: LinkOwner | None) -> None:
    handle(link).owner = owner


def owner_of(link: Link) -> LinkOwner | None:
    return handle(link).owner


def close_handle(link: LinkHandle, condition: Condition | None = None) -> None:
    """:func:`close_link` for a :class:`~tunnel.amqp.handles.Link`."""
    close_link(link.proton, condition)


_LOCAL_CLOSED = Endpoint.LOCAL_CLOSED
_REMOTE_CLOSED = Endpoint.REMOTE_CLOSED
_REMOTE_UNINIT = Endpoint.REMOTE_UNINIT


def wrap_link(raw: Any) -> Link:
    """proton's Python object for a C link handle."""
    link: Link = Link.wrap(raw)  # type: ignore[no-untyped-call]
    return link


def _on_raw_delivery(delivery: Any) -> None:
    link = _lib.pn_delivery_link(delivery)
    # A receiver's credit drops as each delivery is advanced past, so what the
    # peer may still send is the credit less the deliveries not yet advanced.
    if _lib.pn_link_credit(link) < _lib.pn_link_queued(link) and _lib.pn_link_is_receiver(link):
        _over_credit(link, delivery)
        return
    found = owned(link)
    if found is not None and found.owner is not None:
        found.owner.on_delivery(found, DeliveryHandle(delivery))
    elif _lib.pn_link_is_receiver(link) and not _lib.pn_link_state(link) & _LOCAL_CLOSED:
        # A delivery on a link nobody owns any more: refuse it, never drop it.
        # On a link we closed, our detach refuses it, with the reason; an
        # outcome too would reach the sender first (proton frames dispositions
        # before detaches) and hide that reason. proton frees it with the link.
        DeliveryHandle(delivery).finish(RELEASED)


def _over_credit(link: Any, delivery: Any) -> None:
    """A transfer beyond the credit we granted: proton took it, we must not."""
    wrapped = wrap_link(link)
    owner = owner_of(wrapped)
    if not wrapped.state & _LOCAL_CLOSED:
        peer = printable(wrapped.connection.remote_container)
        PEER_LOG.log(
            logging.WARNING,
            peer,
            _TRANSFER_LIMIT,
            "closing link %s of AMQP peer %s: it sent beyond its credit",
            printable(wrapped.name),
            peer,
        )
        condition = Condition(_TRANSFER_LIMIT, "transfer beyond the credit granted")
        close_link(wrapped, condition)
        if owner is not None:
            _tell_failed(owner, wrapped, condition)
    DeliveryHandle(delivery).finish(RELEASED)


def _on_link_remote_close(link: Link, handler: ConnectionHandler) -> None:
    owner = owner_of(link)
    if owner is not None:
        owner.on_link_closed(handle(link))
    close_link(link)


def close_link(link: Link, condition: Condition | None = None) -> None:
    """Detach and close ``link`` (with ``condition`` as the error), and free it when done.

    Nobody owns it afterwards. A link is freed once closed at both ends,
    here or when the peer's detach arrives, so no local-close event is needed.
    """
    set_owner(link, None)
    state = link.state
    if state & Endpoint.LOCAL_UNINIT:
        link.open()  # a detach must follow an attach
    if not state & _LOCAL_CLOSED:
        if condition is not None:
            link.condition = condition
        link.close()
    _free_if_done(link)


def open_session(session: Session) -> None:
    """Open ``session`` with the connection's configured incoming window."""
    window = getattr(session.connection, _SESSION_WINDOW_ATTR, 0)
    if window:
        session.incoming_capacity = window
    session.open()


def _on_session_remote_close(engine: AmqpEngine, event: Event, handler: ConnectionHandler) -> None:
    session = cast(Session, event.session)
    if not session.state & _LOCAL_CLOSED:
        session.close()
    # A router may use a session per routed link: free each as it ends.
    if not getattr(session, _FREED_ATTR, False):
        setattr(session, _FREED_ATTR, True)
        if (counted := getattr(session, _COUNTED_ATTR, None)) is not None:
            counted.session_freed()
        session.free()


def session_usable(session: Session) -> bool:
    """Whether a session kept for later has not been ended and freed meanwhile."""
    return not getattr(session, _FREED_ATTR, False)


def _on_connection_remote_open(event: Event, handler: ConnectionHandler) -> None:
    connection = cast(Connection, event.connection)
    if connection.state & Endpoint.LOCAL_UNINIT:
        connection.open()
    handler.on_connection_opened()


def _on_connection_remote_close(
    engine: AmqpEngine, event: Event, handler: ConnectionHandler
) -> None:
    connection = cast(Connection, event.connection)
    handler.on_connection_closed(connection.remote_condition)
    if not connection.state & _LOCAL_CLOSED:
        connection.close()


def _on_transport_error(engine: AmqpEngine, event: Event, handler: ConnectionHandler) -> None:
    handler.on_transport_error(cast(Transport, event.transport).condition)


# The rare events, by proton's event number, acted on with proton's Event
# object. Each handler may rely on its event's context object (a session
# event has a session), hence the casts. Events not listed need nothing.
_CONNECTION_EVENTS = {
    event_type.number: action
    for event_type, action in (
        (Event.SESSION_REMOTE_OPEN, AmqpEngine._on_session_remote_open),
        (Event.SESSION_REMOTE_CLOSE, _on_session_remote_close),
        (Event.CONNECTION_REMOTE_OPEN, AmqpEngine._on_connection_remote_open),
        (Event.CONNECTION_REMOTE_CLOSE, _on_connection_remote_close),
        (Event.TRANSPORT_ERROR, _on_transport_error),
    )
}
_DELIVERY = Event.DELIVERY.number
_LINK_FLOW = Event.LINK_FLOW.number
_LINK_REMOTE_OPEN = Event.LINK_REMOTE_OPEN.number
_LINK_REMOTE_END = frozenset((Event.LINK_REMOTE_CLOSE.number, Event.LINK_REMOTE_DETACH.number))


def _free_if_done(link: Link) -> None:
    """Free a link closed at both ends, exactly once.

    Both the local and the remote close event reach us, in either order and
    sometimes both after the link is closed at both ends; freeing twice
    would corrupt proton's heap, hence the mark.
    """
    state = link.state
    # A link the peer has not answered yet stays: its attach is still coming,
    # and proton must know the name when it does.
    if state & _LOCAL_CLOSED and state & _REMOTE_CLOSED:
        if getattr(link, _FREED_ATTR, False):
            return
        setattr(link, _FREED_ATTR, True)
        set_owner(link, None)
        if (counted := getattr(link, _COUNTED_ATTR, None)) is not None:
            counted.link_freed()
        forget(link._impl)
        link.free()


def refuse_link(link: Link, name: str, description: str) -> None:
    """Attach and at once detach with an error: how AMQP says no to a link."""
    handle(link).mirror()
    close_link(link, Condition(name, description))


def message_content_type(message: Any) -> str | None:
    """A proton ``Message``'s content type, None when it has none.

    proton's own getter turns a missing one into the symbol ``'None'``.
    """
    value: str | None = cproton.pn_message_get_content_type(message._msg)
    return value
