"""What the router connection decides from the far end: the dialect, and the link routes.

The dialect comes from the Open properties (protocols.md §8.3), read here
from a scripted far end's real Open. The link routes are asked for with
``$management`` requests, answered here by a scripted Qpid Dispatch: only a
2xx statusCode makes an address active.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pytest
from proton import Delivery, Link, Message
from unit_harness import FarEnd, MemoryPort, read_messages

from tunnel.router import (
    LINK_ROUTE_TYPE,
    Dialect,
    ManagementClient,
    RouterConnection,
    choose_dialect,
)


@pytest.mark.parametrize(
    ("properties", "dialect", "said"),
    [
        ({"product": "skupper-router", "version": "3.5.1"}, Dialect.TCP_ADAPTOR, "3.5.1"),
        ({"product": "skupper-router", "version": "2.4.0"}, Dialect.TCP_ADAPTOR, "legacy"),
        ({"product": "qpid-dispatch-router", "version": "1.19.0"}, Dialect.LINK_ROUTE, "Qpid"),
        ({"product": "tunnel", "version": "0.1.0"}, Dialect.LINK_ROUTE, "tunnel 0.1.0"),
        ({}, Dialect.LINK_ROUTE, "unknown product"),
    ],
    ids=["skrouter3", "skrouter2", "qdrouterd", "our-direct-mode", "nothing"],
)
def test_the_dialect_from_the_open_properties(
    properties: dict[str, str], dialect: Dialect, said: str
) -> None:
    far = FarEnd(properties=properties)
    remote = far.engine.connection.remote_properties or {}
    chosen, why = choose_dialect(remote)
    assert chosen is dialect and said in why


def test_a_version_that_is_not_a_number_is_still_the_adaptor() -> None:
    assert choose_dialect({"product": "skupper-router", "version": "main"})[0] is (
        Dialect.TCP_ADAPTOR
    )


@dataclass
class FakeClient:
    egress: dict[str, object]
    routes_active: set[str] = field(default_factory=set)
    route_problems: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeRouterConnection:
    """The little of a RouterConnection that the management client uses."""

    client: FakeClient
    socket: MemoryPort


def managed(
    addresses: list[str], credit: int = 10
) -> tuple[FarEnd, FakeClient, Link, Link, ManagementClient]:
    far = FarEnd(properties={"product": "qpid-dispatch-router", "version": "1.19.0"})
    client = FakeClient(dict.fromkeys(addresses, object()))
    conn = FakeRouterConnection(client, far.port)
    management = ManagementClient(cast(RouterConnection, conn))
    management.start(far.session)
    far.pump()
    requests = replies = None
    for link in far.new_links():
        if link.is_receiver:
            assert link.remote_target.address == "$management"
            far.answer_mirror(link)
            link.flow(credit)
            requests = link
        else:
            far.answer_dynamic(link, "mgmt-replies")
            replies = link
    assert requests is not None and replies is not None
    far.pump()
    return far, client, requests, replies, management


def answer(far: FarEnd, requests: Link, replies: Link, status: dict[str, int]) -> None:
    for n, request in enumerate(read_messages(requests, Delivery.ACCEPTED)):
        props: dict[str, object] = request.properties or {}
        assert props["operation"] == "CREATE" and props["type"] == LINK_ROUTE_TYPE
        assert request.reply_to == "mgmt-replies"
        reply = Message(
            properties={"statusCode": status[str(props["name"])], "statusDescription": "said so"},
            correlation_id=request.correlation_id,
            body={},
        )
        delivery = replies.delivery(f"reply-{n}")
        replies.send(reply.encode())
        replies.advance()
        assert delivery is not None
    far.pump()


def test_a_created_link_route_is_active() -> None:
    far, client, requests, replies, _ = managed(["svc-a"])
    answer(far, requests, replies, {"svc-a": 201})
    assert client.routes_active == {"svc-a"}


@pytest.mark.parametrize("status", [400, 403, 500, 199, 300])
def test_a_refused_link_route_is_not_active(status: int) -> None:
    far, client, requests, replies, _ = managed(["svc-a", "svc-b"])
    answer(far, requests, replies, {"svc-a": status, "svc-b": 201})
    assert client.routes_active == {"svc-b"}


@pytest.mark.parametrize(
    ("credit", "why"),
    [(0, "no credit from the router on $management"), (10, "the router has not answered")],
)
def test_overdue_routes_are_told_why(credit: int, why: str) -> None:
    _, client, requests, _, management = managed(["svc-a", "svc-b"], credit=credit)
    read_messages(requests, Delivery.ACCEPTED)
    management.on_overdue()
    assert set(client.route_problems) == {"svc-a", "svc-b"}
    assert all(problem.startswith(why) for problem in client.route_problems.values())


def test_an_answer_after_the_warning_clears_the_problem() -> None:
    far, client, requests, replies, management = managed(["svc-a"])
    management.on_overdue()
    answer(far, requests, replies, {"svc-a": 201})
    assert client.routes_active == {"svc-a"} and client.route_problems == {}


def test_a_reply_for_an_unknown_request_changes_nothing() -> None:
    far, client, requests, replies, _ = managed(["svc-a"])
    read_messages(requests, Delivery.ACCEPTED)
    replies.delivery("stray")
    replies.send(Message(properties={"statusCode": 201}, correlation_id=99).encode())
    replies.advance()
    far.pump()
    assert client.routes_active == set()


def test_no_request_before_the_reply_address_is_known() -> None:
    far = FarEnd()
    client = FakeClient({"svc-a": object()})
    management = ManagementClient(cast(RouterConnection, FakeRouterConnection(client, far.port)))
    management.start(far.session)
    far.pump()
    for link in far.new_links():
        if link.is_receiver:
            far.answer_mirror(link)
            link.flow(10)
    far.pump()
    assert management.sent is False and management.pending == {}
