"""Putting it together: bridges, the router connection, direct mode, and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from . import __version__
from .admin import AdminServer
from .amqp.engine import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_LINKS
from .bridge import EgressBridge, IngressBridge
from .config import ListenConfig, RouterEndpoint
from .dialects.carrier import Failure
from .direct import DirectListener
from .errors import naming
from .flows import snapshot
from .http2_egress import Http2EgressBridge, client_tls
from .http2_ingress import Http2IngressBridge, server_tls
from .http_egress import HttpEgressBridge, RoutedEgress
from .http_ingress import HttpIngressBridge
from .http_message import HttpSettings
from .limits import DEFAULT_LIMITS, Limits
from .memory import MemoryReleaser
from .metrics import registry_for
from .router import Dialect, RouterClient
from .spec import (
    BridgeSpec,
    EgressSpec,
    Http2EgressSpec,
    Http2IngressSpec,
    HttpEgressSpec,
    HttpIngressSpec,
    IngressSpec,
    join_host,
)
from .stats import BridgeStats

logger = logging.getLogger("tunnel")

DEFAULT_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``main`` resolved from the command line and the environment."""

    specs: tuple[BridgeSpec, ...]
    router: RouterEndpoint | None
    router_source: str
    listen: ListenConfig | None
    site_id: str
    #: Credit per link-route receiver, in deliveries (None: sized for the path).
    window: int | None = None
    open_timeout: float = 15.0
    grace: float = DEFAULT_GRACE
    admin: tuple[str, int] | None = None
    handshake_timeout: float = 10.0
    hold_timeout: float = 10.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    session_window: int = 0
    amqp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Links (and sessions) a peer may open on one AMQP connection.
    max_links: int = DEFAULT_MAX_LINKS
    limits: Limits = DEFAULT_LIMITS
    dialect: Dialect = Dialect.AUTO
    http: HttpSettings = field(default_factory=HttpSettings)
    #: The HTTP/2 ingress's certificate and key files: TLS with ALPN h2 (else h2c).
    http2_tls: tuple[str, str] | None = None
    #: The CA the HTTP/2 egress verifies its backends against: TLS with ALPN h2 (else h2c).
    http2_backend_ca: str | None = None


class App:
    """The running daemon."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.egress = {
            spec.address: EgressBridge(spec, window=settings.window, limits=settings.limits)
            for spec in settings.specs
            if isinstance(spec, EgressSpec)
        }
        self.http_egress = {
            spec.address: HttpEgressBridge(spec, settings.site_id, settings.http)
            for spec in settings.specs
            if isinstance(spec, HttpEgressSpec)
        }
        self.http_ingress = [
            HttpIngressBridge(
                spec, settings.site_id, settings.http, settings.limits.max_connections
            )
            for spec in settings.specs
            if isinstance(spec, HttpIngressSpec)
        ]
        tls = None
        if settings.http2_tls is not None:
            cert, key = settings.http2_tls
            with naming(f"--http2-cert {cert} --http2-key {key}"):
                tls = server_tls(cert, key)
        self.http2_ingress = [
            Http2IngressBridge(
                spec, settings.site_id, settings.http, settings.limits.max_connections, tls
            )
            for spec in settings.specs
            if isinstance(spec, Http2IngressSpec)
        ]
        # HTTP/2 egresses consume their addresses at the router, or at our own listener.
        backend_tls = None
        if settings.http2_backend_ca is not None:
            with naming(f"--http2-backend-ca {settings.http2_backend_ca}"):
                backend_tls = client_tls(settings.http2_backend_ca)
        self.http2_egress = [
            Http2EgressBridge(spec, settings.site_id, settings.http, backend_tls)
            for spec in settings.specs
            if isinstance(spec, Http2EgressSpec)
        ]
        # Through a router, HTTP egress bridges consume their addresses there.
        self.routed_http = [
            RoutedEgress(bridge)
            for bridge in self.http_egress.values()
            if settings.router is not None
        ]
        self.direct = (
            DirectListener(
                settings.listen,
                self.egress,
                http_egress=self.http_egress,
                http2_egress=self.http2_egress if settings.router is None else (),
                handshake_timeout=settings.handshake_timeout,
                max_frame_size=settings.max_frame_size,
                session_window=settings.session_window,
                idle_timeout=settings.amqp_idle_timeout,
                max_message=settings.http.max_message,
                max_links=settings.max_links,
            )
            if settings.listen
            else None
        )
        self.router: RouterClient | None = None
        self.ingress: list[IngressBridge] = []
        self.stopping = asyncio.Event()
        #: A second SIGTERM or SIGINT during the grace period: reset what is left now.
        self.hurry = asyncio.Event()
        self.admin: AdminServer | None = None
        self.memory = MemoryReleaser()

    async def start(self) -> None:
        settings = self.settings
        self.memory.start()
        if settings.admin is not None:
            # First, so that liveness answers while the rest comes up.
            self.admin = AdminServer(
                registry_for(self), self.readiness, lambda: snapshot(self.bridge_stats())
            )
            host, port = settings.admin
            with naming(f"--admin {join_host(host, port)}"):
                await self.admin.start(host, port)
        if self.direct is not None and settings.listen is not None:
            with naming(f"--listen {settings.listen.url}"):
                await self.direct.start()
        endpoint = settings.router
        wants_router = any(
            isinstance(s, (IngressSpec, HttpIngressSpec, Http2IngressSpec)) for s in settings.specs
        )
        if endpoint is None and self.direct is not None and settings.listen and wants_router:
            endpoint = settings.listen.self_endpoint(self.direct.bound_port)
        if endpoint is not None:
            # Link routes only where a router will route: not to our own listener.
            self.router = RouterClient(
                endpoint,
                self.egress if settings.router else {},
                ingress=any(isinstance(s, IngressSpec) for s in settings.specs),
                max_frame_size=settings.max_frame_size,
                session_window=settings.session_window,
                idle_timeout=settings.amqp_idle_timeout,
                dialect=settings.dialect,
                messaging=[
                    *self.http_ingress,
                    *self.routed_http,
                    *self.http2_ingress,
                    *(self.http2_egress if settings.router else ()),
                ],
                max_links=settings.max_links,
            )
            self.router.start()
        for spec in settings.specs:
            if isinstance(spec, IngressSpec):
                assert self.router is not None
                bridge = IngressBridge(
                    spec,
                    self.router,
                    settings.site_id,
                    window=settings.window,
                    open_timeout=settings.open_timeout,
                    hold_timeout=settings.hold_timeout,
                    limits=settings.limits,
                )
                with naming(f"bridge {spec}"):
                    await bridge.start()
                self.ingress.append(bridge)
        for http in self.http_ingress:
            with naming(f"bridge {http.spec}"):
                await http.start()
        for http2 in self.http2_ingress:
            with naming(f"bridge {http2.spec}"):
                await http2.start()
        verify = "n/a"
        if endpoint is not None and endpoint.ssl is not None:
            verify = "on" if endpoint.ssl.verify_mode != 0 else "OFF"
        logger.info(
            "tunnel %s started: bridges [%s]; router %s (%s, TLS verification %s)",
            __version__,
            ", ".join(str(s) for s in settings.specs),
            endpoint.url if endpoint else "none",
            settings.router_source,
            verify,
        )

    def bridge_stats(self) -> list[BridgeStats]:
        return [b.stats for b in self.ingress] + [b.stats for b in self.egress.values()]

    def readiness(self) -> list[str]:
        """What keeps the process from being ready; empty when every bridge is up."""
        missing = []
        for spec in self.settings.specs:
            if isinstance(spec, IngressSpec) and not any(
                b.spec == spec and b.server is not None and b.server.sockets for b in self.ingress
            ):
                missing.append(f"listener for {spec} not bound")
        for http in self.http_ingress:
            if http.server is None or not http.server.sockets:
                missing.append(f"listener for {http.spec} not bound")
            elif http.links is None or http.links.reply_to is None:
                missing.append(f"reply address for {http.spec} not assigned")
        http2: list[Http2IngressBridge | Http2EgressBridge] = [*self.http2_ingress]
        http2 += self.http2_egress
        missing += [why for bridge in http2 if (why := bridge.not_ready()) is not None]
        for routed in self.routed_http:
            if not routed.active:
                missing.append(
                    f"consumer for {routed.bridge.spec.address!r} not active ({routed.bridge.spec})"
                )
        router = self.router
        if router is not None and router.connection is None:
            missing.append(f"router {router.endpoint.url} not connected")
        return missing + self._egress_readiness()

    def _egress_readiness(self) -> list[str]:
        """What keeps the TCP egress bridges from being ready."""
        missing = []
        router = self.router
        adaptor = (
            router is not None
            and router.connection is not None
            and router.connection.dialect is Dialect.TCP_ADAPTOR
        )
        for address, bridge in self.egress.items():
            if self.settings.router is not None:
                if router is None or address not in router.routes_active:
                    what = "consumer" if adaptor else "link route"
                    why = router.route_problems.get(address) if router else None
                    missing.append(
                        f"{what} for {address!r} not active ({bridge.spec})"
                        + (f": {why}" if why else "")
                    )
            elif self.direct is None or self.direct.server is None:
                missing.append(f"direct-mode listener for {bridge.spec} not bound")
        return missing

    def hosts_busy(self) -> int:
        return (
            sum(len(stats.live) for stats in self.bridge_stats())
            + sum(http.busy() for http in self.http_ingress)
            + sum(len(http.tasks) for http in self.http_egress.values())
            + sum(http2.busy() for http2 in self.http2_ingress)
            + sum(http2.busy for http2 in self.http2_egress)
        )

    def on_stop_signal(self) -> None:
        if self.stopping.is_set():
            if not self.hurry.is_set():
                logger.info("stop asked again: not waiting for open tunnels")
            self.hurry.set()
        self.stopping.set()

    def _stop_accepting(self) -> None:
        listeners: list[IngressBridge | HttpIngressBridge | Http2IngressBridge] = [*self.ingress]
        listeners += [*self.http_ingress, *self.http2_ingress]
        for listener in listeners:
            listener.stop_accepting()
        if self.direct is not None:
            self.direct.stop_accepting()

    async def shutdown(self) -> None:
        """Stop accepting, let open tunnels finish for the grace period, reset the rest."""
        self.memory.stop()
        self._stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.grace
        busy = self.hosts_busy()
        if busy:
            logger.info(
                "shutting down: waiting up to %gs for %d tunnels", self.settings.grace, busy
            )
        while self.hosts_busy() and loop.time() < deadline and not self.hurry.is_set():
            await asyncio.sleep(0.05)
        left = self.hosts_busy()
        if left:
            logger.info("shutting down: resetting %d tunnels still open", left)
        # Reset here rather than leave it to the connections' closing: a peer
        # slow to answer the close would let the exit end each socket with a FIN.
        for stats in self.bridge_stats():
            for tunnel in list(stats.live):
                tunnel.reset("shutting down", Failure.SHUTDOWN)
        servers: list[HttpIngressBridge | Http2IngressBridge] = [*self.http_ingress]
        servers += self.http2_ingress
        for server in servers:
            server.close_all()
        for egress in self.egress.values():
            await egress.stop()
        clients: list[HttpEgressBridge | Http2EgressBridge] = [*self.http_egress.values()]
        clients += self.http2_egress
        for client in clients:
            await client.stop()
        if self.router is not None:
            await self.router.stop()
        if self.direct is not None:
            self.direct.close_all()
        # Give the close frames and resets a moment to reach the wire.
        await asyncio.sleep(0.05)
        if self.admin is not None:
            self.admin.close()
        logger.info("tunnel stopped")


async def run(settings: Settings) -> int:
    app = App(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.on_stop_signal)
    try:
        await app.start()
    except BaseException:
        # What did start (the router client, a listener) must not keep the loop alive.
        await app.shutdown()
        raise
    await app.stopping.wait()
    await app.shutdown()
    return 0
