"""Bridge spec parsing: every good form, and every bad one with the part it names."""

from __future__ import annotations

import pytest

from tunnel.errors import ConfigError
from tunnel.spec import (
    EgressSpec,
    Http2EgressSpec,
    Http2IngressSpec,
    HttpEgressSpec,
    HttpIngressSpec,
    IngressSpec,
    parse_spec,
    parse_specs,
)

GOOD = [
    ("tcp:2000=>amqp:echo", IngressSpec(host=None, port=2000, address="echo")),
    ("tcp:127.0.0.1:2000=>amqp:echo", IngressSpec(host="127.0.0.1", port=2000, address="echo")),
    ("tcp:[::1]:2000=>amqp:a/b.c", IngressSpec(host="::1", port=2000, address="a/b.c")),
    ("tcp:0=>amqp:echo", IngressSpec(host=None, port=0, address="echo")),
    ("amqp:echo=>tcp:2000", EgressSpec(address="echo", host="localhost", port=2000)),
    ("amqp:echo=>tcp:db:5432", EgressSpec(address="echo", host="db", port=5432)),
    (" amqp:echo => tcp:2000 ", EgressSpec(address="echo", host="localhost", port=2000)),
    ("http:8080=>amqp:web", HttpIngressSpec(host=None, port=8080, address="web")),
    ("http:[::1]:0=>amqp:web", HttpIngressSpec(host="::1", port=0, address="web")),
    ("amqp:web=>http:8000", HttpEgressSpec(address="web", host="localhost", port=8000)),
    ("amqp:web=>http:srv:80", HttpEgressSpec(address="web", host="srv", port=80)),
    ("http2:8080=>amqp:grpc", Http2IngressSpec(host=None, port=8080, address="grpc")),
    ("http2:[::1]:0=>amqp:grpc", Http2IngressSpec(host="::1", port=0, address="grpc")),
    ("amqp:grpc=>http2:50051", Http2EgressSpec(address="grpc", host="localhost", port=50051)),
    ("amqp:grpc=>http2:srv:50051", Http2EgressSpec(address="grpc", host="srv", port=50051)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_good_specs(text: str, expected: object) -> None:
    """Each accepted form parses to the bridge it describes."""
    assert parse_spec(text) == expected


BAD = [
    ("tcp:2000", "exactly one '=>'"),
    ("tcp:2000=>amqp:a=>tcp:3", "exactly one '=>'"),
    ("=>amqp:echo", "missing its source"),
    ("tcp:2000=>", "missing its target"),
    ("udp:2000=>amqp:echo", "unsupported scheme 'udp'"),
    ("tcp:2000=>http:echo", "bridges 'tcp' to 'http'"),
    ("http:2000=>tcp:3000", "bridges 'http' to 'tcp'"),
    ("amqp:web=>http:0", "bad port '0'"),
    ("https:443=>amqp:web", "unsupported scheme 'https'"),
    ("2000=>amqp:echo", "has no scheme"),
    ("tcp:=>amqp:echo", "empty after 'tcp'"),
    ("tcp:2000=>amqp:", "empty after 'amqp'"),
    ("tcp:70000=>amqp:echo", "bad port '70000'"),
    ("tcp:http=>amqp:echo", "bad port 'http'"),
    ("amqp:echo=>tcp:0", "bad port '0'"),
    ("amqp:echo=>tcp:host:", "bad port ''"),
    ("tcp::2000=>amqp:echo", "empty host"),
    ("tcp:fe80::1:2000=>amqp:echo", "write IPv6 hosts as [HOST]:PORT"),
    ("tcp:[::1]2000=>amqp:echo", "expected [IPV6]:PORT"),
    ("tcp:2000=>tcp:3000", "bridges 'tcp' to 'tcp'"),
    ("amqp:a=>amqp:b", "bridges 'amqp' to 'amqp'"),
    ("http2:8080=>http2:9090", "bridges 'http2' to 'http2'"),
    ("amqp:grpc=>http2:0", "bad port '0'"),
    ("h2:8080=>amqp:grpc", "expected 'tcp', 'http', 'http2' or 'amqp'"),
    ("tcp:2000=>amqp:my echo", "contains whitespace"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_specs(text: str, message: str) -> None:
    """Each malformed spec is refused with a message naming the bad part."""
    with pytest.raises(ConfigError) as info:
        parse_spec(text)
    assert message in str(info.value)


def test_comma_separated_and_separate_arguments() -> None:
    """Specs may be comma-joined in one argument, as skupper-proxy takes them, or separate."""
    specs = parse_specs(["amqp:echo=>tcp:2000,tcp:3000=>amqp:echo", "tcp:4000=>amqp:x"], {})
    assert [str(s) for s in specs] == [
        "amqp:echo=>tcp:localhost:2000",
        "tcp:3000=>amqp:echo",
        "tcp:4000=>amqp:x",
    ]


def test_icproxy_config_and_bridge_host() -> None:
    """Without arguments $ICPROXY_CONFIG is read; $ICPROXY_BRIDGE_HOST is the egress default."""
    env = {"ICPROXY_CONFIG": "amqp:echo=>tcp:2000", "ICPROXY_BRIDGE_HOST": "backend"}
    assert parse_specs([], env) == [EgressSpec(address="echo", host="backend", port=2000)]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "no bridge spec given"),
        (["amqp:echo=>tcp:2000,"], {}, "stray comma"),
        ([], {"ICPROXY_CONFIG": "tcp:1=>amqp:a,,tcp:2=>amqp:b"}, "$ICPROXY_CONFIG"),
        (["tcp:2000=>amqp:a", "tcp:2000=>amqp:b"], {}, "listens on the same port"),
        (["amqp:a=>tcp:1", "amqp:a=>tcp:2"], {}, "serves the same address"),
        (["http:2000=>amqp:a", "tcp:2000=>amqp:b"], {}, "listens on the same port"),
        (["amqp:a=>http:1", "amqp:a=>tcp:2"], {}, "serves the same address"),
        (["tcp:1=>amqp:a,bogus"], {}, "'bogus'"),
    ],
)
def test_bad_spec_lists(args: list[str], env: dict[str, str], message: str) -> None:
    """A bad spec anywhere in the list fails the whole list: none is dropped silently."""
    with pytest.raises(ConfigError) as info:
        parse_specs(args, env)
    assert message in str(info.value)


def test_str_round_trips() -> None:
    """A spec's string form parses back to the same spec."""
    for text, spec in GOOD:
        assert parse_spec(str(spec)) == spec, text
