"""What direct mode forwards between the AMQP connections it accepts.

Theory of operation
-------------------
A direct-mode listener is a small router for the peers that connect to it:
the node proxy's egress and HTTP bridges, or another tunnel process that
uses the listener as its router. It forwards the two ways Qpid Dispatch does
(protocols.md §1.1, §8.1):

- **Link routes.** A peer asks ``$management`` for a connection-scoped link
  route (``CREATE connection.linkRoute {pattern: A, direction: "in"}``).
  From then on a sender attach for ``A``, from any peer, is passed on as a
  new attach on that peer's connection, named as a router names it
  (``<name>@<container-id>``), with the same termini. The far end's answer
  goes back as the answer, termini and all: null ones too, since rhea never
  fills them in. Deliveries go forward, outcomes come back, and a detach on
  either side, with its error, detaches the other. With several peers routing
  ``A``, attaches take turns.
- **Message routing.** A peer's receiver whose source is an address (not
  dynamic) consumes that address; a peer's dynamic receiver is reached by
  the address it was given. A delivery on a sender attached to such an
  address, or on an anonymous sender by the message's ``to``, goes to one
  consumer of the address (the first with credit, in turn), and that
  consumer's outcome goes back to the sender. A bridge of this process may
  consume an address too (:meth:`Forwarder.serve_locally`), and take the
  messages for a dynamic address of its own, in memory. A delivery for an address that
  nobody consumes is released. A sender to a dynamic address that detaches
  cleanly ends that address's link too, once all it sent is settled: a node
  egress's only end-of-stream (a router would drop that signal).

Isolation: dynamic addresses (``dynamic/<random>``) belong to the peer they
were given to. Nobody else can consume one or route it, and a sender to one
reaches that peer's receiver only.

Bounds: a forwarded link is given :data:`WINDOW` credit, and credit comes
back only as its deliveries are settled by the far end, so at most
:data:`WINDOW` deliveries of one link are in hand here, each at most
``max_message`` bytes (larger ones are drained and rejected). What one peer's
deliveries hold here at once is at most :data:`PEER_BUDGET` bytes plus one
message: a delivery beyond that is released at once, so its sender can try
again later. A peer holds at most :data:`MAX_ROUTES` link routes and
:data:`MAX_CONSUMERS` consumers. When a peer's connection is lost, the links
routed through it are detached with ``qd:routed-link-lost`` and its unsettled
deliveries go back ``modified``.

This module does no I/O and touches no proton C handle: it works through the
engine's helpers and :mod:`tunnel.messaging`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proton import Condition, Link, Message, Session

from .amqp.engine import (
    close_link,
    open_session,
    refuse_link,
    session_usable,
    set_owner,
)
from .amqp.handles import ACCEPTED, MODIFIED, REJECTED, RELEASED, Delivery, handle
from .amqp.handles import Link as LinkHandle
from .amqp_link import AmqpSocket
from .codec import WireError, message_to
from .http_message import decode, encode
from .messaging import MessageReceiver, MessageSender, OutcomeCallback
from .peer_text import PEER_LOG, printable

logger = logging.getLogger(__name__)

MANAGEMENT = "$management"
#: Every dynamic address given out starts so; no peer may claim one otherwise.
DYNAMIC_PREFIX = "dynamic/"
LINK_ROUTE_TYPE = "org.apache.qpid.dispatch.router.connection.linkRoute"
ROUTED_LINK_LOST = "qd:routed-link-lost"
#: Deliveries of one forwarded link in hand here at once.
WINDOW = 8
#: Link routes one peer may hold.
MAX_ROUTES = 64
#: Consumer links one peer may hold.
MAX_CONSUMERS = 256
#: Bytes of one peer's deliveries in hand here, waiting for the far end.
PEER_BUDGET = 64 * 1024 * 1024
#: The largest management request taken.
MAX_REQUEST = 64 * 1024


class Destination(Protocol):
    """Where messages for an address go: a peer's link (a MessageSender), or a bridge of
    this process that takes them itself."""

    @property
    def credit(self) -> int: ...
    def send(self, data: bytes | bytearray, on_outcome: OutcomeCallback | None = None) -> None: ...
    def finish(self) -> None: ...


class Peer(Protocol):
    """A direct-mode connection, as the forwarder sees it."""

    socket: AmqpSocket

    @property
    def container(self) -> str:
        """The peer's container id, printable."""
        ...

    @property
    def remote_host(self) -> str:
        """Whom the peer's repeated failures are counted for (see tunnel.peer_text)."""
        ...

    def reply_sender(self, address: str) -> MessageSender | None:
        """The sender towards this peer's dynamic receiver ``address``, or None."""
        ...


@dataclass(eq=False)
class _PeerState:
    routes: set[str] = field(default_factory=set)
    routed: set[RoutedLink] = field(default_factory=set)
    consumers: list[tuple[str, MessageSender]] = field(default_factory=list)
    session: Session | None = None
    #: Bytes of this peer's deliveries in hand (see PEER_BUDGET).
    held: int = 0
    over_budget: bool = False


class Forwarder:
    """The addresses direct-mode peers serve for each other; see the module docstring."""

    def __init__(self, *, max_message: int, is_local: Callable[[str], bool]) -> None:
        self.max_message = max_message
        self.is_local = is_local
        self.routes: dict[str, list[Peer]] = {}
        self.consumers: dict[str, list[Destination]] = {}
        self.dynamic: dict[str, Peer] = {}
        #: Dynamic addresses of this process's own bridges, and what takes their messages.
        self.local: dict[str, Destination] = {}
        self._gone_listeners: list[Callable[[str], None]] = []
        self._peers: dict[Peer, _PeerState] = {}

    def _state(self, peer: Peer) -> _PeerState:
        if peer.socket.closed:
            # Kept, it would outlive the peer_lost() that already came.
            return self._peers.get(peer) or _PeerState()
        return self._peers.setdefault(peer, _PeerState())

    # -- what a peer attaches ---------------------------------------------------
    def serve_management(self, peer: Peer, link: Link) -> None:
        """A peer's sender to ``$management``: it may ask for link routes."""
        handle(link).mirror()
        agent = _Management(self, peer)
        agent.receiver = MessageReceiver(
            link, peer.socket, window=4, max_size=MAX_REQUEST, on_message=agent.on_request
        )
        link.open()

    def routed_peer(self, address: str) -> Peer | None:
        """The next peer with a link route for ``address``, taking turns."""
        peers = self.routes.get(address)
        if not peers:
            return None
        peers.append(peers.pop(0))
        return peers[-1]

    def route(self, origin: Peer, link: Link, to: Peer) -> None:
        """Pass a sender attach on to the peer ``to`` that routes its address."""
        state = self._state(to)
        if state.session is None or not session_usable(state.session):
            state.session = to.socket.engine.connection.session()
            open_session(state.session)
        routed = RoutedLink(self, origin, link, to, state.session)
        state.routed.add(routed)
        self._state(origin).routed.add(routed)

    def consume(self, peer: Peer, link: Link) -> None:
        """A peer's receiver for a plain address: a consumer of it."""
        address = str(link.remote_source.address)
        if address.startswith(DYNAMIC_PREFIX):
            refuse_link(
                link,
                "amqp:unauthorized-access",
                f"{address!r} is a dynamic address: only its own receiver takes it",
            )
            return
        if len(self._state(peer).consumers) >= MAX_CONSUMERS:
            refuse_link(
                link,
                "amqp:resource-limit-exceeded",
                f"at most {MAX_CONSUMERS} consumers per connection",
            )
            return
        handle(link).mirror()
        sender = MessageSender(
            link, peer.socket, on_closed=lambda gone: self._drop_consumer(peer, address, gone)
        )
        self.consumers.setdefault(address, []).append(sender)
        self._state(peer).consumers.append((address, sender))
        link.open()
        logger.debug("direct mode: %s consumes %s", peer.container, printable(repr(address)))

    def serve_locally(self, address: str, consumer: Destination, reply_to: Destination) -> str:
        """A bridge of this process consumes ``address``, among the peers that do; what
        is sent to the dynamic address returned goes to ``reply_to``."""
        self.consumers.setdefault(address, []).append(consumer)
        dynamic = f"{DYNAMIC_PREFIX}{secrets.token_hex(8)}"
        self.local[dynamic] = reply_to
        return dynamic

    def _drop_consumer(self, peer: Peer, address: str, sender: MessageSender) -> None:
        senders = self.consumers.get(address, [])
        if sender in senders:
            senders.remove(sender)
        if not senders:
            self.consumers.pop(address, None)
        state = self._peers.get(peer)
        if state is not None and (address, sender) in state.consumers:
            state.consumers.remove((address, sender))

    def forward(self, peer: Peer, link: Link) -> None:
        """A peer's sender whose deliveries go by address: its target's, or each one's ``to``."""
        handle(link).mirror()
        _Inbound(self, peer, link)
        link.open()

    def has_destination(self, address: str) -> bool:
        return address in self.consumers or self.is_dynamic(address)

    def is_dynamic(self, address: str | None) -> bool:
        """Whether ``address`` is a dynamic address given out here and still in use."""
        return address in self.dynamic or address in self.local

    # -- dynamic addresses ------------------------------------------------------
    def add_dynamic(self, address: str, peer: Peer) -> None:
        self.dynamic[address] = peer

    def remove_dynamic(self, address: str) -> None:
        """``address``'s receiver is gone: nothing sent there is taken any more."""
        if self.dynamic.pop(address, None) is not None:
            self._tell_gone(address)

    def claim_dynamic(self, address: str) -> None:
        """A tunnel took ``address``'s receiver for its own: no message goes there."""
        self.dynamic.pop(address, None)

    def on_dynamic_gone(self, listener: Callable[[str], None]) -> None:
        """Have ``listener`` told each dynamic address of a peer that goes away: a bridge
        of this process sending there hears that nobody will take it any more."""
        self._gone_listeners.append(listener)

    def _tell_gone(self, address: str) -> None:
        for listener in self._gone_listeners:
            listener(address)

    def destination(self, address: str | None) -> Destination | None:
        """Where a message for ``address`` goes now, or None."""
        if not address:
            return None
        if address.startswith(DYNAMIC_PREFIX):
            if (local := self.local.get(address)) is not None:
                return local
            peer = self.dynamic.get(address)
            return peer.reply_sender(address) if peer is not None else None
        senders = self.consumers.get(address)
        if not senders:
            return None
        ready = next((s for s in senders if s.credit > 0), senders[0])
        senders.remove(ready)
        senders.append(ready)
        return ready

    def pass_on(
        self,
        peer: Peer,
        receiver: MessageReceiver,
        delivery: Any,
        data: bytearray,
        destination: Destination,
    ) -> None:
        """Send one of ``peer``'s deliveries on; its outcome comes back to ``receiver``."""
        size = len(data)
        if not self.hold(peer, size):
            receiver.settle(delivery, RELEASED)
            return

        def on_outcome(outcome: int, why: str) -> None:
            self.release(peer, size)
            _settle_with(receiver, delivery, outcome, why)

        destination.send(data, on_outcome)

    def hold(self, peer: Peer, size: int) -> bool:
        """Count ``size`` bytes of ``peer``'s in hand; False (nothing counted) if over budget."""
        state = self._state(peer)
        if state.held > PEER_BUDGET:
            if not state.over_budget:
                PEER_LOG.log(
                    logging.WARNING,
                    peer.remote_host,
                    "forwarding-budget",
                    "direct mode: %s has %d bytes waiting here; releasing what it "
                    "sends until they are delivered",
                    peer.container,
                    state.held,
                )
            state.over_budget = True
            return False
        state.held += size
        return True

    def release(self, peer: Peer, size: int) -> None:
        state = self._peers.get(peer)
        if state is not None:
            state.held -= size
            if state.held <= PEER_BUDGET:
                state.over_budget = False

    # -- link routes ------------------------------------------------------------
    def create_route(self, peer: Peer, request: Message) -> tuple[int, str, dict[str, Any] | None]:
        """Answer one management request: status code, description, body."""
        try:
            pattern = _link_route_pattern(request)
            if self.is_local(pattern):
                raise _RouteRefusedError(409, f"address {pattern!r} is served by this process")
            state = self._state(peer)
            if pattern not in state.routes and len(state.routes) >= MAX_ROUTES:
                raise _RouteRefusedError(403, f"at most {MAX_ROUTES} link routes per connection")
        except _RouteRefusedError as refused:
            return refused.status, refused.description, None
        if pattern not in state.routes:
            state.routes.add(pattern)
            self.routes.setdefault(pattern, []).append(peer)
            logger.debug(
                "direct mode: %s serves %s through a link route",
                peer.container,
                printable(repr(pattern)),
            )
        name = request.properties.get("name") if isinstance(request.properties, dict) else None
        return 201, "Created", {"name": name, "pattern": pattern, "direction": "in"}

    # -- a peer leaves ----------------------------------------------------------
    def peer_lost(self, peer: Peer) -> None:
        """Undo everything ``peer`` had here; what went through it is ended."""
        state = self._peers.pop(peer, None)
        for address, owner in list(self.dynamic.items()):
            if owner is peer:
                del self.dynamic[address]
                self._tell_gone(address)
        if state is None:
            return
        for address in state.routes:
            peers = self.routes.get(address, [])
            if peer in peers:
                peers.remove(peer)
            if not peers:
                self.routes.pop(address, None)
                logger.debug(
                    "direct mode: the link route for %s is gone with %s",
                    printable(repr(address)),
                    peer.container,
                )
        for _, sender in list(state.consumers):
            sender.lost()
        for routed in list(state.routed):
            routed.on_peer_lost(peer)

    def forget(self, routed: RoutedLink) -> None:
        for peer in (routed.origin, routed.target):
            state = self._peers.get(peer)
            if state is not None:
                state.routed.discard(routed)


class _RouteRefusedError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


def _link_route_pattern(request: Message) -> str:
    """The address a ``CREATE connection.linkRoute`` request asks for; :class:`_RouteRefusedError`
    names what is wrong with any other request."""
    props: dict[Any, Any] = request.properties if isinstance(request.properties, dict) else {}
    operation, kind = props.get("operation"), props.get("type")
    if operation != "CREATE":
        raise _RouteRefusedError(501, f"operation {operation!r} is not supported, only CREATE")
    if kind != LINK_ROUTE_TYPE:
        raise _RouteRefusedError(400, f"type {kind!r} is not supported, only {LINK_ROUTE_TYPE}")
    body = request.body
    if not isinstance(body, dict):
        raise _RouteRefusedError(400, "the body is not a map")
    pattern, direction = body.get("pattern"), body.get("direction")
    if not isinstance(pattern, str) or not pattern:
        raise _RouteRefusedError(400, "the body has no pattern")
    if direction != "in":
        raise _RouteRefusedError(400, f"direction {direction!r} is not routed, only 'in'")
    if "*" in pattern or "#" in pattern:
        raise _RouteRefusedError(400, f"pattern {pattern!r}: wildcards are not supported")
    if pattern.startswith(DYNAMIC_PREFIX):
        raise _RouteRefusedError(403, f"pattern {pattern!r} is a dynamic address")
    return pattern


def _settle_with(receiver: MessageReceiver, delivery: Any, outcome: int, why: str) -> None:
    """Settle a forwarded delivery as the far end settled its copy (0: it never did)."""
    if outcome == REJECTED:
        name, _, description = why.partition(": ")
        receiver.settle(
            delivery, REJECTED, condition=Condition(name or "amqp:rejected", description)
        )
    elif outcome in (ACCEPTED, RELEASED):
        receiver.settle(delivery, outcome)
    else:
        receiver.settle(delivery, MODIFIED, failed=True, why=why or None)


class _Management:
    """A peer's ``$management`` link: link-route requests, each answered to its ``reply_to``."""

    def __init__(self, forwarder: Forwarder, peer: Peer) -> None:
        self.forwarder = forwarder
        self.peer = peer
        self.receiver: MessageReceiver | None = None

    def on_request(self, delivery: Any, data: bytearray) -> None:
        assert self.receiver is not None
        try:
            request = decode(data)
        except WireError as exc:
            self.receiver.settle(
                delivery, REJECTED, condition=Condition("amqp:decode-error", str(exc))
            )
            return
        self.receiver.settle(delivery, ACCEPTED)
        status, description, body = self.forwarder.create_route(self.peer, request)
        if status >= 300:
            PEER_LOG.log(
                logging.WARNING,
                self.peer.remote_host,
                "management-refused",
                "direct mode: %s asked for a link route: %d %s",
                self.peer.container,
                status,
                printable(description),
            )
        # Answers go only to the asker's own dynamic receiver, never to another peer.
        reply = self.peer.reply_sender(request.reply_to) if request.reply_to else None
        if reply is None:
            return
        reply.send(
            encode(
                Message(
                    address=request.reply_to,
                    correlation_id=request.correlation_id,
                    properties={"statusCode": status, "statusDescription": description},
                    body=body,
                )
            )
        )


class _Inbound:
    """A peer's sender whose deliveries are message-routed."""

    def __init__(self, forwarder: Forwarder, peer: Peer, link: Link) -> None:
        self.forwarder = forwarder
        self.peer = peer
        self.fixed: str | None = link.remote_target.address
        self.receiver = MessageReceiver(
            link,
            peer.socket,
            window=WINDOW,
            max_size=forwarder.max_message,
            on_message=self.on_message,
            on_closed=self.on_closed,
        )

    def on_message(self, delivery: Any, data: bytearray) -> None:
        address = self.fixed
        if address is None:
            try:
                # Only the properties are read: the body goes on as it came.
                address = message_to(data)
            except WireError as exc:
                self.receiver.settle(
                    delivery, REJECTED, condition=Condition("amqp:decode-error", str(exc))
                )
                return
        destination = self.forwarder.destination(address)
        if destination is None:
            self.receiver.settle(delivery, RELEASED)
            return
        self.forwarder.pass_on(self.peer, self.receiver, delivery, data, destination)

    def on_closed(self, link: Link) -> None:
        """A clean detach of a sender to a dynamic address ends that receiver's stream.

        A node egress has no other way to say its backend is done (protocols.md
        §8.1): this is what carries it to a half-closed client as a FIN, once
        everything sent before it has been delivered.
        """
        address = self.fixed
        if (
            self.receiver.refused
            or link.remote_condition is not None
            or address not in self.forwarder.dynamic
        ):
            return
        destination = self.forwarder.destination(address)
        if destination is not None:
            destination.finish()


class RoutedLink:
    """A sender attach passed on to the peer with a link route, and that peer's link.

    ``origin`` sent the attach; ``target`` routes the address. Until the
    target answers, the origin's attach is not answered and gets no credit.
    """

    def __init__(
        self, forwarder: Forwarder, origin: Peer, link: Link, target: Peer, session: Session
    ) -> None:
        self.forwarder = forwarder
        self.origin, self.target = origin, target
        self.origin_link = link
        self.closed = False
        self.receiver: MessageReceiver | None = None
        out = session.sender(f"{link.name}@{origin.container}")
        out.source.copy(link.remote_source)
        out.target.copy(link.remote_target)
        self.sender = MessageSender(
            out, target.socket, on_closed=self.on_target_closed, on_opened=self.on_target_opened
        )
        out.open()
        # Until the target answers, the origin's link is ours: an early detach ends both.
        set_owner(link, self)
        target.socket.flush_soon()

    # The origin's link, before the target answers (LinkOwner).
    def on_link_opened(self, link: LinkHandle) -> None:
        pass

    def on_link_flow(self, link: LinkHandle) -> None:
        pass

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        pass  # no credit was given yet

    def on_link_closed(self, link: LinkHandle) -> None:
        self.on_origin_closed(link.proton)

    def on_link_failed(self, link: LinkHandle, condition: Condition) -> None:
        """The engine closed the origin's link for its fault: the far end hears why."""
        if not self.closed:
            self._end()
            close_link(self.sender.link, condition)
            self.target.socket.flush_soon()

    # -- events of the two links ---------------------------------------------------
    def on_target_opened(self, out: Link) -> None:
        if self.closed:
            return
        link = self.origin_link
        link.source.copy(out.remote_source)
        link.target.copy(out.remote_target)
        self.receiver = MessageReceiver(
            link,
            self.origin.socket,
            window=WINDOW,
            max_size=self.forwarder.max_message,
            on_message=self.on_message,
            on_closed=self.on_origin_closed,
        )
        link.open()
        self.origin.socket.flush_soon()

    def on_message(self, delivery: Any, data: bytearray) -> None:
        assert self.receiver is not None
        self.forwarder.pass_on(self.origin, self.receiver, delivery, data, self.sender)

    def on_origin_closed(self, link: Link) -> None:
        if self.closed:
            return
        self._end()
        refused = self.receiver is not None and self.receiver.refused
        # Detached by us for the origin's fault: the far end hears why.
        close_link(self.sender.link, link.condition if refused else link.remote_condition)
        self.target.socket.flush_soon()

    def on_target_closed(self, sender: MessageSender) -> None:
        if self.closed:
            return
        self._end()
        close_link(self.origin_link, sender.link.remote_condition)
        self.origin.socket.flush_soon()

    def on_peer_lost(self, peer: Peer) -> None:
        if self.closed:
            return
        self._end()
        lost = Condition(ROUTED_LINK_LOST, f"the connection of {peer.container} was lost")
        if peer is self.target:
            self.sender.lost()
            if not self.origin.socket.closed:
                close_link(self.origin_link, lost)
                self.origin.socket.flush_soon()
        elif not self.target.socket.closed:
            close_link(self.sender.link, lost)
            self.target.socket.flush_soon()

    def _end(self) -> None:
        self.closed = True
        self.forwarder.forget(self)
