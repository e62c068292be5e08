"""HTTP/1.1 requests and responses as AMQP messages, mapped as skupper-proxy does.

The mapping is protocols.md §2.1-2.2.

A request is one message to the bridge's address:

- ``to``: the Host header's name (without its port) followed by the path and
  query, e.g. ``myservice/foo?x=1``; just the path when there is no Host;
- ``subject``: the method; ``content_type``: the Content-Type header;
- ``application_properties``: every other end-to-end header, names in lower case;
- ``group_id``: the site id; ``correlation_id``: a per-bridge counter (ulong);
- ``reply_to``: the ingress's dynamic address;
- the body as one amqp-value of type binary.

A response is one message to the request's ``reply_to`` with its
``correlation_id`` echoed, ``subject`` the status code as a string, the
headers in application properties and ``content_type``, and the body.

Header fields that appear more than once: application-property values must
be simple types (AMQP 1.0 §3.2.5), so where the node proxy sent a list we
send one string. The values are joined with ``", "``, which HTTP defines as
equivalent (RFC 9110 §5.3), except Set-Cookie, which cannot be combined that
way (its dates contain commas): its values are joined with a line feed, a
character no field value may contain, and split again on the way out. A list
from the node proxy is accepted as several fields.

Hop-by-hop fields (Connection and those it names, Keep-Alive,
Transfer-Encoding, ...) describe one connection, not the message, so they are
dropped on the way in; each side frames the body it writes. Content-Length is
the exception on the way out: it is written as an application property, the
length of the message's body, because the node egress writes the headers it
is given and, without one, sends the body chunked, which many small servers
read as empty. A request whose Content-Length disagrees with its body is
refused. This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proton import Message, ulong

from .codec import WireError

Headers = list[tuple[str, str]]

#: Fields that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the framing ones.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_SET_COOKIE = "set-cookie"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_SEPARATOR = "\n"


DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY = 16 * 1024 * 1024
#: Requests in hand at once per consumer link (skupper-proxy's credit window is 10).
DEFAULT_WINDOW = 32
#: Room for the properties and headers around a body of the largest size.
MESSAGE_OVERHEAD = 256 * 1024


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What both HTTP bridge directions are told on the command line."""

    timeout: float = DEFAULT_TIMEOUT
    max_body: int = DEFAULT_MAX_BODY
    window: int = DEFAULT_WINDOW

    @property
    def max_message(self) -> int:
        """The largest message either side takes: a whole body and its envelope."""
        return self.max_body + MESSAGE_OVERHEAD


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One whole request, as the ingress read it or the egress will send it."""

    method: str
    #: Path and query, as in the request line (``/foo?x=1``).
    target: str
    #: End-to-end header fields (Host among them), names in lower case, in order.
    headers: Headers
    body: bytes

    @property
    def host(self) -> str | None:
        """The Host field's value, if there is one."""
        return next((value for name, value in self.headers if name == "host"), None)

    def origin_form(self) -> HttpRequest:
        """The request with an absolute-form target (``http://svc/p``, as sent to a proxy)
        made ``/p``, its authority the Host (RFC 9112 §3.2.2)."""
        if not self.target.lower().startswith(("http://", "https://")):
            return self
        url = urlsplit(self.target)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(name, value) for name, value in self.headers if name != "host"]
        return HttpRequest(self.method, target, [("host", url.netloc), *headers], self.body)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """One whole response."""

    status: int
    headers: Headers
    body: bytes


def end_to_end(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Headers:
    """The fields of ``headers`` worth forwarding, names in lower case."""
    fields = [(_text(name).lower(), _text(value)) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in fields
        if name == "connection"
        for token in value.split(",")
    }
    return [(name, value) for name, value in fields if name not in HOP_BY_HOP and name not in named]


def plain_response(status: int, text: str) -> HttpResponse:
    """A short plain-text response made by the tunnel itself."""
    return HttpResponse(
        status=status,
        headers=[("content-type", "text/plain; charset=utf-8")],
        body=text.encode() + b"\n",
    )


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def wire_bytes(text: str) -> bytes:
    """A header name or value as it goes on the wire.

    Header bytes come in as latin-1, one character per byte (HTTP/1.1 allows
    obs-text), so latin-1 gives the same bytes back; a value from a peer that
    sent characters beyond it (a UTF-8 string from the node proxy) goes out
    as UTF-8, its bytes unchanged.
    """
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def wire_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    """``headers`` as the bytes h11 writes (h11 would encode str as ASCII, and fail)."""
    return [(wire_bytes(name), wire_bytes(value)) for name, value in headers]


#: Methods whose requests carry a body, and so a Content-Length, even an empty one.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_CONTENT_LENGTH = "content-length"


def has_body(method: str, body: bytes) -> bool:
    """Whether a request is framed with a body (and so a Content-Length)."""
    return bool(body) or method in BODY_METHODS


def is_bodyless(method: str, status: int) -> bool:
    """Whether the response to ``method`` with ``status`` has no body (RFC 9110 §6.4.1)."""
    return method == "HEAD" or status in (204, 304) or status < 200


def fold(headers: Headers) -> tuple[str | None, dict[str, str]]:
    """Content-Type, and the other fields as application properties, one string per name."""
    content_type: str | None = None
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        if name == "content-type":
            content_type = value
        elif name != _CONTENT_LENGTH:  # the message's own is set where it is known
            grouped.setdefault(name, []).append(value)
    props = {
        name: (_COOKIE_SEPARATOR if name == _SET_COOKIE else ", ").join(values)
        for name, values in grouped.items()
    }
    return content_type, props


def unfold(props: Mapping[Any, Any] | None, content_type: Any) -> Headers:
    """The header fields that application properties and a content type stand for."""
    headers: Headers = []
    for name, value in (props or {}).items():
        key = str(name).lower()
        if key in HOP_BY_HOP:
            continue
        if isinstance(value, (list, tuple)):
            headers.extend((key, str(item)) for item in value)
        elif key == _SET_COOKIE and isinstance(value, str):
            headers.extend((key, item) for item in value.split(_COOKIE_SEPARATOR))
        elif value is not None:
            headers.append((key, _simple(value, key)))
    if content_type:
        headers.append(("content-type", str(content_type)))
    return headers


def _simple(value: Any, key: str) -> str:
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict):
        raise WireError(f"application property {key!r} is a map, not a header value")
    return str(value)


def body_of(message: Message) -> bytes:
    """The body as bytes: amqp-value binary or string, data sections, or nothing."""
    body = message.body
    if body is None:
        return b""
    if isinstance(body, (bytes, memoryview, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    raise WireError(f"body is {type(body).__name__}, not binary")


# -- requests -----------------------------------------------------------------
def request_message(
    request: HttpRequest, *, site_id: str, correlation_id: int, reply_to: str
) -> Message:
    """The message §2.1 makes of ``request``."""
    content_type, props = fold(request.headers)
    if has_body(request.method, request.body):
        props[_CONTENT_LENGTH] = str(len(request.body))
    return Message(
        address=_hostname(request.host) + request.target,
        subject=request.method,
        content_type=content_type,
        properties=props,
        group_id=site_id,
        correlation_id=ulong(correlation_id),
        reply_to=reply_to,
        body=request.body,
    )


def _hostname(host: str | None) -> str:
    """``host`` without its port: ``svc:8080`` -> ``svc``, ``[::1]:80`` -> ``[::1]``."""
    if not host:
        return ""
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and not name.endswith(":") else host


def request_of(message: Message) -> HttpRequest:
    """The request a message carries; :class:`WireError` names what is missing or wrong."""
    method = message.subject
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise WireError(f"subject {method!r} is not an HTTP method")
    to = message.address or ""
    slash = to.find("/")
    body = body_of(message)
    _check_length(message.properties, body)
    return HttpRequest(
        method=method,
        target=to[slash:] if slash >= 0 else "/",
        headers=unfold(message.properties, message.content_type),
        body=body,
    )


def _check_length(props: Mapping[Any, Any] | None, body: bytes) -> None:
    """A Content-Length property, where there is one, must be the body's length."""
    if not isinstance(props, Mapping):
        return
    value = next((v for k, v in props.items() if str(k).lower() == _CONTENT_LENGTH), None)
    if value is None:
        return
    text = str(value).strip()
    if not text.isdigit() or int(text) != len(body):
        raise WireError(
            f"application property 'content-length' is {value!r}, "
            f"but the body has {len(body)} bytes"
        )


# -- responses ----------------------------------------------------------------
def response_message(
    response: HttpResponse, *, to: str, correlation_id: Any, site_id: str, bodyless: bool = False
) -> Message:
    """The message §2.2 makes of ``response``, answering ``correlation_id``.

    ``bodyless`` says the response has no body whatever its headers say (one to
    HEAD, or a 1xx, 204 or 304), so it gets no Content-Length.
    """
    content_type, props = fold(response.headers)
    if not bodyless:
        props[_CONTENT_LENGTH] = str(len(response.body))
    if (
        isinstance(correlation_id, int)
        and not isinstance(correlation_id, bool)
        and correlation_id >= 0
    ):
        correlation_id = ulong(correlation_id)
    return Message(
        address=to,
        correlation_id=correlation_id,
        subject=str(response.status),
        content_type=content_type,
        properties=props,
        group_id=site_id,
        body=response.body,
    )


def response_of(message: Message) -> HttpResponse:
    """The response a message carries; :class:`WireError` names what is wrong."""
    subject = message.subject
    try:
        status = int(str(subject))
    except ValueError:
        raise WireError(f"subject {subject!r} is not an HTTP status code") from None
    if not 100 <= status <= 599:
        raise WireError(f"subject {subject!r} is not an HTTP status code")
    return HttpResponse(
        status=status,
        headers=unfold(message.properties, message.content_type),
        body=body_of(message),
    )


def encode(message: Message) -> bytes:
    """The message's bytes on the wire, as one delivery carries them."""
    data: bytes = message.encode()
    return data


def decode(data: bytes | bytearray) -> Message:
    """The message in ``data``; proton's decoding errors as :class:`WireError`."""
    message = Message()
    try:
        message.decode(bytes(data))
    except Exception as exc:  # proton raises its own types for every malformed section
        raise WireError(f"undecodable message: {exc}") from None
    return message
