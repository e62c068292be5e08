"""The few pieces of the AMQP 1.0 type system (part 1 of the spec) the wire dialects share.

Both dialects write their message sections by hand: they are small, fixed,
and on the per-chunk path, where proton's ``Message`` would encode and copy
the whole body. Reading goes the other way: :func:`skip` steps over any
encoded value without building it.
"""

from __future__ import annotations

import struct

from .errors import TunnelError

SECTION = b"\x00\x53"
PROPERTIES = 0x73
APP_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77

U32 = struct.Struct(">I")

# Fixed width of each encoding category, by the high nibble of the format
# code (AMQP 1.0 §1.2); None marks the variable-width and compound ones.
_FIXED_WIDTH = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}


class WireError(TunnelError):
    """Bytes that are not what the dialect expects."""


def str_value(text: str) -> bytes:
    """``text`` as an AMQP string (str8 or str32)."""
    raw = text.encode("utf-8")
    if len(raw) < 256:
        return bytes((0xA1, len(raw))) + raw
    return b"\xb1" + U32.pack(len(raw)) + raw


def list32(items: list[bytes]) -> bytes:
    """Encoded values as an AMQP list32."""
    body = b"".join(items)
    return b"\xd0" + U32.pack(len(body) + 4) + U32.pack(len(items)) + body


def skip(buf: memoryview, pos: int) -> int:
    """The offset just past the encoded value starting at ``pos``.

    It may lie beyond the end of ``buf`` when the value is cut short.
    """
    code = buf[pos]
    pos += 1
    if code == 0x00:  # described: descriptor, then the value
        return skip(buf, skip(buf, pos))
    width = _FIXED_WIDTH.get(code >> 4)
    if width is not None:
        return pos + width
    category = code >> 4
    if category in (0xA, 0xC, 0xE):
        return pos + 1 + buf[pos]
    if category in (0xB, 0xD, 0xF):
        size: int = U32.unpack_from(buf, pos)[0]
        return pos + 4 + size
    raise WireError(f"unknown AMQP format code 0x{code:02x} at offset {pos - 1}")


def binary_at(buf: memoryview, pos: int) -> memoryview:
    """The bytes of the AMQP binary (vbin8 or vbin32) at ``pos``, in place."""
    code = buf[pos]
    if code == 0xA0:
        start, size = pos + 2, buf[pos + 1]
    elif code == 0xB0:
        start, size = pos + 5, U32.unpack_from(buf, pos + 1)[0]
    else:
        raise WireError(f"expected binary, found format code 0x{code:02x}")
    if start + size > len(buf):
        raise WireError(f"binary of {size} bytes overruns the message")
    return buf[start : start + size]


def section_code(buf: memoryview, pos: int) -> tuple[int, int]:
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


#: Sections that come after the properties section (AMQP 1.0 §3.2): past one, there is none.
_AFTER_PROPERTIES = frozenset((APP_PROPERTIES, DATA, AMQP_SEQUENCE, AMQP_VALUE, 0x78))


def message_to(message: bytes | bytearray) -> str | None:
    """A message's ``to``, read from its properties section without decoding the rest:
    what a router needs of a message on an anonymous link, whatever its body holds."""
    buf = memoryview(message)
    try:
        pos = 0
        while pos < len(buf):
            code, value_at = section_code(buf, pos)
            if code == PROPERTIES:
                return _list_item_text(buf, value_at, 2, "to")
            if code in _AFTER_PROPERTIES:
                return None
            pos = skip(buf, value_at)
    except (IndexError, struct.error) as exc:
        raise WireError(f"truncated or malformed message ({len(buf)} bytes)") from exc
    return None


def _list_item_text(buf: memoryview, pos: int, index: int, name: str) -> str | None:
    """Item ``index`` of the list at ``pos``, a string or symbol, or None when absent."""
    code = buf[pos]
    if code == 0x45:  # list0
        return None
    if code == 0xC0:
        count, pos = buf[pos + 2], pos + 3
    elif code == 0xD0:
        count, pos = U32.unpack_from(buf, pos + 5)[0], pos + 9
    else:
        raise WireError(f"the properties section is format code 0x{code:02x}, not a list")
    if index >= count:
        return None
    for _ in range(index):
        pos = skip(buf, pos)
    code = buf[pos]
    if code == 0x40:
        return None
    if code in (0xA1, 0xA3):
        start, size = pos + 2, buf[pos + 1]
    elif code in (0xB1, 0xB3):
        start, size = pos + 5, U32.unpack_from(buf, pos + 1)[0]
    else:
        raise WireError(f"{name} is format code 0x{code:02x}, not a string")
    if start + size > len(buf):
        raise WireError(f"{name} overruns the message")
    try:
        return bytes(buf[start : start + size]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{name} is not UTF-8") from None
