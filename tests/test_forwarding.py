"""Direct mode as a router between its peers: management requests, consumers, outcomes.

The peers are proton's blocking client, each on its own connection to one
direct-mode process; the node proxy's side of the same paths is in
test_node_peer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOPBACK, TunnelProcess
from proton import Delivery, Message
from proton.utils import BlockingConnection, LinkDetached, SendException
from reactor_peer import free_port

LINK_ROUTE = "org.apache.qpid.dispatch.router.connection.linkRoute"


@pytest.fixture
async def direct(tmp_path: Path) -> AsyncIterator[int]:
    """A direct-mode process serving ``local`` itself; its AMQP port."""
    ours = TunnelProcess(
        ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:local=>tcp:{LOOPBACK}:{free_port()}"],
        tmp_path / "tunnel.log",
    )
    try:
        yield await ours.amqp_port()
        assert ours.stop() == 0, ours.log()
    finally:
        ours.kill()


def _ask(port: int, requests: list[tuple[dict[str, Any], Any]]) -> list[tuple[int, str]]:
    """Send each (application properties, body) to ``$management``; the answers, in order."""
    conn = BlockingConnection(f"amqp://{LOOPBACK}:{port}", timeout=10)
    try:
        replies = conn.create_receiver(None, dynamic=True, credit=len(requests))
        reply_to = replies.link.remote_source.address
        sender = conn.create_sender("$management")
        answers = []
        for number, (properties, body) in enumerate(requests, start=1):
            sender.send(
                Message(properties=properties, body=body, reply_to=reply_to, correlation_id=number)
            )
            answer = replies.receive(timeout=10)
            replies.accept()
            assert answer.correlation_id == number
            props: dict[str, Any] = answer.properties or {}
            answers.append((props["statusCode"], props["statusDescription"]))
        return answers
    finally:
        conn.close()


async def test_management_answers_each_request_naming_what_is_wrong(direct: int) -> None:
    create = {"operation": "CREATE", "type": LINK_ROUTE, "name": "r"}
    answers = await asyncio.to_thread(
        _ask,
        direct,
        [
            ({"operation": "READ", "type": LINK_ROUTE}, {}),
            ({"operation": "CREATE", "type": "org.apache.qpid.dispatch.router.address"}, {}),
            (create, "not a map"),
            (create, {"direction": "in"}),
            (create, {"pattern": "svc", "direction": "out"}),
            (create, {"pattern": "svc.*", "direction": "in"}),
            (create, {"pattern": "local", "direction": "in"}),
            (create, {"pattern": "dynamic/0123", "direction": "in"}),
            (create, {"pattern": "svc", "direction": "in"}),
        ],
    )
    assert answers == [
        (501, "operation 'READ' is not supported, only CREATE"),
        (
            400,
            f"type 'org.apache.qpid.dispatch.router.address' is not supported, only {LINK_ROUTE}",
        ),
        (400, "the body is not a map"),
        (400, "the body has no pattern"),
        (400, "direction 'out' is not routed, only 'in'"),
        (400, "pattern 'svc.*': wildcards are not supported"),
        (409, "address 'local' is served by this process"),
        (403, "pattern 'dynamic/0123' is a dynamic address"),
        (201, "Created"),
    ]


def _consume(
    port: int, address: str, count: int, got: list[bytes], attached: threading.Event
) -> None:
    """Take ``count`` messages from ``address``: accept each, but reject ``b"bad"``."""
    conn = BlockingConnection(f"amqp://{LOOPBACK}:{port}", timeout=10)
    try:
        receiver = conn.create_receiver(address, credit=1)
        attached.set()
        for _ in range(count):
            message = receiver.receive(timeout=10)
            body = bytes(message.body)  # type: ignore[arg-type]
            got.append(body)
            if body == b"bad":
                receiver.reject()
            else:
                receiver.accept()
    finally:
        conn.close()


async def test_consumers_take_turns_and_their_outcomes_come_back(direct: int) -> None:
    first: list[bytes] = []
    second: list[bytes] = []
    ready = [threading.Event(), threading.Event()]
    consumers = [
        asyncio.create_task(asyncio.to_thread(_consume, direct, "jobs", n, got, r))
        for n, got, r in ((2, first, ready[0]), (2, second, ready[1]))
    ]
    for event in ready:
        assert await asyncio.to_thread(event.wait, 10)

    def produce() -> list[int]:
        conn = BlockingConnection(f"amqp://{LOOPBACK}:{direct}", timeout=10)
        try:
            sender = conn.create_sender("jobs")
            outcomes = []
            for body in (b"one", b"two", b"bad", b"four"):
                try:
                    outcomes.append(sender.send(Message(body=body)).remote_state)
                except SendException as exc:
                    outcomes.append(exc.state)
            return outcomes
        finally:
            conn.close()

    outcomes = await asyncio.to_thread(produce)
    await asyncio.gather(*consumers)
    assert outcomes == [Delivery.ACCEPTED, Delivery.ACCEPTED, Delivery.REJECTED, Delivery.ACCEPTED]
    assert sorted(first + second) == sorted([b"one", b"two", b"bad", b"four"])
    assert first and second, "one consumer took every message"


async def test_a_message_nobody_consumes_is_released(direct: int) -> None:
    def produce() -> int:
        conn = BlockingConnection(f"amqp://{LOOPBACK}:{direct}", timeout=10)
        try:
            sender = conn.create_sender("nobody")
            with pytest.raises(SendException) as raised:
                sender.send(Message(body=b"hello?"))
            return int(raised.value.state)
        finally:
            conn.close()

    assert await asyncio.to_thread(produce) == Delivery.RELEASED


async def test_no_peer_takes_another_peers_dynamic_address(direct: int) -> None:
    """Replies to one connection's dynamic receiver cannot be consumed from another."""

    def hijack() -> tuple[str, bytes]:
        owner = BlockingConnection(f"amqp://{LOOPBACK}:{direct}", timeout=10)
        thief = BlockingConnection(f"amqp://{LOOPBACK}:{direct}", timeout=10)
        try:
            replies = owner.create_receiver(None, dynamic=True, credit=1)
            address = replies.link.remote_source.address
            with pytest.raises(LinkDetached) as refused:
                thief.create_receiver(address, credit=1)
            got: list[bytes] = []
            sent = threading.Event()

            def receive() -> None:
                message = replies.receive(timeout=10)  # kept: its body views its buffer
                got.append(bytes(message.body))  # type: ignore[arg-type]
                replies.accept()
                owner.wait(sent.is_set, timeout=10)  # keeps the owner's side turning

            owner_side = threading.Thread(target=receive)
            owner_side.start()
            thief.create_sender(address).send(Message(body=b"for the owner"))
            sent.set()
            owner_side.join(10)
            return str(refused.value.condition), got[0]
        finally:
            thief.close()
            owner.close()

    condition, body = await asyncio.to_thread(hijack)
    assert "amqp:unauthorized-access" in condition
    assert body == b"for the owner"
