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
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from proton import Condition, Link

from .engine import (
    ACCEPTED,
    MODIFIED,
    REJECTED,
    RELEASED,
    AmqpEngine,
    close_link,
    failure_of,
    raw_lib,
    receive_delivery,
    receive_more,
    set_owner,
    settle,
)

_lib = raw_lib

_TERMINAL = frozenset((ACCEPTED, RELEASED, REJECTED, MODIFIED))

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
        self.raw = link._impl
        self.host = host
        self.on_closed = on_closed
        self.on_opened = on_opened
        #: Bounded by the callers: every queued message is a delivery in hand elsewhere.
        self.queue: deque[tuple[bytes | bytearray, OutcomeCallback | None]] = deque()
        self.unsettled: dict[Any, OutcomeCallback | None] = {}
        self.closed = False
        #: Detach cleanly once nothing is queued or unsettled (see :meth:`finish`).
        self.finishing = False
        self._tags = itertools.count()
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
        sent = False
        while self.queue and not self.closed and _lib.pn_link_credit(self.raw) > 0:
            data, callback = self.queue.popleft()
            tag = next(self._tags).to_bytes(8, "big")
            delivery = engine.send_delivery(self.raw, tag, b"", data)
            self.unsettled[delivery] = callback
            sent = True
        if sent:
            self.host.flush_soon()

    @property
    def credit(self) -> int:
        """Credit the peer has given and no queued message has taken yet."""
        return 0 if self.host.closed else _lib.pn_link_credit(self.raw) - len(self.queue)

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
        self.unsettled.clear()
        self.queue.clear()
        for callback in callbacks:
            if callback is not None:
                callback(0, "link closed before the outcome")
        if self.on_closed is not None:
            self.on_closed(self)

    # -- LinkOwner --------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        if self.on_opened is not None:
            self.on_opened(link)

    def on_link_flow(self, link: Any) -> None:
        self._pump()

    def on_delivery(self, link: Any, delivery: Any) -> None:
        state = _lib.pn_delivery_remote_state(delivery)
        if not _lib.pn_delivery_settled(delivery) and state not in _TERMINAL:
            return  # not an outcome yet (received, or nothing)
        callback = self.unsettled.pop(delivery, None)
        why = failure_of(delivery) if state in (REJECTED, MODIFIED) else ""
        _lib.pn_delivery_settle(delivery)
        if callback is not None:
            callback(state, why)
        self._finish_if_done()

    def on_link_closed(self, link: Link) -> None:
        if not self.closed:
            self._gone()


class MessageReceiver:
    """A receiver link that hands on whole messages and keeps ``window`` credits out."""

    def __init__(
        self,
        link: Link,
        host: AmqpHost,
        *,
        window: int,
        max_size: int,
        on_message: Callable[[Any, bytearray], None],
        on_opened: Callable[[Link], None] | None = None,
        on_closed: Callable[[Link], None] | None = None,
    ) -> None:
        self.raw = link._impl
        self.host = host
        self.on_closed = on_closed
        self.window = window
        self.max_size = max_size
        self.on_message = on_message
        self.on_opened = on_opened
        self.closed = False
        self.in_hand = 0
        self._partial: bytearray | None = None
        self._oversize = 0
        set_owner(link, self)
        _lib.pn_link_flow(self.raw, window)

    def settle(
        self,
        delivery: Any,
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
        settle(delivery, outcome, failed=failed, condition=condition, why=why)
        credit = _lib.pn_link_credit(self.raw)
        if credit + self.in_hand < self.window:
            _lib.pn_link_flow(self.raw, self.window - credit - self.in_hand)
        self.host.flush_soon()

    # -- LinkOwner --------------------------------------------------------------
    def on_link_opened(self, link: Link) -> None:
        if self.on_opened is not None:
            self.on_opened(link)

    def on_link_flow(self, link: Any) -> None:
        pass

    def on_delivery(self, link: Any, delivery: Any) -> None:
        if delivery != _lib.pn_link_current(link):
            return  # news of one handed on already (the sender settled it): nothing to do
        pending = _lib.pn_delivery_pending(delivery)
        partial = bool(_lib.pn_delivery_partial(delivery))
        held = len(self._partial) if self._partial is not None else 0
        if self._oversize or held + pending > self.max_size:
            # Drained, not kept: left in proton it would shut the session window.
            self._oversize += held + pending
            self._partial = None
            receive_delivery(link, pending)
            if not partial:
                size, self._oversize = self._oversize, 0
                self.in_hand += 1
                _lib.pn_link_advance(link)
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
            self._partial = receive_more(link, pending, self._partial)
        if partial:
            return
        data, self._partial = self._partial or bytearray(), None
        _lib.pn_link_advance(link)
        self.in_hand += 1
        self.on_message(delivery, data)

    def on_link_closed(self, link: Link) -> None:
        self.closed = True
        if self.on_closed is not None:
            self.on_closed(link)
