"""Whole messages on AMQP links: a sender with a queue, a receiver that reassembles.

The TCP tunnels stream; the HTTP bridges exchange whole messages, one per
request and one per response, and need two things from a link:

- :class:`MessageSender` queues encoded messages and sends them as credit
  arrives (a router grants none while nobody consumes the address, so the
  queue is where a request waits); each message's outcome goes to its own
  callback once the peer settles it.
- :class:`MessageReceiver` grants a fixed credit window, gathers each
  delivery's transfers into one message (up to a size limit; a larger one is
  drained and rejected, never half-delivered), and hands it on. Credit comes
  back only when the consumer settles, so the window bounds the work in hand.

Both are link owners in the engine's sense and do no I/O: ``host`` supplies
the engine and is asked to flush.

Bounds per AMQP connection (:class:`PeerBudget`, one per connection, shared by
every sender and receiver on it, whoever made them): the bytes of deliveries
the peer has begun and not finished, and the deliveries we sent that the peer
has not settled. A window bounds each link's work, but not a peer that opens
many links and never finishes or settles; the budget bounds the sum.

At close, a sender or receiver drops its callbacks, buffers and queue, so that
whatever it and its owner hold is freed by reference counting as soon as the
link or the connection goes, not whenever the cycle collector runs.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from proton import Condition, Connection, Endpoint, Link

from .amqp.engine import AmqpEngine, close_link, set_owner
from .amqp.handles import ACCEPTED, MODIFIED, REJECTED, RELEASED, Delivery, PartialMessage, handle
from .amqp.handles import Link as LinkHandle
from .peer_text import printable

logger = logging.getLogger(__name__)

_TERMINAL = frozenset((ACCEPTED, RELEASED, REJECTED, MODIFIED))

#: Bytes of unfinished deliveries one connection's peer may leave with us, by default.
DEFAULT_MAX_PARTIAL = 64 * 1024 * 1024
#: Deliveries sent on one connection and not yet settled by its peer, by default.
#: Each costs proton about 270 bytes until settled: 8192 are about 2 MiB.
DEFAULT_MAX_UNSETTLED = 8192
_BUDGET_ATTR = "tunnel_peer_budget"
RESOURCE_LIMIT = "amqp:resource-limit-exceeded"


class PeerBudget:
    """What one AMQP connection's peer may leave with us, across all its links.

    - ``max_partial``: bytes of deliveries it has begun and not finished
      (default :data:`DEFAULT_MAX_PARTIAL`; direct mode sets 4 x the largest
      message). A transfer that takes the sum past it ends that delivery: its
      bytes are dropped, the rest of it drained unkept, and its link detached
      with ``amqp:resource-limit-exceeded``.
    - ``max_unsettled``: deliveries we sent that it has not settled (default
      :data:`DEFAULT_MAX_UNSETTLED`). A send past it detaches the sending
      link with ``amqp:resource-limit-exceeded``; what was queued on it fails.

    Kept in the proton connection's record, so it goes when the connection is
    freed; it holds nothing itself.
    """

    __slots__ = ("max_partial", "max_unsettled", "partial", "unsettled")

    def __init__(
        self, max_partial: int = DEFAULT_MAX_PARTIAL, max_unsettled: int = DEFAULT_MAX_UNSETTLED
    ) -> None:
        self.max_partial = max_partial
        self.max_unsettled = max_unsettled
        self.partial = 0
        self.unsettled = 0


def set_budget(connection: Connection, budget: PeerBudget) -> None:
    """Give ``connection`` its own bounds; before any link on it has a sender or receiver."""
    setattr(connection, _BUDGET_ATTR, budget)


def budget_of(host: AmqpHost) -> PeerBudget:
    """``host``'s connection's budget, a default one made at first use."""
    connection = host.engine.connection
    budget: PeerBudget | None = getattr(connection, _BUDGET_ATTR, None)
    if budget is None:
        budget = PeerBudget()
        set_budget(connection, budget)
    return budget


def _ignore_message(delivery: Delivery, data: bytearray) -> None:
    pass


#: ``(outcome, why)``: the peer's outcome (0 when the link went away first) and,
#: for a rejection or a modified outcome, what it said went wrong.
OutcomeCallback = Callable[[int, str], None]


class AmqpHost(Protocol):
    """What a link owner needs from the connection it lives on."""

    #: The connection is gone and its engine freed: its links and deliveries
    #: must not be touched (no link event says so).
    closed: bool

    @property
    def engine(self) -> AmqpEngine: ...
    def flush_soon(self) -> None: ...


class MessageSender:
    """A sender link that sends queued messages as credit allows."""

    def __init__(
        self,
        link: Link,
        host: AmqpHost,
        on_closed: Callable[[MessageSender], object] | None = None,
        on_opened: Callable[[Link], object] | None = None,
    ) -> None:
        self.link = link
        self.handle = handle(link)
        self.host = host
        self.on_closed = on_closed
        self.on_opened = on_opened
        #: Bounded by the callers: every queued message is a delivery in hand elsewhere.
        self.queue: deque[tuple[bytes | bytearray, OutcomeCallback | None]] = deque()
        #: Sent, not yet settled: bounded by the connection's ``PeerBudget.max_unsettled``.
        self.unsettled: dict[Delivery, OutcomeCallback | None] = {}
        self.closed = False
        #: Detach cleanly once nothing is queued or unsettled (see :meth:`finish`).
        self.finishing = False
        self._tags = itertools.count()
        self.peer_budget = budget_of(host)
        set_owner(link, self)

    def send(self, data: bytes | bytearray, on_outcome: OutcomeCallback | None = None) -> None:
        """Send ``data`` (one encoded message) when credit allows."""
        self.queue.append((data, on_outcome))
        self._pump()

    def withdraw(self, on_outcome: OutcomeCallback) -> bool:
        """Take back a message still waiting for credit; False if it has gone out already."""
        for index, (_, callback) in enumerate(self.queue):
            if callback == on_outcome:
                del self.queue[index]
                return True
        return False

    def _pump(self) -> None:
        if self.host.closed:
            return
        engine = self.host.engine
        budget = self.peer_budget
        sent = False
        while self.queue and not self.closed and self.handle.credit > 0:
            if budget.unsettled >= budget.max_unsettled:
                self._refuse(
                    f"{budget.unsettled} deliveries sent on this connection are unsettled; "
                    f"at most {budget.max_unsettled} are kept"
                )
                return
            data, callback = self.queue.popleft()
            tag = next(self._tags).to_bytes(8, "big")
            delivery = engine.send_delivery(self.handle, tag, b"", data)
            self.unsettled[delivery] = callback
            budget.unsettled += 1
            sent = True
        if sent:
            self.host.flush_soon()

    def _refuse(self, description: str) -> None:
        close_link(self.link, Condition(RESOURCE_LIMIT, description))
        self.host.flush_soon()
        self._gone()

    @property
    def credit(self) -> int:
        """Credit the peer has given and no queued message has taken yet."""
        return 0 if self.host.closed else self.handle.credit - len(self.queue)

    def finish(self) -> None:
        """Detach cleanly, without an error, once every queued message is sent and settled."""
        self.finishing = True
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if not self.finishing or self.queue or self.unsettled or self.closed or self.host.closed:
            return
        close_link(self.link)
        self.host.flush_soon()
        self._gone()

    def lost(self) -> None:
        """The link is gone without a detach (its connection was lost): fail what is out."""
        if not self.closed:
            self._gone()

    def _gone(self) -> None:
        self.closed = True
        callbacks = list(self.unsettled.values())
        callbacks += [cb for _, cb in self.queue]
        self.peer_budget.unsettled -= len(self.unsettled)
        self.unsettled.clear()
        self.queue.clear()
        for callback in callbacks:
            if callback is not None:
                callback(0, "link closed before the outcome")
        on_closed, self.on_closed, self.on_opened = self.on_closed, None, None
        if on_closed is not None:
            on_closed(self)

    # -- LinkOwner --------------------------------------------------------------
    def on_link_opened(self, link: LinkHandle) -> None:
        if self.on_opened is not None:
            self.on_opened(link.proton)

    def on_link_flow(self, link: LinkHandle) -> None:
        self._pump()

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        state = delivery.remote_state
        if not delivery.settled and state not in _TERMINAL:
            return  # not an outcome yet (received, or nothing)
        if delivery not in self.unsettled:
            delivery.settle()
            return
        callback = self.unsettled.pop(delivery)
        self.peer_budget.unsettled -= 1
        why = delivery.failure() if state in (REJECTED, MODIFIED) else ""
        delivery.settle()
        if callback is not None:
            callback(state, why)
        self._finish_if_done()

    def on_link_closed(self, link: LinkHandle) -> None:
        if not self.closed:
            self._gone()


class MessageReceiver:
    """A receiver link that hands on whole messages and keeps ``window`` credits out.

    Memory: at most ``window`` messages of at most ``max_size`` bytes are in
    hand (handed on, not yet settled), plus the one being gathered, whose
    bytes count against the connection's :class:`PeerBudget` until it is whole.
    """

    def __init__(
        self,
        link: Link,
        host: AmqpHost,
        *,
        window: int,
        max_size: int,
        on_message: Callable[[Delivery, bytearray], None],
        on_opened: Callable[[Link], None] | None = None,
        on_closed: Callable[[Link], None] | None = None,
    ) -> None:
        self.handle = handle(link)
        self.host = host
        self.on_closed = on_closed
        self.window = window
        self.max_size = max_size
        self.on_message = on_message
        self.on_opened = on_opened
        self.closed = False
        #: We ended the link for the peer's fault: over the connection's budget, or
        #: (the engine did) a transfer past credit. Not a clean end of the stream.
        self.refused = False
        self.in_hand = 0
        self.peer_budget = budget_of(host)
        self._partial: PartialMessage | None = None
        #: Bytes of the message being gathered that count against the budget.
        self._counted = 0
        #: Bytes of a message being drained unkept (too large, or over budget).
        self._oversize = 0
        set_owner(link, self)
        self.top_up()

    def top_up(self) -> None:
        """Grant credit up to the window, counting the messages in hand."""
        credit = self.handle.credit
        if credit + self.in_hand < self.window:
            self.handle.flow(self.window - credit - self.in_hand)

    def settle(
        self,
        delivery: Delivery,
        outcome: int,
        *,
        failed: bool = False,
        condition: Condition | None = None,
        why: str | None = None,
    ) -> None:
        """Settle a message handed on earlier, and give its credit back."""
        self.in_hand -= 1
        if self.closed or self.host.closed:
            return
        delivery.finish(outcome, failed=failed, condition=condition, why=why)
        self.top_up()
        self.host.flush_soon()

    def lost(self) -> None:
        """The connection is gone without a detach: drop what is held, and the callbacks."""
        if not self.closed:
            self._end()

    def _drop_partial(self) -> None:
        self.peer_budget.partial -= self._counted
        self._counted = 0
        self._partial = None

    def _end(self) -> Callable[[Link], None] | None:
        """Closed: nothing is kept and nothing called any more; the old ``on_closed``."""
        self.closed = True
        self._drop_partial()
        on_closed = self.on_closed
        self.on_closed = self.on_opened = None
        self.on_message = _ignore_message
        return on_closed

    def _refuse(self, link: LinkHandle, would_hold: int) -> None:
        """Over the connection's budget: detach, and drain what the peer still sends."""
        budget = self.peer_budget
        wrapped = link.proton
        logger.debug(
            "link %s detached: unfinished deliveries would hold %d bytes",
            printable(wrapped.name),
            would_hold,
        )
        self.refused = True
        on_closed = self._end()
        close_link(
            wrapped,
            Condition(
                RESOURCE_LIMIT,
                f"unfinished deliveries on this connection would hold {would_hold} bytes; "
                f"at most {budget.max_partial} are kept",
            ),
        )
        if not wrapped.state & Endpoint.REMOTE_CLOSED:
            # Transfers already on their way still come: drained here, not kept in proton.
            set_owner(wrapped, self)
        self.host.flush_soon()
        if on_closed is not None:
            on_closed(wrapped)

    # -- LinkOwner --------------------------------------------------------------
    def on_link_opened(self, link: LinkHandle) -> None:
        if self.on_opened is not None:
            self.on_opened(link.proton)

    def on_link_flow(self, link: LinkHandle) -> None:
        pass

    def on_delivery(self, link: LinkHandle, delivery: Delivery) -> None:
        if not link.is_current(delivery):
            return  # news of one handed on already (the sender settled it): nothing to do
        pending = delivery.pending
        partial = delivery.partial
        if self.closed:  # detached by us: drained until the peer's detach comes
            link.recv(pending)
            if not partial:
                link.advance()
                delivery.settle()
            return
        held = self._partial.size if self._partial is not None else 0
        budget = self.peer_budget
        if not self._oversize and held + pending <= self.max_size and partial:
            would_hold = budget.partial + pending
            if would_hold > budget.max_partial:
                link.recv(pending)
                self._refuse(link, would_hold)
                return
        if self._oversize or held + pending > self.max_size:
            # Drained, not kept: left in proton it would shut the session window.
            self._oversize += held + pending
            self._drop_partial()
            link.recv(pending)
            if not partial:
                size, self._oversize = self._oversize, 0
                self.in_hand += 1
                link.advance()
                self.settle(
                    delivery,
                    REJECTED,
                    condition=Condition(
                        "amqp:link:message-size-exceeded",
                        f"a message of {size} bytes; at most {self.max_size} are taken",
                    ),
                )
            return
        if pending:
            if self._partial is None:
                self._partial = PartialMessage(0, self.max_size)
            self._partial.receive(link, pending)
            if partial:
                budget.partial += pending
                self._counted += pending
        if partial:
            return
        data = self._partial.take() if self._partial is not None else bytearray()
        self._drop_partial()
        link.advance()
        self.in_hand += 1
        self.on_message(delivery, data)

    def on_link_closed(self, link: LinkHandle) -> None:
        if self.closed:
            return
        on_closed = self._end()
        if on_closed is not None:
            on_closed(link.proton)

    def on_link_failed(self, link: LinkHandle, condition: Condition) -> None:
        """The engine closed the link with ``condition`` (see ``engine.FailingOwner``)."""
        self.refused = True
        self.on_link_closed(link)
