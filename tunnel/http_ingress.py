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

What a client may ask, and what it may cost us (each answer below closes the
connection after it):

- CONNECT and protocol upgrades (an Upgrade field, h2c) are not carried: 501.
  Any h11 state the loop does not expect ends that one connection.
- Host must be an RFC 9110 ``uri-host[:port]`` (a reg-name, IPv4 or
  ``[IPv6]``), and the target origin-form, absolute-form or ``*``: the Host
  becomes the start of the message's ``to``, where a ``/`` would move the
  path. Otherwise 400.
- A head (request line and fields) of more than :data:`MAX_HEAD` bytes,
  however it arrived: 431.
- Deadlines, each total, not idle: the head must be complete within
  :data:`HEAD_TIMEOUT` seconds (or the request timeout, if shorter) of its
  first byte, and the body within the request timeout (``--http-timeout``)
  of the head; else 408. An idle keep-alive connection is closed after
  :data:`KEEP_ALIVE_TIMEOUT`.
- Content-Length and Transfer-Encoding together: framed by Transfer-Encoding,
  as h11 does, and closed after the answer (RFC 9112 §6.3).
- Write backpressure: one request per connection is answered at a time, and
  the next one is not read while the transport's write buffer is over its
  high-water mark (asyncio's default, 64 KiB). So what one connection holds
  is its request, or one answer plus that mark, whatever it pipelines; a
  client that reads nothing of it for :data:`KEEP_ALIVE_TIMEOUT` is reset.

A response message that is undecodable or malformed is rejected, and one
that cannot be written as HTTP/1.1 (a 1xx, a field name that is no token, a
line break in a value) is not written: its client, where the correlation id
names one, gets 502, and the failure is logged once per reason through
:data:`tunnel.peer_text.PEER_LOG`. An exception while handling one response
or one client connection ends that client only, never the router connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import itertools
import logging
import re
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import urlsplit

import h11
from proton import Condition, Link, Session

from . import http_message as hm
from .amqp.handles import ACCEPTED, MODIFIED, REJECTED, RELEASED
from .bridge import LISTEN_BACKLOG, listening_addresses
from .census import counted
from .codec import WireError
from .messaging import AmqpHost, MessageReceiver, MessageSender
from .peer_text import PEER_LOG, printable
from .spec import HttpIngressSpec

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 11
#: Seconds an idle keep-alive connection is kept open.
KEEP_ALIVE_TIMEOUT = 75.0
#: Responses in flight towards us at once on the reply link.
REPLY_WINDOW = 64
#: The most bytes of one request head (request line and fields), complete or not.
MAX_HEAD = 64 * 1024
#: Seconds from a head's first byte to its end, at most (the request timeout, if shorter).
HEAD_TIMEOUT = 30.0


def retry_delay(attempt: int) -> float:
    """Seconds before send number ``attempt + 1``: at once after the first, then 50 ms more
    each time up to 250 ms (the node proxy's schedule)."""
    return 0.0 if attempt <= 1 else min(0.05 * (attempt - 1), 0.25)


@counted("http_exchanges")
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
        # Whatever the message holds, only it is refused: an exception that
        # reached the engine would drop the router connection and every tunnel on it.
        try:
            why = self.bridge.on_response(hm.decode(data))
        except WireError as exc:
            why = str(exc)
        except Exception as exc:
            why = f"unusable response: {type(exc).__name__}: {exc}"
            logger.debug("%s: %s", self.bridge.spec, printable(why), exc_info=True)
        if why is None:
            self.receiver.settle(delivery, ACCEPTED)
            return
        self.bridge.peer_failure("bad response", why)
        self.receiver.settle(
            delivery, REJECTED, condition=Condition("amqp:decode-error", printable(why))
        )


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

    def on_response(self, message: Any) -> str | None:
        """Answer the exchange ``message`` is for; what is wrong with it, if anything."""
        correlation_id = message.correlation_id
        exchange = self.exchanges.get(correlation_id) if isinstance(correlation_id, int) else None
        if exchange is None:
            logger.debug(
                "%s: a response for %s, which nobody awaits", self.spec, printable(correlation_id)
            )
            return None
        why: str | None = None
        try:
            response = hm.response_of(message)
        except Exception as exc:  # WireError, and anything else a hostile shape provokes
            why = str(exc) if isinstance(exc, WireError) else f"{type(exc).__name__}: {exc}"
            response = hm.plain_response(
                502, f"Bad Gateway: unusable response from amqp:{self.spec.address}: {why}"
            )
        exchange.finish(response)
        return why

    def peer_failure(self, reason: str, why: str) -> None:
        """A peer-caused failure, logged once per reason and then counted."""
        PEER_LOG.log(
            logging.WARNING,
            f"amqp:{self.spec.address}",
            reason,
            "%s: %s from amqp:%s refused: %s",
            self.spec,
            reason,
            self.spec.address,
            printable(why),
        )


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# RFC 9110 §4.2.3 / RFC 3986 §3.2.2: uri-host [ ":" port ].
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_IPV_FUTURE = re.compile(r"v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+")
_PORT = re.compile(r"[0-9]*")


def valid_host(host: str) -> bool:
    """Whether ``host`` is ``uri-host[:port]``: a reg-name, IPv4 or ``[IPv6]``, then a port.

    A reg-name cannot hold ``/``, ``?``, ``#`` or ``@``, so the Host can never
    move or extend the path when it heads the message's ``to``.
    """
    if host.startswith("["):
        literal, bracket, rest = host[1:].partition("]")
        if not bracket or not (rest == "" or (rest[0] == ":" and _PORT.fullmatch(rest[1:]))):
            return False
        if _IPV_FUTURE.fullmatch(literal):
            return True
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return "%" not in literal  # a zone id is not in the URI grammar
    name, _, port = host.partition(":")
    # An IPv4 address is a reg-name too, as far as the characters go.
    return _REG_NAME.fullmatch(name) is not None and _PORT.fullmatch(port) is not None


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


class Deadline(enum.Enum):
    """What the one timer of a connection is waiting for."""

    #: Idle between requests: closed quietly.
    KEEP_ALIVE = "keep-alive"
    #: A head started and must end: 408.
    HEAD = "head"
    #: A body started and must end: 408.
    BODY = "body"
    #: The client reads nothing of its answers (idle, not total): reset.
    WRITE = "write"
    #: Drained after a closing answer: closed.
    LINGER = "linger"


#: Seconds a connection is drained after a closing answer, at most.
LINGER = 2.0


class HttpServerConnection(asyncio.Protocol):
    """One client connection to an HTTP ingress bridge."""

    def __init__(self, bridge: HttpIngressBridge) -> None:
        self.bridge = bridge
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.phase = Phase.READING
        self.transport: asyncio.Transport | None = None
        #: The client's address, for the log.
        self.peer = "?"
        self.head: h11.Request | None = None
        #: Bounded by ``max_body`` (413 beyond it).
        self.body = bytearray()
        self.exchange: Exchange | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: Deadline | None = None
        #: The transport's write buffer is over its high-water mark: no next request.
        self.write_paused = False
        self.said_write_paused = False
        #: Bytes still to write when the write deadline was last armed.
        self.write_left = 0
        #: This request's answer ends the connection (ambiguous framing).
        self.close_after = False

    @property
    def idle(self) -> bool:
        """No request is being received or answered."""
        return self.phase is not Phase.ANSWERING and self.h11.their_state is not h11.SEND_BODY

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = printable(peername[0])
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
        self._guarded("accepting", self._advance)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.DRAINING:
            return
        self._guarded("reading a request", self._receive, data)

    def eof_received(self) -> bool:
        if self.phase is Phase.DRAINING:
            self._close()
            return True
        self._guarded("reading a request", self._receive, b"")
        return True  # an answer may still be due

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self.bridge.connections.discard(self)
        self._stop_timer()
        if self.exchange is not None:
            self.exchange.abandon()
            self.exchange = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if not self.said_write_paused:
            self.said_write_paused = True
            logger.debug(
                "%s: client %s does not read its answers as fast: its next request waits",
                self.bridge.spec,
                self.peer,
            )

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.deadline is Deadline.WRITE:
            self._stop_timer()
        if self.phase is Phase.READING:
            self._guarded("reading a request", self._advance)

    def _guarded(self, what: str, step: Callable[..., None], *args: Any) -> None:
        """Run ``step``; whatever it raises ends this one connection, not the process."""
        try:
            step(*args)
        except Exception as exc:
            PEER_LOG.log(
                logging.WARNING,
                self.peer,
                f"http-ingress {what}",
                "%s: connection from %s reset: %s failed: %s: %s",
                self.bridge.spec,
                self.peer,
                what,
                type(exc).__name__,
                printable(exc),
            )
            logger.debug("%s: %s failed", self.bridge.spec, what, exc_info=True)
            self.abort(f"{what} failed")

    # -- requests ---------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        if data and self.h11.their_state is h11.IDLE:
            # A head has started: from now on its deadline is total, not re-armed per byte.
            self._arm(Deadline.HEAD)
        self.h11.receive_data(data)
        self._advance()

    def _advance(self) -> None:
        """Act on what h11 has parsed, until it needs more bytes or an answer is due."""
        while self.phase is Phase.READING:
            if self.write_paused and self.h11.their_state is h11.IDLE:
                # The next request waits, in the socket, until the client reads.
                assert self.transport is not None
                self.transport.pause_reading()
                if self.deadline is not Deadline.WRITE:
                    self.write_left = self.transport.get_write_buffer_size()
                    self._arm(Deadline.WRITE)
                return
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self._refuse(status, f"{HTTPStatus(status).phrase}: {exc}")
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
            else:
                # PAUSED (a protocol switch h11 thinks may come) or anything newer:
                # never waited on, or the loop would spin.
                self.abort(
                    f"unexpected HTTP state: {event!r} "
                    f"(client {self.h11.their_state!r}, server {self.h11.our_state!r})"
                )
                return

    def _on_need_data(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()
        state = self.h11.their_state
        if state is h11.IDLE:
            if self.deadline is not Deadline.HEAD:
                # Part of a pipelined head may wait in h11's buffer already.
                started = bool(self.h11.trailing_data[0])
                self._arm(Deadline.HEAD if started else Deadline.KEEP_ALIVE)
        elif state is h11.SEND_BODY:
            self._arm(Deadline.BODY)

    def _on_request_head(self, head: h11.Request) -> None:
        self._stop_timer()
        self.head = head
        self.body = bytearray()
        # What the head took on the wire, give or take its whitespace: h11 bounds
        # only heads still incomplete, not one that arrived whole in a read.
        size = len(head.method) + len(head.target) + 12
        size += sum(len(name) + len(value) + 4 for name, value in head.headers)
        if size > MAX_HEAD:
            self._refuse(
                431, f"Request Header Fields Too Large: the head is limited to {MAX_HEAD} bytes"
            )
            return
        names = {name for name, _ in head.headers}
        if head.method == b"CONNECT":
            self._refuse(501, "Not Implemented: CONNECT is not carried by this bridge")
            return
        if b"upgrade" in names or b"http2-settings" in names:
            self._refuse(501, "Not Implemented: protocol upgrades are not carried by this bridge")
            return
        target = head.target.decode("latin-1")
        absolute = target.lower().startswith(("http://", "https://"))
        if not (
            target.startswith("/") or absolute or (target == "*" and head.method == b"OPTIONS")
        ):
            self._refuse(400, f"Bad Request: request target {printable(target)} is not a path")
            return
        if absolute:
            host: str | None = urlsplit(target).netloc
        else:
            host = next((v.decode("latin-1") for k, v in head.headers if k == b"host"), None)
        if host is not None and not valid_host(host):
            self._refuse(400, f"Bad Request: Host {printable(host)} is not host[:port]")
            return
        chunked = b"transfer-encoding" in names
        # Both framings: h11 goes by Transfer-Encoding, and so do we, but an
        # intermediary may have read the other one (RFC 9112 §6.3).
        self.close_after = chunked and b"content-length" in names
        length = (
            0 if chunked else next((int(v) for k, v in head.headers if k == b"content-length"), 0)
        )
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
        self._refuse(
            413,
            f"Content Too Large: request bodies are limited to "
            f"{self.bridge.settings.max_body} bytes",
        )

    def _refuse(self, status: int, text: str) -> None:
        """Answer a request we will not forward, and close."""
        logger.debug("%s: client %s refused: %d %s", self.bridge.spec, self.peer, status, text)
        self._stop_timer()
        self.body = bytearray()
        self._answer(hm.plain_response(status, text), close=True)

    def _on_request_end(self) -> None:
        head = self.head
        assert head is not None and self.transport is not None
        self._stop_timer()
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

    # -- deadlines ----------------------------------------------------------------
    def _arm(self, deadline: Deadline) -> None:
        """Start ``deadline``'s timer, unless it runs already: deadlines are never re-armed."""
        if self.deadline is deadline:
            return
        self._stop_timer()
        timeout = self.bridge.settings.timeout
        seconds = {
            Deadline.KEEP_ALIVE: KEEP_ALIVE_TIMEOUT,
            Deadline.HEAD: min(HEAD_TIMEOUT, timeout),
            Deadline.BODY: timeout,
            Deadline.WRITE: KEEP_ALIVE_TIMEOUT,
            Deadline.LINGER: LINGER,
        }[deadline]
        self.deadline = deadline
        self.timer = asyncio.get_running_loop().call_later(seconds, self._on_deadline, seconds)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadline = None

    def _on_deadline(self, seconds: float) -> None:
        deadline, self.deadline, self.timer = self.deadline, None, None
        if deadline is Deadline.KEEP_ALIVE:
            self.close_if_idle()
        elif deadline in (Deadline.HEAD, Deadline.BODY) and self.phase is Phase.READING:
            assert deadline is not None
            self._guarded(
                "timing out a request",
                self._refuse,
                408,
                f"Request Timeout: the request {deadline.value} did not arrive "
                f"within {seconds:g} s",
            )
        elif deadline is Deadline.WRITE:
            # Idle, not total: a slow reader of a big answer is still reading.
            left = self.transport.get_write_buffer_size() if self.transport is not None else 0
            if left < self.write_left:
                self.write_left = left
                self._arm(Deadline.WRITE)
            else:
                self.abort(f"the client read none of its answer for {seconds:g} s")
        elif deadline is Deadline.LINGER:
            self._close()

    # -- answers ----------------------------------------------------------------
    def on_response(self, response: hm.HttpResponse) -> None:
        self.exchange = None
        if self.phase is Phase.CLOSED:
            return
        self._guarded("answering", self._on_response, response)

    def _on_response(self, response: hm.HttpResponse) -> None:
        self._answer(response, close=self.bridge.stopping or self.close_after)
        if self.phase is not Phase.ANSWERING:
            return  # closed or draining
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.phase = Phase.READING
            self.h11.start_next_cycle()
            self._advance()
        else:
            self.abort(
                f"unexpected HTTP state after an answer "
                f"(client {self.h11.their_state!r}, server {self.h11.our_state!r})"
            )

    def _head_of(self, response: hm.HttpResponse, method: str, close: bool) -> h11.Response:
        """The h11 head for ``response``; h11 raises LocalProtocolError on what HTTP cannot say."""
        headers = hm.wire_headers(response.headers)
        if not hm.is_bodyless(method, response.status):
            headers.append((b"content-length", str(len(response.body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        return h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )

    def _answer(self, response: hm.HttpResponse, *, close: bool) -> None:
        """Send ``response``; close afterwards if asked or if h11 says the connection is done."""
        method = self.head.method.decode("latin-1") if self.head is not None else "GET"
        try:
            head = self._head_of(response, method, close)
        except h11.LocalProtocolError as exc:
            # A 1xx, a field name that is not a token, a value with a line break...
            why = f"it cannot be written as HTTP/1.1: {exc}"
            self.bridge.peer_failure("unwritable response", why)
            response = hm.plain_response(
                502, f"Bad Gateway: the response from amqp:{self.bridge.spec.address} {why}"
            )
            head = self._head_of(response, method, close)
        bodyless = hm.is_bodyless(method, response.status)
        try:
            # h11 passes the body through: written as it is, never copied into the head.
            parts = self._send(head)
            if response.body and not bodyless:
                parts += self._send(h11.Data(data=response.body))
            parts += self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            logger.info("%s: cannot send the response: %s", self.bridge.spec, printable(exc))
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
        self._arm(Deadline.LINGER)

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> None:
        if self.idle and self.phase is not Phase.CLOSED:
            self._close()

    def abort(self, why: str) -> None:
        logger.debug("%s: connection from %s reset: %s", self.bridge.spec, self.peer, why)
        self.phase = Phase.CLOSED
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()
