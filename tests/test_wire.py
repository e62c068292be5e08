"""The skupper-proxy message encoding, checked against proton's own codec."""

from __future__ import annotations

from typing import Any

import pytest
from proton import Data, Message

from tunnel import wire
from tunnel.codec import WireError, message_to


def _proton(message: bytes) -> Message:
    decoded = Message()
    decoded.decode(message)
    return decoded


@pytest.mark.parametrize("size", [0, 1, 255, 256, 70_000])
def test_our_data_message_is_amqp_value_binary(size: int) -> None:
    """What we send decodes, in proton, to reply_to plus an amqp-value binary body."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    message = wire.properties_section("dyn-1") + wire.body_header(size) + payload
    decoded = _proton(message)
    assert decoded.reply_to == "dyn-1"
    assert bytes(decoded.body) == payload  # type: ignore[arg-type]
    assert message[len(wire.properties_section("dyn-1")) :][:3] == b"\x00\x53\x77"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (Message(body=b"abc"), b"abc"),
        (Message(body=b"abc", reply_to="r", properties={"k": [1, 2], "m": {"a": 1}}), b"abc"),
        (Message(body=None), b""),
        (Message(body=b""), b""),
    ],
)
def test_decode_what_rhea_and_proton_send(message: Message, expected: bytes) -> None:
    """amqp-value binary, amqp-value null and any headers before them decode to the bytes."""
    body, eos = wire.decode(message.encode())
    assert bytes(body) == expected
    assert not eos


def test_decode_data_sections() -> None:
    """Data sections (0x75) are accepted too, and several are concatenated."""
    data = b"\x00\x53\x75\xa0\x03abc" + b"\x00\x53\x75\xb0\x00\x00\x00\x02de"
    body, _ = wire.decode(data)
    assert bytes(body) == b"abcde"


def test_eos_marker() -> None:
    """The end-of-stream marker has an empty binary body and the tunnel:eos property."""
    marker = wire.eos_message(wire.properties_section("dyn-9"))
    decoded = _proton(marker)
    assert decoded.properties == {wire.EOS_PROPERTY: True}
    assert bytes(decoded.body) == b""  # type: ignore[arg-type]
    assert decoded.reply_to == "dyn-9"
    body, eos = wire.decode(marker)
    assert eos and not body


def test_eos_property_false_is_not_a_marker() -> None:
    """Only a true value marks the end of the stream."""
    message = Message(body=b"x", properties={wire.EOS_PROPERTY: False, "other": True})
    assert wire.decode(message.encode())[1] is False


@pytest.mark.parametrize(
    "body",
    [["a", "list"], {"a": "map"}, "text", 42],
)
def test_non_binary_bodies_are_errors(body: Any) -> None:
    """A body that is not bytes is refused with WireError, never written as garbage."""
    with pytest.raises(wire.WireError):
        wire.decode(Message(body=body).encode())


def test_amqp_sequence_is_an_error() -> None:
    """amqp-sequence bodies cannot carry stream bytes."""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(0x76)
    data.put_list()
    data.exit()
    with pytest.raises(wire.WireError, match="amqp-sequence"):
        wire.decode(data.encode())


def test_garbage_is_an_error() -> None:
    """Bytes that are not message sections raise WireError, not IndexError."""
    with pytest.raises(wire.WireError):
        wire.decode(b"\x01\x02\x03")


@pytest.mark.parametrize("cut", [1, 3, 5, 8])
def test_truncated_messages_are_errors(cut: int) -> None:
    """A message cut short anywhere raises WireError instead of yielding short data."""
    message = wire.properties_section("r") + wire.body_header(4) + b"data"
    with pytest.raises(wire.WireError):
        wire.decode(message[:-cut])


@pytest.mark.parametrize(
    "message",
    [
        Message(address="dynamic/abc", body=b"x" * 70_000),
        Message(address="a" * 300, subject="GET", properties={"k": "v"}, body=None),
        Message(subject="no to", body="text"),
        Message(body=b"no properties section at all"),
    ],
)
def test_message_to_reads_what_proton_wrote(message: Message) -> None:
    """The router's view of an anonymous delivery: the same ``to`` proton decodes."""
    data = message.encode()
    decoded = Message()
    decoded.decode(data)
    assert message_to(data) == decoded.address


def test_message_to_names_a_malformed_message() -> None:
    data = Message(address="dynamic/abc", body=b"x").encode()
    with pytest.raises(WireError, match="truncated or malformed"):
        message_to(data[:12])
