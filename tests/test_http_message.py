"""The HTTP <-> message mapping on its own: no sockets, no processes."""

from __future__ import annotations

import pytest
from proton import Message, symbol

from tunnel import http_message as hm
from tunnel.codec import WireError


@pytest.mark.parametrize(
    ("host", "to"),
    [
        ("svc:8080", "svc/p?q=1"),
        ("svc", "svc/p?q=1"),
        ("[::1]:80", "[::1]/p?q=1"),
        ("[::1]", "[::1]/p?q=1"),
        (None, "/p?q=1"),
    ],
)
def test_to_is_host_name_then_target(host: str | None, to: str) -> None:
    """``to`` is the Host's name without its port, then the path and query (§2.1)."""
    headers = [("host", host)] if host else []
    request = hm.HttpRequest("GET", "/p?q=1", headers, b"")
    message = hm.request_message(request, site_id="s", correlation_id=5, reply_to="r")
    assert message.address == to
    assert message.correlation_id == 5
    # On the wire a ulong (smallulong 0x53), as rhea's counter is, not a long (0x55).
    assert b"\x53\x05" in hm.encode(message)


def test_hop_by_hop_fields_are_not_carried() -> None:
    """Connection, the fields it names, framing fields: gone; the rest lower-cased, in order."""
    fields = hm.end_to_end(
        [
            (b"Host", b"svc"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"3"),
            (b"X-Keep", b"2"),
            (b"TE", b"trailers"),
        ]
    )
    assert fields == [("host", "svc"), ("x-keep", "2")]


def test_repeated_fields_fold_and_unfold() -> None:
    """Repeated fields become one simple string each; Set-Cookie splits back into its fields."""
    content_type, props = hm.fold(
        [
            ("accept", "a"),
            ("set-cookie", "x=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
            ("accept", "b"),
            ("set-cookie", "y=2"),
            ("content-type", "text/plain"),
        ]
    )
    assert content_type == "text/plain"
    assert props == {
        "accept": "a, b",
        "set-cookie": "x=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT\ny=2",
    }
    assert hm.unfold(props, content_type) == [
        ("accept", "a, b"),
        ("set-cookie", "x=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
        ("set-cookie", "y=2"),
        ("content-type", "text/plain"),
    ]


def test_node_proxy_lists_are_accepted() -> None:
    """The node proxy sends repeated fields as lists: each item becomes a field."""
    assert hm.unfold(
        {"X-Multi": ["a", "b"], "x-n": 3, "Connection": "close"}, symbol("text/html")
    ) == [("x-multi", "a"), ("x-multi", "b"), ("x-n", "3"), ("content-type", "text/html")]


def test_absolute_form_target_becomes_origin_form() -> None:
    """An absolute-form target (as sent to a proxy) is carried as ``/p?q``, Host svc:81."""
    request = hm.HttpRequest("GET", "http://svc:81/p?q", [("host", "other"), ("x", "1")], b"")
    assert request.origin_form() == hm.HttpRequest(
        "GET", "/p?q", [("host", "svc:81"), ("x", "1")], b""
    )


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Message(subject=None, address="svc/"), "subject None is not an HTTP method"),
        (Message(subject="GET /x", address="svc/"), "is not an HTTP method"),
        (Message(subject="GET", address="svc/", body={"a": 1}), "body is dict, not binary"),
        (
            Message(subject="GET", address="svc/", properties={"x": {"a": 1}}),
            "application property 'x' is a map",
        ),
    ],
)
def test_bad_requests_name_the_field(message: Message, error: str) -> None:
    """A message that is not a request says which field is wrong."""
    with pytest.raises(WireError, match=error):
        hm.request_of(message)


@pytest.mark.parametrize("subject", [None, "OK", "99", "600"])
def test_bad_status_names_the_subject(subject: str | None) -> None:
    """A response whose subject is no status code is refused, naming it."""
    with pytest.raises(WireError, match="is not an HTTP status code"):
        hm.response_of(Message(subject=subject))


def test_round_trip_through_bytes() -> None:
    """A response survives encoding: status, headers, body; the correlation id is echoed."""
    response = hm.HttpResponse(201, [("x-a", "1"), ("content-type", "text/plain")], b"made")
    message = hm.decode(
        hm.encode(hm.response_message(response, to="r", correlation_id=7, site_id="s"))
    )
    assert (message.address, message.correlation_id, message.group_id) == ("r", 7, "s")
    assert hm.response_of(message) == hm.HttpResponse(
        201, [("x-a", "1"), ("content-type", "text/plain")], b"made"
    )


@pytest.mark.parametrize(
    ("method", "body", "expected"),
    [
        ("POST", b"abc", "3"),
        ("POST", b"", "0"),
        ("PUT", b"", "0"),
        ("GET", b"x", "1"),
        ("GET", b"", None),
        ("HEAD", b"", None),
    ],
)
def test_request_content_length_is_the_body_length(
    method: str, body: bytes, expected: str | None
) -> None:
    """The node egress frames a request by the Content-Length it is given."""
    request = hm.HttpRequest(method, "/p", [("host", "svc"), ("content-length", "99")], body)
    message = hm.request_message(request, site_id="s", correlation_id=1, reply_to="r")
    properties: dict[str, object] = message.properties or {}
    assert properties.get("content-length") == expected


@pytest.mark.parametrize(
    ("status", "bodyless", "expected"),
    [
        (200, False, "4"),
        (200, True, None),
        (204, True, None),
    ],
)
def test_response_content_length(status: int, bodyless: bool, expected: str | None) -> None:
    response = hm.HttpResponse(status, [], b"body" if not bodyless else b"")
    message = hm.response_message(
        response, to="r", correlation_id=1, site_id="s", bodyless=bodyless
    )
    properties: dict[str, object] = message.properties or {}
    assert properties.get("content-length") == expected


@pytest.mark.parametrize("length", ["4", "x", "-1", ""])
def test_request_length_must_match_the_body(length: str) -> None:
    """A Content-Length that is not the body's is refused, naming the property."""
    message = Message(
        address="svc/p", subject="POST", properties={"content-length": length}, body=b"abc"
    )
    with pytest.raises(WireError, match="'content-length'"):
        hm.request_of(message)


def test_request_length_matching_the_body_is_taken() -> None:
    message = Message(
        address="svc/p", subject="POST", properties={"content-length": "3"}, body=b"abc"
    )
    request = hm.request_of(message)
    assert request.body == b"abc"
    assert ("content-length", "3") not in request.headers
