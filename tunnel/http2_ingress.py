"""``http2:[HOST:]PORT=>amqp:ADDRESS``: an HTTP/2 server whose streams travel as messages.

Theory of operation
-------------------
Each accepted connection is one :class:`ClientConnection`, an HTTP/2 server
(h2c with prior knowledge, or TLS with ALPN ``h2`` when the bridge has a
certificate). Each request stream becomes a :class:`~tunnel.http2_stream.Stream`
numbered by the bridge (its ``correlation_id``), whose first message, the
request head with whatever data came with it, goes to ``ADDRESS`` on the
bridge's sender: a router hands it to one consumer, so each request may be
served at another site (per-request balancing). The egress that takes it
answers from its own dynamic address, and the rest of the stream, both
ways, goes between the two dynamic addresses on anonymous senders
(protocols.md §2.3).

What can happen to the first message, and what the client gets:

- the egress's first message: the stream is open; its data flows;
- RELEASED or MODIFIED (no egress could take it, or its backend is out of
  reach): sent again at once, then after 50, 100, ... 250 ms, up to
  :data:`~tunnel.http_ingress.MAX_ATTEMPTS` sends, then *unavailable*;
- REJECTED: *unavailable*, with the rejection's error;
- no egress message within ``--http-timeout`` (no consumer: a router grants
  no credit then): *unavailable*.

*Unavailable* is a 503 whose text names the cause, and for a gRPC request
(``content-type: application/grpc...``) a trailers-only answer with
``grpc-status`` 14 (UNAVAILABLE) and that text as ``grpc-message``. Once the
response head has gone to the client, a failure can only reset the stream.
A router connection lost resets the streams it carried (their requests may
have been served), and streams still opening wait for the next connection
within their timeout.

Bounds: :data:`MAX_STREAMS` open streams per bridge (a stream past it is
refused with REFUSED_STREAM, which gRPC retries); :data:`MAX_RESETS` streams a
client may reset per :data:`RESET_PERIOD` (more ends its connection with
ENHANCE_YOUR_CALM: each stream costs a message and a backend stream); and
:data:`~tunnel.http2_stream` windows per stream and connection; headers of at
most :data:`MAX_HEADER_LIST` bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame
from proton import Condition, Session

from . import http2_message as m
from . import http_message as hm
from .amqp.handles import ACCEPTED, MODIFIED, REJECTED, RELEASED
from .bridge import LISTEN_BACKLOG, listening_addresses
from .codec import WireError
from .http2_glue import MAX_HEADER_LIST, H2Glue, local_settings, text_headers, wire
from .http2_stats import Http2Stats
from .http2_stream import CHUNK, Over, Stream
from .http_ingress import MAX_ATTEMPTS, retry_delay
from .messaging import AmqpHost, MessageReceiver, MessageSender
from .peer_text import PEER_LOG, printable
from .spec import Http2IngressSpec

logger = logging.getLogger(__name__)

#: Open streams per ingress bridge, all its clients together.
MAX_STREAMS = 256
#: Streams one client may reset per RESET_PERIOD seconds before its connection ends.
MAX_RESETS = 1000
RESET_PERIOD = 10.0
#: Messages from egresses in flight towards us at once.
REPLY_WINDOW = 256
#: The largest message taken: a chunk and a head.
MAX_MESSAGE = CHUNK + MAX_HEADER_LIST + 4096


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """The ingress's TLS: its certificate, ALPN ``h2`` only, TLS 1.2 or later (RFC 9113 §9.2)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


@dataclass(eq=False, slots=True)
class Opening:
    """A stream whose first message is out, until the egress's first message names it."""

    stream: Stream
    connection: ClientConnection
    #: The request's head with its first data: kept whole until an egress takes it.
    head: m.StreamMessage
    grpc: bool
    attempts: int = 0
    sender: MessageSender | None = None
    timer: asyncio.TimerHandle | None = None
    retry: asyncio.TimerHandle | None = None
    #: The client reset the stream before the egress answered: the egress that
    #: answers is told this code, instead of serving it.
    reset_code: int | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.retry is not None:
            self.retry.cancel()
        if self.sender is not None:
            self.sender.withdraw(self.on_outcome)

    def on_outcome(self, outcome: int, why: str) -> None:
        bridge = self.connection.bridge
        if bridge.openings.get(self.stream.correlation_id) is not self:
            return
        self.sender = None
        if outcome == ACCEPTED:
            return  # the egress's first message follows
        if self.reset_code is not None:
            bridge.forget_opening(self)  # reset, and no egress took it: nobody to tell
            return
        if outcome in (RELEASED, MODIFIED, 0) and self.attempts < MAX_ATTEMPTS:
            delay = retry_delay(self.attempts)
            self.retry = asyncio.get_running_loop().call_later(delay, bridge.send_first, self)
            return
        address = bridge.spec.address
        if outcome == REJECTED:
            text = f"amqp:{address} rejected the request" + (f" ({why})" if why else "")
        else:
            text = f"amqp:{address} did not take the request ({self.attempts} attempts)"
            text += f": {why}" if why else ""
        bridge.unavailable(self, text)


class Http2IngressBridge:
    """``http2:[HOST:]PORT=>amqp:ADDRESS``."""

    def __init__(
        self,
        spec: Http2IngressSpec,
        site_id: str,
        settings: hm.HttpSettings,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.spec = spec
        self.site_id = site_id
        self.settings = settings
        self.max_connections = max_connections
        self.tls = tls
        self.ids = itertools.count(1)
        self.server: asyncio.Server | None = None
        self.links: _Links | None = None
        #: Open streams by correlation id: at most MAX_STREAMS.
        self.streams: dict[int, Stream] = {}
        self.openings: dict[int, Opening] = {}
        self.connections: set[ClientConnection] = set()
        self.stats = Http2Stats(str(spec))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConnection(self),
            host=self.spec.host,
            port=self.spec.port,
            reuse_address=True,
            backlog=LISTEN_BACKLOG,
            ssl=self.tls,
        )
        logger.info("bridge %s listening on %s", self.spec, listening_addresses(self.server))

    def not_ready(self) -> str | None:
        """Why the bridge cannot take requests yet, if it cannot."""
        if self.server is None or not self.server.sockets:
            return f"listener for {self.spec} not bound"
        if self.links is None or self.links.reply_to is None:
            return f"reply address for {self.spec} not assigned"
        return None

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.go_away()

    def busy(self) -> int:
        return len(self.streams)

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    # -- the router connection ------------------------------------------------------
    def on_router_up(self, host: AmqpHost, session: Session) -> None:
        self.links = _Links(self, host, session)

    def on_router_down(self) -> None:
        self.links = None
        for stream in list(self.streams.values()):
            opening = self.openings.get(stream.correlation_id)
            if opening is not None:
                if opening.sender is not None and opening.sender.withdraw(opening.on_outcome):
                    opening.sender = None  # never went out: it waits for the next connection
                    continue
                if opening.sender is None:
                    continue  # waiting already
            self.stats.resets += 1
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR, tell=False)
            stream.side.flush_soon()

    def on_links_ready(self, links: _Links) -> None:
        if links is not self.links:
            return
        for opening in list(self.openings.values()):
            if opening.sender is None and opening.retry is None:
                self.send_first(opening)

    # -- streams ------------------------------------------------------------------
    def open_stream(self, conn: ClientConnection, stream_id: int, headers: m.Headers) -> None:
        if len(self.streams) >= MAX_STREAMS:
            logger.debug("%s: stream refused: %d streams open", self.spec, len(self.streams))
            conn.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.stats.resets += 1
            return
        links = self.links
        correlation_id = next(self.ids)
        stream = Stream(
            conn,
            stream_id=stream_id,
            correlation_id=correlation_id,
            group_id=self.site_id,
            reply_to=(links.reply_to if links else None) or "",
            far=None,
        )
        stream.head_out = m.StreamMessage(
            correlation_id, self.site_id, None, subject=_field(headers, ":method"), headers=headers
        )
        self.streams[correlation_id] = stream
        conn.streams[stream_id] = stream
        conn.new.append(stream)
        self.stats.requests += 1

    def first_message(self, conn: ClientConnection, stream: Stream) -> None:
        """The request's head, with the data that came with it, on its way to ADDRESS."""
        head = stream.next_message()
        head.to = _field(head.headers, ":path")
        grpc = _field(head.headers, "content-type").startswith("application/grpc")
        opening = Opening(stream, conn, head, grpc)
        self.openings[stream.correlation_id] = opening
        opening.timer = asyncio.get_running_loop().call_later(
            self.settings.timeout, self.on_open_timeout, opening
        )
        self.send_first(opening)

    def send_first(self, opening: Opening) -> None:
        opening.retry = None
        if self.openings.get(opening.stream.correlation_id) is not opening:
            return
        links = self.links
        if links is None or links.reply_to is None or links.sender.closed:
            return  # sent when the links are ready, within the timeout
        # This router connection's reply address, whichever the stream began under.
        opening.stream.reply_to = opening.head.reply_to = links.reply_to
        opening.attempts += 1
        opening.sender = links.sender
        links.sender.send(m.encode(opening.head), opening.on_outcome)

    def forget_opening(self, opening: Opening) -> None:
        opening.cancel()
        if self.openings.get(opening.stream.correlation_id) is opening:
            del self.openings[opening.stream.correlation_id]

    def on_reset_before_far(self, stream: Stream, code: int) -> None:
        opening = self.openings.get(stream.correlation_id)
        if opening is None:
            return
        if opening.sender is not None and opening.sender.withdraw(opening.on_outcome):
            opening.sender = None  # it never went out
        if opening.sender is None and opening.retry is None and opening.attempts == 0:
            self.forget_opening(opening)
            return
        # Out (or between attempts): whichever egress answers is told, until the timeout.
        if opening.retry is not None:
            opening.retry.cancel()
            opening.retry = None
        opening.reset_code = code

    def on_open_timeout(self, opening: Opening) -> None:
        opening.timer = None
        if opening.reset_code is not None:
            self.forget_opening(opening)
            return
        within = f"within {self.settings.timeout:g} s"
        if opening.sender is None or opening.sender.withdraw(opening.on_outcome):
            why = f"no consumer of amqp:{self.spec.address} took the request {within}"
        else:
            why = f"no answer from amqp:{self.spec.address} {within}"
        self.unavailable(opening, why)

    def unavailable(self, opening: Opening, why: str) -> None:
        """The request never reached a server: 503, or gRPC's UNAVAILABLE, naming ``why``."""
        opening.cancel()
        self.openings.pop(opening.stream.correlation_id, None)
        stream, conn = opening.stream, opening.connection
        logger.debug("%s: stream %d unavailable: %s", self.spec, stream.correlation_id, why)
        self.stats.count_status(503)
        text = f"Service Unavailable: {why}"
        if stream.over is None and stream.stream_id is not None:
            try:
                if opening.grpc:
                    headers = [
                        (":status", "200"),
                        ("content-type", "application/grpc"),
                        ("grpc-status", "14"),
                        ("grpc-message", quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")),
                    ]
                    conn.h2.send_headers(stream.stream_id, wire(headers), end_stream=True)
                else:
                    headers = [(":status", "503"), ("content-type", "text/plain; charset=utf-8")]
                    conn.h2.send_headers(stream.stream_id, wire(headers))
                    conn.h2.send_data(stream.stream_id, text.encode()[:1024], end_stream=True)
            except h2.exceptions.H2Error:
                pass
        stream.out_pending = bytearray()
        stream.in_done = stream.out_done = True
        stream.flush()
        if stream.over is None:
            stream.reset(h2.errors.ErrorCodes.CANCEL, tell=False)
        conn.flush_soon()

    def on_message(self, message: m.StreamMessage) -> str | None:
        """A message from an egress; what is wrong with it, if anything."""
        stream = self.streams.get(message.correlation_id)
        if stream is None:
            opening = self.openings.get(message.correlation_id)
            if opening is not None and opening.reset_code is not None and message.reply_to:
                # The egress opened a stream the client had already reset: it hears so now.
                self.forget_opening(opening)
                if self.links is not None:
                    reset = m.StreamMessage(
                        message.correlation_id,
                        self.site_id,
                        opening.stream.reply_to,
                        reset=opening.reset_code,
                        to=message.reply_to,
                    )
                    self.links.send(reset, _ignore_outcome)
            return None  # a stream over already: its late acks and data are dropped
        opening = self.openings.pop(message.correlation_id, None)
        if opening is not None:
            opening.cancel()
            if not message.reply_to:
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR, tell=False)
                return "the egress's first message has no reply_to"
        conn = cast(ClientConnection, stream.side)
        if message.subject is not None:
            if message.subject != m.RESPONSE:
                stream.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                conn.flush_soon()
                return f"a response head's subject is {message.subject!r}, not 'response'"
            status = _field(message.headers, ":status")
            self.stats.count_status(int(status) if status.isdigit() else 0)
            try:
                stream.on_head(wire(message.headers), message)
            except h2.exceptions.H2Error as exc:
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                conn.flush_soon()
                return f"the response head cannot be sent as HTTP/2: {exc}"
        self.stats.response_bytes += len(message.data)
        if message.reset is not None:
            self.stats.resets += 1
        stream.on_message(message)
        conn.flush_soon()
        return None

    def on_stream_over(self, stream: Stream) -> None:
        self.streams.pop(stream.correlation_id, None)
        opening = self.openings.get(stream.correlation_id)
        if opening is not None and opening.reset_code is None:
            self.forget_opening(opening)

    def peer_failure(self, reason: str, why: str) -> None:
        PEER_LOG.log(
            logging.WARNING,
            f"amqp:{self.spec.address}",
            reason,
            "%s: %s from amqp:%s: %s",
            self.spec,
            reason,
            self.spec.address,
            printable(why),
        )


def _ignore_outcome(outcome: int, why: str) -> None:
    pass


def _field(headers: m.Headers, name: str) -> str:
    """The value of the (pseudo-)header ``name``, or ``""``."""
    return next((value for key, value in headers if key == name), "")


class _Links:
    """The bridge's sender to ADDRESS, its anonymous sender and its dynamic receiver."""

    def __init__(self, bridge: Http2IngressBridge, host: AmqpHost, session: Session) -> None:
        self.bridge = bridge
        self.reply_to: str | None = None
        name = f"{bridge.site_id}-http2-ingress-{bridge.spec.address}"
        to_address = session.sender(name)
        to_address.target.address = bridge.spec.address
        to_address.source.address = name
        self.sender = MessageSender(to_address, host)
        to_address.open()
        anonymous = session.sender(f"{name}-streams")
        self.streams = MessageSender(anonymous, host)
        anonymous.open()
        replies = session.receiver(f"{name}-replies")
        replies.source.dynamic = True
        self.receiver = MessageReceiver(
            replies,
            host,
            window=REPLY_WINDOW,
            max_size=MAX_MESSAGE,
            on_message=self.on_message,
            on_opened=self.on_reply_opened,
        )
        replies.open()
        host.flush_soon()

    def on_reply_opened(self, link: Any) -> None:
        address = link.remote_source.address
        if not address:
            logger.warning("%s: the router gave the reply link no address", self.bridge.spec)
            return
        self.reply_to = address
        self.bridge.on_links_ready(self)

    def on_message(self, delivery: Any, data: bytearray) -> None:
        # Whatever a message holds, only it is refused: never the router connection.
        try:
            why = self.bridge.on_message(m.decode(data))
        except WireError as exc:
            why = str(exc)
        except Exception as exc:
            why = f"unusable message: {type(exc).__name__}: {exc}"
            logger.debug("%s: %s", self.bridge.spec, printable(why), exc_info=True)
        if why is None:
            self.receiver.settle(delivery, ACCEPTED)
            return
        self.bridge.peer_failure("bad stream message", why)
        self.receiver.settle(
            delivery, REJECTED, condition=Condition("amqp:decode-error", printable(why))
        )

    def send(self, message: m.StreamMessage, on_outcome: Callable[[int, str], None]) -> None:
        self.streams.send(m.encode(message), on_outcome)


class ClientConnection(H2Glue):
    """One client's HTTP/2 connection to an ingress bridge."""

    def __init__(self, bridge: Http2IngressBridge) -> None:
        super().__init__(client=False)
        self.bridge = bridge
        #: Streams begun in the batch being read: their first message leaves after it.
        self.new: list[Stream] = []
        self.peer = "?"
        #: We sent GOAWAY: no new streams, and closed once the last is over.
        self.going_away = False
        #: Streams the client reset since ``resets_since`` (loop time).
        self.resets = 0
        self.resets_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = printable(peername[0])
        bridge = self.bridge
        bridge.connections.add(self)
        if len(bridge.connections) > bridge.max_connections:
            logger.info("%s: connection reset: over the limit", bridge.spec)
            self.abort()
            return
        self.h2.initiate_connection()
        local_settings(self.h2)
        self._write()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            logger.debug("%s: client %s: %s", self.bridge.spec, self.peer, exc)
            self.end()
            return
        try:
            for event in events:
                self._on_event(event)
            for stream in self.new:
                if stream.over is None:
                    self.bridge.first_message(self, stream)
        except Exception as exc:
            PEER_LOG.log(
                logging.WARNING,
                self.peer,
                "http2-ingress",
                "%s: connection from %s reset: %s: %s",
                self.bridge.spec,
                self.peer,
                type(exc).__name__,
                printable(exc),
            )
            logger.debug("%s: failed", self.bridge.spec, exc_info=True)
            self.abort()
            return
        finally:
            self.new.clear()
        self.flush()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            if self.going_away:  # past our GOAWAY's last stream: never served, may be retried
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            headers = text_headers(event.headers or [])
            self.bridge.open_stream(self, event.stream_id, headers)
            return
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            if stream is None:
                # A stream we refused or ended: its window goes back all the same.
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id or 0
                )
                return
            stream.on_h2_data(event.data or b"", event.flow_controlled_length or 0)
            self.bridge.stats.request_bytes += len(event.data or b"")
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.on_h2_end(text_headers(event.headers or []))
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.on_h2_end([])
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            self.bridge.stats.resets += 1
            stream.on_h2_reset(int(event.error_code or 0))
            self._count_reset()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_client_goaway()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.bridge.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        self.streams.clear()

    # -- Side ----------------------------------------------------------------------------
    def send(self, stream: Stream, message: m.StreamMessage) -> None:
        links = self.bridge.links
        if links is None or links.streams.closed:
            # No way to the far end: the message is lost, and with it the stream.
            loop = asyncio.get_running_loop()
            loop.call_soon(stream.on_outcome, 0, "no router connection")
            return
        links.send(message, stream.on_outcome)
        self.flush_soon()

    def on_reset_before_far(self, stream: Stream, code: int) -> None:
        self.bridge.on_reset_before_far(stream, code)

    def on_stream_over(self, stream: Stream) -> None:
        if stream.over is Over.RESET:
            logger.debug("%s: stream %d reset", self.bridge.spec, stream.correlation_id)
        if stream.stream_id is not None and self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.bridge.on_stream_over(stream)
        self.flush_soon()
        if self.going_away and not self.streams and self.transport is not None:
            self._write()
            self.transport.close()

    # -- writing -------------------------------------------------------------------------
    def go_away(self) -> None:
        """Shutting down: tell the client to open no more streams, and close once the
        streams it has are over.

        The GOAWAY is written past h2, which would close its state on sending
        one and refuse every later frame, the answers of the open streams too.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self.going_away:
            return
        self.going_away = True
        self._write()
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.h2.highest_inbound_stream_id
        transport.write(goaway.serialize())
        if not self.streams:
            transport.close()

    def _count_reset(self) -> None:
        """A client that resets the streams it opens faster than :data:`MAX_RESETS` per
        :data:`RESET_PERIOD` makes us work for nothing (each stream costs a message and
        a backend stream): it is told ENHANCE_YOUR_CALM and its connection ends."""
        now = asyncio.get_running_loop().time()
        if now - self.resets_since > RESET_PERIOD:
            self.resets_since, self.resets = now, 0
        self.resets += 1
        if self.resets <= MAX_RESETS or self.transport is None:
            return
        PEER_LOG.log(
            logging.WARNING,
            self.peer,
            "http2-rapid-reset",
            "%s: client %s reset %d streams within %g s: connection closed",
            self.bridge.spec,
            self.peer,
            self.resets,
            RESET_PERIOD,
        )
        self._write()
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.h2.highest_inbound_stream_id
        goaway.error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.transport.write(goaway.serialize())
        self._on_client_goaway()

    def _on_client_goaway(self) -> None:
        """The client is leaving: h2 will take nothing more on this connection."""
        self.end()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
