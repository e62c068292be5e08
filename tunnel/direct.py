"""Direct mode: this process accepts AMQP connections itself and acts as the router.

Towards a connecting ingress (ours or the node proxy) it behaves as a router
with a link route for each local egress address would:

- a receiver attach with a dynamic source gets a fresh address;
- a sender attach whose target is an egress address is handed to that
  egress bridge, and the way back is the ingress's own dynamic receiver
  link, found by the address the attach carries as its source (so the two
  must share a connection, as every ingress's do);
- a sender attach whose target is an HTTP egress address carries request
  messages to that bridge; each response goes to the dynamic receiver named
  by the request's ``reply_to``;
- an HTTP/2 egress bridge of this process is one of the consumers of its
  address at the forwarder, beside any peer's, and has a dynamic address
  there for the rest of each stream: its messages are handed over in
  memory, with no AMQP connection to itself.

Towards everything else it is a small router between the peers connected to
it (:mod:`tunnel.forwarding`): a node egress asks ``$management`` for a link
route and is passed the sender attaches for its address; a node HTTP egress
consumes its address; anonymous senders and senders to a consumed or dynamic
address are message-routed. A tunnel's sender attach (one whose source is a
dynamic address given here: its way back) for an address nobody serves is
refused with ``amqp:not-found``, so its client is reset at once; any other
sender waits, as at a router, and what it sends meanwhile is released.

What one peer may hold here (anyone who can reach the port is a peer; only
``--listen-ca`` makes them prove who they are):

- ``--handshake-timeout`` (default :data:`HANDSHAKE_TIMEOUT` s) from the TCP
  accept to the AMQP open, through the TLS handshake, as one deadline;
- :data:`MAX_UNCLAIMED` dynamic receivers no tunnel has claimed;
- :data:`PARTIAL_MESSAGES` x the largest message in unfinished deliveries,
  and :data:`~tunnel.messaging.DEFAULT_MAX_UNSETTLED` deliveries it has not
  settled (:class:`~tunnel.messaging.PeerBudget`);
- :data:`MAX_SESSIONS` sessions, and ``--max-links-per-connection`` links;
- what :mod:`tunnel.forwarding` allows it (routes, consumers, bytes in hand).

Past one, the link (or attach) is refused with ``amqp:resource-limit-exceeded``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence

from proton import Condition, Link

from .amqp.engine import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_LINKS,
    AmqpEngine,
    EngineOptions,
    owner_of,
    refuse_link,
    set_owner,
)
from .amqp.handles import Delivery, handle
from .amqp.handles import Link as LinkHandle
from .amqp_link import AmqpSocket
from .bridge import LISTEN_BACKLOG, EgressBridge, HostedTunnels
from .config import ListenConfig
from .forwarding import DYNAMIC_PREFIX, MANAGEMENT, Forwarder
from .http2_egress import Http2EgressBridge
from .http_egress import HttpEgressBridge
from .http_message import HttpSettings
from .messaging import (
    DEFAULT_MAX_UNSETTLED,
    MessageReceiver,
    MessageSender,
    PeerBudget,
    set_budget,
)
from .peer_text import PEER_LOG, printable
from .spec import join_host
from .tls_files import ReloadingContext

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
#: Bytes of unfinished deliveries one peer may leave with us, in largest messages.
PARTIAL_MESSAGES = 4
#: Dynamic receivers one peer may hold that no tunnel has claimed yet. Each costs
#: about 2 KiB (mostly proton's link and its termini): 4096 are about 8 MiB. An
#: ingress claims each within a round trip, so only a burst of new clients
#: comes near it.
MAX_UNCLAIMED = 4096
#: Sessions one peer may begin: an ingress or a node proxy uses one (each costs
#: proton some 3.6 KiB).
MAX_SESSIONS = 1024


class DirectListener:
    """The ``--listen`` server."""

    def __init__(
        self,
        config: ListenConfig,
        egress: dict[str, EgressBridge],
        *,
        http_egress: dict[str, HttpEgressBridge] | None = None,
        http2_egress: Sequence[Http2EgressBridge] = (),
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        session_window: int = 0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_message: int = HttpSettings().max_message,
        max_unsettled: int = DEFAULT_MAX_UNSETTLED,
        max_links: int = DEFAULT_MAX_LINKS,
        max_unclaimed: int = MAX_UNCLAIMED,
    ) -> None:
        self.config = config
        self.max_links = max_links
        self.max_frame_size = max_frame_size
        self.session_window = session_window
        self.idle_timeout = idle_timeout
        self.egress = egress
        self.http_egress = http_egress or {}
        local = {*self.egress, *self.http_egress, *(b.spec.address for b in http2_egress)}
        self.handshake_timeout = handshake_timeout
        #: What each peer may leave with us unfinished (see tunnel.messaging.PeerBudget).
        self.max_partial = PARTIAL_MESSAGES * max_message
        self.max_unsettled = max_unsettled
        self.max_unclaimed = max_unclaimed
        self.server: asyncio.Server | TlsServer | None = None
        self.peers: set[DirectPeer] = set()
        self.forwarder = Forwarder(
            max_message=max_message,
            is_local=lambda address: address in local,
        )
        for bridge in http2_egress:
            bridge.serve_locally(self.forwarder)

    async def start(self) -> None:
        tls = self.config.reloading_context()
        if tls is not None:
            self.server = TlsServer(
                listening_sockets(self.config.host, self.config.port),
                self._accept,
                tls,
                self.handshake_timeout,
            )
        else:
            self.server = await asyncio.get_running_loop().create_server(
                self._accept,
                self.config.host,
                self.config.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        logger.info(
            "direct mode: accepting AMQP on %s://%s",
            self.config.scheme,
            join_host(self.config.host, self.bound_port),
        )
        if self.config.scheme == "amqp" and not _is_loopback(self.config.host):
            logger.warning(
                "direct mode listens on %s without TLS: anyone who can reach it "
                "can use the tunnels; use amqps:// with --listen-ca",
                self.config.host,
            )
        elif self.config.scheme == "amqps" and self.config.ca is None:
            logger.warning(
                "direct mode listens on %s with TLS but without --listen-ca: any client "
                "that can reach it connects without a certificate and can use the tunnels",
                join_host(self.config.host, self.bound_port),
            )

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def _accept(self, deadline: float | None = None, address: str | None = None) -> AmqpSocket:
        """A new connection's protocol; it must open AMQP by ``deadline`` (loop time)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.handshake_timeout
        peer = DirectPeer(self, deadline, address)
        engine = AmqpEngine(
            EngineOptions(
                server=True,
                outer_tls=self.config.scheme == "amqps",
                max_frame_size=self.max_frame_size,
                session_window=self.session_window,
                idle_timeout=self.idle_timeout,
                max_links=self.max_links,
                max_sessions=MAX_SESSIONS,
            )
        )
        set_budget(engine.connection, PeerBudget(self.max_partial, self.max_unsettled))
        peer.socket = AmqpSocket(engine, peer)
        self.peers.add(peer)
        return peer.socket

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def close_all(self) -> None:
        for peer in list(self.peers):
            peer.socket.close()


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of ``host``, as asyncio
    binds them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class TlsServer:
    """The amqps listener: plain sockets, each accepted connection's TLS handshake its own task.

    asyncio's TLS server drops a failed handshake without a word (an OSError is
    logged in debug mode only), so a client that distrusts our certificate looked
    like one that never spoke. Here each failure is logged at once with its reason.
    Each handshake takes the context as its files are now (a rotated certificate).
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        make: Callable[[float, str], AmqpSocket],
        tls: ReloadingContext,
        timeout: float,
    ) -> None:
        self.sockets = sockets
        self.make = make
        self.tls = tls
        self.timeout = timeout
        loop = asyncio.get_running_loop()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.accepting = [loop.create_task(self._accept(sock)) for sock in sockets]

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listening)
            except OSError as exc:  # out of descriptors, say: the next accept may do
                logger.warning("direct mode: accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            # One deadline from here to the AMQP open, the TLS handshake included.
            task = loop.create_task(self._handshake(conn, loop.time() + self.timeout))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, conn: socket.socket, deadline: float) -> None:
        made: list[AmqpSocket] = []
        try:
            peer = _address(conn.getpeername())
        except OSError:
            peer = "a peer that left"

        def protocol() -> AmqpSocket:
            made.append(self.make(deadline, peer))
            return made[-1]

        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                protocol,
                conn,
                ssl=self.tls.current(),
                ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
            )
        except (OSError, TimeoutError) as exc:
            reason = f"tls:{exc.reason}" if isinstance(exc, ssl.SSLError) else type(exc).__name__
            PEER_LOG.log(
                logging.INFO,
                _host_of(peer),
                reason,
                "direct mode: TLS handshake with %s failed: %s",
                peer,
                _tls_failure(exc),
            )
            conn.close()
            for app in made:
                app.connection_lost(exc)

    def close(self) -> None:
        for task in self.accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()


_TLS_HINTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this listener's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused this listener's certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "--listen-ca requires a client certificate",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by --listen-ca",
    "WRONG_VERSION_NUMBER": "not TLS: plain AMQP on an AMQPS port?",
    "HTTP_REQUEST": "not TLS: an HTTP request",
}


def _tls_failure(exc: OSError | TimeoutError) -> str:
    if isinstance(exc, ssl.SSLError):
        hint = _TLS_HINTS.get(exc.reason or "")
        return f"{exc.reason or exc} ({hint})" if hint else str(exc.reason or exc)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return (
            "the client closed the connection during it "
            "(does it trust this listener's certificate?)"
        )
    if isinstance(exc, TimeoutError):
        return "it took too long"
    return str(exc.strerror or exc) or type(exc).__name__


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return join_host(str(peer[0]), int(peer[1]))
    return "an unknown peer"


def _host_of(address: str) -> str:
    """The host part of ``host:port`` or ``[v6]:port``: whom repeated failures are counted for."""
    host = address.rpartition(":")[0] if address.count(":") == 1 or "]:" in address else address
    return host.strip("[]") or address


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DirectPeer(HostedTunnels):
    """One accepted AMQP connection in direct mode.

    Logging: one INFO line when the peer opens AMQP; everything per link at
    DEBUG; the peer's failures (garbage, a late open, a close with an error)
    through :data:`tunnel.peer_text.PEER_LOG`, once per host and reason.

    At socket loss everything the peer made here is let go: its links'
    owners are told (their buffers, queues and callbacks dropped), its
    tables cleared and the socket's reference to it replaced, so the peer
    and all it held are freed by reference counting, without the cycle
    collector.
    """

    def __init__(
        self, listener: DirectListener, deadline: float, address: str | None = None
    ) -> None:
        super().__init__()
        self.listener = listener
        self._address = address
        #: Dynamic reply links not claimed yet: at most ``listener.max_unclaimed``.
        self.dynamic: dict[str, Link] = {}
        #: Claimed for replies, one per dynamic link: bounded by the engine's link limit.
        self.reply_senders: dict[str, MessageSender] = {}
        self.unclaimed = _Unclaimed(self.dynamic, listener.forwarder)
        self.opened = False
        # A peer that never completes the AMQP open would hold a socket forever;
        # the deadline runs from the TCP accept, through any TLS handshake.
        self.handshake_timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_at(
            deadline, self._on_handshake_timeout
        )

    @property
    def address(self) -> str:
        """Where the peer connects from, ``host:port``."""
        if self._address is None:
            transport = self.socket.transport
            if transport is None:
                return "a peer not yet connected"
            self._address = _address(transport.get_extra_info("peername"))
        return self._address

    @property
    def remote_host(self) -> str:
        """The peer's host: whom its repeated failures are counted for."""
        return _host_of(self.address)

    def _on_handshake_timeout(self) -> None:
        self.handshake_timer = None
        transport = self.socket.transport
        if transport is None:
            return  # still in the TLS handshake, which ends at this same deadline
        PEER_LOG.log(
            logging.INFO,
            self.remote_host,
            "handshake-timeout",
            "direct mode: %s did not open an AMQP connection within %gs: closing",
            self.address,
            self.listener.handshake_timeout,
        )
        transport.abort()

    @property
    def container(self) -> str:
        """The peer's container id, as it named itself in its Open, made printable."""
        if self.socket.closed:
            return "(gone)"
        return printable(self.socket.engine.connection.remote_container or "(unnamed)")

    def on_connection_opened(self) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        self.opened = True
        logger.info("direct mode: peer %s connected from %s", self.container, self.address)

    def on_connection_closed(self, condition: Condition | None) -> None:
        if condition is not None:
            PEER_LOG.log(
                logging.INFO,
                self.remote_host,
                "closed-with-error",
                "direct mode: peer %s from %s closed with %s: %s",
                self.container,
                self.address,
                printable(condition.name),
                printable(condition.description),
            )
            return
        for conn in list(self.tunnels):
            conn.on_peer_closed()

    def on_transport_error(self, condition: Condition | None) -> None:
        if condition is None or self.socket.transport is None:
            return  # a failed TLS handshake, said already
        if self.handshake_timer is None and not self.opened:
            return  # closed by the handshake timeout, said already
        PEER_LOG.log(
            logging.INFO,
            self.remote_host,
            "transport-error",
            "direct mode: peer %s failed: %s: %s",
            self.address,
            printable(condition.name),
            printable(condition.description),
        )

    def on_link_attach(self, link: Link) -> None:
        if link.is_sender:
            self._attach_reply_link(link)
            return
        address = link.remote_target.address
        forwarder = self.listener.forwarder
        if address == MANAGEMENT:
            forwarder.serve_management(self, link)
            return
        http = self.listener.http_egress.get(address) if address else None
        if http is not None:
            handle(link).mirror()
            http.consume(link, self.socket, self._reply)
            return
        bridge = self.listener.egress.get(address) if address else None
        if bridge is not None:
            self._attach_tunnel(bridge, link)
            return
        routed = None
        if address and not forwarder.is_dynamic(address):
            routed = forwarder.routed_peer(address)
        if routed is not None:
            forwarder.route(self, link, routed)
        elif (
            address is None
            or forwarder.has_destination(address)
            or not forwarder.is_dynamic(link.remote_source.address)
        ):
            forwarder.forward(self, link)
        else:
            refuse_link(link, "amqp:not-found", f"no egress bridge for address {address!r}")

    def _attach_tunnel(self, bridge: EgressBridge, link: Link) -> None:
        reply_to = link.remote_source.address or ""
        reply = self.dynamic.pop(reply_to, None)
        if reply is None:
            refuse_link(
                link,
                "amqp:not-found",
                f"reply address {link.remote_source.address!r} is not a dynamic address "
                "of this connection",
            )
            return
        self.listener.forwarder.claim_dynamic(reply_to)
        bridge.on_attach(link, reply, self)
        self.socket.flush_soon()

    def _attach_reply_link(self, link: Link) -> None:
        if not link.remote_source.dynamic:
            if link.remote_source.address:
                self.listener.forwarder.consume(self, link)
            else:
                refuse_link(link, "amqp:not-found", "a receiver needs a source address")
            return
        if len(self.dynamic) >= self.listener.max_unclaimed:
            refuse_link(
                link,
                "amqp:resource-limit-exceeded",
                f"at most {self.listener.max_unclaimed} dynamic receivers per connection "
                "waiting for a sender",
            )
            return
        address = f"{DYNAMIC_PREFIX}{secrets.token_hex(8)}"
        link.source.copy(link.remote_source)
        link.source.address = address
        link.target.copy(link.remote_target)
        set_owner(link, self.unclaimed)
        link.open()
        self.dynamic[address] = link
        self.listener.forwarder.add_dynamic(address, self)

    def reply_sender(self, address: str) -> MessageSender | None:
        """The sender on the dynamic link whose address is ``address``, made at first use."""
        sender = self.reply_senders.get(address)
        if sender is None:
            link = self.dynamic.pop(address, None)
            if link is None:
                return None
            sender = MessageSender(link, self.socket, on_closed=self._reply_closed)
            self.reply_senders[address] = sender
        return sender

    def _reply_closed(self, sender: MessageSender) -> None:
        address = str(sender.link.source.address)
        if self.reply_senders.get(address) is sender:
            del self.reply_senders[address]
        self.listener.forwarder.remove_dynamic(address)

    def _reply(self, to: str, data: bytes) -> bool:
        """Send an HTTP response to the dynamic receiver ``to``, on any peer."""
        sender = self.listener.forwarder.destination(to)
        if sender is None:
            return False
        sender.send(data)
        return True

    def on_socket_lost(self, exc: Exception | None) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        if self.opened:
            logger.debug("direct mode: peer %s from %s left", self.container, self.address)
        self.reset_tunnels()
        self.dynamic.clear()
        for sender in list(self.reply_senders.values()):
            sender.lost()
        self.reply_senders.clear()
        # First: links routed through this peer end with qd:routed-link-lost.
        self.listener.forwarder.peer_lost(self)
        self._release_links()
        self.listener.peers.discard(self)
        # The socket outlives this call (it frees the engine next) and would
        # keep this peer, and the peer it: a cycle only the collector breaks.
        self.socket.handler = _GONE

    def _release_links(self) -> None:
        """Tell the owners of this connection's links that it is gone: no link event will."""
        link = self.socket.engine.connection.link_head(0)
        while link is not None:
            owner = owner_of(link)
            if isinstance(owner, MessageReceiver | MessageSender):
                owner.lost()
            link = link.next(0)


class _Unclaimed:
    """Owner of a peer's dynamic reply links that no tunnel has claimed yet.

    One per peer, not per link: an unclaimed link costs its entry in
    ``DirectPeer.dynamic`` and the forwarder's table, and nothing else here.
    It holds the peer's table, not the peer, so the two make no cycle.
    """

    __slots__ = ("dynamic", "forwarder")

    def __init__(self, dynamic: dict[str, Link], forwarder: Forwarder) -> None:
        self.dynamic = dynamic
        self.forwarder = forwarder

    def on_link_opened(self, link: LinkHandle) -> None:
        pass

    def on_link_flow(self, link: LinkHandle) -> None:
        pass

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        pass

    def on_link_closed(self, link: LinkHandle) -> None:
        address = str(link.proton.source.address)
        if self.dynamic.pop(address, None) is not None:
            self.forwarder.remove_dynamic(address)


class _Gone:
    """A lost peer's stand-in as its socket's handler: there is nothing left to tell."""

    def on_connection_opened(self) -> None:
        pass

    def on_connection_closed(self, condition: Condition | None) -> None:
        pass

    def on_link_attach(self, link: Link) -> None:
        pass

    def on_transport_error(self, condition: Condition | None) -> None:
        pass

    def on_socket_writable(self) -> None:
        pass

    def on_socket_lost(self, exc: Exception | None) -> None:
        pass


_GONE = _Gone()
