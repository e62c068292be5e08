"""Bridges: the TCP listeners of ingress specs, and the address handlers of egress specs.

This is asyncio glue: it owns the listening sockets, the backend connects
and the timers, and makes one :class:`~tunnel.connection.Connection` per
TCP connection with the carrier of the AMQP connection's dialect.

An :class:`IngressBridge` accepts TCP connections. While the router is
connected, each gets a connection at once, its links on the shared router
connection (never a new AMQP connection per TCP connection). While it is
not, the accepted socket is held unread (:class:`~tunnel.tcp_side.TcpSide`)
for up to the hold timeout, so TCP backpressure does the waiting; held
sockets count against the bridge's limits like open ones.

An :class:`EgressBridge` is handed sender attaches for its address (a link
route through a router, or direct mode) or client streams (skupper-router's
TCP adaptor), and gives each a connection: it connects to the backend and
only then answers, so a client's first bytes always have somewhere to go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable, Hashable
from typing import Protocol, cast

from proton import Link, Session

from .adaptor_wire import StreamHeader
from .amqp.handles import Delivery, handle
from .amqp.handles import Link as LinkHandle
from .amqp_link import AmqpSocket
from .connection import Connection
from .dialects.carrier import NO_PORT, Carrier, Failure
from .dialects.link_route import LinkRouteCarrier
from .dialects.tcp_adaptor import StreamDispatcher, TcpAdaptorCarrier
from .limits import DEFAULT_LIMITS, Limits, Sweeper
from .peer_text import printable
from .spec import EgressSpec, IngressSpec, join_host
from .stats import BridgeStats
from .tcp_side import TcpSide, kernel_buffering

logger = logging.getLogger(__name__)
#: What a TCP reader must take in a row before its credit window grows: more
#: than the kernel could have buffered for it unread (see tunnel.dialects.link_route).
READER_PROOF = kernel_buffering()

DEFAULT_OPEN_TIMEOUT = 15.0
DEFAULT_HOLD_TIMEOUT = 10.0
LISTEN_BACKLOG = 4096
BACKEND_CONNECT_TIMEOUT = 10.0

_PROCESS_TAG = os.urandom(3).hex()
_sequence = itertools.count(1)


def link_name(peer: object, site_id: str) -> str:
    """``<client-ip>:<client-port>@<site-id>@<unique>``, as skupper-proxy names links.

    The node egress keeps the first two ``@`` parts as the connection id; the
    third makes the name unique even behind NAT or with one site id for many
    processes (protocols.md §1.6).
    """
    who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"
    return f"{who}@{site_id}@{_PROCESS_TAG}-{next(_sequence)}"


class TunnelHost(Protocol):
    """One AMQP connection that connections run on: the router client or a direct-mode peer."""

    socket: AmqpSocket
    #: Whether the connection is one peer, whose connections count against the
    #: per-peer share; False for a router's, which carries every client's.
    one_peer: bool

    def add_tunnel(self, conn: Connection) -> None: ...
    def forget_tunnel(self, conn: Connection) -> None: ...
    def take_reply_link(self) -> LinkHandle | None:
        """A dynamic receiver attached in advance, or None."""
        ...

    def stream_dispatcher(self) -> StreamDispatcher | None:
        """Set when the connection speaks skupper-router's TCP adaptor dialect."""
        ...


class RouterLink(Protocol):
    """The shared router connection, as the ingress bridges see it."""

    def current(self) -> tuple[TunnelHost, Session] | None:
        """The live connection and its session for tunnel links, or None while down."""
        ...

    def wait_for_up(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the connection is (re)opened."""
        ...

    def stop_waiting(self, callback: Callable[[], None]) -> None: ...


class Deadlines:
    """The open-timeout timers of one bridge's connections: the clock the connections lack."""

    def __init__(self) -> None:
        #: One per connection with a deadline, until it ends.
        self.timers: dict[Connection, asyncio.TimerHandle] = {}

    def arm(self, conn: Connection) -> None:
        if conn.deadline is not None:
            loop = asyncio.get_running_loop()
            self.timers[conn] = loop.call_at(conn.deadline, self._fire, conn)

    def _fire(self, conn: Connection) -> None:
        self.timers.pop(conn, None)
        conn.on_deadline(asyncio.get_running_loop().time())

    def disarm(self, conn: Connection) -> None:
        timer = self.timers.pop(conn, None)
        if timer is not None:
            timer.cancel()


class IngressBridge:
    """``tcp:[HOST:]PORT=>amqp:ADDRESS``."""

    def __init__(
        self,
        spec: IngressSpec,
        router: RouterLink,
        site_id: str,
        *,
        window: int | None = None,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        hold_timeout: float = DEFAULT_HOLD_TIMEOUT,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.spec = spec
        self.router = router
        self.site_id = site_id
        self.window = window
        self.open_timeout = open_timeout
        self.hold_timeout = hold_timeout
        self.limits = limits
        self.server: asyncio.Server | None = None
        self.stats = BridgeStats(str(spec), f"amqp:{spec.address}")
        self.sweeper = Sweeper(self.stats, limits)
        self.deadlines = Deadlines()
        # Made once, not per connection: a closure each would cost every connection.
        self._disarm = self.deadlines.disarm
        self._finish: tuple[TunnelHost, Callable[[Connection], None]] | None = None
        #: Accepted sockets waiting for the router, with their client and hold timer.
        self.held: dict[TcpSide, tuple[str, asyncio.TimerHandle]] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TcpSide(acceptor=self),
            host=self.spec.host,
            port=self.spec.port,
            reuse_address=True,
            # asyncio's default of 100 drops SYNs under a burst of clients,
            # which then wait a second for their retransmission.
            backlog=LISTEN_BACKLOG,
        )
        logger.info("bridge %s listening on %s", self.spec, listening_addresses(self.server))
        self.sweeper.start()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        self.sweeper.stop()

    # -- Acceptor -----------------------------------------------------------------
    def on_accepted(self, side: TcpSide) -> None:
        client = _client(side.peer())
        stats = self.stats
        stats.hold(client)
        if (refusal := self.limits.refusal(stats, client, client)) is not None:
            stats.unhold(client)
            stats.refused(link_name(side.peer(), self.site_id), Failure.LIMIT)
            logger.debug("%s: client %s refused: %s", self.spec, client, refusal)
            side.reset()
            return
        if self.router.current() is None:
            # Held, not refused: the router may well be back within the hold time.
            logger.debug(
                "%s: client %s held until the router is back (at most %gs)",
                self.spec,
                client,
                self.hold_timeout,
            )
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.hold_timeout, self._on_hold_timeout, side)
            self.held[side] = (client, timer)
            self.router.wait_for_up(self._on_router_up)
            return
        self._connect(side, client)

    def on_lost(self, side: TcpSide) -> None:
        held = self.held.pop(side, None)
        if held is not None:
            held[1].cancel()
            self.stats.unhold(held[0])

    def _on_router_up(self) -> None:
        for side, (client, timer) in list(self.held.items()):
            if self.router.current() is None:
                self.router.wait_for_up(self._on_router_up)
                return
            del self.held[side]
            timer.cancel()
            self._connect(side, client)

    def _on_hold_timeout(self, side: TcpSide) -> None:
        held = self.held.pop(side, None)
        if held is None:
            return
        self.stats.unhold(held[0])
        self.stats.refused(link_name(side.peer(), self.site_id), Failure.NO_ROUTER)
        logger.debug(
            "%s: client %s reset: no router connection within %g s",
            self.spec,
            held[0],
            self.hold_timeout,
        )
        side.reset()
        if not self.held:
            self.router.stop_waiting(self._on_router_up)

    def _connect(self, side: TcpSide, client: str) -> None:
        """The router is connected: give the socket its connection, in the router's dialect."""
        live = self.router.current()
        assert live is not None
        host, session = live
        self.stats.unhold(client)
        name = link_name(side.peer(), self.site_id)
        dispatcher = host.stream_dispatcher()
        carrier: Carrier
        if dispatcher is not None:
            carrier = TcpAdaptorCarrier.listener(host.socket, dispatcher, name, self.spec.address)
        else:
            carrier = LinkRouteCarrier.ingress(
                host.socket,
                name,
                session,
                self.spec.address,
                window=self.window,
                proof=READER_PROOF,
                reply=host.take_reply_link(),
            )
        conn = Connection(
            name,
            carrier,
            stats=self.stats,
            peer=client,
            on_finished=self._finisher(host),
            on_opened=self._disarm,
            now=asyncio.get_running_loop().time(),
            open_timeout=self.open_timeout,
        )
        conn.log.debug("accepted; opening links to %r", self.spec.address)
        host.add_tunnel(conn)
        self.deadlines.arm(conn)
        side.bind(conn)

    def _finisher(self, host: TunnelHost) -> Callable[[Connection], None]:
        """What a connection on ``host`` calls when it ends: one per host, not per connection."""
        if self._finish is None or self._finish[0] is not host:
            self._finish = (host, functools.partial(self._on_finished, host))
        return self._finish[1]

    def _on_finished(self, host: TunnelHost, conn: Connection) -> None:
        self.deadlines.disarm(conn)
        host.forget_tunnel(conn)


def listening_addresses(server: asyncio.Server) -> str:
    names = []
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(names)


class EgressBridge:
    """``amqp:ADDRESS=>tcp:HOST:PORT``."""

    def __init__(
        self, spec: EgressSpec, *, window: int | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.spec = spec
        self.window = window
        self.limits = limits
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = BridgeStats(str(spec), f"tcp:{join_host(spec.host, spec.port)}")
        self.sweeper = Sweeper(self.stats, limits)
        self.backend = BackendHealth(f"{spec}", join_host(spec.host, spec.port))
        self.deadlines = Deadlines()

    def on_attach(self, receiver: Link, sender: Link, host: TunnelHost) -> None:
        """A client's sender reached us (routed or direct): start a connection for it.

        ``sender`` is the way back: a new sender targeting the attach's source
        address through a router, or the ingress's own dynamic receiver link
        in direct mode.
        """
        # The peer names the link; the name reaches the logs and the flow records.
        name = printable("@".join(receiver.name.split("@")[:2]))
        carrier = LinkRouteCarrier.egress(
            host.socket,
            name,
            handle(receiver),
            handle(sender),
            window=self.window,
            proof=READER_PROOF,
        )
        peer = cast(Hashable, host) if host.one_peer else None
        conn = self._open(name, carrier, host, peer, _peer_name(host))
        if conn is not None:
            conn.log.debug("attached; connecting to %s:%d", self.spec.host, self.spec.port)

    def on_client_stream(
        self,
        host: TunnelHost,
        dispatcher: StreamDispatcher,
        delivery: Delivery,
        header: StreamHeader,
    ) -> TcpAdaptorCarrier:
        """skupper-router's dialect: a client stream for our address; connect to the backend."""
        name = f"{printable(header.correlation_id or 'stream')}@{_PROCESS_TAG}-{next(_sequence)}"
        carrier = TcpAdaptorCarrier.connector(host.socket, dispatcher, name, delivery, header)
        conn = self._open(name, carrier, host, None, "")
        if conn is not None:
            conn.log.debug(
                "client stream (correlation %s) for %r", header.correlation_id, header.to
            )
        return carrier

    def _open(
        self, name: str, carrier: Carrier, host: TunnelHost, peer: Hashable | None, who: str
    ) -> Connection | None:
        """A connection for ``carrier``, connecting to the backend; None if refused.

        Only through a router is ``peer`` None: its one connection carries
        every client's, so the per-peer share does not apply.
        """
        conn = Connection(name, carrier, stats=self.stats, peer=peer)
        conn.on_finished = host.forget_tunnel
        host.add_tunnel(conn)
        if (refusal := self.limits.refusal(self.stats, peer, who)) is not None:
            conn.reset(refusal, Failure.LIMIT)
            return None
        task = asyncio.get_running_loop().create_task(self._connect(conn), name=f"connect {name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return conn

    async def _connect(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(BACKEND_CONNECT_TIMEOUT):
                await loop.create_connection(lambda: TcpSide(conn), self.spec.host, self.spec.port)
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            self.backend.failed(reason, loop.time())
            conn.reset(f"backend {self.backend.name} unreachable: {reason}", Failure.BACKEND)
        else:
            self.backend.answered()

    async def stop(self) -> None:
        self.sweeper.stop()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _client(peer: object) -> str:
    """The client's address, as limits count it."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


def _peer_name(host: TunnelHost) -> str:
    """The AMQP peer, as a refusal names it: its container id."""
    if host.socket.closed:
        return "a lost AMQP connection"
    container = host.socket.engine.connection.remote_container
    return f"AMQP peer {printable(container or '(unnamed)')}"


class BackendHealth:
    """Whether a bridge's backend answers, logged once per change, not once per connection.

    The first failed connect is a WARNING; while it lasts, a WARNING at most every
    :data:`REPEAT_EVERY` seconds counts the failures since; the first success after
    it is logged at INFO with the count.
    """

    REPEAT_EVERY = 60.0

    def __init__(self, bridge: str, name: str) -> None:
        self.bridge = bridge
        self.name = name
        self.failures = 0
        self._told = 0
        self._told_at = 0.0

    def failed(self, reason: str, now: float) -> None:
        self.failures += 1
        if self.failures == 1:
            logger.warning("%s: backend %s unreachable: %s", self.bridge, self.name, reason)
        elif now - self._told_at >= self.REPEAT_EVERY:
            logger.warning(
                "%s: backend %s still unreachable: %s (%d connects failed since the last report)",
                self.bridge,
                self.name,
                reason,
                self.failures - self._told,
            )
        else:
            return
        self._told, self._told_at = self.failures, now

    def answered(self) -> None:
        if self.failures:
            logger.info(
                "%s: backend %s answers again, after %d failed connects",
                self.bridge,
                self.name,
                self.failures,
            )
        self.failures = self._told = 0


class HostedTunnels:
    """The connections running on one AMQP connection: woken together, reset together."""

    socket: AmqpSocket
    #: A direct-mode peer is one peer; a router connection sets this False.
    one_peer = True

    def __init__(self) -> None:
        #: Bounded by the bridges' connection limits.
        self.tunnels: set[Connection] = set()

    def take_reply_link(self) -> LinkHandle | None:
        return None

    def stream_dispatcher(self) -> StreamDispatcher | None:
        return None

    def add_tunnel(self, conn: Connection) -> None:
        self.tunnels.add(conn)

    def forget_tunnel(self, conn: Connection) -> None:
        self.tunnels.discard(conn)

    def on_socket_writable(self) -> None:
        for tunnel in list(self.tunnels):
            tunnel.on_amqp_writable()

    def reset_tunnels(self) -> None:
        """The socket is lost: reset every tunnel, then let the socket go."""
        for tunnel in list(self.tunnels):
            tunnel.on_amqp_lost()
        self.tunnels.clear()
        # The socket and this host refer to each other (it is the socket's
        # handler): a cycle that holds the whole engine, proton's buffers
        # with it, until the cycle collector happens to run. Broken once the
        # socket has finished with its loss (it releases its engine after
        # telling us), so the memory returns at once.
        asyncio.get_running_loop().call_soon(self._let_go_of_socket)

    def _let_go_of_socket(self) -> None:
        # Whoever still holds this host after its loss sees a closed socket.
        self.socket = cast(AmqpSocket, LOST_SOCKET)


LOST_SOCKET = NO_PORT
