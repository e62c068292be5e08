"""HTTP/2 streams as AMQP messages: protocols.md §2.3, with the node proxy's defects fixed.

A stream is a run of messages, each carrying ``correlation_id`` (the stream's
number, unique per ingress bridge), ``group_id`` (the sender's site id) and
``reply_to`` (the sender's own dynamic address, where the other side's
messages for this stream go). One kind of message, read by what it carries:

- **head**: ``subject`` set (the method for a request, ``"response"`` for a
  response). Pseudo-headers and headers are application properties
  (``:path``, ``:authority``, ``:scheme`` or ``:status`` among them), except
  ``content-type``, which is ``content_type``; a request also has ``to`` =
  ``:path``. It may carry the first data as its body.
- **data**: no ``subject``; the body (amqp-value binary) is the next bytes
  of the stream.
- ``application_properties.ended`` = true marks the last message of that
  direction; its footer (0x78) holds the trailers, if any (``grpc-status``).

Two extensions, in application properties, that the node proxy lacked:

- ``tunnel:ack`` (ulong): the sender of this message has handed that many
  more bytes of the other direction to its HTTP/2 peer. It is the stream's
  flow control across the network (see :mod:`tunnel.http2_stream`); the
  egress's first ack (0 bytes if need be) also tells the ingress the
  egress's ``reply_to``, so a client may stream before any response exists.
- ``tunnel:reset`` (uint): the stream was reset with that HTTP/2 error code;
  it ends both directions.

Repeated header fields are joined as for HTTP/1 (:func:`tunnel.http_message.fold`).
This module does no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from proton import Data, Described, Message, uint, ulong

from . import http_message as hm
from .codec import (
    AMQP_SEQUENCE,
    AMQP_VALUE,
    DATA,
    WireError,
    binary_at,
    section_code,
    skip,
)
from .wire import body_header

ENDED = "ended"
ACK = "tunnel:ack"
RESET = "tunnel:reset"
RESPONSE = "response"
FOOTER = 0x78
_OURS = frozenset({ENDED, ACK, RESET})
#: The pseudo-headers of RFC 9113 §8.3.
PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":status", ":protocol"})
Headers = list[tuple[str, str]]


@dataclass(slots=True)
class StreamMessage:
    """One message of a stream, decoded."""

    correlation_id: int
    group_id: str
    reply_to: str | None
    #: A head's subject (the method, or ``"response"``); None for data and acks.
    subject: str | None = None
    #: A head's pseudo-headers and headers, in order.
    headers: Headers = field(default_factory=list)
    data: bytes = b""
    ended: bool = False
    trailers: Headers = field(default_factory=list)
    ack: int = 0
    reset: int | None = None
    #: Where an anonymous sender sends it.
    to: str | None = None


def encode(message: StreamMessage) -> bytes:
    """The message's bytes: proton encodes its properties; the body and the footer are
    written here, so that the data is copied once, not once per buffer proton tries."""
    props: dict[str, object] = {}
    content_type = None
    if message.subject is not None:
        content_type, folded = hm.fold(message.headers)
        props.update(folded)
    props[ENDED] = message.ended
    if message.ack:
        props[ACK] = ulong(message.ack)
    if message.reset is not None:
        props[RESET] = uint(int(message.reset))  # an IntEnum from h2 is no AMQP type
    amqp = Message(
        correlation_id=ulong(message.correlation_id), group_id=message.group_id, properties=props
    )
    if message.subject is not None:
        amqp.subject = message.subject
    if message.reply_to is not None:
        amqp.reply_to = message.reply_to
    if message.to is not None:
        amqp.address = message.to
    if content_type is not None:  # None would be sent as the symbol 'None'
        amqp.content_type = content_type
    parts = [amqp.encode(), body_header(len(message.data)), message.data]
    if message.trailers:
        _, trailers = hm.fold(message.trailers)
        footer = Data()
        footer.put_object(Described(ulong(FOOTER), dict(trailers)))  # type: ignore[arg-type]
        parts.append(footer.encode())
    return b"".join(parts)


def decode(data: bytes | bytearray) -> StreamMessage:
    """The stream message in ``data``; :class:`WireError` names what is wrong with it."""
    head, body, footer = _split(memoryview(data))
    amqp = hm.decode(head)
    correlation_id = amqp.correlation_id
    if not isinstance(correlation_id, int) or isinstance(correlation_id, bool):
        raise WireError(f"correlation id {correlation_id!r} is not a stream number (ulong)")
    group_id = amqp.group_id
    if not isinstance(group_id, str):
        raise WireError("no group_id (the sender's site id)")
    reply_to = amqp.reply_to if isinstance(amqp.reply_to, str) and amqp.reply_to else None
    props: object = amqp.properties or {}
    if not isinstance(props, Mapping):
        raise WireError("application properties are not a map")
    ours = {key: props.get(key) for key in _OURS}
    ended = ours[ENDED]
    if ended is not None and not isinstance(ended, bool):
        raise WireError(f"'ended' is {ended!r}, not a boolean")
    ack = ours[ACK] or 0
    reset = ours[RESET]
    if not isinstance(ack, int) or ack < 0:
        raise WireError(f"{ACK!r} is {ack!r}, not a byte count")
    if reset is not None and (not isinstance(reset, int) or not 0 <= reset < 1 << 32):
        raise WireError(f"{RESET!r} is {reset!r}, not an HTTP/2 error code")
    subject = amqp.subject if isinstance(amqp.subject, str) and amqp.subject else None
    headers: Headers = []
    if subject is not None:
        headers = _head_fields(props, hm.content_type_of(amqp))
    return StreamMessage(
        correlation_id=int(correlation_id),
        group_id=group_id,
        reply_to=reply_to,
        subject=subject,
        headers=headers,
        data=bytes(body),
        ended=bool(ended),
        trailers=_trailers(footer) if footer else [],
        ack=int(ack),
        reset=None if reset is None else int(reset),
    )


def _split(buf: memoryview) -> tuple[bytes, memoryview, bytes]:
    """The sections before the body (for proton), the body's bytes, and the footer.

    The body is an amqp-value binary (or null, or data sections): found by
    stepping over the sections' encodings, and never handed to proton, which
    would copy it into a Python object.
    """
    try:
        pos, end, head_end = 0, len(buf), None
        chunks: list[memoryview] = []
        footer = b""
        while pos < end:
            code, value_at = section_code(buf, pos)
            after = skip(buf, value_at)
            if code in (AMQP_VALUE, DATA, AMQP_SEQUENCE, FOOTER) and head_end is None:
                head_end = pos
            if (code == AMQP_VALUE and buf[value_at] != 0x40) or code == DATA:
                chunks.append(binary_at(buf, value_at))
            elif code == AMQP_SEQUENCE:
                raise WireError("an amqp-sequence body cannot carry a stream's bytes")
            elif code == FOOTER:
                footer = bytes(buf[pos:after])
            pos = after
    except (IndexError, struct.error) as exc:
        raise WireError(f"truncated or malformed message ({end} bytes)") from exc
    if pos != end:
        raise WireError("the last section overruns the message")
    head = bytes(buf[: end if head_end is None else head_end])
    body = chunks[0] if len(chunks) == 1 else memoryview(b"".join(chunks))
    return head, body, footer


def _head_fields(props: Mapping[object, object], content_type: str | None) -> Headers:
    """A head's fields: pseudo-headers first, as HTTP/2 requires, then the rest.

    ``te`` is hop-by-hop in HTTP/1 but HTTP/2 allows its one value ``trailers``,
    which gRPC servers require; it is carried when it says just that.
    """
    pseudo: Headers = []
    carried: Headers = []
    rest: dict[str, object] = {}
    for key, value in props.items():
        if not isinstance(key, str):
            raise WireError(f"application property key {key!r} is not a string")
        if key in _OURS:
            continue
        if key.startswith(":"):
            if key not in PSEUDO or not isinstance(value, str):
                raise WireError(f"pseudo-header {key[:40]!r} is not one HTTP/2 has, as a string")
            pseudo.append((key, value))
        elif key.lower() == "te":
            if value != "trailers":
                raise WireError(f"'te' is {str(value)[:40]!r}; HTTP/2 allows only 'trailers'")
            carried.append(("te", "trailers"))
        else:
            rest[key] = value
    return pseudo + carried + hm.unfold(rest, content_type)


def _trailers(footer: bytes) -> Headers:
    """The header fields in a footer section (proton's Message has no footer)."""
    section = Data()
    try:
        section.decode(footer)
        section.rewind()
        section.next()
        value = section.get_object()
    except Exception as exc:  # proton's own decoding errors
        raise WireError(f"undecodable footer: {exc}") from None
    fields = value.value if isinstance(value, Described) else None
    if not isinstance(fields, Mapping):
        raise WireError("the footer is not a map")
    return hm.unfold({str(key): item for key, item in fields.items()}, None)
