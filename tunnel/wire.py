"""The skupper-proxy wire dialect: how stream bytes are framed as AMQP messages.

This is the one place that knows this encoding; skupper-router's TCP
adaptor dialect sits beside it in :mod:`tunnel.adaptor_wire`.

Data messages
    One message per TCP read, sent unsettled. The body is an ``amqp-value``
    section holding a ``binary`` (AMQP 1.0 §3.2.8), exactly what rhea writes
    for a ``Buffer`` body. The ingress also sends a ``properties`` section
    (§3.2.4) whose ``reply-to`` is its dynamic address. On receipt we accept
    ``amqp-value`` binary, ``amqp-value`` null, ``data`` sections (§3.2.6)
    and an empty body.

End-of-stream extension (half-close)
    skupper-proxy has no end-of-stream marker: a FIN closes everything. We
    add one, negotiated with a terminus capability because a link-routing
    router passes terminus capabilities through and drops every other link
    property (protocols.md §8.1):

    - an ingress lists :data:`HALF_CLOSE` in its sender's *source*
      capabilities: "I understand the marker on the return path";
    - an egress lists :data:`HALF_CLOSE` in its reply attach's *target*
      capabilities: "I understand the marker on the forward path".

    The marker is a message whose application-properties map
    :data:`EOS_PROPERTY` to ``true``, with an empty ``amqp-value`` binary
    body, so a peer that ignores it would write zero bytes. It is sent only
    to a peer that offered the capability; towards a node proxy the end of a
    stream is a clean detach once every delivery has been settled.
"""

from __future__ import annotations

import struct

from .codec import (
    AMQP_SEQUENCE,
    AMQP_VALUE,
    APP_PROPERTIES,
    DATA,
    PROPERTIES,
    SECTION,
    U32,
    WireError,
    binary_at,
    list32,
    section_code,
    skip,
    str_value,
)

__all__ = [
    "EOS_PROPERTY",
    "HALF_CLOSE",
    "WireError",
    "body_header",
    "decode",
    "eos_message",
    "properties_section",
]

HALF_CLOSE = "tunnel:half-close"
EOS_PROPERTY = "tunnel:eos"

_AMQP_VALUE_BIN32 = SECTION + b"\x77\xb0"


def properties_section(reply_to: str) -> bytes:
    """A properties section with only ``reply-to`` set (message-id..subject are null)."""
    return SECTION + bytes((PROPERTIES,)) + list32([b"\x40"] * 4 + [str_value(reply_to)])


def body_header(length: int) -> bytes:
    """The bytes that precede ``length`` payload bytes in an amqp-value binary body."""
    return _AMQP_VALUE_BIN32 + U32.pack(length)


_EOS_APP_PROPERTIES = (
    SECTION
    + bytes((APP_PROPERTIES,))
    + b"\xd1"
    + U32.pack(4 + len(str_value(EOS_PROPERTY)) + 1)
    + U32.pack(2)
    + str_value(EOS_PROPERTY)
    + b"\x41"
)


def eos_message(prefix: bytes) -> bytes:
    """The end-of-stream marker, after ``prefix`` (the properties section, or nothing)."""
    return prefix + _EOS_APP_PROPERTIES + body_header(0)


def _map_has_true(buf: memoryview, pos: int, key: bytes) -> bool:
    """Whether the map at ``pos`` maps string/symbol ``key`` to boolean true."""
    code = buf[pos]
    if code == 0xC1:
        count, pos = buf[pos + 2], pos + 3
    elif code == 0xD1:
        (count,) = U32.unpack_from(buf, pos + 5)
        pos += 9
    else:
        return False
    for _ in range(count // 2):
        key_end = skip(buf, pos)
        matched = buf[pos] in (0xA1, 0xA3) and buf[pos + 2 : key_end] == key
        matched = matched or (buf[pos] in (0xB1, 0xB3) and buf[pos + 5 : key_end] == key)
        if matched and buf[key_end] == 0x41:
            return True
        pos = skip(buf, key_end)
    return False


_EOS_KEY = EOS_PROPERTY.encode()


def decode(message: bytes | bytearray) -> tuple[memoryview, bool]:
    """Split a received message into (stream bytes, is end-of-stream marker).

    Raises :class:`WireError` for a body that is not bytes (an
    amqp-sequence, or an amqp-value holding something other than binary),
    and for a message that is truncated or not AMQP at all.
    """
    try:
        return _decode(memoryview(message))
    except (IndexError, struct.error, RecursionError) as exc:
        raise WireError(f"truncated or malformed message ({len(message)} bytes)") from exc


def _decode(buf: memoryview) -> tuple[memoryview, bool]:
    end = len(buf)
    pos = 0
    eos = False
    chunks: list[memoryview] = []
    while pos < end:
        code, value_at = section_code(buf, pos)
        if code == AMQP_VALUE:
            if buf[value_at] != 0x40:
                chunks.append(binary_at(buf, value_at))
        elif code == DATA:
            chunks.append(binary_at(buf, value_at))
        elif code == APP_PROPERTIES:
            eos = _map_has_true(buf, value_at, _EOS_KEY)
        elif code == AMQP_SEQUENCE:
            raise WireError("amqp-sequence bodies cannot carry stream bytes")
        pos = skip(buf, value_at)
    if pos != end:
        raise WireError("the last section overruns the message")
    if len(chunks) == 1:
        return chunks[0], eos
    if not chunks:
        return buf[0:0], eos
    return memoryview(b"".join(chunks)), eos
