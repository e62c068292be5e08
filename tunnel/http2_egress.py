"""``amqp:ADDRESS=>http2:[HOST:]PORT``: serve HTTP/2 streams from messages, on an HTTP/2 backend.

Theory of operation
-------------------
The bridge consumes ``ADDRESS``: each message there is the first of a stream
(protocols.md §2.3), keyed by its (``group_id``, ``reply_to``,
``correlation_id``), never by the number alone, which two ingresses may both
use. It opens a stream on one of its HTTP/2 connections to the backend (a
new connection when those open have no room under the backend's
MAX_CONCURRENT_STREAMS, or after a GOAWAY) and sends the head there; the
first message is then accepted, and the bridge's first message to the
ingress, from its own dynamic address, tells the ingress where the rest of
the stream goes. Everything else of the stream, both ways, is a
:class:`~tunnel.http2_stream.Stream`.

What can happen to the first message:

- the backend connection cannot be made: MODIFIED with delivery-failed, so
  the ingress may send it elsewhere; nothing reached a server;
- more than :data:`MAX_STREAMS` streams open: RELEASED, likewise;
- not a stream's first message (no subject, no ``reply_to``, a stream that
  is open already): REJECTED, naming what is wrong.

Later failures reset the stream: a backend's RST_STREAM reaches the client
with its code; a backend's GOAWAY lets the streams it will still serve
finish, and those it will not are reset with REFUSED_STREAM (which a gRPC
client retries); a backend connection lost resets its streams. A message to
the ingress that is not taken (the ingress is gone) resets the backend's
stream with CANCEL.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import Frame, GoAwayFrame
from proton import Condition, Session

from . import http2_message as m
from . import http_message as hm
from .amqp.handles import ACCEPTED, MODIFIED, REJECTED, RELEASED
from .codec import WireError
from .forwarding import Forwarder
from .http2_glue import H2Glue, local_settings, text_headers, wire
from .http2_ingress import MAX_MESSAGE, REPLY_WINDOW
from .http2_stats import Http2Stats
from .http2_stream import Stream
from .messaging import AmqpHost, MessageReceiver, MessageSender, OutcomeCallback
from .peer_text import PEER_LOG, printable
from .spec import Http2EgressSpec, join_host

logger = logging.getLogger(__name__)

#: Open streams per egress bridge, on all its backend connections.
MAX_STREAMS = 256
#: Streams on one backend connection until its SETTINGS say otherwise.
DEFAULT_CONCURRENT = 100
FRAME_HEADER = 9

Key = tuple[str, str, int]


def client_tls(ca: str) -> ssl.SSLContext:
    """TLS to the backends: verified against ``ca``, ALPN ``h2`` only (RFC 9113 §3.2)."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


class Taken(Protocol):
    """A stream's first message as the bridge took it, until it is settled."""

    @property
    def gone(self) -> bool:
        """The message went with its link or connection: there is nothing to settle."""
        ...

    @property
    def peer(self) -> str:
        """Who sent it, printable, for the log."""
        ...

    def settle(self, outcome: int, why: str = "", error: str = "amqp:invalid-field") -> None:
        """ACCEPTED, RELEASED, MODIFIED (``why``: delivery failed) or REJECTED with
        ``error`` and ``why``."""
        ...


class _Delivered:
    """Through a router: a delivery on the consumer link."""

    __slots__ = ("delivery", "receiver")

    def __init__(self, receiver: MessageReceiver, delivery: Any) -> None:
        self.receiver, self.delivery = receiver, delivery

    @property
    def gone(self) -> bool:
        return self.receiver.closed or self.receiver.host.closed

    @property
    def peer(self) -> str:
        host = self.receiver.host
        if host.closed:
            return "(gone)"
        return printable(host.engine.connection.remote_container or "(unnamed)")

    def settle(self, outcome: int, why: str = "", error: str = "amqp:invalid-field") -> None:
        if outcome == MODIFIED:
            self.receiver.settle(self.delivery, MODIFIED, failed=True, why=why)
        elif outcome == REJECTED:
            condition = Condition(error, printable(why))
            self.receiver.settle(self.delivery, REJECTED, condition=condition)
        else:
            self.receiver.settle(self.delivery, outcome)


class _Forwarded:
    """In direct mode: a message the forwarder handed over, its outcome a callback."""

    __slots__ = ("on_outcome",)

    def __init__(self, on_outcome: OutcomeCallback | None) -> None:
        self.on_outcome = on_outcome

    gone = False
    peer = "a direct-mode peer"

    def settle(self, outcome: int, why: str = "", error: str = "amqp:invalid-field") -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome, f"{error}: {why}" if outcome == REJECTED else why)


class Http2EgressBridge:
    """``amqp:ADDRESS=>http2:HOST:PORT``."""

    def __init__(
        self,
        spec: Http2EgressSpec,
        site_id: str,
        settings: hm.HttpSettings,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.spec = spec
        self.tls = tls
        self.site_id = site_id
        self.settings = settings
        self.links: _Links | _LocalLinks | None = None
        self.active = False
        self.streams: dict[Key, Stream] = {}
        #: Open streams by the ingress address they answer to.
        self.fars: collections.Counter[str] = collections.Counter()
        self.backends: list[BackendConnection] = []
        self.stats = Http2Stats(str(spec))
        self.unreachable = False

    def not_ready(self) -> str | None:
        """Why the bridge cannot take streams yet, if it cannot."""
        return None if self.active else f"consumer for {self.spec.address!r} not active"

    @property
    def busy(self) -> int:
        return len(self.streams) + sum(len(b.waiting) for b in self.backends)

    # -- the router connection ------------------------------------------------------
    def on_router_up(self, host: AmqpHost, session: Session) -> None:
        self.links = _Links(self, host, session)

    def on_router_down(self) -> None:
        self.links = None
        self.active = False
        for stream in list(self.streams.values()):
            stream.reset(h2.errors.ErrorCodes.CANCEL, tell=False)
        for backend in self.backends:
            backend.waiting.clear()
            backend.flush_soon()

    async def stop(self) -> None:
        for backend in list(self.backends):
            backend.close()

    # -- first messages ---------------------------------------------------------------
    def on_request(self, taken: Taken, data: bytes | bytearray) -> None:
        """A stream's first message, through a router or the forwarder."""
        try:
            self._take_request(taken, data)
        except Exception as exc:  # a bug of ours: contained to this stream
            logger.error("%s: a stream's first message failed", self.spec, exc_info=exc)
            if not taken.gone:
                why = f"the tunnel failed taking it: {type(exc).__name__}"
                taken.settle(REJECTED, why, error="amqp:internal-error")

    def _take_request(self, taken: Taken, data: bytes | bytearray) -> None:
        try:
            message = m.decode(data)
            if message.subject is None or not message.reply_to:
                raise WireError("not the first message of a stream: no subject or no reply_to")
            key = (message.group_id, message.reply_to, message.correlation_id)
            if key in self.streams:
                raise WireError(f"stream {message.correlation_id} is open already")
        except WireError as exc:
            self.peer_failure(taken.peer, "bad stream head", str(exc))
            taken.settle(REJECTED, str(exc))
            return
        if self.busy >= MAX_STREAMS:
            taken.settle(RELEASED)
            return
        self.stats.requests += 1
        self.backend().wait(key, message, taken)

    def backend(self) -> BackendConnection:
        """A backend connection with room for one more stream: made if none has."""
        for backend in self.backends:
            if backend.has_room():
                return backend
        backend = BackendConnection(self)
        self.backends.append(backend)
        backend.start()
        return backend

    def on_unreachable(self, backend: BackendConnection, why: str) -> None:
        if not self.unreachable:
            logger.warning("%s: the backend is unreachable: %s", self.spec, why)
        self.unreachable = True
        for _, _, taken in backend.waiting:
            taken.settle(MODIFIED, why)
        backend.waiting.clear()

    def on_reachable(self) -> None:
        if self.unreachable:
            logger.info("%s: the backend answers again", self.spec)
        self.unreachable = False

    # -- the rest of each stream ------------------------------------------------------
    def on_continuation(self, taken: Taken, data: bytes | bytearray) -> None:
        """A later message of a stream, at the bridge's own address."""
        try:
            message = m.decode(data)
        except WireError as exc:
            self.peer_failure(taken.peer, "bad stream message", str(exc))
            taken.settle(REJECTED, str(exc), error="amqp:decode-error")
            return
        self._continue(message)
        taken.settle(ACCEPTED)

    def _continue(self, message: m.StreamMessage) -> None:
        key = (message.group_id, message.reply_to or "", message.correlation_id)
        stream = self.streams.get(key)
        if stream is None:
            return  # a stream over already: late acks and data are dropped
        if message.reset is not None:
            self.stats.resets += 1
        self.stats.request_bytes += len(message.data)
        stream.on_message(message)
        cast(BackendConnection, stream.side).flush_soon()

    def send(self, stream: Stream, message: m.StreamMessage) -> None:
        links = self.links
        if links is None or links.closed:
            asyncio.get_running_loop().call_soon(stream.on_outcome, 0, "no router connection")
            return
        links.send(message, stream.on_outcome)

    def on_far_gone(self, address: str) -> None:
        """Direct mode: the ingress at ``address`` left, so its streams here are
        cancelled at the backend rather than left until it ends them."""
        if not self.fars[address]:
            return
        for key, stream in list(self.streams.items()):
            if key[1] == address:
                stream.reset(h2.errors.ErrorCodes.CANCEL, tell=False)
                cast(BackendConnection, stream.side).flush_soon()

    def serve_locally(self, forwarder: Forwarder) -> None:
        """Direct mode: be one of the consumers of ADDRESS at this process's own listener."""
        self.links = _LocalLinks(self, forwarder)
        self.active = True
        logger.info("%s: consuming %r", self.spec, self.spec.address)

    def peer_failure(self, peer: str, reason: str, why: str) -> None:
        PEER_LOG.log(
            logging.INFO,
            peer,
            reason,
            "%s: %s from %s refused: %s",
            self.spec,
            reason,
            peer,
            printable(why),
        )


class _Links:
    """The consumer of ADDRESS, the dynamic receiver for the rest of each stream, and the
    anonymous sender for everything the bridge sends."""

    def __init__(self, bridge: Http2EgressBridge, host: AmqpHost, session: Session) -> None:
        self.bridge = bridge
        self.reply_to: str | None = None
        spec = bridge.spec
        name = f"{bridge.site_id}-http2-egress-{spec.address}"
        consumer = session.receiver(name)
        consumer.source.address = spec.address
        consumer.target.address = name
        anonymous = session.sender(f"{name}-streams")
        self.streams = MessageSender(anonymous, host)
        anonymous.open()
        continuations = session.receiver(f"{name}-continuations")
        continuations.source.dynamic = True
        self.continuations = MessageReceiver(
            continuations,
            host,
            window=REPLY_WINDOW,
            max_size=MAX_MESSAGE,
            on_message=self.on_continuation,
            on_opened=self.on_continuations_opened,
        )
        continuations.open()
        self.consumer: MessageReceiver | None = None
        self._consumer_link = consumer
        self.host = host
        host.flush_soon()

    @property
    def closed(self) -> bool:
        return self.streams.closed

    def send(self, message: m.StreamMessage, on_outcome: OutcomeCallback) -> None:
        self.streams.send(m.encode(message), on_outcome)

    def on_continuations_opened(self, link: Any) -> None:
        address = link.remote_source.address
        if not address:
            logger.warning("%s: the router gave the stream link no address", self.bridge.spec)
            return
        self.reply_to = address
        # Only now: a first message must be answerable from this address.
        consumer = self._consumer_link
        self.consumer = MessageReceiver(
            consumer,
            self.host,
            window=self.bridge.settings.window,
            max_size=MAX_MESSAGE,
            on_message=self.on_request,
            on_opened=self.on_consuming,
        )
        consumer.open()
        self.host.flush_soon()

    def on_consuming(self, link: Any) -> None:
        self.bridge.active = True
        logger.info("%s: consuming %r", self.bridge.spec, self.bridge.spec.address)

    def on_request(self, delivery: Any, data: bytearray) -> None:
        assert self.consumer is not None
        self.bridge.on_request(_Delivered(self.consumer, delivery), data)

    def on_continuation(self, delivery: Any, data: bytearray) -> None:
        self.bridge.on_continuation(_Delivered(self.continuations, delivery), data)


class _LocalLinks:
    """Direct mode: the bridge is one of the consumers of ADDRESS at this process's own
    forwarder (:mod:`tunnel.forwarding`), and what is sent to its dynamic address comes
    to it there, with no AMQP connection to itself."""

    closed = False

    def __init__(self, bridge: Http2EgressBridge, forwarder: Forwarder) -> None:
        self.bridge = bridge
        self.forwarder = forwarder
        self.reply_to: str | None = forwarder.serve_locally(
            bridge.spec.address, _FirstMessages(bridge), _Continuations(bridge)
        )
        forwarder.on_dynamic_gone(bridge.on_far_gone)

    def send(self, message: m.StreamMessage, on_outcome: OutcomeCallback) -> None:
        destination = self.forwarder.destination(message.to)
        if destination is None:
            why = f"nobody takes messages for {printable(message.to or '')}"
            asyncio.get_running_loop().call_soon(on_outcome, RELEASED, why)
            return
        destination.send(m.encode(message), on_outcome)


class _FirstMessages:
    """The bridge as a consumer of ADDRESS at the forwarder (a ``Destination``)."""

    def __init__(self, bridge: Http2EgressBridge) -> None:
        self.bridge = bridge

    @property
    def credit(self) -> int:
        return max(0, MAX_STREAMS - self.bridge.busy)

    def send(self, data: bytes | bytearray, on_outcome: OutcomeCallback | None = None) -> None:
        self.bridge.on_request(_Forwarded(on_outcome), data)

    def finish(self) -> None:
        pass


class _Continuations:
    """The bridge's dynamic address at the forwarder (a ``Destination``)."""

    #: Each stream bounds what it takes (its window); the messages themselves pass at once.
    credit = 1 << 16

    def __init__(self, bridge: Http2EgressBridge) -> None:
        self.bridge = bridge

    def send(self, data: bytes | bytearray, on_outcome: OutcomeCallback | None = None) -> None:
        self.bridge.on_continuation(_Forwarded(on_outcome), data)

    def finish(self) -> None:
        pass


Waiting = tuple[Key, m.StreamMessage, Taken]


class GoawayFilter:
    """Takes the backend's GOAWAY frames out of its byte stream before h2 sees them.

    h2 closes its connection state on a GOAWAY, after which it refuses every
    frame, including the DATA of the streams the GOAWAY says will still be
    served. So frames are split at their 9-byte headers (parsed by
    hyperframe, h2's own framing) and GOAWAYs are handled here; everything
    else passes on whole. Holds at most one incomplete frame of at most the
    size h2 takes (``max_frame()``); a longer frame, or bytes that are no
    frame, pass on unfiltered from then on, for h2 to refuse.
    """

    __slots__ = ("buffer", "max_frame", "passing")

    def __init__(self, max_frame: Callable[[], int]) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame
        self.passing = False

    def feed(self, data: bytes) -> tuple[bytes, list[GoAwayFrame]]:
        """The bytes for h2, and the GOAWAY frames taken out of them."""
        if self.passing:
            return data, []
        self.buffer += data
        buffer, passed, goaways, start = self.buffer, bytearray(), [], 0
        while len(buffer) - start >= FRAME_HEADER:
            try:
                frame, length = Frame.parse_frame_header(
                    memoryview(buffer)[start : start + FRAME_HEADER]
                )
            except HyperframeError:
                length = -1
            if length < 0 or length > self.max_frame():
                self.passing = True  # h2 refuses what follows; nothing more is ours to filter
                start = len(buffer)
                break
            end = start + FRAME_HEADER + length
            if end > len(buffer):
                break
            if isinstance(frame, GoAwayFrame):
                passed += buffer[:start]
                try:
                    frame.parse_body(memoryview(buffer)[start + FRAME_HEADER : end])
                except HyperframeError:
                    self.passing = True
                    start = len(buffer)
                    break
                goaways.append(frame)
                del buffer[:end]
                start = 0
            else:
                start = end
        passed += buffer[:start]
        del buffer[:start]
        return bytes(passed), goaways


class BackendConnection(H2Glue):
    """One HTTP/2 connection to the backend, carrying many streams."""

    def __init__(self, bridge: Http2EgressBridge) -> None:
        super().__init__(client=True)
        self.bridge = bridge
        #: First messages waiting for the connection: at most the room it has.
        self.waiting: list[Waiting] = []
        self.goaways = GoawayFilter(lambda: self.h2.max_inbound_frame_size)
        self.draining = False
        self._task: asyncio.Task[None] | None = None

    def has_room(self) -> bool:
        if self.draining or self.closed:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        if self.transport is None:
            limit = DEFAULT_CONCURRENT
        return len(self.streams) + len(self.waiting) < min(limit, DEFAULT_CONCURRENT * 10)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        spec = self.bridge.spec
        try:
            loop = asyncio.get_running_loop()
            await loop.create_connection(lambda: self, spec.host, spec.port, ssl=self.bridge.tls)
        except OSError as exc:
            self._gone()
            self.bridge.on_unreachable(
                self, f"cannot connect to {join_host(spec.host, spec.port)}: {exc.strerror or exc}"
            )

    def wait(self, key: Key, message: m.StreamMessage, taken: Taken) -> None:
        self.waiting.append((key, message, taken))
        if self.transport is not None:
            self._open_waiting()

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sealed = transport.get_extra_info("ssl_object")
        if sealed is not None and sealed.selected_alpn_protocol() != "h2":
            cast(asyncio.Transport, transport).abort()
            self._gone()
            self.bridge.on_unreachable(self, "the backend did not choose h2 in the TLS handshake")
            return
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        local_settings(self.h2)
        self.bridge.on_reachable()
        self._open_waiting()

    def _open_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        for key, message, taken in waiting:
            if not taken.gone:  # else gone with its link: the ingress hears of it from the router
                self._open(key, message, taken)
        self.flush()

    def _open(self, key: Key, message: m.StreamMessage, taken: Taken) -> None:
        bridge = self.bridge
        links = bridge.links
        if links is None or links.reply_to is None:
            taken.settle(RELEASED)
            return
        stream_id = self.h2.get_next_available_stream_id()
        stream = Stream(
            self,
            stream_id=stream_id,
            correlation_id=message.correlation_id,
            group_id=bridge.site_id,
            reply_to=links.reply_to,
            far=message.reply_to,
        )
        stream.key = key
        headers = [(k, v) for k, v in message.headers if k != ":protocol"]
        try:
            stream.on_head(wire(headers), message)
        except h2.exceptions.H2Error as exc:
            why = f"the request head cannot be sent as HTTP/2: {exc}"
            bridge.peer_failure(taken.peer, "bad stream head", why)
            taken.settle(REJECTED, why)
            return
        bridge.streams[key] = stream
        bridge.fars[key[1]] += 1
        self.streams[stream_id] = stream
        stream.announce = True
        bridge.stats.request_bytes += len(message.data)
        message.subject = None
        stream.on_message(message)
        taken.settle(ACCEPTED)

    def data_received(self, data: bytes) -> None:
        # Whatever the backend sends, or a bug of ours it provokes, ends this
        # connection and its streams (reset), never the process or other connections.
        try:
            data, goaways = self.goaways.feed(data)
            events = self.h2.receive_data(data)
            for event in events:
                self._on_event(event)
            for goaway in goaways:
                self._on_goaway(goaway.last_stream_id, goaway.error_code)
            self.flush()
        except h2.exceptions.ProtocolError as exc:
            logger.warning("%s: the backend broke HTTP/2: %s", self.bridge.spec, exc)
            self.end()
        except Exception as exc:
            logger.error("%s: the backend connection failed", self.bridge.spec, exc_info=exc)
            self.end()

    def _on_event(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        stats = self.bridge.stats
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            headers = text_headers(event.headers or [])
            status = next((v for k, v in headers if k == ":status"), "")
            stats.count_status(int(status) if status.isdigit() else 0)
            stream.head_out = m.StreamMessage(
                stream.correlation_id, stream.group_id, None, subject=m.RESPONSE, headers=headers
            )
        elif isinstance(event, h2.events.DataReceived):
            if stream is None:
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id or 0
                )
                return
            stats.response_bytes += len(event.data or b"")
            stream.on_h2_data(event.data or b"", event.flow_controlled_length or 0)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.on_h2_end(text_headers(event.headers or []))
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.on_h2_end([])
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stats.resets += 1
            stream.on_h2_reset(int(event.error_code or 0))

    def _on_goaway(self, last_stream_id: int, error_code: int) -> None:
        """The backend serves the streams up to ``last_stream_id`` and no more."""
        logger.info(
            "%s: the backend sent GOAWAY (code %d): streams up to %d finish, later ones "
            "are refused, new ones go on a new connection",
            self.bridge.spec,
            error_code,
            last_stream_id,
        )
        self.draining = True
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
        waiting, self.waiting = self.waiting, []
        for key, message, taken in waiting:
            self.bridge.backend().wait(key, message, taken)
        if not self.streams:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        for stream in list(self.streams.values()):
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        if self.waiting:
            self.bridge.on_unreachable(self, "the backend closed the connection")

    def _gone(self) -> None:
        self.closed = True
        if self in self.bridge.backends:
            self.bridge.backends.remove(self)

    # -- Side ----------------------------------------------------------------------------
    def send(self, stream: Stream, message: m.StreamMessage) -> None:
        self.bridge.send(stream, message)

    def on_reset_before_far(self, stream: Stream, code: int) -> None:
        raise AssertionError("an egress stream knows its ingress from the start")

    def on_stream_over(self, stream: Stream) -> None:
        if stream.stream_id is not None and self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if stream.key is not None and self.bridge.streams.get(stream.key) is stream:
            del self.bridge.streams[stream.key]
            fars = self.bridge.fars
            fars[stream.key[1]] -= 1
            if not fars[stream.key[1]]:
                del fars[stream.key[1]]
        if self.draining and not self.streams:
            self.close()
        self.flush_soon()

    def close(self) -> None:
        self._gone()
        if self.transport is not None:
            try:
                self.h2.close_connection()
                self._write()
            except h2.exceptions.H2Error:
                pass
            self.transport.close()
        elif self._task is not None:
            self._task.cancel()
