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
- a message that is not a request (no method, no ``reply_to``): REJECTED.

At most ``window`` requests are in hand per link: credit is given back only
as requests are settled. A reused keep-alive connection that the backend had
closed meanwhile fails before any response byte; such a request is sent once
more on a fresh connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h11
from proton import Condition, Link, Message, Session

from . import http_message as hm
from .codec import WireError
from .engine import ACCEPTED, MODIFIED, REJECTED
from .messaging import AmqpHost, MessageReceiver, MessageSender
from .spec import HttpEgressSpec, join_host

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


class UnreachableError(Exception):
    """No connection to the backend could be made: the request never left."""


class BackendError(Exception):
    """The backend took the request but gave no usable response."""


class _StaleError(Exception):
    """A reused connection was closed by the backend before any response byte."""


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
                    h11.Request(method=request.method, target=request.target, headers=headers)
                )
                or []
            )
            if request.body:
                parts += conn.send_with_data_passthrough(h11.Data(data=request.body)) or []
            parts += conn.send_with_data_passthrough(h11.EndOfMessage()) or []
        except h11.LocalProtocolError as exc:
            raise BackendError(f"request cannot be sent: {exc}") from None
        return parts

    async def _response(self, max_body: int) -> hm.HttpResponse:
        conn = self.h11
        head: h11.Response | None = None
        body = bytearray()
        got_any = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BackendError(f"malformed response from the backend: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    chunk = await self.reader.read(READ_SIZE)
                except OSError as exc:
                    if not got_any:
                        raise _StaleError(str(exc)) from None
                    raise BackendError(f"backend connection failed: {exc}") from None
                if not chunk and not got_any:
                    raise _StaleError("closed before responding")
                got_any = True
                conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise BackendError(f"response body over the limit of {max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return hm.HttpResponse(
                    status=head.status_code, headers=hm.end_to_end(head.headers), body=bytes(body)
                )
            elif isinstance(event, h11.ConnectionClosed):
                raise BackendError("backend closed the connection mid-response")
            # InformationalResponse (100 Continue and the like): nothing to carry.


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

    async def serve(self, request: Message, parsed: hm.HttpRequest) -> Message | None:
        """The response message for ``request`` (``parsed`` is what it asks); None when the
        backend could not be reached."""
        try:
            response = await asyncio.wait_for(
                self.pool.exchange(parsed, self.settings.max_body), self.settings.timeout
            )
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
        bodyless = hm.is_bodyless(parsed.method, response.status)
        return hm.response_message(
            response,
            to=str(request.reply_to),
            correlation_id=request.correlation_id,
            site_id=self.site_id,
            bodyless=bodyless,
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


class RequestServer:
    """The requests of one receiver link, each served and then settled."""

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
        self.receiver = MessageReceiver(
            link,
            host,
            window=settings.window,
            max_size=settings.max_message,
            on_message=self.on_request,
            on_opened=on_opened,
        )

    def on_request(self, delivery: Any, data: bytearray) -> None:
        try:
            message = hm.decode(data)
            parsed = hm.request_of(message)
            if not message.reply_to:
                raise WireError("no reply_to to answer to")
        except WireError as exc:
            logger.debug("%s: request refused: %s", self.bridge.spec, exc)
            self.receiver.settle(
                delivery, REJECTED, condition=Condition("amqp:invalid-field", str(exc))
            )
            return
        task = asyncio.get_running_loop().create_task(self.bridge.serve(message, parsed))
        self.bridge.tasks.add(task)
        task.add_done_callback(lambda done: self.on_served(delivery, message, done))

    def on_served(
        self, delivery: Any, request: Message, task: asyncio.Task[Message | None]
    ) -> None:
        self.bridge.tasks.discard(task)
        if task.cancelled():
            return
        if self.receiver.closed or self.receiver.host.closed:
            return  # the delivery went with its link; the far end will retry or fail
        if (exc := task.exception()) is not None:
            logger.error("%s: serving a request failed: %r", self.bridge.spec, exc)
            self.receiver.settle(delivery, MODIFIED, failed=True)
            return
        response = task.result()
        if response is None:
            self.receiver.settle(delivery, MODIFIED, failed=True, why=self.bridge.unreachable_why)
        elif self.reply(str(request.reply_to), hm.encode(response)):
            self.receiver.settle(delivery, ACCEPTED)
        else:
            self.receiver.settle(
                delivery,
                REJECTED,
                condition=Condition("amqp:not-found", f"no way to reply to {request.reply_to!r}"),
            )


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
