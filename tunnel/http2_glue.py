"""What both ends of an HTTP/2 bridge do with their HTTP/2 connections: the asyncio glue.

:class:`H2Glue` is an asyncio protocol around one ``h2`` connection and the
:class:`~tunnel.http2_stream.Stream` objects on it: the ingress's
connection from a client and the egress's connection to a backend are both
one. It writes what h2 has to send, once per loop turn however many streams
asked, and it is the ``Side`` its streams send through. Also here: the
settings both ends advertise, and the header conversions between h2's bytes
and the messages' text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings

from . import http2_message as m
from .http2_stream import CONNECTION_WINDOW, STREAM_WINDOW, Stream
from .linger import close_after_written

logger = logging.getLogger(__name__)

#: Streams a peer may open on one of our connections at once (our SETTINGS).
MAX_CONCURRENT = 100
#: The most bytes of one header list, as HPACK decodes it.
MAX_HEADER_LIST = 64 * 1024


def h2_config(*, client: bool) -> h2.config.H2Configuration:
    # Headers stay bytes: a value need not be UTF-8, and latin-1 maps each byte back.
    return h2.config.H2Configuration(client_side=client, header_encoding=None)


def local_settings(conn: h2.connection.H2Connection) -> None:
    """Our windows and limits, sent in the preface."""
    conn.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
    )
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)


def text_headers(headers: Any) -> m.Headers:
    return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in headers]


def wire(headers: m.Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class H2Glue(asyncio.Protocol):
    """One HTTP/2 connection and its streams, by stream id."""

    def __init__(self, *, client: bool) -> None:
        self.h2 = h2.connection.H2Connection(h2_config(client=client))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        #: Gone: nothing is flushed or written any more.
        self.closed = False
        self._flush_handle: asyncio.Handle | None = None

    def flush_soon(self) -> None:
        """Flush the streams and write what h2 has to send, once this turn is over."""
        if self._flush_handle is None and not self.closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        for stream in list(self.streams.values()):
            try:
                stream.flush()
            except h2.exceptions.ProtocolError as exc:  # h2 refuses: this stream ends
                logger.debug("stream %d: %s", stream.correlation_id, exc)
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._write()

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def end(self) -> None:
        """We end the connection: what h2 has to send (a GOAWAY naming why) is
        written and read by the peer before the socket closes (see
        :mod:`tunnel.linger`); the streams are lost at once."""
        transport = self.transport
        if transport is None or self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self._write()
        close_after_written(transport)
        self.transport = None  # the socket is the linger's now
        self.connection_lost(None)
