"""The one AMQP connection to the router, shared by every bridge and tunnel.

:class:`RouterClient` connects (TLS and SASL as the connection file says),
keeps the connection, and reconnects with capped exponential backoff and
jitter when it is lost, logging the loss once rather than once per retry.
While the router is not there at all (the connect is refused), the backoff
stops at :data:`ABSENT_CAP`, so that a restarted router carries the clients
held meanwhile within a second of its return; a router that answers and
refuses us (TLS, SASL) is retried up to :data:`BACKOFF_CAP` apart.
Every tunnel that used a lost connection is reset.

The router's Open says who it is (protocols.md §8.3), and that picks the
dialect (:class:`Dialect`) unless ``--dialect`` did:

- a Qpid Dispatch router, or any other peer: skupper-proxy's contract
  (§1). After every (re)connect we ask the router, over ``$management``,
  for a connection-scoped link route per egress address: sender attaches
  for that address anywhere in the network are then routed to this
  connection and handed to the egress bridge;
- skupper-router 3.x, which has no link routes: its TCP adaptor's
  encoding (§4, :mod:`tunnel.dialects.tcp_adaptor`). Each egress address gets a
  consumer link, and streams are told apart by their headers.

Our Open must offer ``qd.streaming-links`` for skupper-router to carry
concurrent streams, but it leaves before the router's arrives, and
offering it to a Qpid Dispatch router would have it open links our
link-route dialect does not expect. So without ``--dialect`` the first
connection offers nothing, and on finding skupper-router we reconnect at
once offering it, and go on offering it for that endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import random
import secrets
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from proton import Condition, Link, Message, Receiver, Sender, Session

from . import adaptor_wire
from .amqp.engine import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_LINKS,
    AmqpEngine,
    EngineOptions,
    close_handle,
    open_session,
    refuse_link,
    set_owner,
)
from .amqp.handles import ACCEPTED, Delivery, handle
from .amqp.handles import Link as LinkHandle
from .amqp_link import AmqpSocket
from .bridge import EgressBridge, HostedTunnels, TunnelHost
from .config import RouterEndpoint
from .dialects.link_route import MAX_MESSAGE_SIZE
from .dialects.tcp_adaptor import StreamDispatcher, TcpAdaptorCarrier
from .messaging import AmqpHost
from .peer_text import printable

logger = logging.getLogger(__name__)

#: Seconds a router may take to take and answer our link-route requests before we warn.
#: A router answers in milliseconds; past this it has stalled (no credit, no answer).
MANAGEMENT_PATIENCE = 5.0
BACKOFF_FIRST = 0.1
#: The longest wait between retries of a router that refused us after connecting.
BACKOFF_CAP = 10.0
#: The longest wait between retries of a router that is not listening (each a SYN
#: answered by RST): jitter makes it 0.25 to 0.75 s.
ABSENT_CAP = 0.5
LINK_ROUTE_TYPE = "org.apache.qpid.dispatch.router.connection.linkRoute"


class Dialect(enum.Enum):
    """How TCP connections travel on the router connection."""

    AUTO = "auto"
    #: skupper-proxy's messages over Qpid Dispatch link routes (protocols.md §1).
    LINK_ROUTE = "link-route"
    #: skupper-router 3.x's TCP adaptor streams (protocols.md §4).
    TCP_ADAPTOR = "tcp-adaptor"


def choose_dialect(properties: Mapping[str, object]) -> tuple[Dialect, str]:
    """The dialect for a router that sent these Open properties, and why."""
    product = str(properties.get("product", ""))
    version = str(properties.get("version", ""))
    if product == "skupper-router":
        major = version.split(".", maxsplit=1)[0]
        if major.isdigit() and int(major) < 3:
            return Dialect.TCP_ADAPTOR, (
                f"skupper-router {version}: 2.x defaults to a legacy "
                "encapsulation we do not speak; trying 3.x's"
            )
        return Dialect.TCP_ADAPTOR, f"skupper-router {version}"
    if product == "qpid-dispatch-router":
        return Dialect.LINK_ROUTE, f"Qpid Dispatch {version}"
    return Dialect.LINK_ROUTE, f"{product or 'unknown product'} {version or '?'}".strip()


class MessageBridge(Protocol):
    """A bridge that exchanges whole messages (HTTP): its links live on each live connection."""

    def on_router_up(self, host: AmqpHost, session: Session) -> None: ...
    def on_router_down(self) -> None: ...


class RouterClient:
    """Keeps one live AMQP connection to the router; see the module docstring."""

    def __init__(
        self,
        endpoint: RouterEndpoint,
        egress: dict[str, EgressBridge],
        *,
        container_id: str | None = None,
        ingress: bool = True,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        session_window: int = 0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        dialect: Dialect = Dialect.AUTO,
        messaging: Sequence[MessageBridge] = (),
        max_links: int = DEFAULT_MAX_LINKS,
    ) -> None:
        self.dialect = dialect
        self.max_links = max_links
        self.messaging = messaging
        # What AUTO found at this endpoint, for the next connection's Open.
        self.found: Dialect | None = None
        self.max_frame_size = max_frame_size
        self.session_window = session_window
        self.idle_timeout = idle_timeout
        self.endpoint = endpoint
        self.egress = egress
        self.container_id = container_id or f"{socket.gethostname()}-tunnel-{secrets.token_hex(4)}"
        self.ingress = ingress
        self.connection: RouterConnection | None = None
        self.connects = 0
        self.disconnects = 0
        self.waiting: set[Callable[[], None]] = set()
        self.routes_active: set[str] = set()
        #: Why a link route is not active, by address, once there is a reason to tell.
        self.route_problems: dict[str, str] = {}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def current(self) -> tuple[TunnelHost, Session] | None:
        conn = self.connection
        if conn is None or not conn.opened or conn.session is None:
            return None
        return conn, conn.session

    def wait_for_up(self, callback: Callable[[], None]) -> None:
        self.waiting.add(callback)

    def stop_waiting(self, callback: Callable[[], None]) -> None:
        self.waiting.discard(callback)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="router client")

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        was_up = True
        while not self._stopping:
            cap = BACKOFF_CAP
            lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
            conn = RouterConnection(self, lost)
            try:
                await self._connect(conn)
            except (OSError, TimeoutError) as error:
                if not isinstance(error, ssl.SSLError):
                    cap = ABSENT_CAP  # nothing answered: no load on the router to spare
                if was_up:
                    logger.warning(
                        "router %s %s; retrying",
                        self.endpoint.url,
                        connect_failure(error, tls=self.endpoint.tls is not None),
                    )
                    was_up = False
            else:
                exc = await lost
                if conn.redial:
                    continue
                if conn.opened:
                    delay = BACKOFF_FIRST
                    cap = ABSENT_CAP  # most likely gone: back as soon as it listens
                    was_up = True
                    self.disconnects += 1
                    logger.warning(
                        "router %s connection lost%s; reconnecting",
                        self.endpoint.url,
                        f": {exc}" if exc else "",
                    )
                elif was_up:
                    # The socket's error (a TLS alert, say) explains more than
                    # proton's complaint about the missing protocol header.
                    logger.warning(
                        "router %s refused the connection: %s",
                        self.endpoint.url,
                        exc or conn.failure or "closed",
                    )
                    was_up = False
            if self._stopping:
                break
            delay = min(delay, cap)
            # Jitter only spreads reconnects out; it needs no cryptographic strength.
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311
            delay *= 2

    async def _connect(self, conn: RouterConnection) -> None:
        ep = self.endpoint
        engine = AmqpEngine(
            EngineOptions(
                container_id=self.container_id,
                hostname=ep.hostname,
                user=ep.user,
                password=ep.password,
                mechanisms=_mechanisms(ep),
                outer_tls=ep.tls is not None,
                max_frame_size=self.max_frame_size,
                session_window=self.session_window,
                idle_timeout=self.idle_timeout,
                max_links=self.max_links,
                offered_capabilities=(
                    (adaptor_wire.STREAMING_LINKS,) if self.offers_streaming_links() else ()
                ),
            )
        )
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(
            loop.create_connection(
                lambda: conn.make_socket(engine),
                ep.host,
                ep.port,
                ssl=ep.ssl,
                server_hostname=ep.server_hostname,
            ),
            timeout=10.0,
        )

    def offers_streaming_links(self) -> bool:
        return Dialect.TCP_ADAPTOR in (self.dialect, self.found)

    async def stop(self) -> None:
        self._stopping = True
        if self.connection is not None:
            self.connection.socket.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _mechanisms(ep: RouterEndpoint) -> str:
    if ep.mechanisms is not None:
        return " ".join(ep.mechanisms)
    mechs = []
    if ep.has_client_cert:
        mechs.append("EXTERNAL")
    if ep.password:
        mechs.append("PLAIN")
    mechs.append("ANONYMOUS")
    return " ".join(mechs)


class RouterConnection(HostedTunnels):
    """One connection attempt and, once open, the live connection."""

    # It carries every client's tunnels: no per-peer share applies to it.
    one_peer = False

    def __init__(self, client: RouterClient, lost: asyncio.Future[Exception | None]) -> None:
        super().__init__()
        self.reply_pool = ReplyPool()
        self.client = client
        self.lost = lost
        self.opened = False
        self.session: Session | None = None
        self.failure: str | None = None
        self.management: ManagementClient | None = None
        #: Calls the management client's on_overdue, unless the connection goes first.
        self._overdue: asyncio.TimerHandle | None = None
        self.dialect = Dialect.LINK_ROUTE
        self.dispatcher: StreamDispatcher | None = None
        # Set when this connection is closed only to reconnect with another Open.
        self.redial = False

    def make_socket(self, engine: AmqpEngine) -> AmqpSocket:
        self.socket = AmqpSocket(engine, self)
        engine.connection.open()
        return self.socket

    # -- ConnectionHandler ------------------------------------------------------
    def on_connection_opened(self) -> None:
        client = self.client
        props = self.socket.engine.connection.remote_properties or {}
        dialect, who = choose_dialect(props)
        if client.dialect is not Dialect.AUTO:
            dialect, who = client.dialect, f"{who}; chosen by --dialect"
        elif dialect is Dialect.TCP_ADAPTOR and not client.offers_streaming_links():
            client.found = dialect
            logger.info(
                "router %s is %s: reconnecting to offer %s",
                client.endpoint.url,
                who,
                adaptor_wire.STREAMING_LINKS,
            )
            self.redial = True
            self.socket.close()
            return
        self.opened = True
        client.connection = self
        client.connects += 1
        self.dialect = dialect
        logger.info("router %s connected (%s): %s dialect", client.endpoint.url, who, dialect.value)
        self.session = self.socket.engine.connection.session()
        open_session(self.session)
        if dialect is Dialect.TCP_ADAPTOR:
            self._start_streams(self.session)
        elif client.ingress:
            self.reply_pool.refill(self.session)
        for bridge in client.messaging:
            bridge.on_router_up(self.socket, self.session)
        # Ingress clients held while the router was away go on now.
        waiting, client.waiting = client.waiting, set()
        for callback in waiting:
            callback()
        if client.egress and dialect is Dialect.LINK_ROUTE:
            self.management = ManagementClient(self)
            self.management.start(self.session)
            self._overdue = asyncio.get_running_loop().call_later(
                MANAGEMENT_PATIENCE, self.management.on_overdue
            )

    def on_connection_closed(self, condition: Condition | None) -> None:
        if condition is not None:
            self.failure = f"{condition.name}: {condition.description}"
            logger.warning("router closed the connection: %s", printable(self.failure))

    def on_transport_error(self, condition: Condition | None) -> None:
        # proton may report the same failure more than once: log it once.
        failure = f"{condition.name}: {condition.description}" if condition else None
        if failure is not None and failure != self.failure:
            self.failure = failure
            logger.debug("transport error: %s", printable(failure))

    def _start_streams(self, session: Session) -> None:
        self.dispatcher = StreamDispatcher(
            session, self._on_client_stream, self.client.routes_active.add
        )
        for address in self.client.egress:
            self.dispatcher.consume(address)

    def _on_client_stream(
        self, address: str, delivery: Delivery, header: adaptor_wire.StreamHeader
    ) -> TcpAdaptorCarrier | None:
        bridge = self.client.egress.get(address)
        if bridge is None or self.dispatcher is None:
            return None
        return bridge.on_client_stream(self, self.dispatcher, delivery, header)

    def stream_dispatcher(self) -> StreamDispatcher | None:
        return self.dispatcher

    def on_link_attach(self, link: Link) -> None:
        if self.dispatcher is not None:
            if link.is_receiver:
                self.dispatcher.accept_link(handle(link))  # a link per stream
            else:
                refuse_link(link, "amqp:not-allowed", "no link routes in this dialect")
            return
        address = link.remote_target.address if link.is_receiver else None
        bridge = self.client.egress.get(address) if address else None
        if bridge is None:
            refuse_link(link, "amqp:not-found", f"no egress bridge for address {address!r}")
            return
        reply_to = link.remote_source.address
        if not reply_to:
            refuse_link(
                link, "amqp:invalid-field", "routed attach has no source address to reply to"
            )
            return
        sender = link.session.sender(f"{link.name}/reply")
        sender.target.address = reply_to
        sender.open()
        bridge.on_attach(link, sender, self)

    def take_reply_link(self) -> LinkHandle | None:
        link = self.reply_pool.take()
        if self.session is not None and self.client.ingress:
            self.reply_pool.refill(self.session)
        return link

    # -- SocketHandler ----------------------------------------------------------
    def on_socket_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client.connection is self:
            client.connection = None
            client.routes_active.clear()
            client.route_problems.clear()
            for bridge in client.messaging:
                bridge.on_router_down()
        if self._overdue is not None:
            self._overdue.cancel()
        self.reset_tunnels()
        if not self.lost.done():
            self.lost.set_result(exc)


_PLAIN_PORT = "(is it a plain AMQP port, not AMQPS?)"


def connect_failure(error: OSError | TimeoutError, *, tls: bool) -> str:
    """What a failed connect to the router says, in words that name the cause."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"failed TLS verification ({error.reason}): {error.verify_message}"
    if tls and isinstance(error, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return f"answered, but closed the connection during the TLS handshake {_PLAIN_PORT}"
    if isinstance(error, ssl.SSLError):
        hint = f" {_PLAIN_PORT}" if error.reason == "WRONG_VERSION_NUMBER" else ""
        return f"failed the TLS handshake: {error.reason or error}{hint}"
    if isinstance(error, TimeoutError):
        return "did not answer within the connect timeout"
    if isinstance(error, ConnectionRefusedError):
        return "unreachable: connection refused (nothing listens there)"
    reason = error.strerror or str(error) or type(error).__name__
    return f"unreachable: {reason}"


class ReplyPool:
    """A few dynamic receivers attached ahead of need.

    A new ingress tunnel then attaches its sender at once instead of first
    waiting a round trip for a dynamic address. The pool is small and fixed;
    a burst beyond it just takes the slower path.
    """

    SIZE = 4

    def __init__(self) -> None:
        self.ready: collections.deque[LinkHandle] = collections.deque()
        self.pending: set[str] = set()
        self._count = itertools.count(1)

    def take(self) -> LinkHandle | None:
        while self.ready:
            link = self.ready.popleft()
            link.own(None)
            if link.remote_active and not link.closed:
                return link
        return None

    def refill(self, session: Session) -> None:
        while len(self.ready) + len(self.pending) < self.SIZE:
            name = f"tunnel-reply-{next(self._count)}"
            receiver: Receiver = session.receiver(name)
            receiver.source.dynamic = True
            receiver.max_message_size = MAX_MESSAGE_SIZE
            set_owner(receiver, self)
            receiver.open()
            self.pending.add(name)

    def on_link_opened(self, link: LinkHandle) -> None:
        self.pending.discard(link.name)
        if link.remote_source_address:
            self.ready.append(link)
        else:
            close_handle(link)

    def on_link_flow(self, link: LinkHandle) -> None:
        pass

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        pass  # no credit is ever granted to a pooled link

    def on_link_closed(self, link: LinkHandle) -> None:
        self.pending.discard(link.name)
        if link in self.ready:
            self.ready.remove(link)


class ManagementClient:
    """Creates the connection-scoped link routes with ``$management`` requests.

    A router that gives no credit on ``$management``, or takes the requests
    and never answers, would leave the egress waiting in silence: the
    connection calls :meth:`on_overdue` after :data:`MANAGEMENT_PATIENCE`, and
    each route still not active is warned about, naming its address and what
    is missing, and the readiness probe says it. No clock or loop here.
    """

    def __init__(self, conn: RouterConnection) -> None:
        self.conn = conn
        self.sender: Sender | None = None
        self.reply_to: str | None = None
        self.pending: dict[int, str] = {}
        self.sent = False

    def on_overdue(self) -> None:
        """:data:`MANAGEMENT_PATIENCE` has passed since :meth:`start` on a connection still up."""
        client = self.conn.client
        if self.sent:
            why = f"the router has not answered its request in {MANAGEMENT_PATIENCE:g}s"
        elif self.reply_to is None:
            why = f"no reply address from the router in {MANAGEMENT_PATIENCE:g}s"
        else:
            why = f"no credit from the router on $management in {MANAGEMENT_PATIENCE:g}s"
        for address in client.egress:
            if address not in client.routes_active and address not in client.route_problems:
                client.route_problems[address] = why
                logger.warning("link route for %r not active: %s", address, why)

    def start(self, session: Session) -> None:
        self.sender = session.sender("tunnel-management")
        self.sender.target.address = "$management"
        set_owner(self.sender, self)
        self.sender.open()
        receiver: Receiver = session.receiver("tunnel-management-replies")
        receiver.source.dynamic = True
        set_owner(receiver, self)
        receiver.open()
        receiver.flow(len(self.conn.client.egress) + 4)

    def on_link_opened(self, link: LinkHandle) -> None:
        if not link.is_sender:
            self.reply_to = link.remote_source_address
        self._send()

    def on_link_flow(self, link: LinkHandle) -> None:
        self._send()

    def _send(self) -> None:
        sender = self.sender
        if self.sent or sender is None or self.reply_to is None or sender.credit <= 0:
            return
        self.sent = True
        for correlation, address in enumerate(self.conn.client.egress, start=1):
            request = Message(
                properties={
                    "operation": "CREATE",
                    "type": LINK_ROUTE_TYPE,
                    "name": address,
                },
                body={"pattern": address, "direction": "in"},
                reply_to=self.reply_to,
                correlation_id=correlation,
            )
            self.pending[correlation] = address
            sender.delivery(str(correlation))
            sender.stream(request.encode())
            sender.advance()
        self.conn.socket.flush_soon()

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        if link.is_sender:
            if delivery.settled:
                delivery.settle()
            return
        if delivery.partial:
            return
        message = Message()
        message.decode(bytes(link.recv(delivery.pending)))
        link.advance()
        delivery.finish(ACCEPTED)
        correlation = message.correlation_id
        address = self.pending.pop(correlation, None) if isinstance(correlation, int) else None
        props: dict[str, object] = message.properties or {}
        status = props.get("statusCode")
        if address is None:
            return
        client = self.conn.client
        if isinstance(status, int) and 200 <= status < 300:
            client.routes_active.add(address)
            if client.route_problems.pop(address, None) is not None:
                logger.warning("link route for %r active after all (%s)", address, status)
            else:
                logger.info("link route for %r active (%s)", address, status)
        else:
            refusal = f"{printable(status)} {printable(props.get('statusDescription', ''))}"
            client.route_problems[address] = f"refused by the router: {refusal.strip()}"
            logger.error("router refused the link route for %r: %s", address, refusal)

    def on_link_closed(self, link: LinkHandle) -> None:
        condition = link.remote_condition
        if condition is not None:
            why = f"{printable(condition.name)}: {printable(condition.description)}"
            logger.error("management link closed by the router: %s", why)
            for address in self.pending.values():
                self.conn.client.route_problems[address] = f"management link closed: {why}"
