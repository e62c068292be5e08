"""Closing a socket so that its peer reads our last words.

A connection we end because of its peer usually ends with a frame that says
why: an AMQP Close naming the error, an HTTP/2 GOAWAY with its code. Closing
the socket right after writing it loses it whenever the peer is still
sending: closing with unread input makes the kernel send a reset, which
fails the peer's next send and can drop what it had not read yet.

So :func:`close_after_written` hands the socket to a protocol that reads and
drops whatever comes, half-closes our side once the last frame is out, and
closes when the peer closes its side, or aborts after :data:`LINGER`
seconds. Nothing is held while it lingers; the connection's own protocol
is done with it at once.
"""

from __future__ import annotations

import asyncio

LINGER = 2.0  # seconds a socket we ended reads and drops before it is aborted


class _Dropping(asyncio.Protocol):
    def __init__(self, transport: asyncio.Transport) -> None:
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the connection is over: nothing it says is read

    def eof_received(self) -> bool:
        return False  # the peer is done too: close once our last frame is written

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def close_after_written(transport: asyncio.Transport, *, peer_done: bool = False) -> None:
    """Close ``transport`` once its peer has read what was written to it (see above).

    ``peer_done``: the peer has closed its side already, so nothing is left to
    drop and the socket closes as soon as what is written has left.
    """
    if transport.is_closing():
        return
    if peer_done:
        transport.close()
        return
    transport.set_protocol(_Dropping(transport))
    if transport.can_write_eof():
        transport.write_eof()  # after what is buffered; a TLS socket cannot half-close
    transport.resume_reading()
