"""The daemon authenticates to a router as a Skupper router listener demands.

skupper-cli's router listener (protocols.md §3) is ``sslProfile`` plus
``saslMechanisms: EXTERNAL`` and ``authenticatePeer: true``: mutual TLS, and
the SASL identity taken from the client certificate. Here the independent
reactor peer (tests/reactor_peer.py) plays that listener with proton's own
TLS and SASL, the daemon runs as a real ``python -m tunnel`` subprocess, and
every byte stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import Certs, eventually, make_certs
from proton import SASL, SSLDomain
from reactor_peer import (
    HALF_CLOSE,
    Attached,
    ConnectionOpened,
    Daemon,
    Harness,
    Policy,
    RouterPeer,
)

pytestmark = pytest.mark.timeout(30)

ADDRESS = "echo"
SITE = "SITE"
INGRESS_DYNAMIC = "dyn-ing-1"
LISTENING = r"listening on 127\.0\.0\.1:(\d+)"
CONNECTED = r"router amqps://localhost:\d+ connected"
REFUSED = (
    r"router amqps://localhost:\d+ (refused the connection|unreachable|failed TLS|failed the TLS)"
)
# Attempts a refused daemon is watched through for a late "connected".
REFUSED_ATTEMPTS = 3


@dataclass(frozen=True)
class Authenticated:
    """What the peer's transport knew about the daemon when the AMQP open completed."""

    mechanism: str | None
    outcome: int | None
    sasl_user: str | None
    transport_user: str | None
    authenticated: bool
    tls_subject: str | None


class TlsRouterPeer(RouterPeer):
    """The reactor peer behind a Skupper-style listener: mutual TLS and SASL EXTERNAL only."""

    def __init__(self, certs: Certs, policy: Policy | None = None) -> None:
        super().__init__(policy)
        self.certs = certs
        self._tls_lock = threading.Lock()
        self._authenticated: list[Authenticated] = []
        self._transport_errors: list[str] = []

    # -- test thread --------------------------------------------------------------
    def start(self, port: int = 0) -> int:
        """Listen as :meth:`RouterPeer.start` does, with TLS on before any daemon connects."""
        port = super().start(port)
        certs = self.certs

        def use_tls(peer: RouterPeer) -> None:
            domain = SSLDomain(SSLDomain.MODE_SERVER)
            domain.set_credentials(str(certs.server_cert), str(certs.server_key), None)
            domain.set_trusted_ca_db(str(certs.ca))
            # authenticatePeer: a client certificate signed by our CA is required.
            domain.set_peer_authentication(SSLDomain.VERIFY_PEER, str(certs.ca))
            peer._acceptor.set_ssl_domain(domain)

        self.call(use_tls)
        return port

    def authenticated(self) -> list[Authenticated]:
        """Every connection that got as far as an AMQP open, as its transport saw it."""
        with self._tls_lock:
            return list(self._authenticated)

    def transport_errors(self) -> list[str]:
        """Every transport error the peer saw (TLS or SASL failures, socket loss)."""
        with self._tls_lock:
            return list(self._transport_errors)

    # -- reactor thread -----------------------------------------------------------
    def on_connection_bound(self, event: Any) -> None:
        # Runs before the accepted socket is read: the Acceptor has just put
        # TLS on the transport; SASL is offered as saslMechanisms: EXTERNAL.
        transport = event.transport
        transport.require_auth(True)
        transport.sasl().allowed_mechs("EXTERNAL")

    def on_connection_opened(self, event: Any) -> None:
        transport = event.transport
        sasl = transport.sasl()
        ssl = getattr(transport, "_ssl", None)
        subject = ssl.get_cert_subject() if ssl is not None else None
        with self._tls_lock:
            self._authenticated.append(
                Authenticated(
                    mechanism=sasl.mech,
                    outcome=sasl.outcome,
                    sasl_user=sasl.user,
                    transport_user=transport.user,
                    authenticated=bool(transport.authenticated),
                    tls_subject=subject,
                )
            )
        super().on_connection_opened(event)

    def on_transport_error(self, event: Any) -> None:
        condition = event.transport.condition
        text = f"{condition.name}: {condition.description}" if condition else "unknown"
        with self._tls_lock:
            self._transport_errors.append(text)
        super().on_transport_error(event)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def tls_peer(harness: Harness, certs: Certs, policy: Policy | None = None) -> TlsRouterPeer:
    """Start a TLS peer that the harness stops."""
    peer = TlsRouterPeer(certs, policy)
    harness.peers.append(peer)
    peer.start()
    return peer


def tls_daemon(harness: Harness, peer: RouterPeer, tls: dict[str, str], *args: str) -> Daemon:
    """Start an ingress daemon whose connect.json says amqps://localhost:<peer> with ``tls``."""
    daemon = Daemon(harness.workdir, peer.port, [f"tcp:127.0.0.1:0=>amqp:{ADDRESS}", *args])
    # The server certificate names localhost, so that is the host to verify.
    daemon.config.write_text(
        json.dumps({"scheme": "amqps", "host": "localhost", "port": peer.port, "tls": tls})
    )
    harness.daemons.append(daemon)
    daemon.start()
    return daemon


def assert_refused(daemon: Daemon, peer: TlsRouterPeer, pattern: str = REFUSED) -> str:
    """The daemon reports the failure, never connects, and the peer never sees an open."""
    line = daemon.wait_log(pattern, timeout=10).group(0)
    # Each failed attempt ends at the peer in a transport error, after anything
    # that attempt could have opened: wait for the first and two retries.
    asyncio.run(
        eventually(
            lambda: len(peer.transport_errors()) >= REFUSED_ATTEMPTS,
            f"{REFUSED_ATTEMPTS} refused attempts at the peer",
        )
    )
    log = daemon.log()
    assert re.search(CONNECTED, log) is None, log
    assert not any(isinstance(e, ConnectionOpened) for e in peer.events()), peer.events()
    assert peer.authenticated() == [], peer.authenticated()
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, f"the daemon should keep retrying:\n{log}"
    return line


def test_mutual_tls_and_sasl_external_connects_and_links(harness: Harness, certs: Certs) -> None:
    """Mutual TLS + SASL EXTERNAL: identity from the client certificate, then links attach."""
    peer = tls_peer(
        harness,
        certs,
        Policy(
            dynamic_addresses=[INGRESS_DYNAMIC],
            target_capabilities={ADDRESS: (HALF_CLOSE,)},
        ),
    )
    daemon = tls_daemon(
        harness,
        peer,
        {
            "ca": str(certs.ca),
            "cert": str(certs.client_cert),
            "key": str(certs.client_key),
        },
        "--site-id",
        SITE,
    )
    port = int(daemon.wait_log(LISTENING).group(1))
    daemon.wait_log(CONNECTED)
    opened = peer.wait_for(ConnectionOpened)
    assert opened.container_id

    [auth] = peer.authenticated()
    assert auth.mechanism == "EXTERNAL", auth
    assert auth.outcome == SASL.OK, auth
    assert auth.authenticated, auth
    # SASL EXTERNAL's identity is the client certificate's subject (CN=client).
    assert auth.transport_user is not None, auth
    assert "client" in auth.transport_user, auth
    assert auth.sasl_user == auth.transport_user == auth.tls_subject, auth
    assert peer.transport_errors() == [], peer.transport_errors()

    # Before a TCP client arrives only dynamic receivers (the reply pool) are
    # attached; then the ingress attaches its sender over this connection.
    receiver = peer.wait_for(Attached, lambda a: a.daemon_role == "receiver")
    assert receiver.source.dynamic
    assert not any(isinstance(e, Attached) and e.daemon_role == "sender" for e in peer.events()), (
        peer.events()
    )
    client = harness.client(port)
    sender = peer.wait_for(Attached, lambda a: a.daemon_role == "sender")
    assert sender.name.startswith(f"127.0.0.1:{client.getsockname()[1]}@{SITE}@")
    assert sender.target.address == ADDRESS
    # The sender replies through one of the pooled dynamic receivers.
    assigned = peer.call(
        lambda p: {link.source.address for link in p.links.values() if link.is_sender}
    )
    assert sender.source.address in assigned
    assert INGRESS_DYNAMIC in assigned
    assert peer.events().index(receiver) < peer.events().index(sender)


def test_daemon_without_client_certificate_is_refused(harness: Harness, certs: Certs) -> None:
    """With only a CA (no client certificate) the listener refuses the daemon."""
    peer = tls_peer(harness, certs)
    daemon = tls_daemon(harness, peer, {"ca": str(certs.ca)})
    assert_refused(daemon, peer)
    assert peer.transport_errors(), "the peer should have seen the failed handshake"


def test_daemon_with_foreign_client_certificate_is_refused(harness: Harness, certs: Certs) -> None:
    """A client certificate signed by another CA is refused like a missing one."""
    peer = tls_peer(harness, certs)
    daemon = tls_daemon(
        harness,
        peer,
        {
            "ca": str(certs.ca),
            "cert": str(certs.other_client_cert),
            "key": str(certs.other_client_key),
        },
    )
    assert_refused(daemon, peer)
    assert peer.transport_errors(), "the peer should have seen the failed handshake"


def test_default_trust_store_rejects_private_ca(harness: Harness, certs: Certs) -> None:
    """Without "ca" the system trust store is used and the router's private CA fails to verify."""
    peer = tls_peer(harness, certs)
    daemon = tls_daemon(
        harness,
        peer,
        {
            "cert": str(certs.client_cert),
            "key": str(certs.client_key),
        },
    )
    line = assert_refused(daemon, peer, r"router amqps://localhost:\d+ .*CERTIFICATE_VERIFY_FAILED")
    assert re.search(REFUSED, line), line
