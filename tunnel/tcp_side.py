"""The TCP side of a connection: an asyncio Protocol that only moves bytes.

Every callback is forwarded to the connection's ``on_tcp_*`` method
(:class:`TcpEvents`); this module holds no policy. The connection sees its
socket only as a :class:`TcpPort`, which :class:`TcpSide` implements over
its asyncio transport, so the connection itself imports no asyncio.
``eof_received`` returns True so that a FIN from the peer closes only its
direction (half-close) and the other keeps flowing.

Reads land in one buffer shared by every connection (a buffered protocol):
the event loop fills it and hands it on before it reads another socket, and
the bytes are copied into proton at once. A new bytes object of up to
256 KiB per read, freed a moment later, is what fragmented the heap of a
long-running process; so ``on_tcp_data`` gets a view that is valid only
during the call, and a connection that must keep bytes copies them.

An accepted socket may have no connection yet (an ingress whose router is
not connected): it is then *held*, told to its :class:`Acceptor`, and not
read. What arrived before reading paused (at most one read) is kept and
handed on, with any FIN, once a connection is bound (:meth:`TcpSide.bind`).

Bounds: each socket buffers at most :data:`WRITE_HIGH_WATER` bytes of
output before the connection is told to stop taking the far end's bytes;
a held socket keeps at most one read (:data:`READ_SIZE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path
from typing import Protocol, cast

from .census import counted

# Explicit limits: uvloop's default low-water mark is 16 bytes, which would
# resume a paused writer almost never; these bound what one socket buffers.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)

READ_SIZE = 256 * 1024
_READ_VIEW = memoryview(bytearray(READ_SIZE))


def kernel_buffering() -> int:
    """The most a reader that does not read can have taken without one write held back.

    Our send buffer and, for a reader on this host, its receive buffer, at
    the largest the kernel grows them to (``tcp_wmem`` and ``tcp_rmem``);
    0 where they cannot be read (not Linux).
    """
    total = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        try:
            total += int(Path("/proc/sys/net/ipv4", name).read_text().split()[2])
        except (OSError, ValueError, IndexError):
            return 0
    return total


class TcpPort(Protocol):
    """One TCP socket, as a connection drives it."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def unsent(self) -> int:
        """Bytes written that the kernel has not taken yet."""
        ...

    def write_eof(self) -> None:
        """Send our FIN; raises OSError if the peer reset meanwhile."""
        ...

    def close(self) -> None:
        """Close once what is written is out (a FIN, both ways ended)."""
        ...

    def reset(self) -> None:
        """Close with an RST, so the peer cannot mistake a failure for a clean end."""
        ...

    def set_reading(self, want: bool) -> None:
        """Read from the socket only while ``want`` holds."""
        ...


class TcpEvents(Protocol):
    """What a connection implements to hear from its TCP socket."""

    def on_tcp_connected(self, port: TcpPort) -> None: ...
    def on_tcp_data(self, data: memoryview) -> None:
        """Bytes read; ``data`` is reused after the call returns."""

    def on_tcp_eof(self) -> None: ...
    def on_tcp_closed(self, exc: Exception | None) -> None: ...
    def on_tcp_write_paused(self) -> None: ...
    def on_tcp_write_resumed(self) -> None: ...


class Acceptor(Protocol):
    """Whoever holds accepted sockets that have no connection yet."""

    def on_accepted(self, side: TcpSide) -> None: ...
    def on_lost(self, side: TcpSide) -> None:
        """A held socket closed before it got a connection."""
        ...


@counted("tcp_sockets")
class TcpSide(asyncio.BufferedProtocol):
    """One TCP socket: the protocol feeding one connection, and the :class:`TcpPort` it drives.

    Until it has a connection it is held by its :class:`Acceptor`.
    """

    __slots__ = ("_held", "_held_eof", "acceptor", "events", "transport")

    def __init__(self, events: TcpEvents | None = None, acceptor: Acceptor | None = None) -> None:
        self.events = events
        self.acceptor = acceptor
        self.transport: asyncio.Transport | None = None
        self._held = b""
        self._held_eof = False

    # -- asyncio callbacks --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.transport = transport
        if self.events is not None:
            self.events.on_tcp_connected(self)
            return
        self.set_reading(False)
        if self.acceptor is not None:
            self.acceptor.on_accepted(self)

    def bind(self, events: TcpEvents) -> None:
        """Hand a held socket to its connection, with what arrived meanwhile."""
        self.events = events
        self.acceptor = None
        held, self._held = self._held, b""
        events.on_tcp_connected(self)
        if held:
            events.on_tcp_data(memoryview(held))
        if self._held_eof:
            events.on_tcp_eof()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        if self.events is not None:
            self.events.on_tcp_data(_READ_VIEW[:nbytes])
        else:
            # uvloop may read once before the pause takes; reading stays paused.
            self._held += _READ_VIEW[:nbytes]
            self.set_reading(False)

    def eof_received(self) -> bool:
        if self.events is not None:
            self.events.on_tcp_eof()
        else:
            self._held_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.events is not None:
            self.events.on_tcp_closed(exc)
        elif self.acceptor is not None:
            self.acceptor.on_lost(self)

    def pause_writing(self) -> None:
        if self.events is not None:
            self.events.on_tcp_write_paused()

    def resume_writing(self) -> None:
        if self.events is not None:
            self.events.on_tcp_write_resumed()

    # -- TcpPort ----------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def unsent(self) -> int:
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    def write_eof(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write_eof()

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def reset(self) -> None:
        assert self.transport is not None
        reset(self.transport)

    def set_reading(self, want: bool) -> None:
        """Read from the socket only while ``want`` holds.

        Asks the transport, not a flag of ours: uvloop starts reading after
        connection_made even if the protocol paused it there.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or want == transport.is_reading():
            return
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def peer(self) -> object:
        """The peer's address, as the socket gives it."""
        return None if self.transport is None else self.transport.get_extra_info("peername")


def reset(transport: asyncio.Transport) -> None:
    """Close with an RST, not a FIN, so the peer cannot mistake a failure for a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Already closed by the peer: abort() below is all that is left to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()
