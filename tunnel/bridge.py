"""Bridges: the TCP listeners of ingress specs, and the address handlers of egress specs.

An :class:`IngressBridge` accepts TCP connections and gives each an
:class:`IngressTunnel`, which opens its links on the shared router
connection (skupper-proxy §1.2 on the wire, but never a new AMQP connection
per TCP connection).

An :class:`EgressBridge` is handed sender attaches for its address, by a
link route through a router or by direct mode, and gives each an egress
tunnel: it mirrors the attach's termini, connects to the backend, and only
then grants credit, so a client's first bytes always have somewhere to go.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Hashable
from typing import Any, Protocol, cast

from proton import Link, Receiver, Sender

from . import wire
from .adaptor_flow import Flow, Role, StreamDispatcher
from .adaptor_wire import StreamHeader
from .amqp_link import AmqpSocket
from .engine import add_capability, capabilities
from .limits import DEFAULT_LIMITS, Limits, Sweeper
from .peer_text import printable
from .relay import DEFAULT_WINDOW, MAX_MESSAGE_SIZE, NO_PORT, Failure, Phase, Tunnel
from .spec import EgressSpec, IngressSpec, join_host
from .stats import BridgeStats
from .tcp_side import TcpSide

logger = logging.getLogger(__name__)

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
    """One AMQP connection that tunnels run on: the router client or a direct-mode peer."""

    socket: AmqpSocket
    #: Whether the connection is one peer, whose tunnels count against the
    #: per-peer share; False for a router's, which carries every client's.
    one_peer: bool

    def add_tunnel(self, tunnel: Tunnel) -> None: ...
    def forget_tunnel(self, tunnel: Tunnel) -> None: ...
    def take_reply_link(self) -> Link | None:
        """A dynamic receiver attached in advance, or None."""
        ...

    def stream_dispatcher(self) -> StreamDispatcher | None:
        """Set when the connection speaks skupper-router's TCP adaptor dialect."""
        ...


class RouterLink(Protocol):
    """The shared router connection, as the ingress bridges see it."""

    def current(self) -> tuple[TunnelHost, object] | None:
        """The live connection and its session for tunnel links, or None while down."""
        ...

    def wait_for_up(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the connection is (re)opened."""
        ...

    def stop_waiting(self, callback: Callable[[], None]) -> None: ...


class IngressTunnel(Tunnel):
    """A tunnel for one accepted client: opens a dynamic receiver, then a sender to the address."""

    __slots__ = ("bridge", "host", "open_timer", "session")

    def __init__(self, bridge: IngressBridge) -> None:
        super().__init__("(accepting)", NO_PORT, routed_is_sender=True, window=bridge.window)
        self.bridge = bridge
        self.host: TunnelHost | None = None
        self.session: object = None
        self.open_timer: asyncio.TimerHandle | None = None

    def on_tcp_connected(self, transport: asyncio.Transport) -> None:
        bridge = self.bridge
        self.name = link_name(transport.get_extra_info("peername"), bridge.site_id)
        self.log.extra = {"tunnel": self.name}
        self.stats = bridge.stats
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        bridge.stats.tunnel_opened(self, peer=client)
        if (refusal := bridge.limits.refusal(bridge.stats, client, client)) is not None:
            self.tcp = transport
            self.reset(refusal, Failure.LIMIT)
            return
        super().on_tcp_connected(transport)
        self.on_finished = self._on_finished
        live = bridge.router.current()
        if live is None:
            # Held, not refused: the router may well be back within the hold time.
            self.log.debug("waiting up to %gs for the router", bridge.hold_timeout)
            bridge.router.wait_for_up(self._on_router_up)
            self.open_timer = asyncio.get_running_loop().call_later(
                bridge.hold_timeout, self._on_hold_timeout
            )
            return
        self._open(*live)

    def _on_router_up(self) -> None:
        live = self.bridge.router.current()
        if self.phase is Phase.CLOSED or live is None:
            return
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        self._open(*live)

    def _on_hold_timeout(self) -> None:
        self.open_timer = None
        if self.host is None:
            self.reset(
                f"no router connection within {self.bridge.hold_timeout:g} s", Failure.NO_ROUTER
            )

    def _open(self, host: TunnelHost, session: Any) -> None:
        """Open this tunnel's links on the live router connection."""
        bridge = self.bridge
        dispatcher = host.stream_dispatcher()
        if dispatcher is not None:
            self._hand_over(host, dispatcher, session)
            return
        self.host, self.session, self.amqp = host, session, host.socket
        host.add_tunnel(self)
        pooled = host.take_reply_link()
        if pooled is not None:
            # Its dynamic address is known already: one round trip saved.
            self.attach_links(None, pooled)
            self._open_sender(pooled)
        else:
            receiver: Receiver = session.receiver(f"{self.name}/reply")
            receiver.source.dynamic = True
            receiver.max_message_size = MAX_MESSAGE_SIZE
            self.attach_links(None, receiver)
            receiver.open()
        self.log.debug("accepted; opening links to %r", bridge.spec.address)
        self.open_timer = asyncio.get_running_loop().call_later(
            bridge.open_timeout, self.on_open_timeout, bridge.open_timeout
        )
        self.amqp.flush_soon()

    def _hand_over(self, host: TunnelHost, dispatcher: StreamDispatcher, session: Any) -> None:
        """skupper-router's dialect: from here a :class:`Flow` carries this connection."""
        bridge, tcp = self.bridge, self.tcp
        assert tcp is not None
        flow = Flow(self.name, host, dispatcher, Role.LISTENER, bridge.spec.address)
        flow.stats = bridge.stats
        bridge.stats.hand_over(self, flow)
        self.tcp, self.phase, self.on_finished = None, Phase.CLOSED, None
        tcp.set_protocol(TcpSide(flow))
        parked = bytes(self._parked) if self._parked is not None else b""
        flow.start_listener(session, tcp, bridge.open_timeout, parked, self.read_open)

    def on_link_flow(self, link: Link) -> None:
        super().on_link_flow(link)
        if self.open_timer is not None and self.phase is not Phase.OPENING:
            self.open_timer.cancel()
            self.open_timer = None

    def _on_finished(self, tunnel: Tunnel) -> None:
        if self.open_timer is not None:
            self.open_timer.cancel()
            self.open_timer = None
        self.bridge.router.stop_waiting(self._on_router_up)
        if self.host is not None:
            self.host.forget_tunnel(self)
        # Closed: the connection it ran on may go, and nothing of it is needed.
        self.host = self.session = None

    def on_link_opened(self, link: Link) -> None:
        if link.is_sender:
            # An answer with no target is still an attach: rhea, and so the node
            # egress behind a link route, never copies the termini. A refusal
            # is the detach that follows, and that is what resets.
            super().on_link_opened(link)
            return
        self._open_sender(link)

    def _open_sender(self, receiver: Link) -> None:
        """Attach the sender, carrying the reply link's dynamic address as its source."""
        address = receiver.remote_source.address
        if not address:
            self.reset("the router gave no dynamic reply address", Failure.FAR_END)
            return
        sender: Sender = receiver.session.sender(self.name)
        sender.target.address = self.bridge.spec.address
        sender.source.address = address
        add_capability(sender.source, wire.HALF_CLOSE)
        self.prefix = wire.properties_section(address)
        self.attach_links(sender, None)
        sender.open()
        self.on_tcp_write_resumed()  # grants the first credit on the reply link


class IngressBridge:
    """``tcp:[HOST:]PORT=>amqp:ADDRESS``."""

    def __init__(
        self,
        spec: IngressSpec,
        router: RouterLink,
        site_id: str,
        *,
        window: int = DEFAULT_WINDOW,
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

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TcpSide(IngressTunnel(self)),
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


def listening_addresses(server: asyncio.Server) -> str:
    names = []
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(names)


class EgressBridge:
    """``amqp:ADDRESS=>tcp:HOST:PORT``."""

    def __init__(
        self, spec: EgressSpec, *, window: int = DEFAULT_WINDOW, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.spec = spec
        self.window = window
        self.limits = limits
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats = BridgeStats(str(spec), f"tcp:{join_host(spec.host, spec.port)}")
        self.sweeper = Sweeper(self.stats, limits)
        self.backend = BackendHealth(f"{spec}", join_host(spec.host, spec.port))

    def on_attach(self, receiver: Link, sender: Link, host: TunnelHost) -> None:
        """A client's sender reached us (routed or direct): start a tunnel for it.

        ``sender`` is the way back: a new sender targeting the attach's source
        address through a router, or the ingress's own dynamic receiver link
        in direct mode.
        """
        # The peer names the link; the name reaches the logs and the flow records.
        name = printable("@".join(receiver.name.split("@")[:2]))
        tunnel = Tunnel(
            name,
            host.socket,
            routed_is_sender=False,
            window=self.window,
            on_finished=host.forget_tunnel,
        )
        receiver.source.copy(receiver.remote_source)
        receiver.target.copy(receiver.remote_target)
        add_capability(receiver.target, wire.HALF_CLOSE)
        receiver.max_message_size = MAX_MESSAGE_SIZE
        tunnel.peer_half_close = wire.HALF_CLOSE in capabilities(receiver.remote_source)
        tunnel.attach_links(sender, receiver)
        tunnel.stats = self.stats
        peer = cast(Hashable, host) if host.one_peer else None
        self.stats.tunnel_opened(tunnel, peer=peer)
        if (refusal := self.limits.refusal(self.stats, peer, _peer_name(host))) is not None:
            host.add_tunnel(tunnel)
            tunnel.reset(refusal, Failure.LIMIT)
            return
        # The attach is answered once the backend is connected (see
        # Tunnel.on_tcp_connected), so the answer and the first credit
        # reach the client in one write.
        host.add_tunnel(tunnel)
        if sender.state & Link.REMOTE_ACTIVE:
            tunnel.on_sender_ready()
        tunnel.log.debug("attached; connecting to %s:%d", self.spec.host, self.spec.port)
        task = asyncio.get_running_loop().create_task(
            self._connect(tunnel), name=f"connect {tunnel.name}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_client_stream(
        self, host: TunnelHost, dispatcher: StreamDispatcher, delivery: Any, header: StreamHeader
    ) -> Flow:
        """skupper-router's dialect: a client stream for our address; connect to the backend."""
        assert header.reply_to is not None
        # Only through a router: its one connection carries every client's
        # streams, so the per-peer share does not apply.
        name = f"{printable(header.correlation_id or 'stream')}@{_PROCESS_TAG}-{next(_sequence)}"
        flow = Flow(name, host, dispatcher, Role.CONNECTOR, header.reply_to, stats=self.stats)
        flow.start_connector(delivery, header)
        if (refusal := self.limits.refusal(self.stats)) is not None:
            flow.reset(refusal, Failure.LIMIT)
            return flow
        task = asyncio.get_running_loop().create_task(self._connect(flow), name=f"connect {name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return flow

    async def _connect(self, tunnel: Tunnel | Flow) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(BACKEND_CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: TcpSide(tunnel), self.spec.host, self.spec.port
                )
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            self.backend.failed(reason, loop.time())
            tunnel.reset(f"backend {self.backend.name} unreachable: {reason}", Failure.BACKEND)
        else:
            self.backend.answered()

    async def stop(self) -> None:
        self.sweeper.stop()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


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


class Hosted(Protocol):
    """A tunnel or flow, as the connection it runs on sees it."""

    def on_amqp_writable(self) -> None: ...
    def on_amqp_lost(self) -> None: ...


class HostedTunnels:
    """The tunnels running on one AMQP connection: woken together, reset together."""

    socket: AmqpSocket
    #: A direct-mode peer is one peer; a router connection sets this False.
    one_peer = True

    def __init__(self) -> None:
        self.tunnels: set[Hosted] = set()

    def take_reply_link(self) -> Link | None:
        return None

    def stream_dispatcher(self) -> StreamDispatcher | None:
        return None

    def add_tunnel(self, tunnel: Hosted) -> None:
        self.tunnels.add(tunnel)

    def forget_tunnel(self, tunnel: Hosted) -> None:
        self.tunnels.discard(tunnel)

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


class _LostSocket:
    """What a host's ``socket`` is once the real one is lost: closed, and sending nothing."""

    closed = True
    transport = None
    write_paused = True

    def flush_soon(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def engine(self) -> Any:
        raise RuntimeError("the AMQP connection is lost")


LOST_SOCKET = _LostSocket()
