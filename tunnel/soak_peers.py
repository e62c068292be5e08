"""Hostile AMQP peers for the soak: what issue-10's bounds are about, over and over.

Each is proton's engine driven by hand over one loopback socket, against the
direct-mode listener of the soak's egress, so that it can do what a
well-behaved peer never does:

- :func:`ignore_credit` opens a tunnel as an ingress would and then sends
  transfers its credit does not allow, written as raw frames (proton itself
  keeps to credit). The egress must close that link
  (``amqp:link:transfer-limit-exceeded``) and keep none of it.
- :func:`shut_window` opens tunnels with a million credit each and a session
  incoming window of one frame, sends requests that the echo backend answers,
  and never reads: every answer stays with the egress, which must stop
  taking them from the backend rather than hold them.

Both report what they saw, so a fault that did not happen is not counted as
one that was survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import Callable

from proton import Connection, Data, Endpoint, Link, Session, Transport

_TRANSFER = 0x14
#: The smallest frame AMQP allows; a session capacity of one such frame shuts
#: the window after the first transfer for good, as nothing is read.
MIN_FRAME = 512
_names = itertools.count(1)


def transfer_frame(channel: int, handle: int, delivery_id: int, payload: bytes) -> bytes:
    """One whole transfer (AMQP 1.0 §2.7.5) on ``channel``, whatever credit says."""
    performative = Data()
    performative.put_described()
    performative.enter()
    performative.put_ulong(_TRANSFER)
    performative.put_list()
    performative.enter()
    performative.put_uint(handle)
    performative.put_uint(delivery_id)
    performative.put_binary(b"t%d" % delivery_id)
    performative.put_uint(0)
    performative.put_bool(False)
    performative.put_bool(False)
    performative.exit()
    performative.exit()
    body = performative.encode() + payload
    return struct.pack(">IBBH", 8 + len(body), 2, 0, channel) + body


class Peer:
    """One AMQP connection driven by hand over asyncio streams."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int = 0
    ) -> None:
        self.reader, self.writer = reader, writer
        self.connection = Connection()
        self.connection.container = f"soak-hostile-{next(_names)}"
        self.transport = Transport()
        if max_frame:
            self.transport.max_frame_size = max_frame
        self.transport.bind(self.connection)
        self.connection.open()
        self.task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def connect(cls, port: int, max_frame: int = 0) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, max_frame)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.transport.closed:
            # Heartbeats: a hostile peer that fell silent would only meet the idle timeout.
            self.transport.tick(loop.time())
            self.flush()
            # Not wait_for: on 3.11 it drops a cancel that lands as the read
            # completes, and close() then waits on this loop for ever.
            try:
                async with asyncio.timeout(0.01):
                    data = await self.reader.read(65536)
            except TimeoutError:
                continue
            if not data:
                self.transport.close_tail()
                return
            view = memoryview(data)
            while view:
                room = self.transport.capacity()
                if room <= 0:
                    return  # proton closed its input: the connection is over
                self.transport.push(bytes(view[:room]))
                view = view[room:]

    def flush(self) -> None:
        # Answer what the far end opens (an egress opens its reply sender), as a peer must.
        while (link := self.connection.link_head(Endpoint.LOCAL_UNINIT)) is not None:
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            link.open()
        pending = self.transport.pending()
        if pending > 0:
            self.writer.write(self.transport.peek(pending) or b"")
            self.transport.pop(pending)

    async def until(self, done: Callable[[], object], seconds: float) -> bool:
        """Whether ``done()`` came true within ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not done():
            if loop.time() > deadline or self.task.done():
                return False
            await asyncio.sleep(0.01)
        return True

    def session(self, capacity: int = 0) -> Session:
        session = self.connection.session()
        if capacity:
            session.incoming_capacity = capacity
        session.open()
        return session

    async def open_tunnel(
        self, session: Session, address: str, credit: int
    ) -> tuple[Link, Link] | None:
        """A dynamic receiver with ``credit``, then a sender to ``address``; None if refused."""
        name = f"127.0.0.1:{next(_names)}@soak-hostile@{next(_names)}"
        receiver = session.receiver(f"{name}/reply")
        receiver.source.dynamic = True
        receiver.open()
        receiver.flow(credit)
        if not await self.until(lambda: receiver.remote_source.address, 10):
            return None
        reply = receiver.remote_source.address
        assert reply is not None
        sender = session.sender(name)
        sender.target.address = address
        sender.source.address = reply
        sender.open()
        if not await self.until(lambda: sender.state & Endpoint.REMOTE_ACTIVE, 10):
            return None
        return receiver, sender

    async def close(self) -> None:
        self.task.cancel()
        # A hostile peer may well have been cut off by the egress (reset): that is its due.
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self.task
        self.writer.close()


async def ignore_credit(port: int, address: str, transfers: int = 1024) -> str:
    """Transfers past credit on a tunnel's sender; what the egress did about it.

    The reply receiver gets no credit, so the echo cannot come back and the
    egress soon stops granting any: 64 MiB sent at once is far past it.
    """
    peer = await Peer.connect(port)
    try:
        opened = await peer.open_tunnel(peer.session(), address, credit=0)
        if opened is None:
            return "not attached"
        _, sender = opened
        await peer.until(lambda: sender.credit > 0, 10)
        peer.flush()
        handle = 1  # the sender is our second link on its session: the reply receiver is 0
        payload = b"\x00\x53\x75\xb0" + struct.pack(">I", 65536) + bytes(65536)  # a data section
        frames = b"".join(
            transfer_frame(0, handle, delivery, payload) for delivery in range(transfers)
        )
        peer.writer.write(frames)
        # The egress detaches the link; it may then close the whole connection too,
        # for the transfers that go on arriving on the detached handle.
        await peer.until(lambda: sender.state & Endpoint.REMOTE_CLOSED, 15)
        if not sender.state & Endpoint.REMOTE_CLOSED:
            return "link left open"
        condition = sender.remote_condition
        return str(condition.name) if condition is not None else "closed without a condition"
    finally:
        await peer.close()


async def shut_window(port: int, address: str, tunnels: int, seconds: float) -> str:
    """Tunnels whose answers can never be delivered, held ``seconds``; what they got through."""
    peer = await Peer.connect(port, max_frame=MIN_FRAME)
    try:
        session = peer.session(capacity=MIN_FRAME)
        senders = []
        for _ in range(tunnels):
            opened = await peer.open_tunnel(session, address, credit=1_000_000)
            if opened is None:
                return "not attached"
            senders.append(opened[1])
        if not await peer.until(lambda: all(s.credit > 0 for s in senders), 10):
            return "no credit to send requests"
        for sender in senders:
            sender.delivery("request")
            # A whole link-route message: one data section of 64 KiB, echoed back.
            sender.send(b"\x00\x53\x75\xb0" + struct.pack(">I", 65536) + bytes(65536))
            sender.advance()
        peer.flush()
        await asyncio.sleep(seconds)
        return "held" if not peer.task.done() else "closed by the egress"
    finally:
        await peer.close()
