"""``python -m tunnel [OPTIONS] SPEC [SPEC ...]``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import __version__, flows, http_message
from .amqp.engine import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FRAME_SIZE, MIN_PEER_IDLE_TIMEOUT
from .app import DEFAULT_GRACE, Settings, run
from .bridge import DEFAULT_HOLD_TIMEOUT, DEFAULT_OPEN_TIMEOUT
from .config import ConnectionConfig, ListenConfig, find_connection_file, load_connection_file
from .dialects.link_route import CREDIT_BUDGET, MAX_DELIVERY, START_WINDOW
from .errors import ConfigError, StartupError
from .limits import (
    DEFAULT_HALF_CLOSED_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SILENT_TIMEOUT,
    Limits,
)
from .router import Dialect
from .spec import parse_specs

logger = logging.getLogger("tunnel")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel",
        description="Carry TCP connections over AMQP 1.0 (skupper-proxy compatible).",
        epilog="SPEC is tcp:[HOST:]PORT=>amqp:ADDRESS or amqp:ADDRESS=>tcp:[HOST:]PORT, "
        "or the same with http: for HTTP/1.1 bridges and http2: for HTTP/2 and gRPC; "
        "several may be joined with commas. "
        "Without SPEC, $ICPROXY_CONFIG is read.",
    )
    parser.add_argument("specs", nargs="*", metavar="SPEC", help="bridge spec(s)")
    parser.add_argument("--config", metavar="PATH", help="router connection file (connect.json)")
    parser.add_argument(
        "--listen",
        metavar="URL",
        help="direct mode: accept AMQP on amqp://HOST:PORT or amqps://HOST:PORT",
    )
    parser.add_argument("--listen-cert", metavar="PEM", help="direct mode TLS certificate")
    parser.add_argument("--listen-key", metavar="PEM", help="direct mode TLS private key")
    parser.add_argument(
        "--listen-ca",
        metavar="PEM",
        help="direct mode: require client certificates signed by this CA",
    )
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics over HTTP (off by default)",
    )
    parser.add_argument(
        "--site-id", help="site id in link names (default: $SKUPPER_SITE_ID, else the host name)"
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, help="default: $LOGLEVEL, else INFO"
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object a line (default %(default)s)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help=(
            "a fixed credit window per link, in deliveries of up to"
            f" {MAX_DELIVERY // 1024} KiB (default: sized for the path, from {START_WINDOW}"
            f" to {CREDIT_BUDGET // MAX_DELIVERY})"
        ),
    )
    parser.add_argument(
        "--open-timeout",
        type=float,
        default=DEFAULT_OPEN_TIMEOUT,
        help="seconds an ingress waits for credit before resetting the client "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--hold-timeout",
        type=float,
        default=DEFAULT_HOLD_TIMEOUT,
        help="seconds a new connection is held while the router is away, "
        "before it is reset (default %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help="seconds open tunnels get to finish on SIGTERM (default %(default)s)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="direct mode: seconds a new AMQP connection has to open (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="tunnels open at once per bridge; past it new connections are "
        "reset (default %(default)s)",
    )
    parser.add_argument(
        "--max-connections-per-peer",
        type=int,
        help="tunnels one peer (a client address at an ingress, a direct-mode AMQP "
        "connection at an egress) may have open per bridge (default: half of "
        "--max-connections, rounded up)",
    )
    parser.add_argument(
        "--max-links-per-connection",
        type=int,
        help="links, and sessions, a peer may open on one AMQP connection; past it the "
        "peer is closed with amqp:resource-limit-exceeded (default: twice "
        "--max-connections, plus 64)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=0.0,
        help="reset a tunnel that carries nothing for this many seconds (default 0: never)",
    )
    parser.add_argument(
        "--amqp-idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="seconds of silence after which an AMQP peer (the router) is taken for dead; "
        f"it is asked to send heartbeats at half that (default %(default)g; at least "
        f"{MIN_PEER_IDLE_TIMEOUT:g}, 0: never)",
    )
    parser.add_argument(
        "--silent-timeout",
        type=float,
        default=DEFAULT_SILENT_TIMEOUT,
        help="reset a tunnel that has not carried a single byte after this many seconds "
        "(default %(default)s; 0: never)",
    )
    parser.add_argument(
        "--half-closed-timeout",
        type=float,
        default=DEFAULT_HALF_CLOSED_TIMEOUT,
        help="reset a tunnel left half-closed and silent this long (default %(default)s; 0: never)",
    )
    parser.add_argument(
        "--max-frame-size",
        type=int,
        default=DEFAULT_MAX_FRAME_SIZE,
        help="largest AMQP frame we accept, in bytes (default %(default)s)",
    )
    parser.add_argument(
        "--session-window",
        type=int,
        default=0,
        help="bytes an AMQP session takes in before the peer must wait; "
        "at least the frame size (default 0: proton's)",
    )
    parser.add_argument(
        "--dialect",
        choices=[d.value for d in Dialect],
        default="auto",
        help="how TCP travels through the router: link-route (Qpid Dispatch, "
        "skupper-proxy's messages), tcp-adaptor (skupper-router 3.x streams), "
        "or auto: chosen from the router's Open (default %(default)s)",
    )
    parser.add_argument(
        "--http-timeout",
        type=float,
        default=http_message.DEFAULT_TIMEOUT,
        help="HTTP bridges: seconds a request may take before it is answered "
        "504 (default %(default)s)",
    )
    parser.add_argument(
        "--http-max-body",
        type=int,
        default=http_message.DEFAULT_MAX_BODY,
        help="HTTP bridges: largest request or response body, in bytes; larger "
        "requests get 413, larger responses 502 (default %(default)s)",
    )
    parser.add_argument(
        "--http-max-held",
        type=int,
        default=http_message.DEFAULT_HELD_BYTES,
        help="HTTP egress: bytes of requests held per consumer link, received and not "
        "yet answered; at least one largest message (default %(default)s)",
    )
    parser.add_argument(
        "--http-window",
        type=int,
        default=http_message.DEFAULT_WINDOW,
        help="HTTP egress: requests in hand at once per consumer link (default %(default)s)",
    )
    parser.add_argument(
        "--http2-cert",
        metavar="PEM",
        help="HTTP/2 ingress: serve TLS with ALPN h2 with this certificate (default: h2c)",
    )
    parser.add_argument("--http2-key", metavar="PEM", help="HTTP/2 ingress: its private key")
    parser.add_argument(
        "--http2-backend-ca",
        metavar="PEM",
        help="HTTP/2 egress: reach backends over TLS with ALPN h2, verified against this CA "
        "(default: h2c)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop (default %(default)s)",
    )
    parser.add_argument("--version", action="version", version=f"tunnel {__version__}")
    return parser


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Turn parsed arguments and the environment into settings; raises ConfigError."""
    specs = parse_specs(args.specs, env)
    _check_numbers(args)
    listen = None
    if args.listen:
        listen = ListenConfig.parse(args.listen, args.listen_cert, args.listen_key, args.listen_ca)
    elif args.listen_cert or args.listen_key or args.listen_ca:
        raise ConfigError("--listen-cert/--listen-key/--listen-ca need --listen")
    if args.config:
        path: Path | None = Path(args.config)
        source = f"--config {args.config}"
    else:
        path = find_connection_file(env)
        source = str(path) if path else ""
    router = None
    if path is not None:
        conn = load_connection_file(path)
        try:
            router = conn.endpoint()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        _warn_insecure(conn, source)
    elif listen is None:
        source = "default: no connection file found"
        router = ConnectionConfig().endpoint()
    else:
        source = "own direct-mode listener"
    if bool(args.http2_cert) != bool(args.http2_key):
        raise ConfigError("--http2-cert and --http2-key go together")
    site_id = args.site_id or env.get("SKUPPER_SITE_ID") or socket.gethostname()
    return Settings(
        specs=tuple(specs),
        router=router,
        router_source=source,
        listen=listen,
        site_id=site_id,
        window=args.window,
        open_timeout=args.open_timeout,
        grace=args.grace,
        admin=_admin_address(args.admin) if args.admin else None,
        handshake_timeout=args.handshake_timeout,
        hold_timeout=args.hold_timeout,
        max_frame_size=args.max_frame_size,
        session_window=args.session_window,
        amqp_idle_timeout=args.amqp_idle_timeout,
        max_links=_max_links(args),
        limits=Limits(
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            half_closed_timeout=args.half_closed_timeout,
            max_connections_per_peer=args.max_connections_per_peer,
            silent_timeout=args.silent_timeout,
        ),
        dialect=Dialect(args.dialect),
        http=http_message.HttpSettings(
            timeout=args.http_timeout,
            max_body=args.http_max_body,
            window=args.http_window,
            held_bytes=args.http_max_held,
        ),
        http2_tls=(args.http2_cert, args.http2_key) if args.http2_cert else None,
        http2_backend_ca=args.http2_backend_ca,
    )


def _max_links(args: argparse.Namespace) -> int:
    # Each tunnel is a link each way; replies and management need a few more.
    given: int | None = args.max_links_per_connection
    return 2 * int(args.max_connections) + 64 if given is None else given


def _per_peer(args: argparse.Namespace) -> int:
    given: int | None = args.max_connections_per_peer
    return -(-int(args.max_connections) // 2) if given is None else given


def _admin_address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--admin {text!r}: expected HOST:PORT")
    return host, int(port)


#: Upper bounds of the numeric options: beyond them a value is a typo, not a setting.
MAX_WINDOW = 64  # deliveries of up to 128 KiB per link, per direction
MAX_HTTP_WINDOW = 1024
MAX_HTTP_BODY = 1 << 30
MAX_CONNECTIONS = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option finite and in range, or a ConfigError naming it."""
    # AMQP 1.0 §2.7.1: no peer may require frames smaller than 512 bytes.
    if not 512 <= args.max_frame_size <= 1 << 30:
        raise ConfigError(f"--max-frame-size {args.max_frame_size}: expected 512 to 2**30")
    if 0 < args.amqp_idle_timeout < MIN_PEER_IDLE_TIMEOUT:
        raise ConfigError(
            f"--amqp-idle-timeout {args.amqp_idle_timeout:g}: must be 0 or at least "
            f"{MIN_PEER_IDLE_TIMEOUT:g} (our peers refuse shorter ones)"
        )
    if args.session_window and not args.max_frame_size <= args.session_window <= 1 << 31:
        raise ConfigError(
            f"--session-window {args.session_window}: must be 0, or from "
            f"the frame size ({args.max_frame_size}) to 2**31"
        )
    for flag, count, most in (
        ("--window", START_WINDOW if args.window is None else args.window, MAX_WINDOW),
        ("--http-window", args.http_window, MAX_HTTP_WINDOW),
        ("--http-max-body", args.http_max_body, MAX_HTTP_BODY),
        ("--max-connections", args.max_connections, MAX_CONNECTIONS),
        ("--max-links-per-connection", _max_links(args), 2 * MAX_CONNECTIONS + 64),
        ("--max-connections-per-peer", _per_peer(args), MAX_CONNECTIONS),
        ("--http-max-held", args.http_max_held, 1 << 40),
    ):
        if count < 1:
            raise ConfigError(f"{flag} {count}: must be at least 1")
        if count > most:
            raise ConfigError(f"{flag} {count}: must be at most {most}")
    for flag, value, least in (
        ("--open-timeout", args.open_timeout, "above 0"),
        ("--handshake-timeout", args.handshake_timeout, "above 0"),
        ("--http-timeout", args.http_timeout, "above 0"),
        ("--grace", args.grace, "0 or more"),
        ("--hold-timeout", args.hold_timeout, "0 or more"),
        ("--idle-timeout", args.idle_timeout, "0 or more"),
        ("--amqp-idle-timeout", args.amqp_idle_timeout, "0 or more"),
        ("--half-closed-timeout", args.half_closed_timeout, "0 or more"),
        ("--silent-timeout", args.silent_timeout, "0 or more"),
    ):
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: must be a number of seconds, not {value}")
        if value < 0 or (value == 0 and least == "above 0"):
            raise ConfigError(f"{flag} {value:g}: must be {least}")
        if value > MAX_SECONDS:
            raise ConfigError(f"{flag} {value:g}: must be at most {MAX_SECONDS:g} (a week)")


def _warn_insecure(conn: ConnectionConfig, source: str) -> None:
    if conn.scheme == "amqps" and not conn.verify_peer:
        logger.warning(
            "%s turns TLS verification off: the router's identity is not checked", source
        )
    if conn.scheme == "amqp" and conn.password:
        logger.warning("%s sends a SASL PLAIN password without TLS", source)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["flows"]:
        return flows.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or os.environ.get("LOGLEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        parser.error(f"$LOGLEVEL {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        flows.JsonFormatter()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])
    # h2 and hpack log every frame and header at DEBUG: per chunk, never ours to show.
    for chatty in ("h2", "hpack"):
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLevelName(level)))
    try:
        settings = resolve(args, os.environ)
    except ConfigError as exc:
        print(f"tunnel: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.loop == "uvloop":
            import uvloop  # noqa: PLC0415 - optional at import time for plain-asyncio users

            return uvloop.run(run(settings))
        return asyncio.run(run(settings))
    except (OSError, StartupError) as exc:
        print(f"tunnel: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
