"""skupper-router's TCP adaptor dialect (3.x): one TCP direction as one streaming message.

Layout of a stream (protocols.md §4.1-4.2, as seen on skrouterd 3.5.1 in §8.2)
    - ``properties``: ``to`` (the service address, or the listener's reply
      address on a counter-stream), ``reply-to`` and ``correlation-id`` on a
      client stream, and ``content-type`` ``application/octet-stream``
      written as a *string* (str8), not the symbol the spec asks for;
    - ``application-properties``: ``{"V": 1}``, the mapping version;
    - ``amqp-value`` null (``00 53 77 40``), a placeholder body section;
    - then the stream's raw octets with no framing at all, in as many
      transfers of the same delivery as it takes. The final transfer
      (``more=false``) is the stream's FIN.

So the message is not valid AMQP past its header, and nothing here decodes
it as one: :func:`parse_header` finds where the octets start, and the
rest of the delivery is bytes.

Capabilities
    :data:`STREAMING_LINKS` on our Open asks the router for a link per
    stream, so that concurrent streams do not queue behind one another;
    :data:`STREAMING_DELIVERIES` on a sender's target makes the router pass
    an unfinished delivery on at once instead of holding it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .codec import (
    AMQP_VALUE,
    APP_PROPERTIES,
    PROPERTIES,
    SECTION,
    U32,
    WireError,
    list32,
    section_code,
    skip,
    str_value,
)

CONTENT_TYPE = "application/octet-stream"
STREAMING_LINKS = "qd.streaming-links"
STREAMING_DELIVERIES = "qd.streaming-deliveries"
#: A header longer than this is not one (the router's are about 150 bytes).
MAX_HEADER = 64 * 1024

_NULL = b"\x40"
_APP_PROPERTIES_V1 = SECTION + bytes((APP_PROPERTIES,)) + b"\xc1\x06\x02\xa1\x01V\x52\x01"
_AMQP_VALUE_NULL = SECTION + bytes((AMQP_VALUE,)) + _NULL
# Sections that may come before the body; anything else there is another encoding.
_HEADER_SECTIONS = frozenset((0x70, 0x71, 0x72, PROPERTIES, APP_PROPERTIES))
_TO, _REPLY_TO, _CORRELATION_ID, _CONTENT_TYPE = 2, 4, 5, 6


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The fields of a stream's header that the dialect uses."""

    to: str | None
    reply_to: str | None = None
    correlation_id: str | None = None
    content_type: str | None = CONTENT_TYPE


def encode_header(to: str, reply_to: str | None = None, correlation_id: str | None = None) -> bytes:
    """The header sections of a stream, to be followed by its raw octets."""
    fields = [
        _NULL,  # message-id
        _NULL,  # user-id
        str_value(to),
        _NULL,  # subject
        str_value(reply_to) if reply_to is not None else _NULL,
        str_value(correlation_id) if correlation_id is not None else _NULL,
        str_value(CONTENT_TYPE),
    ]
    return SECTION + bytes((PROPERTIES,)) + list32(fields) + _APP_PROPERTIES_V1 + _AMQP_VALUE_NULL


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[StreamHeader, int] | None:
    """Find the header at the start of a stream.

    Returns the header and the offset of the first octet of the stream, or
    None while ``buf`` holds only part of the header. Raises
    :class:`WireError` for bytes that cannot start a stream of this dialect
    (a body that is not ``amqp-value``, or a header past :data:`MAX_HEADER`).
    """
    view = memoryview(buf)
    try:
        return _parse(view)
    except (IndexError, struct.error):
        # Reading past the end is a header cut short, not a broken one.
        if len(view) > MAX_HEADER:
            raise WireError(f"no stream header within {MAX_HEADER} bytes") from None
        return None


def _end_of(view: memoryview, pos: int) -> int:
    end = skip(view, pos)
    if end > len(view):
        raise IndexError("the header goes on past what has arrived")
    return end


def _parse(view: memoryview) -> tuple[StreamHeader, int]:
    pos = 0
    header = StreamHeader(to=None, content_type=None)
    while True:
        if pos >= len(view):
            raise IndexError("the header goes on past what has arrived")
        code, value_at = section_code(view, pos)
        end = _end_of(view, value_at)
        if code == AMQP_VALUE:
            return header, end
        if code not in _HEADER_SECTIONS:
            raise WireError(
                f"a body section 0x{code:02x} where a TCP adaptor stream has "
                "amqp-value null: not this dialect"
            )
        if code == PROPERTIES:
            header = _properties(view[value_at:end])
        pos = end


def _properties(view: memoryview) -> StreamHeader:
    code = view[0]
    if code == 0x45:
        return StreamHeader(to=None, content_type=None)
    if code == 0xC0:
        count, pos = view[2], 3
    elif code == 0xD0:
        count, pos = U32.unpack_from(view, 5)[0], 9
    else:
        raise WireError(f"properties section is not a list (format code 0x{code:02x})")
    fields: dict[int, str | None] = {}
    for index in range(count):
        end = skip(view, pos)
        if index in (_TO, _REPLY_TO, _CORRELATION_ID, _CONTENT_TYPE):
            fields[index] = _text(view[pos:end])
        pos = end
    return StreamHeader(
        to=fields.get(_TO),
        reply_to=fields.get(_REPLY_TO),
        correlation_id=fields.get(_CORRELATION_ID),
        content_type=fields.get(_CONTENT_TYPE),
    )


def _text(value: memoryview) -> str | None:
    """A string or symbol as text; other types (a numeric correlation-id) as their hex."""
    code = value[0]
    if code == 0x40:
        return None
    if code in (0xA1, 0xA3):
        return bytes(value[2:]).decode("utf-8", errors="replace")
    if code in (0xB1, 0xB3):
        return bytes(value[5:]).decode("utf-8", errors="replace")
    return bytes(value).hex()
