"""The HTTP <-> message mapping on its own: no sockets, no processes."""

from __future__ import annotations

import contextlib

import pytest
from proton import Message, symbol, ulong

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


# -- malformed messages and header bytes ----------------------------------------
_BODY_MARK = b"\x00Sw\xa0\x04MARK"


def _with_app_properties(value: bytes) -> bytes:
    """A GET whose application-properties section holds the encoded ``value``, which
    proton's Message cannot be made to send when it is not a map."""
    message = Message(address="svc/p", subject="GET", reply_to="r", body=b"MARK")
    data = hm.encode(message)
    assert data.endswith(_BODY_MARK)
    return data[: -len(_BODY_MARK)] + b"\x00St" + value + _BODY_MARK


def _request_bytes() -> bytes:
    request = hm.HttpRequest(
        "POST", "/p?q=1", [("host", "svc"), ("x-name", "r\xe9sum\xe9")], b"body"
    )
    return hm.encode(
        hm.request_message(request, site_id="site", correlation_id=9, reply_to="reply")
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"\xc0\x04\x01\xa1\x01a", "a list"),  # list8 of one string
        (b"\xa1\x03abc", "a str"),
        (b"\x54\x07", "an int32"),
    ],
)
def test_application_properties_that_are_not_a_map_are_a_wire_error(
    value: bytes, kind: str
) -> None:
    """An application-properties section that is a list or a string: a WireError naming it."""
    message = hm.decode(_with_app_properties(value))
    with pytest.raises(WireError, match=f"application properties are {kind}, not a map"):
        hm.request_of(message)
    with pytest.raises(WireError, match=f"application properties are {kind}, not a map"):
        hm.response_of(Message(subject="200", properties=message.properties))


def test_flipped_bytes_raise_only_wire_errors() -> None:
    """Every byte of an encoded request flipped in turn: decoding and reading it as a request
    or a response either works or raises WireError, never anything else."""
    data = _request_bytes()
    for offset in range(len(data)):
        for mask in (0xFF, 0x80, 0x01, 0x20):
            flipped = bytearray(data)
            flipped[offset] ^= mask
            try:
                message = hm.decode(flipped)
            except WireError:
                continue
            for read in (hm.request_of, hm.response_of):
                with contextlib.suppress(WireError):
                    read(message)


def test_a_subject_that_is_not_utf8_is_a_wire_error_naming_it() -> None:
    """A subject holding bytes that are not UTF-8 fails at decode, naming the subject."""
    data = hm.encode(Message(address="svc/p", subject="G\xc9T", reply_to="r"))
    at = data.index("\xc9".encode())
    broken = data[:at] + b"\xff" + data[at + 1 :]
    with pytest.raises(WireError, match="message property subject is not UTF-8"):
        hm.decode(broken)


def test_header_bytes_are_carried_as_latin1_both_ways() -> None:
    """obs-text in a header (a Latin-1 file name, raw UTF-8 bytes) comes out byte for byte."""
    raw = [
        (b"Content-Disposition", b'attachment; filename="r\xe9sum\xe9.pdf"'),
        (b"X-U", b"caf\xc3\xa9"),
    ]
    fields = hm.end_to_end(raw)
    request = hm.HttpRequest("GET", "/p", [("host", "svc"), *fields], b"")
    message = hm.decode(
        hm.encode(hm.request_message(request, site_id="s", correlation_id=1, reply_to="r"))
    )
    carried = hm.request_of(message).headers
    assert hm.wire_headers(carried) == [
        (b"host", b"svc"),
        (b"content-disposition", b'attachment; filename="r\xe9sum\xe9.pdf"'),
        (b"x-u", b"caf\xc3\xa9"),
    ]
    response = hm.HttpResponse(200, fields, b"")
    back = hm.response_of(
        hm.decode(hm.encode(hm.response_message(response, to="r", correlation_id=1, site_id="s")))
    )
    assert hm.wire_headers(back.headers)[:2] == [(name.lower(), value) for name, value in raw]


def test_a_utf8_string_from_the_node_proxy_goes_out_as_utf8() -> None:
    """A value beyond Latin-1 (a node proxy's JavaScript string) is written as UTF-8."""
    headers = hm.unfold({"x-name": "caf\u00e9 \u2603"}, None)
    assert hm.wire_headers(headers) == [(b"x-name", "caf\u00e9 \u2603".encode())]


@pytest.mark.parametrize(
    ("props", "error"),
    [
        ({"x-a": "one\r\nx-injected: 1"}, "header 'x-a' holds a control character"),
        ({"x-a": ["ok", "b\x00d"]}, "header 'x-a' holds a control character"),
        ({"set-cookie": "a=1\n\rb=2"}, "header 'set-cookie' holds a control character"),
        ({"bad name": "1"}, "application property 'bad name' is not a header field name"),
        ({"caf\u00e9": "1"}, "is not a header field name"),
        ({"x-a": [["nested"]]}, "application property 'x-a' nests a list in a list"),
    ],
)
def test_properties_that_cannot_be_header_fields_are_wire_errors(
    props: dict[str, object], error: str
) -> None:
    """A property whose key is no field name, or whose value would break the head."""
    with pytest.raises(WireError, match=error):
        hm.unfold(props, None)


def test_a_key_that_is_not_a_string_is_a_wire_error() -> None:
    """Application-property keys are strings (AMQP 1.0 §3.2.5); an int key is named."""
    message = hm.decode(_with_app_properties(b"\xc1\x05\x02\x54\x07\xa1\x00"))  # map8 {7: ""}
    with pytest.raises(WireError, match=r"application property key int32\(7\) is not a string"):
        hm.request_of(message)


def test_a_content_type_with_a_line_break_is_a_wire_error() -> None:
    message = Message(address="svc/p", subject="GET", content_type="text/plain\r\nx-a: 1")
    with pytest.raises(WireError, match="header 'content-type' holds a control character"):
        hm.request_of(hm.decode(hm.encode(message)))


def test_a_target_that_is_not_visible_ascii_is_a_wire_error() -> None:
    """h11 would refuse it anyway; named here, as the request's fault."""
    with pytest.raises(WireError, match="does not end in a request target"):
        hm.request_of(Message(address="svc/a b", subject="GET"))


@pytest.mark.parametrize("length", ["\u00b2", "1" * 5000])
def test_odd_digits_in_content_length_are_wire_errors(length: str) -> None:
    """A superscript two is a digit to str.isdigit but not to int(); 5000 digits are too
    many for int(): both a WireError, not a ValueError."""
    message = Message(address="svc/p", subject="POST", properties={"content-length": length})
    with pytest.raises(WireError, match="'content-length'"):
        hm.request_of(message)


@pytest.mark.parametrize("subject", ["+200", " 200", "2_00", "\u0662\u0660\u0660"])
def test_a_status_must_be_three_ascii_digits(subject: str) -> None:
    with pytest.raises(WireError, match="is not an HTTP status code"):
        hm.response_of(Message(subject=subject))


def test_a_missing_content_type_is_none_not_the_symbol_none() -> None:
    """No Content-Type: none on the wire and none read back, for requests and responses
    (proton's getter says 'None', which was then sent as the header ``None``)."""
    request = hm.HttpRequest("GET", "/p", [("host", "svc")], b"")
    sent = hm.request_message(request, site_id="s", correlation_id=1, reply_to="r")
    got = hm.decode(hm.encode(sent))
    assert hm.content_type_of(got) is None
    assert hm.request_of(got).headers == [("host", "svc")]
    response = hm.HttpResponse(200, [("x-a", "1")], b"")
    answer = hm.decode(
        hm.encode(hm.response_message(response, to="r", correlation_id=1, site_id="s"))
    )
    assert hm.content_type_of(answer) is None
    assert hm.response_of(answer).headers == [("x-a", "1"), ("content-length", "0")][:1]
    # A content type that is there is still carried.
    typed = hm.response_message(
        hm.HttpResponse(200, [("content-type", "text/plain")], b""),
        to="r",
        correlation_id=1,
        site_id="s",
    )
    assert hm.content_type_of(hm.decode(hm.encode(typed))) == "text/plain"


@pytest.mark.parametrize(
    ("value", "answer"),
    [
        (7, ulong(7)),
        ("abc", "abc"),
        (b"\x01", b"\x01"),
        (memoryview(b"\x02"), b"\x02"),
        (-1, None),
        (1 << 64, None),
        (True, None),
        (1.5, None),
        ([1], None),
        (None, None),
    ],
)
def test_only_message_id_types_can_be_answered(value: object, answer: object) -> None:
    """A correlation id that is not a ulong, uuid, binary or string cannot be echoed
    (proton cannot even encode a negative one as a message id)."""
    assert hm.answer_id(value) == answer
    if answer is not None:
        hm.encode(Message(correlation_id=hm.answer_id(value)))
