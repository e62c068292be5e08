"""The skupper-proxy wire dialect: how stream bytes are framed as AMQP messages.

This is the one place that knows the encoding, so that a second dialect
(skupper-router's TCP adaptor) can sit beside it.

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

from .errors import TunnelError

HALF_CLOSE = "tunnel:half-close"
EOS_PROPERTY = "tunnel:eos"

_SECTION = b"\x00\x53"
_PROPERTIES = 0x73
_APP_PROPERTIES = 0x74
_DATA = 0x75
_AMQP_SEQUENCE = 0x76
_AMQP_VALUE = 0x77

_U32 = struct.Struct(">I")
_AMQP_VALUE_BIN32 = _SECTION + b"\x77\xb0"

# Fixed width of each encoding category, by the high nibble of the format
# code (AMQP 1.0 §1.2); None marks the variable-width and compound ones.
_FIXED_WIDTH = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}


class WireError(TunnelError):
    """A message that is not a stream chunk of this dialect."""


def _str_value(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < 256:
        return bytes((0xA1, len(raw))) + raw
    return b"\xb1" + _U32.pack(len(raw)) + raw


def _list32(items: list[bytes]) -> bytes:
    body = b"".join(items)
    return b"\xd0" + _U32.pack(len(body) + 4) + _U32.pack(len(items)) + body


def properties_section(reply_to: str) -> bytes:
    """A properties section with only ``reply-to`` set (message-id..subject are null)."""
    return _SECTION + bytes((_PROPERTIES,)) + _list32([b"\x40"] * 4 + [_str_value(reply_to)])


def body_header(length: int) -> bytes:
    """The bytes that precede ``length`` payload bytes in an amqp-value binary body."""
    return _AMQP_VALUE_BIN32 + _U32.pack(length)


_EOS_APP_PROPERTIES = (
    _SECTION
    + bytes((_APP_PROPERTIES,))
    + b"\xd1"
    + _U32.pack(4 + len(_str_value(EOS_PROPERTY)) + 1)
    + _U32.pack(2)
    + _str_value(EOS_PROPERTY)
    + b"\x41"
)


def eos_message(prefix: bytes) -> bytes:
    """The end-of-stream marker, after ``prefix`` (the properties section, or nothing)."""
    return prefix + _EOS_APP_PROPERTIES + body_header(0)


def _skip(buf: memoryview, pos: int) -> int:
    """The offset just past the encoded value starting at ``pos``."""
    code = buf[pos]
    pos += 1
    if code == 0x00:  # described: descriptor, then the value
        return _skip(buf, _skip(buf, pos))
    width = _FIXED_WIDTH.get(code >> 4)
    if width is not None:
        return pos + width
    category = code >> 4
    if category in (0xA, 0xC, 0xE):
        return pos + 1 + buf[pos]
    if category in (0xB, 0xD, 0xF):
        size: int = _U32.unpack_from(buf, pos)[0]
        return pos + 4 + size
    raise WireError(f"unknown AMQP format code 0x{code:02x} at offset {pos - 1}")


def _section_code(buf: memoryview, pos: int) -> tuple[int, int]:
    """Read a section descriptor at ``pos``; returns (descriptor code, value offset)."""
    if buf[pos] != 0x00:
        raise WireError(f"expected a message section at offset {pos}")
    kind = buf[pos + 1]
    if kind == 0x53:  # smallulong
        return buf[pos + 2], pos + 3
    if kind == 0x80:  # ulong
        return int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
    if kind == 0x44:  # ulong0
        return 0, pos + 2
    # Symbolic descriptors are legal but never used for the standard sections.
    raise WireError(f"unsupported section descriptor 0x{kind:02x} at offset {pos}")


def _binary(buf: memoryview, pos: int) -> memoryview:
    code = buf[pos]
    if code == 0xA0:
        start, size = pos + 2, buf[pos + 1]
    elif code == 0xB0:
        start, size = pos + 5, _U32.unpack_from(buf, pos + 1)[0]
    else:
        raise WireError(f"expected binary, found format code 0x{code:02x}")
    if start + size > len(buf):
        raise WireError(f"binary of {size} bytes overruns the message")
    return buf[start : start + size]


def _map_has_true(buf: memoryview, pos: int, key: bytes) -> bool:
    """Whether the map at ``pos`` maps string/symbol ``key`` to boolean true."""
    code = buf[pos]
    if code == 0xC1:
        count, pos = buf[pos + 2], pos + 3
    elif code == 0xD1:
        (count,) = _U32.unpack_from(buf, pos + 5)
        pos += 9
    else:
        return False
    for _ in range(count // 2):
        key_end = _skip(buf, pos)
        matched = buf[pos] in (0xA1, 0xA3) and buf[pos + 2 : key_end] == key
        matched = matched or (buf[pos] in (0xB1, 0xB3) and buf[pos + 5 : key_end] == key)
        if matched and buf[key_end] == 0x41:
            return True
        pos = _skip(buf, key_end)
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
        code, value_at = _section_code(buf, pos)
        if code == _AMQP_VALUE:
            if buf[value_at] != 0x40:
                chunks.append(_binary(buf, value_at))
        elif code == _DATA:
            chunks.append(_binary(buf, value_at))
        elif code == _APP_PROPERTIES:
            eos = _map_has_true(buf, value_at, _EOS_KEY)
        elif code == _AMQP_SEQUENCE:
            raise WireError("amqp-sequence bodies cannot carry stream bytes")
        pos = _skip(buf, value_at)
    if pos != end:
        raise WireError("the last section overruns the message")
    if len(chunks) == 1:
        return chunks[0], eos
    if not chunks:
        return buf[0:0], eos
    return memoryview(b"".join(chunks)), eos
