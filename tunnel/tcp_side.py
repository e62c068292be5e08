"""The TCP side of a tunnel: an asyncio Protocol that only moves bytes.

Every callback is forwarded to the tunnel's ``on_tcp_*`` method; this module
holds no policy. ``eof_received`` returns True so that a FIN from the peer
closes only its direction (half-close) and the other keeps flowing.

Reads land in one buffer shared by every connection (a buffered protocol):
the event loop fills it and hands it on before it reads another socket, and
the bytes are copied into proton at once. A new bytes object of up to
256 KiB per read, freed a moment later, is what fragmented the heap of a
long-running process; so ``on_tcp_data`` gets a view that is valid only
during the call, and a tunnel that must keep bytes copies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Protocol, cast

# Explicit limits: uvloop's default low-water mark is 16 bytes, which would
# resume a paused writer almost never; these bound what one socket buffers.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)

READ_SIZE = 256 * 1024
_READ_VIEW = memoryview(bytearray(READ_SIZE))


class TcpEvents(Protocol):
    """What a tunnel implements to hear from its TCP connection."""

    def on_tcp_connected(self, transport: asyncio.Transport) -> None: ...
    def on_tcp_data(self, data: memoryview) -> None:
        """Bytes read; ``data`` is reused after the call returns."""

    def on_tcp_eof(self) -> None: ...
    def on_tcp_closed(self, exc: Exception | None) -> None: ...
    def on_tcp_write_paused(self) -> None: ...
    def on_tcp_write_resumed(self) -> None: ...


class TcpSide(asyncio.BufferedProtocol):
    """One TCP connection, feeding one tunnel."""

    __slots__ = ("events",)

    def __init__(self, events: TcpEvents) -> None:
        self.events = events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.events.on_tcp_connected(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.events.on_tcp_data(_READ_VIEW[:nbytes])

    def eof_received(self) -> bool:
        self.events.on_tcp_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.on_tcp_closed(exc)

    def pause_writing(self) -> None:
        self.events.on_tcp_write_paused()

    def resume_writing(self) -> None:
        self.events.on_tcp_write_resumed()


def set_reading(transport: asyncio.Transport | None, want: bool) -> None:
    """Read from ``transport`` only while ``want`` holds.

    Asks the transport, not a flag of ours: uvloop starts reading after
    connection_made even if the protocol paused it there.
    """
    if transport is None or transport.is_closing() or want == transport.is_reading():
        return
    if want:
        transport.resume_reading()
    else:
        transport.pause_reading()


def reset(transport: asyncio.Transport) -> None:
    """Close with an RST, not a FIN, so the peer cannot mistake a failure for a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Already closed by the peer: abort() below is all that is left to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()
