"""The AMQP socket: an asyncio Protocol that pumps bytes through an :class:`AmqpEngine`.

After every input it lets the engine's events run, then writes what the
engine produced. Output from calls made outside a callback (a tunnel
sending TCP bytes) is coalesced: :meth:`AmqpSocket.flush_soon` schedules one
flush for the end of the loop iteration, so many tunnels' deliveries leave
in one ``write``. One timer is kept, re-armed only when the engine's next
deadline (heartbeat or idle timeout) changes.

Back-pressure: when the socket's write buffer passes its high-water mark,
``write_paused`` turns on and tunnels stop reading from TCP; on resume the
handler wakes them. Input: proton takes what it has room for; the rest of
a read (at most :data:`~tunnel.tcp_side.READ_SIZE` bytes) waits in
``_backlog`` and reading pauses until proton has taken it, so a peer that
sends faster than proton takes is held back by TCP, not buffered here.
What proton itself holds is bounded by the credit we granted.

Bounds: ``_backlog`` holds at most one read (:data:`~tunnel.tcp_side.READ_SIZE`);
the transport's write buffer at most :data:`WRITE_HIGH_WATER` before
``write_paused`` turns on (one more proton output buffer may land on top).
Output framed in one loop turn, before the flush at its end, counts too:
``write_paused`` turns on once :data:`WRITE_HIGH_WATER` of it waits in the
engine, so what all tunnels together frame in a turn is that plus the one
send that crossed it (at most one tunnel's room).

Closing: once the engine is done, the socket is closed after the peer has
read its last frame (see :mod:`tunnel.linger`), and the connection is lost
to its handler at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

from .amqp.engine import AmqpEngine, ConnectionHandler
from .linger import close_after_written
from .tcp_side import READ_SIZE

logger = logging.getLogger(__name__)

WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024


class SocketHandler(ConnectionHandler, Protocol):
    """A connection handler that also hears about the socket itself."""

    def on_socket_writable(self) -> None: ...
    def on_socket_lost(self, exc: Exception | None) -> None: ...


_READ_VIEW = memoryview(bytearray(READ_SIZE))


class AmqpSocket(asyncio.BufferedProtocol):
    """One AMQP connection over one (possibly TLS) stream socket.

    Reads land in a buffer shared by every AMQP socket, as on the TCP side
    (see :mod:`tunnel.tcp_side`): what proton cannot take yet is copied out.
    """

    def __init__(self, engine: AmqpEngine, handler: SocketHandler) -> None:
        self.engine = engine
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._write_paused = False
        self._read_paused = False
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._backlog = b""
        self._peer_done = False
        self._released = False
        self.closed = False

    # -- what tunnels see -----------------------------------------------------
    @property
    def write_paused(self) -> bool:
        """Past the transport's high-water mark, or as much waiting in the engine.

        The engine's share is what tunnels sent in this loop turn, before
        the flush at its end: without it, every tunnel readable in one turn
        would frame its whole room before the transport could push back.
        """
        return self._write_paused or self.engine.output_held >= WRITE_HIGH_WATER

    def flush_soon(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    # -- asyncio callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.process()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self._take(_READ_VIEW[:nbytes])

    def _take(self, data: memoryview | bytes) -> None:
        if self.closed:
            return  # a read scheduled before the engine finished
        if self._backlog:
            data = self._backlog + data
        view = memoryview(data)
        offset = 0
        # A slice at a time, each followed by its events, so that received
        # bytes leave proton as they land (see tunnel.amqp.engine on memory).
        while offset < len(view):
            taken = self.engine.receive_bytes(view[offset:])
            offset += taken
            self._run_events()
            if not taken:
                break
        self._backlog = bytes(view[offset:])
        transport = self.transport
        if transport is not None and not self.closed:
            if self._backlog and not self._read_paused:
                self._read_paused = True
                transport.pause_reading()
            elif not self._backlog and self._read_paused:
                self._read_paused = False
                transport.resume_reading()
        # Output once at the end of this loop iteration: whatever else
        # arrives in the same iteration leaves in the same write.
        self.flush_soon()

    def eof_received(self) -> bool:
        self._peer_done = True
        self.engine.eof_in()
        self.process()
        # Keep the socket open for what is still to be written; a TLS transport
        # cannot half-close, and asyncio warns when asked to.
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._released:
            return
        self._released = True
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.engine.eof_in()
        self.engine.eof_out()
        self._run_events()
        self.handler.on_socket_lost(exc)
        self.engine.release()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.handler.on_socket_writable()
        self.flush()

    # -- pumping --------------------------------------------------------------
    def process(self) -> None:
        """Run every pending engine event, then write the engine's output."""
        self._run_events()
        self.flush()

    def _run_events(self) -> None:
        self.engine.run_events(self.handler)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.process()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        engine = self.engine
        deadline = engine.tick(self._loop.time())
        # tick() may produce events (a heartbeat timeout closes the connection).
        self._run_events()
        held_back = engine.output_held >= WRITE_HIGH_WATER
        # proton hands out its output one buffer at a time: drain it, but only
        # while the socket takes it. Past the high-water mark the rest stays
        # in proton until resume_writing, rather than sitting there and in a
        # copy in the transport's buffer.
        while not self._write_paused and (out := engine.bytes_to_send()) is not None:
            transport.write(out)
        if held_back and not self.write_paused:
            # Tunnels stopped on the engine's share, which is out now: the
            # transport will not tell them, as it never paused.
            self.handler.on_socket_writable()
        if self._backlog and engine.transport.capacity() > 0:
            self._loop.call_soon(self._take, b"")
        if engine.finished:
            self.closed = True
            close_after_written(transport, peer_done=self._peer_done)
            # Later, as asyncio would: the caller may be a handler still at work.
            self._loop.call_soon(self.connection_lost, None)
            return
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = (
                self._loop.call_at(deadline, self._on_timer) if deadline is not None else None
            )

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.process()

    def close(self) -> None:
        """Close the AMQP connection politely, then the socket once the close is written."""
        connection = self.engine.connection
        if not connection.state & connection.LOCAL_CLOSED:
            connection.close()
        self.process()
