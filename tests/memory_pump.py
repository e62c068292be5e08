"""Two AMQP endpoints wired to each other in memory: our engine and a plain proton peer.

No sockets and no event loop: :func:`pump` moves bytes both ways until both
sides are quiet, running our engine's events after each input, as the
asyncio glue does. The peer is proton's own Connection and Transport, which
plays by the rules; :func:`transfer_frame` lets a test break them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from proton import Collector, Connection, Data, Link, Transport

from tunnel.amqp.engine import AmqpEngine, ConnectionHandler
from tunnel.soak_peers import transfer_frame

_BEGIN = 0x11


@dataclass
class Peer:
    """The far end: a proton connection that the test drives by hand."""

    connection: Connection = field(default_factory=Connection)
    transport: Transport = field(default_factory=Transport)
    collector: Collector = field(default_factory=Collector)

    def __post_init__(self) -> None:
        self.transport.bind(self.connection)
        self.connection.collect(self.collector)
        self.connection.container = "hostile-peer"


def pump(engine: AmqpEngine, handler: ConnectionHandler, peer: Peer, rounds: int = 1000) -> None:
    """Move bytes between ``engine`` and ``peer`` until neither has any to send."""
    for _ in range(rounds):
        moved = False
        pending = peer.transport.pending()
        if pending > 0:
            data = memoryview(peer.transport.peek(pending) or b"")
            peer.transport.pop(pending)
            while data:
                taken = engine.receive_bytes(data)
                engine.run_events(handler)
                if not taken:
                    break
                data = data[taken:]
            moved = True
        elif pending < 0 and not engine.finished:
            engine.eof_in()
        engine.run_events(handler)
        while (out := engine.bytes_to_send()) is not None:
            if peer.transport.capacity() > 0:
                peer.transport.push(bytes(out))
            moved = True
        engine.run_events(handler)
        if engine.finished and peer.transport.capacity() >= 0:
            peer.transport.close_tail()
        if not moved:
            return
    raise AssertionError("the two sides never went quiet")


def feed(engine: AmqpEngine, handler: ConnectionHandler, frame: bytes) -> None:
    """Bytes straight into ``engine``, as if the peer had sent them."""
    data = memoryview(frame)
    while data:
        taken = engine.receive_bytes(data)
        engine.run_events(handler)
        if not taken:
            break
        data = data[taken:]


def begin_frame(channel: int) -> bytes:
    """A Begin (AMQP 1.0 §2.7.2) on ``channel``, whatever channel-max says."""
    performative = Data()
    performative.put_described()
    performative.enter()
    performative.put_ulong(_BEGIN)
    performative.put_list()
    performative.enter()
    performative.put_null()
    performative.put_uint(0)
    performative.put_uint(1024)
    performative.put_uint(1024)
    performative.exit()
    performative.exit()
    body = performative.encode()
    return struct.pack(">IBBH", 8 + len(body), 2, 0, channel) + body


def remote_error(endpoint: Connection | Link) -> str | None:
    """The error name the far end closed ``endpoint`` with, if any."""
    condition = endpoint.remote_condition
    return None if condition is None else str(condition.name)


__all__ = ["Peer", "begin_frame", "feed", "pump", "remote_error", "transfer_frame"]
