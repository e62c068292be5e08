"""In-memory harness for the connection and its carriers: no sockets, no event loop.

- :class:`FakeTcp` is a :class:`~tunnel.tcp_side.TcpPort` that records what a
  connection does to its socket; :class:`Side` pairs it with its connection.
- :class:`MemoryPort` is an :class:`~tunnel.dialects.carrier.AmqpPort` around
  an engine; bytes move only when a test pumps.
- :class:`Pair` is our ingress engine (a client) pumped into our egress
  engine (a server) whose :class:`DirectEgress` handler does what direct mode
  does for a link-route ingress.
- :class:`FarEnd` is a plain proton connection, scripted by the test, for what
  our own egress would never do (a node proxy, a skupper-router).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from proton import (
    Collector,
    Condition,
    Delivery,
    Endpoint,
    Link,
    Message,
    Session,
    SymbolList,
    Transport,
    symbol,
)
from proton import Connection as ProtonConnection

from tunnel.amqp.engine import (
    DEFAULT_MAX_FRAME_SIZE,
    AmqpEngine,
    ConnectionHandler,
    EngineOptions,
    open_session,
    set_owner,
)
from tunnel.amqp.handles import Link as LinkHandle
from tunnel.amqp.handles import handle
from tunnel.connection import Connection
from tunnel.dialects.link_route import LinkRouteCarrier

ADDRESS = "svc"
RESET = "tunnel:reset"


class FakeTcp:
    """A TCP socket as a connection sees it, recording every call.

    Calls that a real socket would refuse (a write after our FIN, anything
    after close or reset) are recorded in :attr:`violations`, not raised: the
    engine would contain an exception raised inside an event handler.
    """

    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.eof = False
        self.closed = False
        self.was_reset = False
        self.reading: bool | None = None
        self.violations: list[str] = []
        #: Every call, in order: "write", "eof", "close", "reset".
        self.log: list[str] = []
        #: Raised by write_eof, as when the peer reset after its own FIN.
        self.eof_error: OSError | None = None
        #: What the kernel has not taken, as a test sets it (a slow reader).
        self.unsent_bytes = 0

    @property
    def done(self) -> bool:
        return self.closed or self.was_reset

    def _check(self, what: str) -> None:
        if self.done:
            self.violations.append(f"{what} after {'reset' if self.was_reset else 'close'}")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check("write")
        if self.eof:
            self.violations.append("write after write_eof")
        self.written += data
        self.writes += 1
        self.log.append("write")

    def unsent(self) -> int:
        return self.unsent_bytes

    def write_eof(self) -> None:
        self._check("write_eof")
        if self.eof_error is not None:
            raise self.eof_error
        if self.eof:
            self.violations.append("write_eof twice")
        self.eof = True
        self.log.append("eof")

    def close(self) -> None:
        self._check("close")
        self.closed = True
        self.log.append("close")

    def reset(self) -> None:
        self._check("reset")
        self.was_reset = True
        self.log.append("reset")

    def set_reading(self, want: bool) -> None:
        self.reading = want


@dataclass
class MemoryPort:
    """An AMQP connection in memory: the test pumps, so flush_soon has nothing to do."""

    engine: AmqpEngine
    write_paused: bool = False
    flushes: int = 0

    def flush_soon(self) -> None:
        self.flushes += 1


@dataclass
class Side:
    """One end of a tunnel: the connection and its TCP socket."""

    conn: Connection
    tcp: FakeTcp = field(default_factory=FakeTcp)

    def data(self, payload: bytes) -> None:
        """The TCP peer sent ``payload`` (in one read)."""
        self.conn.on_tcp_data(memoryview(bytearray(payload)))

    def fin(self) -> None:
        self.conn.on_tcp_eof()

    def rst(self) -> None:
        self.conn.on_tcp_closed(ConnectionResetError(104, "Connection reset by peer"))


class RecordingCarrier(LinkRouteCarrier):
    """A link-route carrier that also records the error of each detach it hears."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (our link is a sender, the far end's error name or None), per detach.
        self.detaches: list[tuple[bool, str | None]] = []

    def on_link_closed(self, link: LinkHandle) -> None:
        condition = link.remote_condition
        self.detaches.append((link.is_sender, None if condition is None else str(condition.name)))
        super().on_link_closed(link)


class QuietHandler:
    """A connection handler for the ingress side: it refuses nothing, it records closes."""

    def __init__(self) -> None:
        self.opened = False
        self.closed: list[Condition | None] = []
        self.sides: list[Side] = []

    def on_connection_opened(self) -> None:
        self.opened = True

    def on_connection_closed(self, condition: Condition | None) -> None:
        self.closed.append(condition)
        for side in self.sides:
            side.conn.on_peer_closed()

    def on_link_attach(self, link: Link) -> None:
        link.close()

    def on_transport_error(self, condition: Condition | None) -> None:
        pass


class DirectEgress(QuietHandler):
    """Our egress engine's handler, doing what direct mode does for a link-route ingress.

    A dynamic receiver gets a fresh address and is opened; a sender attached
    to :data:`ADDRESS` gets an egress carrier whose way back is the ingress's
    dynamic link. The backend connects at the next pump (``auto_connect``),
    or when the test says (:meth:`connect`).
    """

    def __init__(self, port: MemoryPort, *, window: int | None, auto_connect: bool) -> None:
        super().__init__()
        self.port = port
        self.window = window
        self.auto_connect = auto_connect
        self.dynamic: dict[str, Link] = {}
        self.pending: list[Side] = []
        #: False: routed attaches are answered with no credit and no carrier, as a
        #: router answers for an address nobody consumes; they are kept in ``held``.
        self.serving = True
        self.held: list[Link] = []
        self._count = itertools.count(1)

    def on_link_attach(self, link: Link) -> None:
        if link.is_sender:
            address = f"dyn-{next(self._count)}"
            link.source.copy(link.remote_source)
            link.source.address = address
            link.target.copy(link.remote_target)
            set_owner(link, None)
            link.open()
            self.dynamic[address] = link
            return
        reply = self.dynamic.pop(link.remote_source.address or "", None)
        if link.remote_target.address != ADDRESS or reply is None:
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            link.condition = Condition("amqp:not-found", "no such address")
            link.open()
            link.close()
            return
        if not self.serving:
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            link.open()
            self.held.append(link)
            return
        carrier = RecordingCarrier.egress(
            self.port, link.name, handle(link), handle(reply), window=self.window
        )
        side = Side(Connection(link.name, carrier))
        self.sides.append(side)
        self.pending.append(side)

    def connect(self) -> Side:
        """The backend of the oldest waiting connection answers."""
        side = self.pending.pop(0)
        side.conn.on_tcp_connected(side.tcp)
        return side

    def connect_all(self) -> bool:
        moved = False
        while self.auto_connect and self.pending:
            self.connect()
            moved = True
        return moved


def _move(src: AmqpEngine, dst: AmqpEngine, handler: ConnectionHandler) -> bool:
    """Whatever ``src`` has to send, into ``dst``, running its events after each slice."""
    moved = False
    while (out := src.bytes_to_send()) is not None:
        moved = True
        data = memoryview(out)
        while data:
            taken = dst.receive_bytes(data)
            dst.run_events(handler)
            if not taken:
                break
            data = data[taken:]
    return moved


class Pair:
    """Our ingress engine and our egress engine, pumped into each other."""

    def __init__(
        self,
        *,
        window: int | None = 2,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        auto_connect: bool = True,
        open_timeout: float | None = 5.0,
    ) -> None:
        self.window = window
        self.open_timeout = open_timeout
        self.a = AmqpEngine(EngineOptions(max_frame_size=max_frame_size))
        self.b = AmqpEngine(EngineOptions(server=True, max_frame_size=max_frame_size))
        self.a_port = MemoryPort(self.a)
        self.b_port = MemoryPort(self.b)
        self.ingress = QuietHandler()
        self.egress = DirectEgress(self.b_port, window=window, auto_connect=auto_connect)
        self.a.connection.open()
        self.pump()
        self.session: Session = self.a.connection.session()
        open_session(self.session)
        self.pump()
        self._names = itertools.count(1)

    def pump(self, rounds: int = 10_000) -> None:
        """Move bytes both ways until both engines are quiet."""
        for _ in range(rounds):
            self.a.run_events(self.ingress)
            self.b.run_events(self.egress)
            moved = _move(self.a, self.b, self.egress)
            moved = _move(self.b, self.a, self.ingress) or moved
            moved = self.egress.connect_all() or moved
            if not moved:
                return
        raise AssertionError("the two engines never went quiet")

    def client(self, *, now: float = 0.0) -> Side:
        """A TCP client accepted at the ingress; its links attach at the next pump."""
        name = f"10.0.0.1:{40000 + next(self._names)}@site@t"
        carrier = RecordingCarrier.ingress(
            self.a_port, name, self.session, ADDRESS, window=self.window
        )
        conn = Connection(name, carrier, now=now, open_timeout=self.open_timeout)
        side = Side(conn)
        conn.on_tcp_connected(side.tcp)
        self.ingress.sides.append(side)
        return side

    def tunnel(self) -> tuple[Side, Side]:
        """A client and its egress side, both open."""
        client = self.client()
        self.pump()
        server = self.egress.sides[-1]
        return client, server


def carrier_of(side: Side) -> RecordingCarrier:
    carrier = side.conn.carrier
    assert isinstance(carrier, RecordingCarrier)
    return carrier


# -- a scripted far end, made with proton's own Connection and Transport ----------
class Peer:
    """A proton connection and its server transport, which the test drives by hand."""

    def __init__(self, transport: Transport) -> None:
        self.connection = ProtonConnection()
        self.transport = transport
        self.collector = Collector()
        self.transport.bind(self.connection)
        self.connection.collect(self.collector)


def pump_peer(engine: AmqpEngine, handler: ConnectionHandler, peer: Peer) -> None:
    """Move bytes between our engine and the proton peer until neither has any."""
    for _ in range(10_000):
        moved = False
        pending = peer.transport.pending()
        if pending > 0:
            data = memoryview(peer.transport.peek(pending) or b"")
            peer.transport.pop(pending)
            moved = True
            while data:
                taken = engine.receive_bytes(data)
                engine.run_events(handler)
                if not taken:
                    break
                data = data[taken:]
        elif pending < 0 and not engine.finished:
            engine.eof_in()
        engine.run_events(handler)
        while (out := engine.bytes_to_send()) is not None:
            moved = True
            rest = bytes(out)
            while rest and (room := peer.transport.capacity()) > 0:
                peer.transport.push(rest[:room])
                rest = rest[room:]
        engine.run_events(handler)
        if not moved:
            return
    raise AssertionError("the far end and our engine never went quiet")


def server_transport() -> Transport:
    transport = Transport(Transport.SERVER)
    transport.sasl().allowed_mechs("ANONYMOUS")
    transport.require_auth(False)
    return transport


class FarEnd:
    """A proton peer that our client engine connects to, driven by the test."""

    def __init__(
        self,
        *,
        properties: dict[str, str] | None = None,
        offered: tuple[str, ...] = (),
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.peer = Peer(transport=server_transport())
        self.peer.connection.container = "far-end"
        if properties:
            self.peer.connection.properties = {symbol(k): v for k, v in properties.items()}
        if offered:
            self.peer.connection.offered_capabilities = SymbolList([symbol(c) for c in offered])
        self.engine = AmqpEngine(EngineOptions(max_frame_size=max_frame_size))
        self.port = MemoryPort(self.engine)
        self.handler = QuietHandler()
        self.peer.connection.open()
        self.engine.connection.open()
        self.pump()
        self.session: Session = self.engine.connection.session()
        open_session(self.session)
        self.pump()
        self._dynamic = itertools.count(1)

    def pump(self) -> None:
        pump_peer(self.engine, self.handler, self.peer)
        while self.peer.collector.peek() is not None:
            self.peer.collector.pop()
        # Sessions our engine begins are answered, as any peer does.
        session = self.peer.connection.session_head(Endpoint.LOCAL_UNINIT)
        while session is not None:
            session.open()
            session = session.next(Endpoint.LOCAL_UNINIT)  # type: ignore[no-untyped-call]
        if self.peer.transport.pending() > 0:
            pump_peer(self.engine, self.handler, self.peer)

    def links(self, state: int = 0) -> Iterator[Link]:
        link = self.peer.connection.link_head(state)
        while link is not None:
            yield link
            link = link.next(state)

    def new_links(self) -> list[Link]:
        """Links our engine attached that the far end has not answered."""
        return list(self.links(Endpoint.LOCAL_UNINIT | Endpoint.REMOTE_ACTIVE))

    def link(self, name: str) -> Link:
        for link in self.links():
            if link.name == name:
                return link
        raise KeyError(name)

    def answer_dynamic(self, link: Link, address: str | None = None) -> str:
        """Answer a dynamic receiver's attach with a fresh address, as a router does."""
        address = address or f"dyn-far-{next(self._dynamic)}"
        link.source.copy(link.remote_source)
        link.source.address = address
        link.target.copy(link.remote_target)
        link.open()
        return address

    def answer_bare(self, link: Link) -> None:
        """Answer an attach with null termini and no capabilities, as rhea does."""
        link.open()

    def answer_mirror(self, link: Link) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()


def message(body: bytes, *, eos: bool = False) -> bytes:
    """A skupper-proxy data message, encoded by proton (amqp-value binary)."""
    msg = Message(body=body, properties={"tunnel:eos": True} if eos else None)
    return bytes(msg.encode())


def send_message(link: Link, payload: bytes, tag: str) -> Delivery:
    delivery = link.delivery(tag)
    link.send(payload)
    link.advance()
    return delivery


def read_messages(link: Link, outcome: int | None = Delivery.ACCEPTED) -> list[Message]:
    """Every whole message waiting on a far-end receiver, settled with ``outcome``."""
    got = []
    while (delivery := link.current) is not None and not delivery.partial and delivery.readable:
        data = link.recv(delivery.pending) or b""
        msg = Message()
        msg.decode(data)
        link.advance()
        got.append(msg)
        if outcome is not None:
            delivery.update(outcome)
            delivery.settle()
    return got


def bodies(link: Link, outcome: int | None = Delivery.ACCEPTED) -> list[bytes]:
    """The bodies of :func:`read_messages`, as bytes."""
    return [body_of(m) for m in read_messages(link, outcome)]


def body_of(msg: Message) -> bytes:
    body: object = msg.body
    assert isinstance(body, bytes | memoryview), body
    return bytes(body)
