"""Hostile and broken input on the direct-mode AMQP listener.

Every offending connection is closed, the process keeps serving everyone
else, and its memory does not grow. Includes a bounded fuzz run.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LOOPBACK, TunnelProcess, make_certs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proton import SASL, Connection, Endpoint, Transport

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"


def _wait_log(process: TunnelProcess, pattern: str) -> re.Match[str]:
    """:meth:`TunnelProcess.wait_for`, from these synchronous tests and fixtures.

    The tests stay synchronous: they drive blocking sockets against a
    module-scoped listener, which as an async fixture would need a module-wide
    event loop for every test here, hypothesis's examples included.
    """
    return asyncio.run(process.wait_for(pattern))


def _echo_backend() -> tuple[socket.socket, int]:
    server = socket.create_server((LOOPBACK, 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TunnelProcess, int]]:
    """A direct-mode egress with a one-second handshake timeout, in front of an echo backend."""
    folder = tmp_path_factory.mktemp("hostile")
    backend, backend_port = _echo_backend()
    process = TunnelProcess(
        [
            "--handshake-timeout",
            "1",
            "--listen",
            f"amqp://{LOOPBACK}:0",
            f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}",
        ],
        folder / "egress.log",
    )
    try:
        port = int(_wait_log(process, r"accepting AMQP on amqp://[^:]+:(\d+)").group(1))
        yield process, port
        assert process.stop() == 0
    finally:
        process.kill()
        backend.close()


def _closed_by_server(
    port: int, data: bytes, *, half_close: bool = True, timeout: float = 5.0
) -> bool:
    """Send ``data``; True once the server has closed the connection (EOF or reset)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return True


def _still_serves(port: int, tmp: Path) -> None:
    """A well-behaved ingress still carries a round trip through the same listener."""
    config = tmp / "connect.json"
    config.write_text(f'{{"host": "{LOOPBACK}", "port": {port}}}')
    ingress = TunnelProcess(
        ["--config", str(config), f"tcp:{LOOPBACK}:0=>amqp:echo"], tmp / "ingress.log"
    )
    try:
        client_port = int(_wait_log(ingress, r"listening on 127\.0\.0\.1:(\d+)").group(1))
        _wait_log(ingress, r"router \S+ connected")
        with socket.create_connection((LOOPBACK, client_port), timeout=10) as sock:
            sock.sendall(b"still alive")
            assert sock.recv(11) == b"still alive"
        assert ingress.stop() == 0
    finally:
        ingress.kill()


BROKEN = {
    "garbage": b"\x16\x03\x01garbage that is not AMQP at all" * 3,
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unknown protocol id": b"AMQP\x07\x01\x00\x00",
    "wrong version": b"AMQP\x03\x02\x00\x00",
    "tls header on a plain port": b"AMQP\x02\x01\x00\x00",
    "truncated frame": SASL_HEADER + struct.pack(">IBBH", 64, 2, 1, 0) + b"\x00\x53",
    "oversized frame": SASL_HEADER + struct.pack(">IBBH", 0xFFFFFFF0, 2, 1, 0) + b"\x00" * 64,
    "frame shorter than its header": SASL_HEADER + struct.pack(">IBBH", 4, 2, 1, 0),
    "sasl-init for an unknown mechanism": SASL_HEADER
    + bytes.fromhex("0000001a02010000005341d00000000a00000002a308434f4f4b49455321"),
}


@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
def test_broken_input_is_closed(listener: tuple[TunnelProcess, int], data: bytes) -> None:
    """Each broken opening is answered by closing the connection; nothing else is disturbed."""
    _, port = listener
    assert _closed_by_server(port, data)


def test_silent_connection_is_closed_after_the_handshake_timeout(
    listener: tuple[TunnelProcess, int],
) -> None:
    """A connection that never speaks is closed once the handshake timeout passes."""
    process, port = listener
    started = time.monotonic()
    assert _closed_by_server(port, b"", half_close=False, timeout=5)
    assert time.monotonic() - started < 4
    _wait_log(process, "did not open an AMQP connection")


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(prefix=st.sampled_from([b"", SASL_HEADER, AMQP_HEADER]), body=st.binary(max_size=300))
def test_fuzzed_input_never_hurts_the_listener(
    listener: tuple[TunnelProcess, int], prefix: bytes, body: bytes
) -> None:
    """Random bytes after a valid or no header: closed, and the process lives on."""
    process, port = listener
    assert _closed_by_server(port, prefix + body)
    assert process.proc.poll() is None


def test_after_the_abuse_memory_is_flat_and_service_goes_on(
    listener: tuple[TunnelProcess, int],
    tmp_path: Path,
) -> None:
    """A further 300 broken connections add no memory, and a real tunnel still works."""
    process, port = listener
    for data in list(BROKEN.values()) * 3:
        _closed_by_server(port, data)
    before = process.rss_kib()
    for _ in range(20):
        for data in BROKEN.values():
            assert _closed_by_server(port, data)
    growth_mib = (process.rss_kib() - before) / 1024
    assert growth_mib < 4, f"RSS grew {growth_mib:.1f} MiB over 180 broken connections"
    _still_serves(port, tmp_path)


def test_plaintext_to_a_tls_listener_is_closed(tmp_path: Path) -> None:
    """Plain AMQP sent to an amqps listener ends that connection only."""
    certs = make_certs(tmp_path / "certs")
    process = TunnelProcess(
        [
            "--listen",
            "amqps://localhost:0",
            "--listen-cert",
            str(certs.server_cert),
            "--listen-key",
            str(certs.server_key),
            f"amqp:echo=>tcp:{LOOPBACK}:9",
        ],
        tmp_path / "egress.log",
    )
    try:
        port = int(_wait_log(process, r"accepting AMQP on amqps://[^:]+:(\d+)").group(1))
        assert _closed_by_server(port, SASL_HEADER + b"\x00" * 32)
        context = ssl.create_default_context(cafile=str(certs.ca))
        with (
            socket.create_connection((LOOPBACK, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() is not None  # the listener still completes handshakes
        assert process.stop() == 0
    finally:
        process.kill()


def test_sasl_failure_closes_the_connection(listener: tuple[TunnelProcess, int]) -> None:
    """A client insisting on a mechanism the listener does not offer is refused and closed."""
    _, port = listener
    connection = Connection()
    transport = Transport()
    sasl = transport.sasl()
    sasl.allowed_mechs("PLAIN")
    sasl.allow_insecure_mechs = True
    connection.user, connection.password = "user", "not-offered"
    transport.bind(connection)
    connection.open()
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not transport.closed:
            pending = transport.pending()
            if pending > 0:
                sock.sendall(transport.peek(pending) or b"")
                transport.pop(pending)
            data = sock.recv(65536)
            if not data:
                transport.close_tail()
                break
            transport.push(data)
    assert sasl.outcome not in (None, SASL.OK)
    assert connection.state & Endpoint.REMOTE_UNINIT  # the AMQP open never came
