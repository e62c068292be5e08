"""``http:[HOST:]PORT=>amqp:ADDRESS``: an HTTP/1.1 server whose requests travel as messages.

Theory of operation
-------------------
Each accepted connection is one :class:`HttpServerConnection`, parsing with
h11 (keep-alive and pipelining included: requests are answered one at a
time, in order, and the socket is not read while an answer is due, so a
pipelining client cannot make us buffer without bound). A whole request
(body up to ``max_body``, else 413) becomes an :class:`Exchange`: one message
to ``ADDRESS`` (protocols.md §2.1) on the bridge's sender, with ``reply_to``
the bridge's dynamic receiver on the same router connection and a
``correlation_id`` unique in the bridge.

What can happen to the request message, and what the client gets:

- a response message with that correlation id: the HTTP response;
- RELEASED or MODIFIED (nobody could take it, or the backend was out of
  reach): sent again at once, then after 50, 100, ... 250 ms, up to
  :data:`MAX_ATTEMPTS` sends in all, then 502;
- REJECTED: 502 with the rejection's error;
- nothing within ``timeout`` (no consumer grants credit, or no response):
  504. A response that comes later is accepted and dropped;
- the router connection drops after the request was sent: 502, since the
  request may have been served. A request not yet sent waits for the next
  connection, within its timeout.

Every tunnel-made error is a short ``text/plain`` body naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import h11
from proton import Link, Session

from . import http_message as hm
from .bridge import LISTEN_BACKLOG, listening_addresses
from .codec import WireError
from .engine import ACCEPTED, MODIFIED, RELEASED
from .messaging import AmqpHost, MessageReceiver, MessageSender
from .spec import HttpIngressSpec

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 11
#: Seconds an idle keep-alive connection is kept open.
KEEP_ALIVE_TIMEOUT = 75.0
#: Responses in flight towards us at once on the reply link.
REPLY_WINDOW = 64
MAX_HEAD = 64 * 1024


def retry_delay(attempt: int) -> float:
    """Seconds before send number ``attempt + 1``: at once after the first, then 50 ms more
    each time up to 250 ms (the node proxy's schedule)."""
    return 0.0 if attempt <= 1 else min(0.05 * (attempt - 1), 0.25)


class Exchange:
    """One request on its way to an answer."""

    __slots__ = (
        "attempts",
        "bridge",
        "correlation_id",
        "on_done",
        "request",
        "retry",
        "sender",
        "timer",
    )

    def __init__(
        self,
        bridge: HttpIngressBridge,
        request: hm.HttpRequest,
        on_done: Callable[[hm.HttpResponse], None],
    ) -> None:
        self.bridge = bridge
        self.request = request
        self.on_done: Callable[[hm.HttpResponse], None] | None = on_done
        self.correlation_id = next(bridge.ids)
        self.attempts = 0
        #: Where the request went last, while its outcome is awaited.
        self.sender: MessageSender | None = None
        self.retry: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(bridge.settings.timeout, self.on_timeout)

    def on_timeout(self) -> None:
        within = f"within {self.bridge.settings.timeout:g} s"
        if self.withdraw() or self.sender is None:
            why = f"no consumer of amqp:{self.bridge.spec.address} took the request {within}"
        else:
            why = f"no response from amqp:{self.bridge.spec.address} {within}"
        self.finish(hm.plain_response(504, f"Gateway Timeout: {why}"))

    def withdraw(self) -> bool:
        """Keep a request still waiting for credit from going out after all."""
        return self.sender is not None and self.sender.withdraw(self.on_outcome)

    def on_outcome(self, outcome: int, why: str) -> None:
        if self.on_done is None:
            return
        if outcome == ACCEPTED:
            return  # the response follows
        if outcome in (RELEASED, MODIFIED, 0):
            self.sender = None
            if self.attempts >= MAX_ATTEMPTS:
                self.finish(
                    hm.plain_response(
                        502,
                        f"Bad Gateway: amqp:{self.bridge.spec.address} did not take the "
                        f"request ({self.attempts} attempts)" + (f": {why}" if why else ""),
                    )
                )
                return
            delay = retry_delay(self.attempts)
            self.retry = asyncio.get_running_loop().call_later(delay, self.bridge.send, self)
            return
        self.finish(
            hm.plain_response(
                502,
                f"Bad Gateway: amqp:{self.bridge.spec.address} rejected the request"
                + (f" ({why})" if why else ""),
            )
        )

    def finish(self, response: hm.HttpResponse) -> None:
        on_done = self.on_done
        if on_done is not None:
            self.abandon()
            on_done(response)

    def abandon(self) -> None:
        """Nobody wants the answer any more (given, or the client went away)."""
        self.withdraw()
        self.on_done = None
        self.timer.cancel()
        if self.retry is not None:
            self.retry.cancel()
        self.bridge.forget(self)


class RequestLinks:
    """The bridge's sender to ADDRESS and its dynamic reply receiver, on one router connection."""

    def __init__(self, bridge: HttpIngressBridge, host: AmqpHost, session: Session) -> None:
        self.bridge = bridge
        self.reply_to: str | None = None
        name = f"{bridge.site_id}-http-{bridge.spec.address}"
        sender_link = session.sender(name)
        sender_link.target.address = bridge.spec.address
        sender_link.source.address = name
        self.sender = MessageSender(sender_link, host, on_closed=self.on_sender_closed)
        sender_link.open()
        receiver_link = session.receiver(f"{name}-replies")
        receiver_link.source.dynamic = True
        self.receiver = MessageReceiver(
            receiver_link,
            host,
            window=REPLY_WINDOW,
            max_size=bridge.settings.max_message,
            on_message=self.on_response,
            on_opened=self.on_reply_opened,
        )
        receiver_link.open()
        host.flush_soon()

    def on_sender_closed(self, sender: MessageSender) -> None:
        condition = sender.link.remote_condition
        logger.warning(
            "%s: the router closed the link to %r%s; requests wait for the next connection",
            self.bridge.spec,
            self.bridge.spec.address,
            f" ({condition.name}: {condition.description})" if condition else "",
        )

    def on_reply_opened(self, link: Link) -> None:
        address = link.remote_source.address
        if not address:
            logger.warning("%s: the router gave the reply link no address", self.bridge.spec)
            return
        self.reply_to = address
        self.bridge.on_links_ready(self)

    def on_response(self, delivery: Any, data: bytearray) -> None:
        self.receiver.settle(delivery, ACCEPTED)
        try:
            message = hm.decode(data)
        except WireError as exc:
            logger.info("%s: undecodable response dropped: %s", self.bridge.spec, exc)
            return
        self.bridge.on_response(message)


class HttpIngressBridge:
    """``http:[HOST:]PORT=>amqp:ADDRESS``."""

    def __init__(
        self, spec: HttpIngressSpec, site_id: str, settings: hm.HttpSettings, max_connections: int
    ) -> None:
        self.spec = spec
        self.site_id = site_id
        self.settings = settings
        self.max_connections = max_connections
        self.ids = itertools.count(1)
        self.server: asyncio.Server | None = None
        self.links: RequestLinks | None = None
        self.exchanges: dict[int, Exchange] = {}
        self.waiting: deque[Exchange] = deque()
        self.connections: set[HttpServerConnection] = set()
        #: Shutting down: answers say ``Connection: close`` and end their connection.
        self.stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: HttpServerConnection(self),
            host=self.spec.host,
            port=self.spec.port,
            reuse_address=True,
            backlog=LISTEN_BACKLOG,
        )
        logger.info("bridge %s listening on %s", self.spec, listening_addresses(self.server))

    def stop_accepting(self) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    def busy(self) -> int:
        return sum(1 for conn in self.connections if not conn.idle)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort("shutting down")

    # -- the router connection ------------------------------------------------------
    def on_router_up(self, host: AmqpHost, session: Session) -> None:
        self.links = RequestLinks(self, host, session)

    def on_router_down(self) -> None:
        self.links = None
        for exchange in list(self.exchanges.values()):
            if exchange.sender is None:
                continue
            if exchange.withdraw():  # never went out: wait
                exchange.sender = None
                self.waiting.append(exchange)
            else:
                exchange.finish(
                    hm.plain_response(
                        502, "Bad Gateway: the connection to the router was lost before a response"
                    )
                )

    def on_links_ready(self, links: RequestLinks) -> None:
        if links is not self.links:
            return
        waiting, self.waiting = self.waiting, deque()
        for exchange in waiting:
            self.send(exchange)

    # -- exchanges ----------------------------------------------------------------
    def submit(
        self, request: hm.HttpRequest, on_done: Callable[[hm.HttpResponse], None]
    ) -> Exchange:
        exchange = Exchange(self, request, on_done)
        self.exchanges[exchange.correlation_id] = exchange
        self.send(exchange)
        return exchange

    def send(self, exchange: Exchange) -> None:
        exchange.retry = None
        if exchange.on_done is None:
            return
        links = self.links
        if links is None or links.reply_to is None or links.sender.closed:
            self.waiting.append(exchange)
            return
        message = hm.request_message(
            exchange.request,
            site_id=self.site_id,
            correlation_id=exchange.correlation_id,
            reply_to=links.reply_to,
        )
        exchange.attempts += 1
        exchange.sender = links.sender
        links.sender.send(hm.encode(message), exchange.on_outcome)

    def forget(self, exchange: Exchange) -> None:
        self.exchanges.pop(exchange.correlation_id, None)
        with contextlib.suppress(ValueError):
            self.waiting.remove(exchange)

    def on_response(self, message: Any) -> None:
        correlation_id = message.correlation_id
        exchange = self.exchanges.get(correlation_id) if isinstance(correlation_id, int) else None
        if exchange is None:
            logger.debug("%s: a response for %r, which nobody awaits", self.spec, correlation_id)
            return
        try:
            response = hm.response_of(message)
        except WireError as exc:
            response = hm.plain_response(502, f"Bad Gateway: unusable response: {exc}")
        exchange.finish(response)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class Phase(enum.Enum):
    """Where one client connection is."""

    #: Waiting for (the rest of) a request.
    READING = "reading"
    #: A whole request is out as a message; the answer is due.
    ANSWERING = "answering"
    #: Answered and shut for writing; what the client still sends is read and
    #: dropped, so that closing does not reset the answer away.
    DRAINING = "draining"
    CLOSED = "closed"


#: Seconds a connection is drained after a closing answer, at most.
LINGER = 2.0


class HttpServerConnection(asyncio.Protocol):
    """One client connection to an HTTP ingress bridge."""

    def __init__(self, bridge: HttpIngressBridge) -> None:
        self.bridge = bridge
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.phase = Phase.READING
        self.transport: asyncio.Transport | None = None
        self.head: h11.Request | None = None
        self.body = bytearray()
        self.exchange: Exchange | None = None
        self.keep_alive: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request is being received or answered."""
        return self.phase is not Phase.ANSWERING and self.h11.their_state is not h11.SEND_BODY

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.bridge.connections.add(self)
        if len(self.bridge.connections) > self.bridge.max_connections:
            # As the TCP bridges do: HTTP has no way to answer before a request.
            logger.info(
                "%s: connection reset: over the bridge's limit of %d connections",
                self.bridge.spec,
                self.bridge.max_connections,
            )
            self.abort("over the connection limit")
            return
        self._advance()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.DRAINING:
            return
        self._stop_keep_alive()
        self.h11.receive_data(data)
        self._advance()

    def eof_received(self) -> bool:
        if self.phase is Phase.DRAINING:
            self._close()
            return True
        self.h11.receive_data(b"")
        self._advance()
        return True  # an answer may still be due

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self.bridge.connections.discard(self)
        self._stop_keep_alive()
        if self.exchange is not None:
            self.exchange.abandon()
            self.exchange = None

    # -- requests ---------------------------------------------------------------
    def _advance(self) -> None:
        """Act on what h11 has parsed, until it needs more bytes or an answer is due."""
        while self.phase is Phase.READING:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._answer(
                    hm.plain_response(exc.error_status_hint, f"Bad Request: {exc}"), close=True
                )
                return
            if event is h11.NEED_DATA:
                self._on_need_data()
                return
            if isinstance(event, h11.Request):
                self._on_request_head(event)
            elif isinstance(event, h11.Data):
                self._on_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._on_request_end()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _on_need_data(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()
        if self.h11.their_state is h11.IDLE and self.keep_alive is None:
            self.keep_alive = asyncio.get_running_loop().call_later(
                KEEP_ALIVE_TIMEOUT, self.close_if_idle
            )

    def _on_request_head(self, head: h11.Request) -> None:
        self.head = head
        self.body = bytearray()
        length = next((int(v) for k, v in head.headers if k == b"content-length"), 0)
        if length > self.bridge.settings.max_body:
            self._too_large()
            return
        if self.h11.they_are_waiting_for_100_continue:
            self._write(self._send(h11.InformationalResponse(status_code=100, headers=[])))

    def _on_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > self.bridge.settings.max_body:
            self._too_large()

    def _too_large(self) -> None:
        self._answer(
            hm.plain_response(
                413,
                f"Content Too Large: request bodies are limited to "
                f"{self.bridge.settings.max_body} bytes",
            ),
            close=True,
        )

    def _on_request_end(self) -> None:
        head = self.head
        assert head is not None and self.transport is not None
        request = hm.HttpRequest(
            method=head.method.decode("ascii"),
            target=head.target.decode("latin-1"),
            headers=hm.end_to_end(head.headers),
            body=bytes(self.body),
        ).origin_form()
        self.body = bytearray()
        self.phase = Phase.ANSWERING
        # Pipelined requests wait in the socket, not in our memory.
        self.transport.pause_reading()
        self.exchange = self.bridge.submit(request, self.on_response)

    # -- answers ----------------------------------------------------------------
    def on_response(self, response: hm.HttpResponse) -> None:
        self.exchange = None
        if self.phase is Phase.CLOSED:
            return
        self._answer(response, close=self.bridge.stopping)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.phase = Phase.READING
            self.h11.start_next_cycle()
            self._advance()

    def _answer(self, response: hm.HttpResponse, *, close: bool) -> None:
        """Send ``response``; close afterwards if asked or if h11 says the connection is done."""
        method = self.head.method.decode("latin-1") if self.head is not None else "GET"
        headers = [(name, value) for name, value in response.headers]
        bodyless = hm.is_bodyless(method, response.status)
        if not bodyless:
            headers.append(("content-length", str(len(response.body))))
        if close:
            headers.append(("connection", "close"))
        try:
            # h11 passes the body through: written as it is, never copied into the head.
            parts = self._send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=_reason(response.status)
                )
            )
            if response.body and not bodyless:
                parts += self._send(h11.Data(data=response.body))
            parts += self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            logger.info("%s: cannot send the response: %s", self.bridge.spec, exc)
            self.abort(str(exc))
            return
        self._write(parts)
        if close:
            self._drain()
        elif self.h11.our_state is h11.MUST_CLOSE:
            self._close()

    def _send(self, event: h11.Event) -> list[bytes]:
        return self.h11.send_with_data_passthrough(event) or []

    def _write(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def _drain(self) -> None:
        assert self.transport is not None
        self.phase = Phase.DRAINING
        if self.transport.is_closing():
            return
        self.transport.write_eof()
        self.transport.resume_reading()
        self._stop_keep_alive()
        self.keep_alive = asyncio.get_running_loop().call_later(LINGER, self._close)

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._stop_keep_alive()
        if self.transport is not None:
            self.transport.close()

    def _stop_keep_alive(self) -> None:
        if self.keep_alive is not None:
            self.keep_alive.cancel()
            self.keep_alive = None

    def close_if_idle(self) -> None:
        if self.idle and self.phase is not Phase.CLOSED:
            self._close()

    def abort(self, why: str) -> None:
        logger.debug("%s: connection reset: %s", self.bridge.spec, why)
        self.phase = Phase.CLOSED
        self._stop_keep_alive()
        if self.transport is not None:
            self.transport.abort()
