"""An independent AMQP 1.0 peer, built on proton's own reactor, that plays the router.

The wire-contract tests run the daemon as a real subprocess and point it at
a :class:`RouterPeer`: a ``proton.reactor.Container`` listening on
127.0.0.1 with a ``MessagingHandler``, running in a background thread. The
peer answers what a link-routing router (Qpid Dispatch, protocols.md §1.1
and §8.1) would answer, and records everything the daemon does as
immutable snapshots that the test thread can inspect.

Threading is :mod:`tests.reactor_thread`'s; :meth:`RouterPeer.wait_for`
also waits for one kind of event.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from proton import Condition, Data, Delivery, Endpoint, Message, symbol
from proton.handlers import MessagingHandler
from reactor_thread import ReactorThread

HALF_CLOSE = "tunnel:half-close"
EOS_PROPERTY = "tunnel:eos"
MANAGEMENT = "$management"
LINK_ROUTE_TYPE = "org.apache.qpid.dispatch.router.connection.linkRoute"

E = TypeVar("E")


# -- snapshots (safe to read from any thread) ---------------------------------
@dataclass(frozen=True)
class TerminusInfo:
    """A source or target as seen on the wire."""

    address: str | None
    dynamic: bool
    capabilities: frozenset[str]


@dataclass(frozen=True)
class Attached:
    """The daemon initiated a link; ``daemon_role`` is the daemon's end of it."""

    name: str
    daemon_role: Literal["sender", "receiver"]
    source: TerminusInfo
    target: TerminusInfo
    session: int


@dataclass(frozen=True)
class AttachAnswered:
    """The daemon answered an attach that the peer initiated."""

    name: str
    source: TerminusInfo
    target: TerminusInfo
    session: int


@dataclass(frozen=True)
class Received:
    """A complete message the daemon sent to the peer."""

    link: str
    body: object
    inferred: bool
    properties: dict[str, object]
    reply_to: str | None
    correlation_id: object
    settled_on_arrival: bool
    #: The whole message, for the checks the fields above do not cover.
    message: Message | None = None

    @property
    def eos(self) -> bool:
        """Whether this is the end-of-stream marker."""
        return self.properties.get(EOS_PROPERTY) is True

    @property
    def is_value_binary(self) -> bool:
        """Whether the body is an amqp-value section holding a binary."""
        return not self.inferred and isinstance(self.body, bytes | memoryview)

    @property
    def data(self) -> bytes:
        """The body as bytes (empty for a null body)."""
        if isinstance(self.body, bytes | memoryview):
            return bytes(self.body)
        return b""


@dataclass(frozen=True)
class Credit:
    """The daemon changed the credit of a link on which the peer sends."""

    link: str
    credit: int


@dataclass(frozen=True)
class Outcome:
    """The daemon updated a delivery the peer sent."""

    link: str
    state: int
    settled: bool
    #: A rejection's error description, as it arrived.
    why: str | None = None


@dataclass(frozen=True)
class Detached:
    """The daemon detached a link; ``closed`` tells a close from a plain detach."""

    link: str
    closed: bool
    condition: str | None
    description: str | None


@dataclass(frozen=True)
class ConnectionOpened:
    """The daemon's AMQP connection is open at both ends."""

    container_id: str | None


@dataclass(frozen=True)
class ConnectionClosed:
    """The daemon's AMQP connection ended (close frame or socket loss)."""

    condition: str | None


PeerEvent = (
    Attached
    | AttachAnswered
    | Received
    | Credit
    | Outcome
    | Detached
    | ConnectionOpened
    | ConnectionClosed
)


def terminus_info(terminus: Any) -> TerminusInfo:
    """Snapshot a proton terminus (reactor thread only)."""
    return TerminusInfo(
        address=terminus.address,
        dynamic=bool(terminus.dynamic),
        capabilities=frozenset(_symbols(terminus.capabilities)),
    )


def _symbols(data: Any) -> list[str]:
    data.rewind()
    if data.next() is None:
        return []
    value = data.get_object()
    if isinstance(value, str):
        return [str(value)]
    try:
        return [str(item) for item in value]
    except TypeError:
        return []


def set_capabilities(terminus: Any, names: Iterable[str]) -> None:
    """Replace a terminus's capabilities with an array of symbols (reactor thread only)."""
    data = terminus.capabilities
    data.clear()
    data.put_array(False, Data.SYMBOL)
    data.enter()
    for name in names:
        data.put_symbol(symbol(name))
    data.exit()


@dataclass
class Policy:
    """How the peer answers the daemon.

    ``dynamic_addresses`` are handed out in order to dynamic-source attaches;
    ``target_capabilities`` are offered in the answer to a daemon sender whose
    target address is a key; ``hold_targets`` names target addresses whose
    deliveries the peer leaves unsettled until :meth:`RouterPeer.release_held`;
    ``outcomes`` gives, per target address, the outcomes of the first
    deliveries there (a rejection with ``amqp:internal-error``), before the
    peer goes back to accepting; ``product`` is what the Open says the peer is.
    ``uncredited_targets`` get no credit at all (a sender there waits forever),
    and a ``management_status`` of None leaves ``$management`` requests
    accepted but unanswered, as an overloaded or misconfigured router may.
    """

    dynamic_addresses: list[str] = field(default_factory=list)
    target_capabilities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    credit: int = 50
    management_status: int | None = 201
    uncredited_targets: frozenset[str] = frozenset()
    hold_targets: frozenset[str] = frozenset()
    outcomes: dict[str, list[int]] = field(default_factory=dict)
    #: The Open's product and version, as a router names itself (protocols.md §8.3).
    product: tuple[str, str] = ("reactor-peer", "")


class RouterPeer(ReactorThread, MessagingHandler):
    """Plays the router for one daemon connection; see the module docstring."""

    container_id = "reactor-peer-router"

    def __init__(self, policy: Policy | None = None) -> None:
        MessagingHandler.__init__(self, prefetch=0, auto_accept=False, auto_settle=True)
        ReactorThread.__init__(self)
        self.policy = policy or Policy()
        self._dynamic_count = 0
        # Reactor-thread state.
        self.connection: Any = None
        self.links: dict[str, Any] = {}
        self.outbox: dict[str, collections.deque[Message]] = collections.defaultdict(
            collections.deque
        )
        self.held: list[Any] = []

    # -- lifecycle --------------------------------------------------------------
    def shut_down(self) -> None:
        if self.connection is not None and not self.connection.state & Endpoint.LOCAL_CLOSED:
            self.connection.close()
        super().shut_down()

    # -- observation (test thread) --------------------------------------------
    def wait_for(
        self,
        kind: type[E],
        pred: Callable[[E], bool] = lambda _e: True,
        timeout: float = 10.0,
    ) -> E:
        """The first recorded event of ``kind`` satisfying ``pred``, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_alive()
                for event in self._events:
                    if isinstance(event, kind) and pred(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n  ".join(repr(e) for e in self._events)
                    raise TimeoutError(
                        f"no {kind.__name__} matching after {timeout}s; seen:\n  {seen}"
                    )
                self._cond.wait(left)

    def received(self, link: str) -> list[Received]:
        return [e for e in self.events() if isinstance(e, Received) and e.link == link]

    # -- actions (test thread) -----------------------------------------------
    def open_sender(
        self,
        name: str,
        target: str,
        source: str,
        source_capabilities: Iterable[str] = (),
    ) -> None:
        """Open a new session and a sender on it, as a router forwards a routed attach."""
        caps = list(source_capabilities)

        def act(peer: RouterPeer) -> None:
            session = peer.connection.session()
            session.open()
            sender = session.sender(name)
            sender.target.address = target
            sender.source.address = source
            if caps:
                set_capabilities(sender.source, caps)
            peer.links[name] = sender
            sender.open()

        self.call(act)

    def send(self, link: str, message: Message) -> None:
        """Queue ``message`` on the peer's sender ``link``; it leaves as credit allows."""

        def act(peer: RouterPeer) -> None:
            peer.outbox[link].append(message)
            peer._flush(link)

        self.call(act)

    def flow(self, link: str, credit: int) -> None:
        """Grant ``credit`` more on ``link``, on which the daemon sends."""

        def act(peer: RouterPeer) -> None:
            peer.links[link].flow(credit)

        self.call(act)

    def detach(self, link: str, condition: str | None = None, description: str = "") -> None:
        """Close (detach closed=true) the peer's end of ``link``, optionally with an error."""

        def act(peer: RouterPeer) -> None:
            proton_link = peer.links[link]
            if condition is not None:
                proton_link.condition = Condition(condition, description)
            proton_link.close()

        self.call(act)

    def release_held(self) -> int:
        """Accept and settle every held delivery; returns how many there were."""

        def act(peer: RouterPeer) -> int:
            held, peer.held = peer.held, []
            for delivery in held:
                delivery.update(Delivery.ACCEPTED)
                delivery.settle()
            return len(held)

        return self.call(act)

    # -- reactor thread ---------------------------------------------------------
    def on_connection_opening(self, event: Any) -> None:
        self.connection = event.connection
        event.connection.container = "reactor-peer-router"
        product, version = self.policy.product
        event.connection.properties = {symbol("product"): product, symbol("version"): version}

    def on_connection_opened(self, event: Any) -> None:
        self._record(ConnectionOpened(event.connection.remote_container))

    def on_connection_remote_close(self, event: Any) -> None:
        condition = event.connection.remote_condition
        self._record(ConnectionClosed(condition.name if condition else None))

    def on_transport_closed(self, event: Any) -> None:
        if event.connection is not None and not event.connection.state & Endpoint.REMOTE_CLOSED:
            self._record(ConnectionClosed("socket closed"))

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        session = hash(link.session)
        if not link.state & Endpoint.LOCAL_UNINIT:
            self._record(
                AttachAnswered(
                    link.name,
                    terminus_info(link.remote_source),
                    terminus_info(link.remote_target),
                    session,
                )
            )
            return
        self._record(
            Attached(
                link.name,
                "sender" if link.is_receiver else "receiver",
                terminus_info(link.remote_source),
                terminus_info(link.remote_target),
                session,
            )
        )
        self.links[link.name] = link
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if link.remote_source.dynamic:
            addresses = self.policy.dynamic_addresses
            if self._dynamic_count < len(addresses):
                address = addresses[self._dynamic_count]
            else:
                address = f"dyn-{self._dynamic_count}"
            self._dynamic_count += 1
            link.source.address = address
        if link.is_receiver:
            offered = self.policy.target_capabilities.get(link.remote_target.address or "")
            if offered is not None:
                set_capabilities(link.target, offered)
        link.open()
        if link.is_receiver and link.remote_target.address not in self.policy.uncredited_targets:
            link.flow(self.policy.credit)

    def on_link_remote_close(self, event: Any) -> None:
        self._detached(event.link, closed=True)

    def on_link_remote_detach(self, event: Any) -> None:
        self._detached(event.link, closed=False)
        if not event.link.state & Endpoint.LOCAL_CLOSED:
            event.link.detach()

    def _detached(self, link: Any, *, closed: bool) -> None:
        condition = link.remote_condition
        self._record(
            Detached(
                link.name,
                closed,
                condition.name if condition else None,
                condition.description if condition else None,
            )
        )

    # The defaults of these close the whole connection on any link error.
    def on_link_error(self, event: Any) -> None:
        pass

    def on_session_error(self, event: Any) -> None:
        pass

    def on_connection_error(self, event: Any) -> None:
        pass

    def on_transport_error(self, event: Any) -> None:
        pass

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        if link.is_sender:
            self._record(Credit(link.name, link.credit))
            self._flush(link.name)

    def on_delivery(self, event: Any) -> None:
        delivery = event.delivery
        if delivery.link.is_sender and delivery.updated:
            condition = delivery.remote.condition
            self._record(
                Outcome(
                    delivery.link.name,
                    delivery.remote_state,
                    delivery.settled,
                    condition.description if condition is not None else None,
                )
            )

    def on_message(self, event: Any) -> None:
        link, delivery, message = event.link, event.delivery, event.message
        body = message.body
        self._record(
            Received(
                link=link.name,
                body=bytes(body) if isinstance(body, bytes | memoryview) else body,
                inferred=bool(message.inferred),
                properties=dict(message.properties or {}),
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
                settled_on_arrival=bool(delivery.settled),
                message=message,
            )
        )
        target = link.remote_target.address
        planned = self.policy.outcomes.get(target or "")
        if planned:
            outcome = planned.pop(0)
            if outcome == Delivery.REJECTED:
                delivery.local.condition = Condition("amqp:internal-error", "refused by the test")
            delivery.update(outcome)
            delivery.settle()
        elif target in self.policy.hold_targets and not delivery.settled:
            self.held.append(delivery)
        else:
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
        link.flow(1)
        if target == MANAGEMENT and message.reply_to:
            self._answer_management(message)

    def _answer_management(self, request: Message) -> None:
        status = self.policy.management_status
        if status is None:
            return
        reply = Message(
            address=request.reply_to,
            correlation_id=request.correlation_id,
            properties={"statusCode": status, "statusDescription": "Created"},
            body=request.body,
        )
        for name, link in self.links.items():
            if link.is_sender and link.source.address == request.reply_to:
                self.outbox[name].append(reply)
                self._flush(name)
                return

    def _flush(self, name: str) -> None:
        link = self.links.get(name)
        queue = self.outbox[name]
        if link is None:
            return
        while queue and link.credit > 0 and link.state & Endpoint.REMOTE_ACTIVE:
            link.send(queue.popleft())


# -- the daemon under test, and a backend ---------------------------------------
REPO = Path(__file__).resolve().parent.parent


class Daemon:
    """``python -m tunnel`` as a subprocess, with its stderr in a file."""

    def __init__(self, workdir: Path, router_port: int, args: Sequence[str]) -> None:
        self.config = workdir / "connect.json"
        self.config.write_text(
            json.dumps({"scheme": "amqp", "host": "127.0.0.1", "port": router_port})
        )
        self.log_path = workdir / "daemon.log"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SKUPPER_", "MESSAGING_", "ICPROXY_", "LOGLEVEL"))
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tunnel",
                    "--config",
                    str(self.config),
                    *self.args,
                    "--log-level",
                    "DEBUG",
                    "--grace",
                    "0.5",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO,
                env=env,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for a line of the daemon's log matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match is not None:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                    + self.log()
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not log {pattern!r}:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class EchoServer:
    """A TCP backend that echoes, and answers a FIN with its own FIN (half-close)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.eof_seen = threading.Event()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        thread = threading.Thread(target=self._accept_loop, name="echo-accept", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    self.eof_seen.set()
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)
        except OSError as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()
        for thread in self._threads:
            thread.join(2)


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Harness:
    """What one test started, stopped in reverse order: daemon, then peer, then the rest."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.daemons: list[Daemon] = []
        self.peers: list[RouterPeer] = []
        self.echoes: list[EchoServer] = []
        self.sockets: list[socket.socket] = []

    def peer(self, policy: Policy) -> RouterPeer:
        peer = RouterPeer(policy)
        self.peers.append(peer)
        peer.start()
        return peer

    def daemon(self, peer: RouterPeer, *args: str) -> Daemon:
        daemon = Daemon(self.workdir, peer.port, args)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def echo(self) -> EchoServer:
        echo = EchoServer()
        self.echoes.append(echo)
        echo.start()
        return echo

    def client(self, port: int, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        steps: list[Callable[[], None]] = [
            *(d.stop for d in self.daemons),
            *(p.stop for p in self.peers),
            *(e.stop for e in self.echoes),
            *(s.close for s in self.sockets),
        ]
        failure: BaseException | None = None
        for step in steps:
            try:
                step()
            except Exception as exc:  # every step runs; the first failure is re-raised
                failure = failure or exc
        if failure is not None:
            raise failure
