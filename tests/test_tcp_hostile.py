"""Hostile AMQP peers against the TCP bridges: what one peer can make a tunnel hold.

The peer here is proton's engine driven by hand over a loopback socket, so
it can do what no well-behaved client does: grant a million credit and keep
its session window shut, never settle, take every connection slot, or
attach and say nothing. Most tests run the egress bridge and its direct-mode
listener in the test's own process, where weak references show what is
freed; the memory tests run the real daemon and read its RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from helpers import LOOPBACK, TunnelProcess, echo_server, eventually
from proton import Collector, Connection, Endpoint, Link, Receiver, Sender, Session, Transport

from tunnel.amqp_link import AmqpSocket
from tunnel.bridge import EgressBridge
from tunnel.config import ListenConfig
from tunnel.connection import Connection as TcpConnection
from tunnel.dialects.link_route import MAX_DELIVERY, MAX_UNSETTLED, LinkRouteCarrier
from tunnel.direct import DirectListener
from tunnel.limits import Limits
from tunnel.spec import EgressSpec, parse_spec

# The smallest frame AMQP allows; with a session capacity of one frame the
# window shuts after the first transfer and stays shut, as nothing is read.
MIN_FRAME = 512
_names = itertools.count(1)


class RawPeer:
    """One AMQP connection driven by hand: it does exactly what the test tells it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self.reader, self.writer = reader, writer
        self.connection = Connection()
        self.connection.container = f"raw-peer-{next(_names)}"
        self.transport = Transport()
        if max_frame:
            self.transport.max_frame_size = max_frame
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        self.connection.open()
        self.task = asyncio.create_task(self._run())

    @classmethod
    async def connect(cls, port: int, max_frame: int = 0) -> RawPeer:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        return cls(reader, writer, max_frame)

    async def _run(self) -> None:
        while not self.transport.closed:
            self.flush()
            try:
                data = await asyncio.wait_for(self.reader.read(65536), 0.01)
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
        pending = self.transport.pending()
        if pending > 0:
            self.writer.write(self.transport.peek(pending) or b"")
            self.transport.pop(pending)

    def session(self, capacity: int = 0) -> Session:
        session = self.connection.session()
        if capacity:
            session.incoming_capacity = capacity
        session.open()
        return session

    async def open_tunnel(
        self, session: Session, credit: int = 1_000_000, address: str = "echo"
    ) -> tuple[Receiver, Sender]:
        """A tunnel as an ingress opens one: a dynamic receiver, then a sender to ``address``."""
        name = f"{LOOPBACK}:{next(_names)}@raw@{next(_names)}"
        receiver = session.receiver(f"{name}/reply")
        receiver.source.dynamic = True
        receiver.open()
        receiver.flow(credit)
        reply = str(await eventually(lambda: receiver.remote_source.address, "a dynamic address"))
        sender = session.sender(name)
        sender.target.address = address
        sender.source.address = reply
        sender.open()
        return receiver, sender

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.writer.close()


def detached(link: Link) -> bool:
    return bool(link.state & Endpoint.REMOTE_CLOSED)


@contextlib.asynccontextmanager
async def direct_egress(port: int, limits: Limits) -> AsyncIterator[tuple[int, EgressBridge]]:
    """``amqp:echo=>tcp:127.0.0.1:port`` with its direct-mode listener, in this process."""
    spec = parse_spec(f"amqp:echo=>tcp:{LOOPBACK}:{port}")
    assert isinstance(spec, EgressSpec)
    bridge = EgressBridge(spec, limits=limits)
    listener = DirectListener(ListenConfig.parse(f"amqp://{LOOPBACK}:0"), {"echo": bridge})
    await listener.start()
    bridge.sweeper.start()
    try:
        yield listener.bound_port, bridge
    finally:
        listener.stop_accepting()
        listener.close_all()
        await bridge.stop()


class FastBackend:
    """Writes to every client as fast as it takes it, and notes when a client stops taking."""

    def __init__(self) -> None:
        self.sent = 0
        self.stalled = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        chunk = b"\0" * 65536
        # Cancelled when the test ends, possibly in the middle of a drain.
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while True:
                writer.write(chunk)
                self.sent += len(chunk)
                try:
                    # A tunnel that stopped reading leaves this drain waiting.
                    await asyncio.wait_for(writer.drain(), 1.0)
                except TimeoutError:
                    self.stalled.set()
                    await writer.drain()


@contextlib.asynccontextmanager
async def fast_backend() -> AsyncIterator[tuple[int, FastBackend]]:
    backend = FastBackend()
    server = await asyncio.start_server(backend.serve, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1], backend
    finally:
        for writer in backend.writers:
            writer.close()
        server.close()


async def stalls_or_floods(backend: FastBackend, flood: int) -> bool:
    """True once the backend finds its client stopped reading; False if ``flood`` bytes went."""
    waiting = asyncio.create_task(backend.stalled.wait())
    try:
        await eventually(lambda: waiting.done() or backend.sent >= flood, "stall or flood", 60)
    finally:
        waiting.cancel()
    return backend.stalled.is_set() and backend.sent < flood


# -- 1. zero session window -----------------------------------------------------------
async def test_zero_session_window_stops_reading_the_backend(tmp_path: Path) -> None:
    """A peer with credit 1e6 and a shut session window: the egress stops reading, RSS flat."""
    async with fast_backend() as (backend_port, backend):
        egress = TunnelProcess(
            ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}"],
            tmp_path / "egress.log",
        )
        try:
            port = await egress.amqp_port()
            before = egress.rss_kib()
            peer = await RawPeer.connect(port, max_frame=MIN_FRAME)
            await peer.open_tunnel(peer.session(capacity=MIN_FRAME))
            # Without the bound it reads on for good: 256 MiB go in seconds.
            assert await stalls_or_floods(backend, 256 << 20), f"{backend.sent} bytes taken"
            growth = (egress.rss_kib() - before) / 1024
            assert growth < 16, f"RSS grew {growth:.0f} MiB behind a shut session window"
            await peer.close()
            assert await asyncio.to_thread(egress.stop) == 0
        finally:
            egress.kill()


# -- 2. memory kept after the peer left -------------------------------------------------
async def test_memory_returns_after_zero_window_peers_leave(tmp_path: Path) -> None:
    """Three rounds of the zero-window attack, each ending in a disconnect: RSS stays near
    its baseline, without waiting for the cycle collector."""
    async with fast_backend() as (backend_port, backend):
        egress = TunnelProcess(
            ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}"],
            tmp_path / "egress.log",
        )
        try:
            port = await egress.amqp_port()
            before = egress.rss_kib()
            for _ in range(3):
                backend.stalled.clear()
                sent, seen = backend.sent, len(egress.log())
                peer = await RawPeer.connect(port, max_frame=MIN_FRAME)
                await peer.open_tunnel(peer.session(capacity=MIN_FRAME))
                await stalls_or_floods(backend, sent + (128 << 20))
                await peer.close()
                await egress.wait_for("amqp-connection-lost", after=seen)
            growth = (egress.rss_kib() - before) / 1024
            assert growth < 16, f"RSS {growth:.0f} MiB over its baseline after three rounds"
            assert await asyncio.to_thread(egress.stop) == 0
        finally:
            egress.kill()


async def test_a_lost_peer_is_freed_without_the_cycle_collector() -> None:
    """With the cycle collector off, a lost peer's tunnel, AMQP socket and proton connection
    (where a shut window's bytes were held) are freed as soon as the peer goes: nothing of
    them waits in a reference cycle."""
    async with echo_server() as backend, direct_egress(backend.port, Limits()) as (port, bridge):
        peer = await RawPeer.connect(port)
        await peer.open_tunnel(peer.session(), credit=10)
        tunnel = await eventually(lambda: next(iter(bridge.stats.live), None), "a tunnel")
        assert isinstance(tunnel, TcpConnection)
        assert isinstance(tunnel.carrier, LinkRouteCarrier)
        socket = tunnel.carrier.port
        assert isinstance(socket, AmqpSocket)
        refs = {
            "tunnel": weakref.ref(tunnel),
            "AMQP socket": weakref.ref(socket),
            "proton connection": weakref.ref(socket.engine.connection),
        }
        del tunnel, socket
        gc.collect()
        gc.disable()
        try:
            await peer.close()
            for what, ref in refs.items():
                await eventually(lambda ref=ref: ref() is None, f"the {what} freed")  # type: ignore[misc]
        finally:
            gc.enable()


# -- 3. one peer takes every slot ------------------------------------------------------
async def test_one_direct_peer_cannot_take_every_slot() -> None:
    """With 4 connections and the default share of 2 per peer, a peer's third tunnel is
    refused naming the per-peer limit, and another peer still gets in."""
    async with (
        echo_server() as backend,
        direct_egress(backend.port, Limits(max_connections=4)) as (port, bridge),
    ):
        greedy = await RawPeer.connect(port)
        session = greedy.session()
        tunnels = [await greedy.open_tunnel(session, credit=10) for _ in range(3)]
        refused = tunnels[2][1]
        await eventually(lambda: detached(refused), "the third tunnel refused")
        condition = refused.remote_condition
        assert condition is not None
        assert "per peer (--max-connections-per-peer)" in str(condition.description)
        for _, sender in tunnels[:2]:
            await eventually(lambda sender=sender: sender.credit > 0, "credit")  # type: ignore[misc]
            assert not detached(sender)
        other = await RawPeer.connect(port)
        _, sender = await other.open_tunnel(other.session(), credit=10)
        await eventually(lambda: sender.credit > 0, "the other peer's tunnel open")
        assert not detached(sender)
        assert len(bridge.stats.live) == 3
        await greedy.close()
        await other.close()


def test_the_per_peer_share_defaults_to_half_rounded_up() -> None:
    assert Limits(max_connections=50).per_peer == 25
    assert Limits(max_connections=5).per_peer == 3
    assert Limits(max_connections=1).per_peer == 1
    assert Limits(max_connections=10, max_connections_per_peer=20).per_peer == 10


# -- 4. silent clients ---------------------------------------------------------------
async def test_a_tunnel_that_never_carries_a_byte_is_reset() -> None:
    """The silent timeout resets a tunnel that carried nothing, even with no idle timeout."""
    limits = Limits(silent_timeout=0.4)
    assert limits.idle_timeout == 0
    async with echo_server() as backend, direct_egress(backend.port, limits) as (port, _):
        peer = await RawPeer.connect(port)
        session = peer.session()
        _, silent = await peer.open_tunnel(session, credit=10)
        await eventually(lambda: silent.credit > 0, "the tunnel open")
        await eventually(lambda: detached(silent), "the silent tunnel reset", 5)
        condition = silent.remote_condition
        assert condition is not None and "silent for" in str(condition.description)
        await peer.close()


def test_silent_timeout_is_on_by_default() -> None:
    assert Limits().silent_timeout == 300
    assert Limits().idle_timeout == 0


# -- 5. unsettled deliveries -----------------------------------------------------------
async def test_a_peer_that_never_settles_gets_a_bounded_number_of_deliveries() -> None:
    """Credit 1e6, an open window, and no settlement: the tunnel sends MAX_UNSETTLED
    deliveries, then stops reading its backend."""
    async with (
        fast_backend() as (backend_port, backend),
        direct_egress(backend_port, Limits()) as (port, _),
    ):
        peer = await RawPeer.connect(port)
        receiver, _ = await peer.open_tunnel(peer.session())
        assert await stalls_or_floods(backend, 256 << 20), f"{backend.sent} bytes taken"
        await eventually(lambda: receiver.unsettled >= MAX_UNSETTLED, "the cap reached")
        assert receiver.unsettled == MAX_UNSETTLED
        assert backend.sent < 32 << 20
        await peer.close()


def test_the_unsettled_bound_is_one_mib_per_tunnel() -> None:
    """What the link-route docstring states: at most 1 MiB held towards a peer not settling."""
    assert MAX_UNSETTLED * MAX_DELIVERY == 1 << 20
