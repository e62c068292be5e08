"""A stand-in for a router's message routing, built on proton's reactor.

What the HTTP/2 bridges need of a router, as Qpid Dispatch and skupper-router
do it for anycast addresses:

- any number of AMQP connections; its Open names it ``qpid-dispatch-router``
  and offers ANONYMOUS-RELAY;
- a receiver attached with a source address consumes it; a dynamic receiver
  gets a fresh address (``_topo/0/Router.A/temp.N``);
- a sender to an address gets credit (:data:`LINK_CAPACITY`, topped up as
  its deliveries move on) only while the address has a consumer: with none,
  credit 0 for ever; an anonymous sender (no target) gets credit at once,
  and its deliveries go by their ``to``;
- each whole delivery goes to one consumer, in turn among those with
  credit, held here while none has any; one for an address nobody consumes
  is released;
- the consumer's outcome goes back to the sender, settled when the consumer
  settles; a consumer lost with deliveries unsettled returns them modified
  (delivery-failed).

:meth:`MessageRouter.pause` holds what goes to dynamic addresses, as a slow
path back to a sender would, for tests of what happens meanwhile.

Threading is :mod:`tests.reactor_thread`'s.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any

from proton import Delivery, Endpoint, Handler, Message, SymbolList, symbol
from reactor_thread import ReactorThread

#: Credit the router keeps out on each sender link (qdrouterd's default linkCapacity).
LINK_CAPACITY = 250
DYNAMIC_PREFIX = "_topo/0/Router.A/temp."


class MessageRouter(ReactorThread, Handler):
    """See the module docstring."""

    container_id = "message-router"

    def __init__(self) -> None:
        Handler.__init__(self)
        ReactorThread.__init__(self)
        self._numbers = itertools.count(1)
        # Reactor-thread state.
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        self.turn: collections.Counter[str] = collections.Counter()
        self.waiting_senders: list[Any] = []
        self.held: dict[str, collections.deque[tuple[Any, bytes]]] = collections.defaultdict(
            collections.deque
        )
        self.forwarded: dict[Any, Any] = {}
        self.connections: list[Any] = []
        self.paused = False

    def pause(self, on: bool) -> None:
        """Test thread: while on, deliveries to dynamic addresses wait here."""

        def act(router: MessageRouter) -> None:
            router.paused = on
            for address in list(router.held):
                router._dispatch(address)

        self.call(act)

    def shut_down(self) -> None:
        for conn in self.connections:
            if not conn.state & Endpoint.LOCAL_CLOSED:
                conn.close()
        super().shut_down()

    # -- connections ------------------------------------------------------------------
    def on_connection_init(self, event: Any) -> None:
        conn = event.connection
        conn.container = self.container_id
        conn.properties = {symbol("product"): "qpid-dispatch-router", symbol("version"): "1.19.0"}
        conn.offered_capabilities = SymbolList(["ANONYMOUS-RELAY"])
        self.connections.append(conn)

    def on_connection_remote_open(self, event: Any) -> None:
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.open()

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_connection_remote_close(self, event: Any) -> None:
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        # proton makes a new wrapper per event: its objects compare with ==, never `is`.
        conn = event.connection
        self.connections = [c for c in self.connections if c != conn]
        for address, links in self.consumers.items():
            for link in [link for link in links if link.connection == conn]:
                self._drop_consumer(address, link)
        self.waiting_senders = [s for s in self.waiting_senders if s.connection != conn]

    # -- links ------------------------------------------------------------------------
    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if link.is_sender:  # a client's receiver: a consumer
            if link.remote_source.dynamic:
                link.source.address = f"{DYNAMIC_PREFIX}{next(self._numbers)}"
            address = link.source.address
            link.open()
            self.consumers[address].append(link)
            self._grant_waiting()
            return
        link.open()
        if link.remote_target.address is None:
            link.flow(LINK_CAPACITY)  # anonymous: routed per message
        else:
            self.waiting_senders.append(link)
            self._grant_waiting()

    def _grant_waiting(self) -> None:
        for link in list(self.waiting_senders):
            if self.consumers.get(link.remote_target.address):
                self.waiting_senders.remove(link)
                link.flow(LINK_CAPACITY)

    def on_link_remote_close(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_CLOSED:
            link.close()
        if link.is_sender:
            self._drop_consumer(link.source.address, link)
        else:
            self.waiting_senders = [s for s in self.waiting_senders if s != link]

    def _drop_consumer(self, address: str, link: Any) -> None:
        links = self.consumers.get(address, [])
        if link in links:
            links.remove(link)
        for out, incoming in list(self.forwarded.items()):
            if out.link == link:
                del self.forwarded[out]
                incoming.local.failed = True
                incoming.update(Delivery.MODIFIED)
                incoming.settle()

    def on_link_flow(self, event: Any) -> None:
        link = event.link
        if link.is_sender:
            self._dispatch(link.source.address)

    # -- deliveries -------------------------------------------------------------------
    def on_delivery(self, event: Any) -> None:
        delivery, link = event.delivery, event.link
        if link.is_sender:
            self._on_outcome(delivery)
            return
        if not delivery.readable or delivery.partial:
            return  # news of one taken already (its sender settled it), or not all here yet
        data = link.recv(delivery.pending) or b""
        link.advance()
        link.flow(1)  # moved on: the sender's credit is topped up
        address = link.remote_target.address
        if address is None:
            message = Message()
            message.decode(data)
            address = message.address
        if not self.consumers.get(address):
            delivery.update(Delivery.RELEASED)
            delivery.settle()
            return
        self.held[address].append((delivery, data))
        self._dispatch(address)

    def _dispatch(self, address: str) -> None:
        if self.paused and address.startswith(DYNAMIC_PREFIX):
            return
        held = self.held.get(address)
        while held:
            consumer = self._next_consumer(address)
            if consumer is None:
                return
            incoming, data = held.popleft()
            out = consumer.delivery(str(next(self._numbers)))
            consumer.send(data)
            consumer.advance()
            self.forwarded[out] = incoming

    def _next_consumer(self, address: str) -> Any:
        links = self.consumers.get(address, [])
        for offset in range(len(links)):
            link = links[(self.turn[address] + offset) % len(links)]
            if link.credit > 0:
                self.turn[address] += offset + 1
                return link
        return None

    def _on_outcome(self, out: Any) -> None:
        incoming = self.forwarded.get(out)
        state = out.remote_state
        if incoming is None or not (
            out.settled
            or state in (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED)
        ):
            return
        del self.forwarded[out]
        if state == Delivery.MODIFIED:
            incoming.local.failed = out.remote.failed
            incoming.local.undeliverable = out.remote.undeliverable
        elif state == Delivery.REJECTED:
            incoming.local.condition = out.remote.condition
        incoming.update(state)
        incoming.settle()
        out.settle()
