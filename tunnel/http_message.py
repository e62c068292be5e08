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
from uuid import UUID

from proton import Message, ulong

from .amqp.engine import message_content_type
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
#: What no field value may hold (RFC 9110 §5.5): controls other than HTAB. CR, LF
#: and NUL would end the field or the head; h11 refuses the others.
_NOT_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: A request target as h11 sends it (RFC 9112 §3.2): visible ASCII, no spaces.
_TARGET = re.compile(r"[\x21-\x7e]+")
#: The most characters of a peer's value quoted in an error.
_QUOTED = 80


DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY = 16 * 1024 * 1024
#: Requests in hand at once per consumer link (skupper-proxy's credit window is 10).
DEFAULT_WINDOW = 32
#: Room for the properties and headers around a body of the largest size.
MESSAGE_OVERHEAD = 256 * 1024
#: Bytes of requests an egress link holds (received, not yet answered); never
#: less than one message of the largest size, so that one can always come in.
DEFAULT_HELD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What both HTTP bridge directions are told on the command line."""

    timeout: float = DEFAULT_TIMEOUT
    max_body: int = DEFAULT_MAX_BODY
    window: int = DEFAULT_WINDOW
    held_bytes: int = DEFAULT_HELD_BYTES

    @property
    def max_message(self) -> int:
        """The largest message either side takes: a whole body and its envelope."""
        return self.max_body + MESSAGE_OVERHEAD

    @property
    def held_budget(self) -> int:
        """Bytes of requests one egress link may hold, with room for one of the largest."""
        return max(self.held_bytes, self.max_message)


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


def unfold(props: object, content_type: object) -> Headers:
    """The header fields that application properties and a content type stand for.

    :class:`WireError` names the property that cannot be a header field: a
    section that is not a map, a key that is not a field name, a value that is
    a map or holds a line break or another control character.
    """
    if props is None:
        props = {}
    if not isinstance(props, Mapping):
        raise WireError(f"application properties are {_kind(props)}, not a map")
    headers: Headers = []
    for name, value in props.items():
        if not isinstance(name, str):
            raise WireError(f"application property key {_quoted(name)} is not a string")
        key = name.lower()
        if not _TOKEN.fullmatch(key):
            raise WireError(f"application property {_quoted(key)} is not a header field name")
        if key in HOP_BY_HOP or value is None:
            continue
        if isinstance(value, (list, tuple)):
            values = [_simple(item, key) for item in value]
        elif key == _SET_COOKIE and isinstance(value, str):
            values = value.split(_COOKIE_SEPARATOR)
        else:
            values = [_simple(value, key)]
        headers.extend((key, _field_value(item, key)) for item in values)
    if content_type is not None:
        if not isinstance(content_type, str):
            raise WireError(f"content-type is {_kind(content_type)}, not a symbol")
        headers.append(("content-type", _field_value(content_type, "content-type")))
    return headers


def _simple(value: object, key: str) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict):
        raise WireError(f"application property {_quoted(key)} is a map, not a header value")
    if isinstance(value, (list, tuple)):
        raise WireError(f"application property {_quoted(key)} nests a list in a list")
    return str(value)


def _field_value(value: str, key: str) -> str:
    """``value`` without the whitespace around it (RFC 9110 §5.5), if it may be a field's."""
    if _NOT_IN_VALUE.search(value):
        raise WireError(f"header {_quoted(key)} holds a control character: {_quoted(value)}")
    return value.strip(" \t")


def _kind(value: object) -> str:
    """What ``value`` is, for an error: ``a list``, ``an int32``."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _quoted(value: object) -> str:
    """A peer's value quoted for an error: repr escapes every control character."""
    text = repr(value)
    return text if len(text) <= _QUOTED else f"{text[:_QUOTED]}..."


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


def content_type_of(message: Message) -> str | None:
    """The content type, None when there is none (proton's getter says ``'None'``)."""
    value: str | None = _read("content-type", lambda: message_content_type(message))
    return value


def _read(field: str, get: Any) -> Any:
    """A property of a decoded message: proton decodes strings only when they are read."""
    try:
        return get()
    except UnicodeDecodeError as exc:
        raise WireError(f"message property {field} is not UTF-8: {exc.reason}") from None


# -- requests -----------------------------------------------------------------
def request_message(
    request: HttpRequest, *, site_id: str, correlation_id: int, reply_to: str
) -> Message:
    """The message §2.1 makes of ``request``."""
    content_type, props = fold(request.headers)
    if has_body(request.method, request.body):
        props[_CONTENT_LENGTH] = str(len(request.body))
    message = Message(
        address=_hostname(request.host) + request.target,
        subject=request.method,
        properties=props,
        group_id=site_id,
        correlation_id=ulong(correlation_id),
        reply_to=reply_to,
        body=request.body,
    )
    if content_type is not None:  # None would be sent as the symbol 'None'
        message.content_type = content_type
    return message


def _hostname(host: str | None) -> str:
    """``host`` without its port: ``svc:8080`` -> ``svc``, ``[::1]:80`` -> ``[::1]``."""
    if not host:
        return ""
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and not name.endswith(":") else host


def request_of(message: Message) -> HttpRequest:
    """The request a message carries; :class:`WireError` names what is missing or wrong,
    and is the only exception raised, whatever the message holds."""
    method = _read("subject", lambda: message.subject)
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise WireError(f"subject {_quoted(method)} is not an HTTP method")
    to = _read("to", lambda: message.address) or ""
    slash = to.find("/")
    target = to[slash:] if slash >= 0 else "/"
    if not _TARGET.fullmatch(target):
        raise WireError(f"to {_quoted(to)} does not end in a request target")
    body = body_of(message)
    headers = unfold(message.properties, content_type_of(message))
    _check_length(message.properties, body)
    return HttpRequest(method=method, target=target, headers=headers, body=body)


def _check_length(props: Mapping[Any, Any] | None, body: bytes) -> None:
    """A Content-Length property, where there is one, must be the body's length."""
    if not isinstance(props, Mapping):
        return
    value = next((v for k, v in props.items() if str(k).lower() == _CONTENT_LENGTH), None)
    if value is None:
        return
    text = str(value).strip()
    # isascii: int() would also read other scripts' digits; 20 digits hold any real length.
    if not (text.isascii() and text.isdigit() and len(text) <= 20) or int(text) != len(body):
        raise WireError(
            f"application property 'content-length' is {value!r}, "
            f"but the body has {len(body)} bytes"
        )


# -- responses ----------------------------------------------------------------
def answer_id(value: object) -> object | None:
    """``value`` as the correlation id of an answer, or None if it cannot be one.

    A message id is a ulong, uuid, binary or string (AMQP 1.0 §3.2.11), and
    proton decodes a ulong as a plain int; anything else (a negative long, a
    double, a list) is not, and proton cannot even encode some of it.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return ulong(value) if 0 <= value < 1 << 64 else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, UUID)):
        return value
    return None


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
    message = Message(
        address=to,
        correlation_id=correlation_id,
        subject=str(response.status),
        properties=props,
        group_id=site_id,
        body=response.body,
    )
    if content_type is not None:  # None would be sent as the symbol 'None'
        message.content_type = content_type
    return message


def response_of(message: Message) -> HttpResponse:
    """The response a message carries; :class:`WireError` names what is wrong, and is the
    only exception raised, whatever the message holds."""
    subject = _read("subject", lambda: message.subject)
    if not (
        isinstance(subject, str)
        and len(subject) == 3
        and subject.isascii()
        and subject.isdigit()
        and 100 <= int(subject) <= 599
    ):
        raise WireError(f"subject {_quoted(subject)} is not an HTTP status code")
    return HttpResponse(
        status=int(subject),
        headers=unfold(message.properties, content_type_of(message)),
        body=body_of(message),
    )


def encode(message: Message) -> bytes:
    """The message's bytes on the wire, as one delivery carries them."""
    data: bytes = message.encode()
    return data


#: The properties proton decodes only when they are read, by their names in §3.2.4.
_LAZY = {
    "to": "address",
    "subject": "subject",
    "reply-to": "reply_to",
    "content-encoding": "content_encoding",
    "group-id": "group_id",
    "reply-to-group-id": "reply_to_group_id",
    "message-id": "id",
    "correlation-id": "correlation_id",
}


def decode(data: bytes | bytearray) -> Message:
    """The message in ``data``; proton's decoding errors as :class:`WireError`, naming the
    property that is not what it should be.

    Every property is read here, so that one holding bytes that are not UTF-8
    fails now rather than wherever it is first used."""
    message = Message()
    try:
        message.decode(bytes(data))
    except Exception as exc:  # proton raises its own types for every malformed section
        raise WireError(f"undecodable message: {exc}") from None
    for field, attribute in _LAZY.items():
        _read(field, lambda attribute=attribute: getattr(message, attribute))
    content_type_of(message)
    return message
