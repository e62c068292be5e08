"""Hostile peers on the direct-mode listener: deadlines, budgets, memory at close, the log.

The attacker is proton's own engine over a plain blocking socket
(:class:`RawPeer`), driven by hand so that it can break the rules a
well-behaved client keeps: never finish a delivery, never settle one, name
a link with a newline. Where a test must look inside the listener (its
budgets, whether its objects are freed) the listener runs in the test's own
event loop and the attacker in a thread; otherwise it is a real process.
"""

from __future__ import annotations

import asyncio
import gc
import re
import select
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOPBACK, TunnelProcess, eventually, make_certs
from memory_pump import transfer_frame
from proton import Condition, Connection, Delivery, Endpoint, Link, Message, Session, Transport

from tunnel.amqp.engine import owner_of
from tunnel.config import ListenConfig
from tunnel.direct import DirectListener, DirectPeer
from tunnel.messaging import MessageReceiver, MessageSender, budget_of

LINK_ROUTE = "org.apache.qpid.dispatch.router.connection.linkRoute"
RESOURCE_LIMIT = "amqp:resource-limit-exceeded"
MIB = 1024 * 1024


class RawPeer:
    """An AMQP client that does only what the test says, over a blocking socket."""

    def __init__(self, port: int, container: str = "attacker") -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=10)
        self.connection = Connection()
        self.connection.container = container
        self.transport = Transport()
        self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.transport.bind(self.connection)
        self.connection.open()
        self.session: Session = self.connection.session()
        self.session.open()
        self._tags = 0
        self.accepted = 0

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        """Move bytes both ways until ``until()`` holds; fails if it does not in ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self._write()
            if until():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the listener did not get there within {timeout}s")
            if self.transport.closed:
                raise AssertionError("the listener closed the connection")
            readable, _, _ = select.select([self.sock], [], [], 0.01)
            if readable:
                data = self.sock.recv(1024 * 1024)
                if not data:
                    self.transport.close_tail()
                else:
                    self._push(data)

    def _push(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.transport.capacity()
            if room <= 0:
                return
            self.transport.push(bytes(view[:room]))
            view = view[room:]

    def _write(self) -> None:
        while (pending := self.transport.pending()) > 0:
            self.sock.sendall(self.transport.peek(pending) or b"")
            self.transport.pop(pending)

    def opened(self) -> None:
        self.pump(lambda: bool(self.connection.state & Endpoint.REMOTE_ACTIVE))

    def sender(self, address: str | None, name: str | None = None) -> Link:
        link: Link = self.session.sender(name or f"s{self._next()}")
        if address is not None:
            link.target.address = address
        link.open()
        return link

    def dynamic_receiver(self, credit: int, name: str | None = None) -> Link:
        link: Link = self.session.receiver(name or f"r{self._next()}")
        link.source.dynamic = True
        link.open()
        link.flow(credit)
        return link

    def send(self, link: Link, data: bytes, *, finished: bool = True) -> Any:
        """Start a delivery of ``data`` on ``link``; ``finished=False`` leaves it partial."""
        delivery = link.delivery(str(self._next()))
        link.send(data)
        if finished:
            link.advance()
        return delivery

    def accept_all(self, link: Link) -> int:
        """Accept and settle every whole delivery on receiver ``link``; how many so far."""
        while (delivery := link.current) is not None and not delivery.partial:
            link.recv(delivery.pending)
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()  # settling the current delivery advances past it
            self.accepted += 1
        return self.accepted

    def _next(self) -> int:
        self._tags += 1
        return self._tags

    def close(self) -> None:
        self.sock.close()


def _detached(link: Link) -> bool:
    return bool(link.state & Endpoint.REMOTE_CLOSED)


def _has_credit(link: Link) -> Callable[[], bool]:
    return lambda: link.credit > 0


def _sent_or_detached(link: Link, delivery: Any) -> Callable[[], bool]:
    return lambda: delivery.pending == 0 or _detached(link)


def _all_attached(links: list[Link]) -> Callable[[], bool]:
    return lambda: not any(link.state & Endpoint.REMOTE_UNINIT for link in links)


def _all_detached(links: list[Link]) -> Callable[[], bool]:
    return lambda: all(_detached(link) for link in links)


def _condition(link: Link) -> str | None:
    condition: Condition | None = link.remote_condition
    return None if condition is None else str(condition.name)


@pytest.fixture
async def listener() -> AsyncIterator[DirectListener]:
    """A direct-mode listener in this process: 1 MiB messages, so a 4 MiB partial budget,
    at most 50 unsettled deliveries and 300 unclaimed dynamic receivers per connection."""
    ours = DirectListener(
        ListenConfig.parse(f"amqp://{LOOPBACK}:0"),
        {},
        max_message=MIB,
        max_unsettled=50,
        max_unclaimed=300,
    )
    await ours.start()
    try:
        yield ours
    finally:
        ours.stop_accepting()
        ours.close_all()


def _loud_lines(log: str) -> list[str]:
    """The log's lines at INFO and above."""
    return [line for line in log.splitlines() if re.match(r"\S+ \S+ (INFO|WARNING|ERROR) ", line)]


def _only_peer(listener: DirectListener) -> DirectPeer | None:
    return next(iter(listener.peers), None) if len(listener.peers) == 1 else None


# -- 1. the handshake deadline, and 6. the warning for amqps without --listen-ca --------
@pytest.fixture(scope="module")
def tls_listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TunnelProcess, int]]:
    """An amqps listener without --listen-ca and with a one-second handshake timeout."""
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certs(folder / "certs")
    process = TunnelProcess(
        [
            "--handshake-timeout",
            "1",
            "--listen",
            "amqps://localhost:0",
            "--listen-cert",
            str(certs.server_cert),
            "--listen-key",
            str(certs.server_key),
            f"amqp:echo=>tcp:{LOOPBACK}:9",
        ],
        folder / "egress.log",
    )
    try:
        port = int(asyncio.run(process.amqp_port()))
        yield process, port
        assert process.stop() == 0
    finally:
        process.kill()


# The first bytes of a ClientHello: a record header promising 512 bytes, and a few.
HALF_CLIENT_HELLO = bytes.fromhex("16030102000100 01fc 0303") + b"\x00" * 40


@pytest.mark.parametrize("data", [b"", HALF_CLIENT_HELLO], ids=["silent", "half a ClientHello"])
def test_handshake_timeout_covers_the_tls_handshake(
    tls_listener: tuple[TunnelProcess, int], data: bytes
) -> None:
    """A TLS client that never finishes its handshake is closed at the handshake timeout,
    counted from the TCP accept, and said once in the log, not once per layer."""
    process, port = tls_listener
    before = len(_loud_lines(process.log()))
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(data)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        held = time.monotonic() - started
    assert held < 1.8, f"held {held:.1f}s with a 1s handshake timeout"
    added = _loud_lines(process.log())[before:]
    assert len(added) <= 1, added
    assert all("TLS handshake with 127.0.0.1:" in line for line in added), added


def test_amqps_without_listen_ca_warns(tls_listener: tuple[TunnelProcess, int]) -> None:
    """Without --listen-ca anyone with a TCP route may connect over amqps: said at start."""
    process, _ = tls_listener
    assert re.search(r"WARNING tunnel\.direct: .*without --listen-ca", process.log())


# -- 2. partial deliveries --------------------------------------------------------------
async def test_partial_deliveries_are_bounded_per_connection(listener: DirectListener) -> None:
    """Unfinished deliveries on many links may hold at most 4 x the largest message per
    connection: the link that goes past it is detached with resource-limit-exceeded."""
    port = listener.bound_port
    links: list[Link] = []

    def attack() -> None:
        peer = RawPeer(port)
        try:
            peer.opened()
            for _ in range(8):
                link = peer.sender("anywhere")
                links.append(link)
                peer.pump(_has_credit(link))
                delivery = peer.send(link, b"x" * (900 * 1024), finished=False)
                peer.pump(_sent_or_detached(link, delivery))
            peer.pump(lambda: sum(map(_detached, links)) >= 4)
        finally:
            peer.close()

    held: list[int] = []
    done = False

    async def watch() -> None:
        while not done:
            peer = _only_peer(listener)
            if peer is not None and not peer.socket.closed:
                held.append(budget_of(peer.socket).partial)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.to_thread(attack)
    finally:
        done = True
        await watcher
    assert [_detached(link) for link in links] == [False] * 4 + [True] * 4
    assert {_condition(link) for link in links[4:]} == {RESOURCE_LIMIT}
    assert max(held) <= listener.max_partial


# -- 3. unsettled deliveries and dynamic links -----------------------------------------
async def test_unsettled_deliveries_are_capped_per_connection(listener: DirectListener) -> None:
    """A peer that asks and never settles the answers: past the cap, the link the answers
    come on is detached with resource-limit-exceeded, and the count goes back to zero."""
    port = listener.bound_port
    replies: list[Link] = []

    def attack() -> int:
        peer = RawPeer(port)
        try:
            peer.opened()
            reply = peer.dynamic_receiver(credit=1000)
            replies.append(reply)
            peer.pump(lambda: bool(reply.remote_source.address))
            management = peer.sender("$management")
            request = Message(
                properties={"operation": "READ", "type": LINK_ROUTE},
                body={},
                reply_to=reply.remote_source.address,
            ).encode()
            sent = 0
            while not _detached(reply) and sent < 200:
                peer.pump(lambda: management.credit > 0 or _detached(reply))
                if management.credit > 0:
                    peer.send(management, request)
                    sent += 1
            peer.pump(lambda: _detached(reply))
            return int(reply.queued)
        finally:
            peer.close()

    received = await asyncio.to_thread(attack)
    assert _condition(replies[0]) == RESOURCE_LIMIT
    assert received == 50


async def test_unclaimed_dynamic_links_are_capped_per_connection(
    listener: DirectListener,
) -> None:
    """Dynamic receivers that no sender claims: past the cap, the next is refused with
    resource-limit-exceeded; once one goes, there is room again."""
    port = listener.bound_port

    def attack() -> tuple[list[str | None], str | None]:
        peer = RawPeer(port)
        try:
            peer.opened()
            links = [peer.dynamic_receiver(credit=0) for _ in range(310)]
            peer.pump(_all_attached(links))
            peer.pump(lambda: sum(map(_detached, links)) >= 10)
            refused = [_condition(link) for link in links if _detached(link)]
            links[0].close()
            peer.pump(_all_detached(links[:1]))
            again = peer.dynamic_receiver(credit=0)
            peer.pump(_all_attached([again]))
            return refused, _condition(again) if _detached(again) else None
        finally:
            peer.close()

    refused, again = await asyncio.to_thread(attack)
    assert refused == [RESOURCE_LIMIT] * 10
    assert again is None


async def test_unclaimed_dynamic_links_leave_nothing_behind(listener: DirectListener) -> None:
    """Dynamic receivers attached and detached again leave no entry in any table."""
    port = listener.bound_port

    def churn() -> None:
        peer = RawPeer(port)
        try:
            peer.opened()
            links = [peer.dynamic_receiver(credit=1) for _ in range(200)]
            peer.pump(lambda: all(link.state & Endpoint.REMOTE_ACTIVE for link in links))
            assert len(listener.forwarder.dynamic) == 200
            for link in links:
                link.close()
            peer.pump(lambda: all(_detached(link) for link in links))
            peer.pump(
                lambda: (
                    not listener.forwarder.dynamic
                    and not any(ours.dynamic for ours in listener.peers)
                )
            )
        finally:
            peer.close()

    await asyncio.to_thread(churn)


async def test_a_sender_closed_for_its_fault_does_not_end_the_stream_cleanly(
    listener: DirectListener,
) -> None:
    """A sender to a dynamic address that the engine closes for sending past its credit
    is no clean detach: the dynamic receiver's stream is not ended as if it were."""
    port = listener.bound_port

    def attack() -> tuple[str | None, bool]:
        peer = RawPeer(port)
        try:
            peer.opened()
            replies = peer.dynamic_receiver(credit=100)
            peer.pump(lambda: bool(replies.remote_source.address))
            sender = peer.sender(replies.remote_source.address)
            peer.pump(_has_credit(sender))
            payload = b"\x00Su\xa0\x01x"  # a data section of one byte
            for _ in range(8):
                peer.send(sender, payload)
            peer.pump(lambda: peer.accept_all(replies) >= 8)
            # proton sends only within credit: past it, the frames are written by hand.
            peer.sock.sendall(b"".join(transfer_frame(0, 1, n, payload) for n in range(8, 40)))
            peer.pump(_all_detached([sender]))
            probe = peer.sender("anywhere")  # answered after anything sent before it
            peer.pump(_all_attached([probe]))
            return _condition(sender), _detached(replies)
        finally:
            peer.close()

    condition, replies_detached = await asyncio.to_thread(attack)
    assert condition == "amqp:link:transfer-limit-exceeded"
    assert not replies_detached


# -- 4. memory after the peer left --------------------------------------------------------
async def test_a_lost_peer_is_freed_without_the_cycle_collector(
    listener: DirectListener,
) -> None:
    """With the cycle collector off, a peer that held links of every kind, unfinished and
    unsettled deliveries, and then vanished is freed: peer, socket and every link owner."""
    port = listener.bound_port
    gone = asyncio.Event()
    attached = asyncio.Event()
    loop = asyncio.get_running_loop()

    def attack() -> None:
        peer = RawPeer(port)
        try:
            peer.opened()
            replies = [peer.dynamic_receiver(credit=100) for _ in range(20)]
            peer.pump(lambda: all(r.remote_source.address for r in replies))
            forwarded = [peer.sender("anywhere") for _ in range(3)]
            peer.pump(lambda: all(link.credit > 0 for link in forwarded))
            for link in forwarded:
                peer.send(link, b"y" * (300 * 1024), finished=False)
            management = peer.sender("$management")
            peer.pump(lambda: management.credit > 0)
            for reply in replies[:5]:
                peer.send(
                    management,
                    Message(properties={}, body={}, reply_to=reply.remote_source.address).encode(),
                )
            peer.pump(lambda: all(r.queued for r in replies[:5]))
            consumer: Link = peer.session.receiver("consumer")
            consumer.source.address = "jobs"
            consumer.open()
            consumer.flow(10)
            peer.pump(lambda: bool(consumer.state & Endpoint.REMOTE_ACTIVE))
            loop.call_soon_threadsafe(attached.set)
            peer.pump(gone.is_set)
        finally:
            peer.close()

    gc.collect()
    gc.disable()
    try:
        attacker = asyncio.create_task(asyncio.to_thread(attack))
        await asyncio.wait_for(attached.wait(), 10)
        peer = await eventually(lambda: _only_peer(listener), "the peer is connected", 1)
        assert peer is not None
        budget = budget_of(peer.socket)
        assert budget.partial == 3 * 300 * 1024
        owners: list[weakref.ref[Any]] = [weakref.ref(peer), weakref.ref(peer.socket)]
        link = peer.socket.engine.connection.link_head(0)
        while link is not None:
            owner = owner_of(link)
            if isinstance(owner, MessageReceiver | MessageSender):
                owners.append(weakref.ref(owner))
            link = link.next(0)
        assert len(owners) >= 2 + 3 + 1 + 5 + 1, owners
        del peer, link, owner
        gone.set()
        await attacker
        await eventually(lambda: not listener.peers, "the listener saw the peer go")
        await eventually(
            lambda: all(ref() is None for ref in owners),
            f"freed by reference counting: {[ref() for ref in owners if ref() is not None]}",
            5,
        )
    finally:
        gc.enable()


# -- 5. the log -----------------------------------------------------------------------------
FORGED = "2000-01-01 00:00:00,000 ERROR tunnel: forged"


@pytest.fixture
def plain_listener(tmp_path: Path) -> Iterator[tuple[TunnelProcess, int]]:
    process = TunnelProcess(
        ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:echo=>tcp:{LOOPBACK}:9"],
        tmp_path / "egress.log",
    )
    try:
        yield process, int(asyncio.run(process.amqp_port()))
        assert process.stop() == 0
    finally:
        process.kill()


def test_a_newline_from_the_peer_forges_no_log_line(
    plain_listener: tuple[TunnelProcess, int],
) -> None:
    """Link names, detach descriptions and close conditions with newlines stay one line."""
    process, port = plain_listener
    peer = RawPeer(port, container=f"c\n{FORGED}")
    try:
        peer.opened()
        links = [
            peer.sender("anywhere", name=f"a\n{FORGED}"),
            peer.sender("dynamic/nobody", name=f"b\n{FORGED}"),
            peer.dynamic_receiver(1, name=f"c\n{FORGED}"),
        ]
        peer.pump(lambda: all(link.state & Endpoint.REMOTE_ACTIVE for link in links))
        for link in links:
            link.condition = Condition("x:y", f"bye\n{FORGED}")
            link.close()
        peer.pump(lambda: all(_detached(link) for link in links))
        peer.connection.condition = Condition(f"x:z\n{FORGED}", f"bye\n{FORGED}")
        peer.connection.close()
        peer.pump(lambda: bool(peer.connection.state & Endpoint.REMOTE_CLOSED))
    finally:
        peer.close()
    asyncio.run(process.wait_for(r"closed with x:z"))
    log = process.log()
    assert "forged" in log
    assert not [line for line in log.splitlines() if line.startswith(FORGED)]


def test_garbage_connections_log_a_bounded_number_of_lines(
    plain_listener: tuple[TunnelProcess, int],
) -> None:
    """200 garbage connections from one host are said once per kind of failure, then counted."""
    process, port = plain_listener
    before = len(_loud_lines(process.log()))
    garbage = [
        b"AMQP\x03\x01\x00\x00" + struct.pack(">IBBH", 64, 2, 1, 0) + b"\x00\x53",
        b"AMQP\x03\x01\x00\x00" + struct.pack(">IBBH", 0xFFFFFFF0, 2, 1, 0),
        b"\x16\x03\x01 not AMQP",
        b"AMQP\x07\x01\x00\x00",
    ]
    for number in range(200):
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            sock.sendall(garbage[number % len(garbage)])
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    added = _loud_lines(process.log())[before:]
    assert len(added) <= len(garbage), added


def test_attach_detach_churn_logs_a_bounded_number_of_lines(
    plain_listener: tuple[TunnelProcess, int],
) -> None:
    """Hundreds of links attached and detached on one connection, each asking for what it
    may not have, add a bounded number of log lines at INFO and above."""
    process, port = plain_listener
    peer = RawPeer(port)
    try:
        peer.opened()
        before = len(_loud_lines(process.log()))
        replies = peer.dynamic_receiver(credit=1000)
        peer.pump(lambda: bool(replies.remote_source.address))
        refused = Message(
            properties={"operation": "DELETE"}, body={}, reply_to=replies.remote_source.address
        ).encode()
        for _ in range(100):
            links = [
                peer.sender("anywhere"),
                peer.sender("echo"),
                peer.sender("$management"),
                peer.dynamic_receiver(1),
                peer.session.receiver("jobs-consumer"),
            ]
            links[-1].source.address = "jobs"
            links[-1].open()
            peer.pump(_all_attached(links))
            peer.pump(_has_credit(links[2]))
            peer.send(links[2], refused)
            for link in links:
                link.close()
            peer.pump(_all_detached(links))
        added = _loud_lines(process.log())[before:]
    finally:
        peer.close()
    assert len(added) <= 2, added
