"""Bridge specs: ``SOURCE=>TARGET``, the syntax skupper-proxy's ``simple.js`` accepts.

Grammar (one spec; several may be joined with ``,`` in one argument)::

    spec     := ingress | egress
    ingress  := ("tcp:" | "http:" | "http2:") [host ":"] port "=>" "amqp:" address
    egress   := "amqp:" address "=>" ("tcp:" | "http:" | "http2:") [host ":"] port

Examples: ``tcp:2000=>amqp:echo`` listens on every interface, port 2000, and
carries each connection to whoever serves ``echo``; ``amqp:echo=>tcp:2000``
serves ``echo`` by connecting to ``$ICPROXY_BRIDGE_HOST`` (else ``localhost``)
port 2000. IPv6 hosts are written in brackets: ``tcp:[::1]:2000``.
``http:8080=>amqp:web`` and ``amqp:web=>http:8080`` carry HTTP/1.1, one
message per request and one per response (:mod:`tunnel.http_message`);
``http2:8080=>amqp:grpc`` and ``amqp:grpc=>http2:50051`` carry HTTP/2 and gRPC,
each stream as its own messages (:mod:`tunnel.http2_message`).

Unlike ``simple.js``, which silently drops what it cannot parse, every
malformed spec raises :class:`~tunnel.errors.ConfigError` naming the bad part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError

Port = Annotated[int, Field(ge=1, le=65535)]

DEFAULT_BRIDGE_HOST = "localhost"


class _Listening(BaseModel):
    """What every ``SCHEME:[HOST:]PORT=>amqp:ADDRESS`` spec holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: ClassVar[str]
    host: str | None = Field(default=None, description="Bind address; None binds every interface.")
    port: Annotated[int, Field(ge=0, le=65535, description="0 lets the OS choose (logged).")]
    address: str = Field(min_length=1)

    def __str__(self) -> str:
        return f"{self.scheme}:{join_host(self.host, self.port)}=>amqp:{self.address}"


class _Serving(BaseModel):
    """What every ``amqp:ADDRESS=>SCHEME:HOST:PORT`` spec holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: ClassVar[str]
    address: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: Port

    def __str__(self) -> str:
        return f"amqp:{self.address}=>{self.scheme}:{join_host(self.host, self.port)}"


class IngressSpec(_Listening):
    """``tcp:[HOST:]PORT=>amqp:ADDRESS``: accept TCP, carry it to ``address``."""

    scheme = "tcp"
    kind: Literal["ingress"] = "ingress"


class EgressSpec(_Serving):
    """``amqp:ADDRESS=>tcp:[HOST:]PORT``: serve ``address`` by connecting to a backend."""

    scheme = "tcp"
    kind: Literal["egress"] = "egress"


class HttpIngressSpec(_Listening):
    """``http:[HOST:]PORT=>amqp:ADDRESS``: serve HTTP, each request a message to ``address``."""

    scheme = "http"
    kind: Literal["http-ingress"] = "http-ingress"


class HttpEgressSpec(_Serving):
    """``amqp:ADDRESS=>http:[HOST:]PORT``: answer requests to ``address`` from an HTTP server."""

    scheme = "http"
    kind: Literal["http-egress"] = "http-egress"


class Http2IngressSpec(_Listening):
    """``http2:[HOST:]PORT=>amqp:ADDRESS``: serve HTTP/2, each stream messages to ``address``."""

    scheme = "http2"
    kind: Literal["http2-ingress"] = "http2-ingress"


class Http2EgressSpec(_Serving):
    """``amqp:ADDRESS=>http2:[HOST:]PORT``: serve streams to ``address`` from an HTTP/2 server."""

    scheme = "http2"
    kind: Literal["http2-egress"] = "http2-egress"


BridgeSpec = (
    IngressSpec | EgressSpec | HttpIngressSpec | HttpEgressSpec | Http2IngressSpec | Http2EgressSpec
)
_LISTENERS: dict[str, type[IngressSpec | HttpIngressSpec | Http2IngressSpec]] = {
    "tcp": IngressSpec,
    "http": HttpIngressSpec,
    "http2": Http2IngressSpec,
}
_SERVERS: dict[str, type[EgressSpec | HttpEgressSpec | Http2EgressSpec]] = {
    "tcp": EgressSpec,
    "http": HttpEgressSpec,
    "http2": Http2EgressSpec,
}


def join_host(host: str | None, port: int) -> str:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6), or just the port without a host."""
    if host is None:
        return str(port)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _parse_endpoint(text: str, spec: str, *, listener: bool) -> tuple[str | None, int]:
    """Parse ``[HOST:]PORT`` (``[v6]:PORT`` for IPv6)."""
    host: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(f"bad endpoint {text!r} in spec {spec!r}: expected [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ConfigError(
                f"bad endpoint {text!r} in spec {spec!r}: write IPv6 hosts as [HOST]:PORT"
            )
    else:
        host, port_text = None, text
    if host is not None and not host:
        raise ConfigError(f"empty host in endpoint {text!r} of spec {spec!r}")
    lowest = 0 if listener else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ConfigError(f"bad port {port_text!r} in spec {spec!r}: expected {lowest}-65535")
    return host, int(port_text)


def _split_side(side: str, spec: str) -> tuple[str, str]:
    scheme, sep, rest = side.partition(":")
    if not sep:
        raise ConfigError(
            f"{side!r} in spec {spec!r} has no scheme: "
            "expected tcp:..., http:..., http2:... or amqp:..."
        )
    if scheme not in ("tcp", "http", "http2", "amqp"):
        raise ConfigError(
            f"unsupported scheme {scheme!r} in spec {spec!r}: "
            "expected 'tcp', 'http', 'http2' or 'amqp'"
        )
    if not rest:
        raise ConfigError(f"{side!r} in spec {spec!r} is empty after {scheme!r}:")
    return scheme, rest


def parse_spec(spec: str, bridge_host: str = DEFAULT_BRIDGE_HOST) -> BridgeSpec:
    """Parse one ``SOURCE=>TARGET`` spec."""
    text = spec.strip()
    if text.count("=>") != 1:
        raise ConfigError(f"spec {spec!r} must have exactly one '=>' between source and target")
    source, target = (part.strip() for part in text.split("=>"))
    if not source or not target:
        raise ConfigError(f"spec {spec!r} is missing its {'source' if not source else 'target'}")
    src_scheme, src = _split_side(source, spec)
    dst_scheme, dst = _split_side(target, spec)
    if src_scheme in _LISTENERS and dst_scheme == "amqp":
        host, port = _parse_endpoint(src, spec, listener=True)
        listener = _LISTENERS[src_scheme]
        return listener(host=host, port=port, address=_check_address(dst, spec))
    if src_scheme == "amqp" and dst_scheme in _SERVERS:
        egress_host, port = _parse_endpoint(dst, spec, listener=False)
        server = _SERVERS[dst_scheme]
        return server(address=_check_address(src, spec), host=egress_host or bridge_host, port=port)
    raise ConfigError(
        f"spec {spec!r} bridges {src_scheme!r} to {dst_scheme!r}: expected SCHEME:...=>amqp:... "
        "or amqp:...=>SCHEME:..., SCHEME one of tcp, http, http2"
    )


def _check_address(address: str, spec: str) -> str:
    if any(ch.isspace() for ch in address):
        raise ConfigError(f"AMQP address {address!r} in spec {spec!r} contains whitespace")
    return address


def parse_specs(args: Iterable[str], env: Mapping[str, str]) -> list[BridgeSpec]:
    """Parse every spec in ``args`` (comma-separated or separate), else ``$ICPROXY_CONFIG``.

    Duplicate listeners or duplicate egress addresses are errors: the second
    one could never work, and dropping it silently is what we promise not to do.
    """
    items = list(args)
    origin = "argument"
    if not items and env.get("ICPROXY_CONFIG", "").strip():
        items, origin = [env["ICPROXY_CONFIG"]], "$ICPROXY_CONFIG"
    bridge_host = env.get("ICPROXY_BRIDGE_HOST") or DEFAULT_BRIDGE_HOST
    specs: list[BridgeSpec] = []
    for item in items:
        parts = item.split(",")
        for part in parts:
            if not part.strip():
                raise ConfigError(f"empty spec in {origin} {item!r} (stray comma?)")
            try:
                specs.append(parse_spec(part, bridge_host))
            except ConfigError as exc:
                if origin == "argument":
                    raise
                raise ConfigError(f"{origin}: {exc}") from None
    if not specs:
        raise ConfigError("no bridge spec given: pass SOURCE=>TARGET or set $ICPROXY_CONFIG")
    _check_unique(specs)
    return specs


def _check_unique(specs: list[BridgeSpec]) -> None:
    listeners: dict[tuple[str | None, int], BridgeSpec] = {}
    addresses: dict[str, BridgeSpec] = {}
    for spec in specs:
        if isinstance(spec, _Listening):
            key = (spec.host, spec.port)
            if key in listeners and spec.port != 0:
                raise ConfigError(
                    f"spec {str(spec)!r} listens on the same port as {str(listeners[key])!r}"
                )
            listeners[key] = spec
        else:
            if spec.address in addresses:
                first = addresses[spec.address]
                raise ConfigError(f"spec {str(spec)!r} serves the same address as {str(first)!r}")
            addresses[spec.address] = spec
