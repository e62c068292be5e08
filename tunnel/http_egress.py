"""``amqp:ADDRESS=>http:[HOST:]PORT``: answer request messages from an HTTP/1.1 server.

Each request message (protocols.md §2.2) is carried to the backend over a
pool of keep-alive connections (h11 as the client), and the whole response
goes back as one message to the request's ``reply_to``, ``correlation_id``
echoed. The request delivery is settled only after that:

- response sent: ACCEPTED, after the response message is handed to AMQP;
- the backend cannot be reached (connect refused or failed): MODIFIED with
  delivery-failed, so the ingress may retry, perhaps elsewhere; the request
  never reached any server, so retrying is safe;
- the backend took the request but failed (closed early, answered badly,
  answered more than the size limit): a 502 response, and ACCEPTED;
- no answer within the timeout: a 504 response, and ACCEPTED. Neither is
  retried: the backend may have acted on the request.
- a message that is not a request (undecodable, no method, no ``reply_to``,
  a correlation id no answer can carry): REJECTED, naming what is wrong;
- a request that is malformed (a header that is no header, a Content-Length
  that is not its body's, a target that is no target): a 400 response, and
  ACCEPTED, the backend not contacted;
- CONNECT: a 501 response, and ACCEPTED, the backend not contacted. It would
  turn the backend connection into a tunnel, which a message per request
  cannot carry. An Upgrade field is hop-by-hop and never reaches the
  backend, so such a request is served as plain HTTP/1.1.
- anything else going wrong while one request is handled (a bug of ours, an
  h11 state the loop does not expect): that request alone gets a 502, or is
  REJECTED if it cannot be answered, and the failure is logged once with its
  traceback. The AMQP connection, its other requests and its tunnels go on.

Peer-caused failures are logged through :data:`tunnel.peer_text.PEER_LOG`:
once per peer and reason, then counted.

Bounds, per consumer link:

- at most ``window`` requests in hand (credit, the one being received, and
  those received and not yet settled), so never more credit than ``window``;
- at most ``held_budget`` bytes of requests held (:attr:`HttpSettings.held_budget`:
  64 MiB by default, at least one message of the largest size), plus the one
  being received: credit is topped up only while one more of the largest
  fits, and a request that arrives on earlier credit and does not fit is
  released (see :class:`HeldReceiver`). A request's message is dropped once
  read: what is held is its body, once, until it is answered.

A reused keep-alive connection that the backend had closed meanwhile fails
before any response byte; such a request is sent once more on a fresh
connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from proton import Condition, Link, Message, Session

from . import http_message as hm
from .amqp.handles import ACCEPTED, MODIFIED, REJECTED, RELEASED
from .census import counted
from .codec import WireError
from .messaging import AmqpHost, MessageReceiver, MessageSender
from .peer_text import PEER_LOG, printable
from .spec import HttpEgressSpec, join_host

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
#: Methods that would make the backend connection a tunnel (RFC 9110 §9.3.6).
_TUNNEL_METHODS = frozenset({"CONNECT"})


class UnreachableError(Exception):
    """No connection to the backend could be made: the request never left."""


class BackendError(Exception):
    """The backend took the request but gave no usable response."""


class _StaleError(Exception):
    """A reused connection was closed by the backend before any response byte."""


class RequestError(Exception):
    """The request cannot be written as HTTP/1.1 (h11 refused it): the request's fault."""


@counted("http_backend_connections")
class BackendConnection:
    """One keep-alive HTTP/1.1 connection to the backend."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        self.writer.close()

    async def exchange(
        self, request: hm.HttpRequest, default_host: str, max_body: int
    ) -> hm.HttpResponse:
        self.writer.writelines(self._encode(request, default_host))
        return await self._response(max_body)

    def _encode(self, request: hm.HttpRequest, default_host: str) -> list[bytes]:
        """The request's bytes, the body passed through uncopied."""
        conn = self.h11
        headers = list(request.headers)
        if request.host is None:
            headers.append(("host", default_host))
        if hm.has_body(request.method, request.body):
            headers.append(("content-length", str(len(request.body))))
        try:
            parts = (
                conn.send_with_data_passthrough(
                    h11.Request(
                        method=hm.wire_bytes(request.method),
                        target=hm.wire_bytes(request.target),
                        # As bytes: h11 would encode str as ASCII, and obs-text is latin-1.
                        headers=hm.wire_headers(headers),
                    )
                )
                or []
            )
            if request.body:
                parts += conn.send_with_data_passthrough(h11.Data(data=request.body)) or []
            parts += conn.send_with_data_passthrough(h11.EndOfMessage()) or []
        except h11.LocalProtocolError as exc:
            raise RequestError(f"request cannot be sent as HTTP/1.1: {exc}") from None
        return parts

    async def _response(self, max_body: int) -> hm.HttpResponse:
        conn = self.h11
        head: h11.Response | None = None
        #: Bounded by ``max_body``, checked as each piece comes.
        body = bytearray()
        read = 0
        # Every branch either awaits, or ends the request; anything else is an error, so
        # that no event or state h11 may yet return (PAUSED, after a CONNECT or an
        # Upgrade) can turn this loop into a spin.
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BackendError(f"malformed response from the backend: {exc}") from None
            if event is h11.NEED_DATA:
                read = await self._receive(read)
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: nothing to carry
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise BackendError(f"response body over the limit of {max_body} bytes")
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                return hm.HttpResponse(
                    status=head.status_code, headers=hm.end_to_end(head.headers), body=bytes(body)
                )
            elif isinstance(event, h11.ConnectionClosed):
                raise BackendError("backend closed the connection mid-response")
            else:
                raise BackendError(
                    f"unexpected {type(event).__name__} from h11 "
                    f"(client {conn.our_state}, server {conn.their_state})"
                )

    async def _receive(self, reads: int) -> int:
        """Read once more from the backend into h11; ``reads`` counts the reads so far,
        -1 once the backend closed. Returns the new count."""
        if reads < 0:
            raise BackendError("backend closed the connection mid-response")
        try:
            chunk = await self.reader.read(READ_SIZE)
        except OSError as exc:
            if not reads:
                raise _StaleError(str(exc)) from None
            raise BackendError(f"backend connection failed: {exc}") from None
        if not chunk and not reads:
            raise _StaleError("closed before responding")
        self.h11.receive_data(chunk)
        return reads + 1 if chunk else -1


class BackendPool:
    """Keep-alive connections to one backend, reused one request at a time."""

    def __init__(self, host: str, port: int, max_idle: int) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle: list[BackendConnection] = []
        self.host_header = join_host(host, port)

    async def _connect(self) -> BackendConnection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise UnreachableError(
                f"cannot connect to {self.host_header}: {exc.strerror or exc}"
            ) from None
        return BackendConnection(reader, writer)

    async def exchange(self, request: hm.HttpRequest, max_body: int) -> hm.HttpResponse:
        while self.idle:
            conn = self.idle.pop()
            try:
                return await self._use(conn, request, max_body)
            except _StaleError:
                continue
        try:
            return await self._use(await self._connect(), request, max_body)
        except _StaleError as exc:
            raise BackendError(
                f"backend closed the connection without a response ({exc})"
            ) from None

    async def _use(
        self, conn: BackendConnection, request: hm.HttpRequest, max_body: int
    ) -> hm.HttpResponse:
        done = False
        try:
            response = await conn.exchange(request, self.host_header, max_body)
            done = True
            return response
        finally:
            if done and conn.reusable and len(self.idle) < self.max_idle:
                conn.h11.start_next_cycle()
                self.idle.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


@dataclass(frozen=True, slots=True)
class Asker:
    """Where the answer to one request goes: all that is kept of the request's message
    once it is read, so that the message's copies of the body go at once."""

    reply_to: str
    #: As :func:`http_message.answer_id` made it: one a response can carry.
    correlation_id: object

    @classmethod
    def of(cls, message: Message) -> Asker | None:
        """Whom ``message`` asks to be answered, if an answer could reach and match it."""
        reply_to = message.reply_to
        correlation_id = hm.answer_id(message.correlation_id)
        if not isinstance(reply_to, str) or not reply_to or correlation_id is None:
            return None
        return cls(reply_to, correlation_id)


class HttpEgressBridge:
    """``amqp:ADDRESS=>http:HOST:PORT``."""

    def __init__(self, spec: HttpEgressSpec, site_id: str, settings: hm.HttpSettings) -> None:
        self.spec = spec
        self.site_id = site_id
        self.settings = settings
        self.pool = BackendPool(spec.host, spec.port, max_idle=settings.window)
        self.tasks: set[asyncio.Task[Message | None]] = set()
        #: Logged once per change, not once per request.
        self.unreachable = False
        #: Why, for the ingress's 502 once no egress took the request.
        self.unreachable_why = ""

    async def serve(self, asker: Asker, parsed: hm.HttpRequest) -> Message | None:
        """The response message to ``asker`` for the request ``parsed``; None when the
        backend could not be reached."""
        try:
            response = await asyncio.wait_for(
                self.pool.exchange(parsed, self.settings.max_body), self.settings.timeout
            )
        except RequestError as exc:
            logger.debug("%s: %s: %s", self.spec, parsed.method, exc)
            response = hm.plain_response(400, f"Bad Request: {exc}")
        except UnreachableError as exc:
            if not self.unreachable:
                logger.warning("%s: the backend is unreachable: %s", self.spec, exc)
            self.unreachable = True
            self.unreachable_why = str(exc)
            logger.debug("%s: %s %s: %s", self.spec, parsed.method, parsed.target, exc)
            return None
        except BackendError as exc:
            logger.debug("%s: %s %s: %s", self.spec, parsed.method, parsed.target, exc)
            response = hm.plain_response(
                502, f"Bad Gateway: backend {self.pool.host_header}: {exc}"
            )
        except TimeoutError:
            logger.debug(
                "%s: %s %s: no response within %gs",
                self.spec,
                parsed.method,
                parsed.target,
                self.settings.timeout,
            )
            response = hm.plain_response(
                504,
                f"Gateway Timeout: {self.spec.host}:{self.spec.port} gave no response "
                f"within {self.settings.timeout:g} s",
            )
        else:
            if self.unreachable:
                logger.info("%s: the backend answers again", self.spec)
            self.unreachable = False
        return self.answer(asker, parsed.method, response)

    def answer(self, asker: Asker, method: str, response: hm.HttpResponse) -> Message:
        """The message that answers ``asker``'s ``method`` request with ``response``."""
        return hm.response_message(
            response,
            to=asker.reply_to,
            correlation_id=asker.correlation_id,
            site_id=self.site_id,
            bodyless=hm.is_bodyless(method, response.status),
        )

    def consume(
        self,
        link: Link,
        host: AmqpHost,
        reply: Callable[[str, bytes], bool],
        on_opened: Callable[[Link], None] | None = None,
    ) -> None:
        """Open ``link`` and serve the requests on it; ``reply(to, message)`` sends a response."""
        RequestServer(self, link, host, reply, on_opened)
        link.open()
        host.flush_soon()

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pool.close()


class HeldReceiver(MessageReceiver):
    """A :class:`MessageReceiver` whose requests in hand are bounded in bytes as well.

    ``held`` counts the bytes of the requests handed on and not yet settled.
    Credit is topped up to the window only while one more message of the
    largest size fits beside them in ``budget``. A request that arrives on
    credit given earlier and does not fit is released, for the sender to
    offer again later or to another consumer; each release uses up a credit,
    so releases stop once the credit given out is spent. Held bytes stay
    within ``budget``, and one more message may be arriving.
    """

    def __init__(
        self,
        link: Link,
        host: AmqpHost,
        *,
        window: int,
        max_size: int,
        budget: int,
        on_message: Callable[[Any, bytearray], None],
        on_opened: Callable[[Link], None] | None = None,
    ) -> None:
        # Never less than one message of the largest size: an empty hand takes any.
        self.held_budget = max(budget, max_size)
        self.held = 0
        #: Bytes of each request handed on and not yet settled: at most ``window`` entries.
        self.sizes: dict[Any, int] = {}
        super().__init__(
            link, host, window=window, max_size=max_size, on_message=on_message, on_opened=on_opened
        )

    def hold(self, delivery: Any, size: int) -> bool:
        """Keep ``delivery``, of ``size`` bytes, if it fits in the budget; False: release it."""
        if self.held + size > self.held_budget:
            return False
        self.sizes[delivery] = size
        self.held += size
        return True

    def settle(
        self,
        delivery: Any,
        outcome: int,
        *,
        failed: bool = False,
        condition: Condition | None = None,
        why: str | None = None,
    ) -> None:
        self.held -= self.sizes.pop(delivery, 0)
        super().settle(delivery, outcome, failed=failed, condition=condition, why=why)

    def top_up(self) -> None:
        if self.held + self.max_size <= self.held_budget:
            super().top_up()


def _refusal(request: Message, parsed: hm.HttpRequest) -> str | None:
    """Why ``request`` is not carried to the backend, if it is not."""
    # An Upgrade field needs no refusal here: it is hop-by-hop, so it never
    # reaches the backend, which then answers in HTTP/1.1 (RFC 9110 §7.8).
    if parsed.method in _TUNNEL_METHODS:
        return f"Not Implemented: {parsed.method} is not carried by this tunnel"
    return None


def _peer_of(host: AmqpHost) -> str:
    """The AMQP peer a request came from, as it named itself, for the log."""
    if host.closed:
        return "(gone)"
    return printable(host.engine.connection.remote_container or "(unnamed)")


@counted("http_request_links")
class RequestServer:
    """The requests of one receiver link, each served and then settled.

    Whatever goes wrong with one request stays with that request: it is answered
    (400, 501, 502) or rejected, and the link, the connection and the other
    requests go on.
    """

    def __init__(
        self,
        bridge: HttpEgressBridge,
        link: Link,
        host: AmqpHost,
        reply: Callable[[str, bytes], bool],
        on_opened: Callable[[Link], None] | None,
    ) -> None:
        self.bridge = bridge
        self.reply = reply
        settings = bridge.settings
        self.receiver = HeldReceiver(
            link,
            host,
            window=settings.window,
            max_size=settings.max_message,
            budget=settings.held_budget,
            on_message=self.on_request,
            on_opened=on_opened,
        )

    def on_request(self, delivery: Any, data: bytearray) -> None:
        if not self.receiver.hold(delivery, len(data)):
            peer = _peer_of(self.receiver.host)
            PEER_LOG.log(
                logging.INFO,
                peer,
                "held-budget",
                "%s: request from %s released: %d bytes of requests already in hand",
                self.bridge.spec,
                peer,
                self.receiver.held,
            )
            self.receiver.settle(delivery, RELEASED)
            return
        asker: Asker | None = None
        method: str | None = None
        try:
            message = hm.decode(data)
            asker = Asker.of(message)
            subject = message.subject
            # A message without a method is no HTTP request: there is no one to answer 400.
            method = subject if isinstance(subject, str) and subject else None
            if not isinstance(message.reply_to, str) or not message.reply_to:
                raise WireError("no reply_to to answer to")
            if asker is None:
                raise WireError(
                    f"correlation id {printable(repr(message.correlation_id), 80)} cannot be "
                    "echoed: it is not a ulong, uuid, binary or string"
                )
            parsed = hm.request_of(message)
            refusal = _refusal(message, parsed)
            del message  # its body is parsed's now; proton's copy need not wait for the answer
            if refusal is not None:
                self.answer_with(delivery, asker, parsed.method, hm.plain_response(501, refusal))
                return
            task = asyncio.get_running_loop().create_task(self.bridge.serve(asker, parsed))
        except WireError as exc:
            self.refuse(delivery, asker if method is not None else None, method or "", exc)
            return
        except Exception as exc:  # a bug of ours: it must not reach the connection
            self.failed(delivery, asker, exc)
            return
        self.bridge.tasks.add(task)
        answer_to = asker
        task.add_done_callback(lambda done: self.on_served(delivery, answer_to, done))

    def refuse(self, delivery: Any, asker: Asker | None, method: str, exc: WireError) -> None:
        """A message that is no request is rejected; a malformed request is answered 400."""
        spec = self.bridge.spec
        peer = _peer_of(self.receiver.host)
        PEER_LOG.log(
            logging.INFO,
            peer,
            "bad-http-request",
            "%s: refused a request from %s: %s",
            spec,
            peer,
            printable(exc),
        )
        logger.debug("%s: request refused: %s", spec, printable(exc))
        try:
            if asker is not None and self.answer_with(
                delivery, asker, method, hm.plain_response(400, f"Bad Request: {exc}")
            ):
                return
            self.receiver.settle(
                delivery, REJECTED, condition=Condition("amqp:invalid-field", str(exc))
            )
        except Exception as failure:  # a bug of ours: contained to this request
            self.failed(delivery, None, failure)

    def failed(self, delivery: Any, asker: Asker | None, exc: BaseException) -> None:
        """Handling one request raised: log it once, with its traceback, and answer 502
        if the request can be answered, else reject it."""
        spec = self.bridge.spec
        if PEER_LOG.log(
            logging.ERROR,
            _peer_of(self.receiver.host),
            f"http-egress-failure:{type(exc).__name__}",
            "%s: serving a request failed: %s",
            spec,
            printable(repr(exc)),
        ):
            logger.error("%s: the failure's traceback", spec, exc_info=exc)
        receiver = self.receiver
        if receiver.closed or receiver.host.closed or delivery not in receiver.sizes:
            return  # gone with its link, or settled before the failure
        why = f"the tunnel failed serving it: {type(exc).__name__}"
        if asker is not None:
            try:
                if self.answer_with(
                    delivery, asker, "", hm.plain_response(502, f"Bad Gateway: {why}")
                ):
                    return
            except Exception:  # the answer fails too: rejected instead, below
                logger.debug("%s: the 502 could not be sent either", spec, exc_info=True)
        if delivery in receiver.sizes:
            receiver.settle(delivery, REJECTED, condition=Condition("amqp:internal-error", why))

    def answer_with(
        self, delivery: Any, asker: Asker, method: str, response: hm.HttpResponse
    ) -> bool:
        """Answer ``asker`` with ``response``; see :meth:`send`."""
        return self.send(delivery, asker, self.bridge.answer(asker, method, response))

    def send(self, delivery: Any, asker: Asker, response: Message) -> bool:
        """Send ``response`` to ``asker`` and accept ``delivery``; False, and nothing
        settled, if there is no way to reply."""
        if not self.reply(asker.reply_to, hm.encode(response)):
            return False
        self.receiver.settle(delivery, ACCEPTED)
        return True

    def on_served(self, delivery: Any, asker: Asker, task: asyncio.Task[Message | None]) -> None:
        self.bridge.tasks.discard(task)
        if task.cancelled():
            return
        if self.receiver.closed or self.receiver.host.closed:
            return  # the delivery went with its link; the far end will retry or fail
        try:
            exc = task.exception()
            if exc is not None:
                self.failed(delivery, asker, exc)
                return
            response = task.result()
            if response is None:
                self.receiver.settle(
                    delivery, MODIFIED, failed=True, why=self.bridge.unreachable_why
                )
            elif not self.send(delivery, asker, response):
                self.receiver.settle(
                    delivery,
                    REJECTED,
                    condition=Condition(
                        "amqp:not-found", f"no way to reply to {printable(asker.reply_to)!r}"
                    ),
                )
        except Exception as failure:  # a bug of ours: contained to this request
            self.failed(delivery, asker, failure)


class RoutedEgress:
    """An HTTP egress bridge's links on a router connection: a consumer of its address,
    and an anonymous sender for the responses, each addressed by its ``to``."""

    def __init__(self, bridge: HttpEgressBridge) -> None:
        self.bridge = bridge
        self.replies: MessageSender | None = None
        self.active = False

    def on_router_up(self, host: AmqpHost, session: Session) -> None:
        spec = self.bridge.spec
        name = f"{self.bridge.site_id}-http-{spec.address}"
        consumer = session.receiver(name)
        consumer.source.address = spec.address
        consumer.target.address = name
        sender = session.sender(f"{name}-responses")
        self.replies = MessageSender(sender, host)
        sender.open()
        self.bridge.consume(consumer, host, self.reply, on_opened=self.on_consuming)

    def on_consuming(self, link: Link) -> None:
        self.active = True
        logger.info("%s: consuming %r", self.bridge.spec, self.bridge.spec.address)

    def on_router_down(self) -> None:
        self.replies = None
        self.active = False

    def reply(self, to: str, data: bytes) -> bool:
        if self.replies is None or self.replies.closed:
            return False
        self.replies.send(data)
        return True
