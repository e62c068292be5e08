"""One HTTP/2 stream carried as AMQP messages, the same object at either end of the tunnel.

Theory of operation
-------------------
Each end holds an HTTP/2 connection (``h2``): the ingress as the server its
client talks to, the egress as the client of its backend. A :class:`Stream`
joins one HTTP/2 stream of that connection to the stream's messages
(:mod:`tunnel.http2_message`) to and from the other end. It has two
directions:

- **out**: what our HTTP/2 peer sends (request at the ingress, response at
  the egress) goes out as messages, one per batch of DATA, at most
  :data:`CHUNK` bytes each, once the far end's address is known;
- **in**: what the far end sends is handed to our HTTP/2 peer as its flow
  control window allows.

Flow control across the network: we acknowledge our HTTP/2 peer's DATA (so
that it may send more) only when the far end says, with a ``tunnel:ack``,
that it has handed those bytes to its own HTTP/2 peer. So what our peer may
send and nobody has yet consumed is the window we advertised
(:data:`STREAM_WINDOW` per stream, :data:`CONNECTION_WINDOW` per connection),
however slow the far peer is: a client uploading faster than the backend
reads is held back by its window, not buffered. Acks ride on whatever
message goes next; one goes alone once per batch in which bytes were handed
over, unless the far end has ended its direction: it gives its peer's
window back when its stream is over, so a unary call costs no ack of its
response.

State: which directions are open, and whether the stream is over.

===================  ============================  =================================
event                when                          effect
===================  ============================  =================================
h2 data              out open                      kept; sent at the next flush
h2 end (trailers)    out open                      out closed: last message at flush
message data         in open, within window        kept; handed to h2 as it allows
message data         in closed or over the window  reset (PROTOCOL_ERROR both ways)
message ended        in open                       in closed once its data is handed
message ack          any                           h2 window given back to our peer
message reset        NO_ERROR, far side whole      its bytes handed on, then our peer
                                                   gets RST_STREAM NO_ERROR; over
message reset        otherwise                     h2 stream reset with its code; over
h2 reset             NO_ERROR, our side whole      its last message, then NO_ERROR to
                                                   the far end; over (RFC 9113 §8.1)
h2 reset             otherwise                     reset message to the far end; over
a message lost       any                           h2 stream reset; over
both directions      closed                        over
===================  ============================  =================================

Bounds, per stream: out, what our peer sent and the far end has not
acknowledged, is at most our advertised window; at most
:data:`MAX_MESSAGES` messages are on their way at once (more data is
coalesced); in, at most :data:`STREAM_WINDOW` plus one :data:`CHUNK` from
the far end waiting for our peer's window, past which the far end broke the
contract and the stream is reset.

This module does no I/O: the side (:class:`Side`) writes what ``h2`` has to
send and carries the messages.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from typing import Protocol

import h2.connection
import h2.errors
import h2.exceptions

from .amqp.handles import ACCEPTED
from .census import counted
from .http2_message import StreamMessage

logger = logging.getLogger(__name__)

#: Our advertised HTTP/2 window per stream: also what one stream holds in each direction.
STREAM_WINDOW = 256 * 1024
#: Our advertised HTTP/2 window per connection, across its streams.
CONNECTION_WINDOW = 1024 * 1024
#: The most bytes of data in one message.
CHUNK = 64 * 1024
#: Messages of one stream on their way at once (sent, not yet settled).
MAX_MESSAGES = 8
#: The most bytes the far end may leave waiting for our peer's window.
MAX_IN = STREAM_WINDOW + CHUNK


class Side(Protocol):
    """What a stream needs of its end: the HTTP/2 connection and a way to the far end."""

    h2: h2.connection.H2Connection

    def send(self, stream: Stream, message: StreamMessage) -> None:
        """Carry ``message`` to the far end; ``stream.on_outcome`` hears how it went."""
        ...

    def on_stream_over(self, stream: Stream) -> None:
        """The stream is over at this end: forget it."""
        ...

    def on_reset_before_far(self, stream: Stream, code: int) -> None:
        """``stream`` was reset before the far end's address was known: the side tells
        the far end once it is (an egress may be serving the stream already)."""
        ...

    def flush_soon(self) -> None:
        """Flush the streams and write what ``h2`` has to send, once this turn is over."""
        ...


class Stop(enum.Enum):
    """A side ended whole and its peer reads no more of the other (RFC 9113 §8.1)."""

    #: Our peer did: the far end hears NO_ERROR after our last message.
    TELL_FAR = "tell far"
    #: The far end's peer did: ours gets NO_ERROR after the far end's last byte.
    STOP_PEER = "stop peer"


class Over(enum.Enum):
    """How a stream ended."""

    COMPLETED = "completed"
    RESET = "reset"


@counted("http2_streams")
class Stream:
    """One HTTP/2 stream and its messages; see the module docstring."""

    __slots__ = (
        "ack_due",
        "announce",
        "correlation_id",
        "far",
        "group_id",
        "head_out",
        "in_done",
        "in_end",
        "in_pending",
        "key",
        "out_done",
        "out_end",
        "out_messages",
        "out_pending",
        "out_unacked",
        "over",
        "reply_to",
        "side",
        "stop",
        "stream_id",
    )

    def __init__(
        self,
        side: Side,
        *,
        stream_id: int | None,
        correlation_id: int,
        group_id: str,
        reply_to: str,
        far: str | None,
    ) -> None:
        self.side = side
        #: Ours in ``h2``; None at the egress until the backend stream is opened.
        self.stream_id = stream_id
        #: The stream's number, the ingress's, in every message.
        self.correlation_id = correlation_id
        #: Our own site, in every message we send.
        self.group_id = group_id
        #: Our own address, where the far end's messages come.
        self.reply_to = reply_to
        #: The far end's address; None at the ingress until its first message.
        self.far = far
        #: The head to send first (the response's, at the egress).
        self.head_out: StreamMessage | None = None
        #: The egress tells its address at once, with or without anything to say.
        self.announce = False
        #: From our peer, not yet sent: bounded by our advertised window.
        self.out_pending = bytearray()
        #: Sent to the far end and not yet acknowledged by it.
        self.out_unacked = 0
        self.out_messages = 0
        #: Our peer ended its side, with these trailers; None while it is open.
        self.out_end: list[tuple[str, str]] | None = None
        self.out_done = False
        #: From the far end, not yet handed to our peer: at most MAX_IN.
        self.in_pending = bytearray()
        self.in_end: list[tuple[str, str]] | None = None
        self.in_done = False
        #: Bytes handed to our peer since the last ack.
        self.ack_due = 0
        self.over: Over | None = None
        self.stop: Stop | None = None
        #: What the egress knows the stream by: the ingress's (site, address, number).
        self.key: tuple[str, str, int] | None = None

    # -- from our HTTP/2 peer ------------------------------------------------------------
    def on_h2_data(self, data: bytes, flow_controlled: int) -> None:
        if self.over is not None or self.out_end is not None:
            return
        self.out_pending += data
        padding = flow_controlled - len(data)
        if padding and self.stream_id is not None:
            # Padding reaches nobody: its window goes back at once.
            self.side.h2.acknowledge_received_data(padding, self.stream_id)

    def on_h2_end(self, trailers: list[tuple[str, str]]) -> None:
        if self.over is None and self.out_end is None:
            self.out_end = trailers

    def on_h2_reset(self, code: int) -> None:
        """Our peer reset the stream: the far end hears of it, and it is over.

        NO_ERROR after our peer's whole side (RFC 9113 §8.1: a server that has
        answered and reads no more of the request) is no failure: the far end
        gets the rest of that side first, then the same NO_ERROR.
        """
        if self.over is not None:
            return
        if code == h2.errors.ErrorCodes.NO_ERROR and self.out_end is not None:
            self.stop = Stop.TELL_FAR
            self.in_pending = bytearray()
            self.in_done = True  # our peer reads no more
            return
        self._tell_reset(code)
        self._finish(Over.RESET)

    # -- from the far end ----------------------------------------------------------------
    def on_message(self, message: StreamMessage) -> None:
        """A message of this stream from the far end (its head is the side's business)."""
        if self.over is not None:
            return
        if self.far is None and message.reply_to:
            self.far = message.reply_to
        if message.reset is not None:
            if message.reset == h2.errors.ErrorCodes.NO_ERROR and (
                self.in_end is not None or message.ended
            ):
                # The far end's side is whole; its peer reads no more of ours (§8.1).
                self.stop = Stop.STOP_PEER
                self.out_pending = bytearray()
                self.out_done = True
            else:
                self.reset(message.reset, tell=False)
                return
        if message.ack:
            if message.ack > self.out_unacked:
                self.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            self.out_unacked -= message.ack
            self._give_window(message.ack)
        if message.data:
            if self.in_end is not None or len(self.in_pending) + len(message.data) > MAX_IN:
                self.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            self.in_pending += message.data
        if message.ended and self.in_end is None:
            self.in_end = message.trailers

    def on_head(self, headers: list[tuple[bytes, bytes]], message: StreamMessage) -> None:
        """The far end's head, sent to our peer at once; a head that ends the direction
        with no data and no trailers ends it in one HEADERS frame (gRPC's trailers-only)."""
        assert self.stream_id is not None
        quiet = message.ended and not message.data and not message.trailers
        self.side.h2.send_headers(self.stream_id, headers, end_stream=quiet)
        if quiet:
            self.in_end = []
            self.in_done = True

    def on_outcome(self, outcome: int, why: str) -> None:
        """How the far end took one of our messages: anything but accepted loses the stream."""
        self.out_messages -= 1
        if outcome != ACCEPTED and self.over is None:
            logger.debug("stream %d: a message was not taken: %s", self.correlation_id, why)
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR, tell=False)

    # -- both ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand our peer what its window allows, and send the far end what is due."""
        if self.over is not None:
            return
        self._give()
        if self.far is None:
            return
        while self.out_messages < MAX_MESSAGES and self._due():
            self._send_next()
        if self.stop is Stop.TELL_FAR and self.out_done:
            self._send(self._message(reset=h2.errors.ErrorCodes.NO_ERROR))
            self._finish(Over.COMPLETED)
        elif self.in_done and self.out_done:
            if self.stop is Stop.STOP_PEER and self.stream_id is not None:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.side.h2.reset_stream(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            self._finish(Over.COMPLETED)

    def reset(self, code: int, *, tell: bool = True) -> None:
        """End the stream at once: our peer gets RST_STREAM with ``code``; the far end too,
        unless it is the one that reset it or is gone."""
        if self.over is not None:
            return
        if self.stream_id is not None:
            # Closed already, or the whole connection is (h2 then refuses everything).
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.side.h2.reset_stream(self.stream_id, code)
        if tell:
            self._tell_reset(code)
        self._finish(Over.RESET)

    def _tell_reset(self, code: int) -> None:
        if self.far is not None:
            self._send(self._message(reset=code))
        else:
            self.side.on_reset_before_far(self, code)

    def _due(self) -> bool:
        # An ack alone is news only while the far end's direction is open: once it
        # has ended, the far end gives its peer's window back when its stream is over.
        return bool(
            self.head_out is not None
            or self.announce
            or (self.ack_due and self.in_end is None)
            or self.out_pending
            or (self.out_end is not None and not self.out_done)
        )

    def _send_next(self) -> None:
        self._send(self.next_message())

    def next_message(self) -> StreamMessage:
        """Our direction's next message: the head if it is due, up to CHUNK bytes of
        data, the end with the trailers once everything is in it, and the ack due."""
        taken = min(len(self.out_pending), CHUNK)
        with memoryview(self.out_pending) as view:
            chunk = bytes(view[:taken])
        del self.out_pending[:taken]
        ended = self.out_end is not None and not self.out_pending and not self.out_done
        message = self._message(data=chunk, ended=ended)
        if ended:
            message.trailers = self.out_end or []
            self.out_done = True
        if self.head_out is not None:
            message.subject = self.head_out.subject
            message.headers = self.head_out.headers
            self.head_out = None
        message.ack, self.ack_due = self.ack_due, 0
        self.announce = False
        self.out_unacked += len(chunk)
        return message

    def _send(self, message: StreamMessage) -> None:
        self.out_messages += 1
        self.side.send(self, message)

    def _message(self, **fields: object) -> StreamMessage:
        message = StreamMessage(
            correlation_id=self.correlation_id,
            group_id=self.group_id,
            reply_to=self.reply_to,
            to=self.far,
        )
        for name, value in fields.items():
            setattr(message, name, value)
        return message

    def _give(self) -> None:
        """Hand our peer what the far end sent, as far as its window goes."""
        sid = self.stream_id
        if sid is None or self.in_done:
            return
        conn = self.side.h2
        given = 0
        with memoryview(self.in_pending) as view:
            while given < len(view):
                room = min(
                    len(view) - given,
                    conn.local_flow_control_window(sid),
                    conn.max_outbound_frame_size,
                )
                if room <= 0:
                    break
                conn.send_data(sid, bytes(view[given : given + room]))
                given += room
        del self.in_pending[:given]  # once: not a shift of the rest per frame
        self.ack_due += given
        if self.in_end is not None and not self.in_pending:
            if self.in_end:
                conn.send_headers(sid, self.in_end, end_stream=True)
            else:
                conn.end_stream(sid)
            self.in_done = True

    def _give_window(self, size: int) -> None:
        if self.stream_id is not None:
            # On a stream h2 has closed, only the connection's window grows: what we want;
            # on a connection it has closed, nothing does, and nothing needs to.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.side.h2.acknowledge_received_data(size, self.stream_id)

    def _finish(self, how: Over) -> None:
        self.over = how
        if self.out_unacked or self.out_pending:
            # The stream is gone: what our peer sent counts no more against the connection.
            self._give_window(self.out_unacked + len(self.out_pending))
        self.out_unacked = 0
        self.out_pending = bytearray()
        self.in_pending = bytearray()
        self.side.on_stream_over(self)
