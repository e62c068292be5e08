"""HTTP/2 and gRPC bridges through real processes: a real gRPC server and client (grpcio).

The egress serves ``grpc`` in direct mode (its own listener is the router),
the ingress is a second process connected to it; both are real tunnel
processes on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_backend import Backend, channel, method
from helpers import (
    LOOPBACK,
    TunnelProcess,
    admin_base,
    eventually,
    make_certs,
    scrape,
    write_connect_json,
)
from message_router import MessageRouter

TIMEOUT = 30.0


@dataclass
class Pair:
    port: int
    amqp_port: int
    ingress: TunnelProcess
    egress: TunnelProcess


def egress_process(
    tmp: Path, backend_port: int, log: str = "egress.log", router: int | None = None
) -> TunnelProcess:
    """An HTTP/2 egress: in direct mode, or connected to the router on port ``router``."""
    if router is None:
        where = ["--listen", f"amqp://{LOOPBACK}:0"]
    else:
        where = ["--config", str(connect_json(tmp, router, f"{log}.json"))]
    return TunnelProcess([*where, f"amqp:grpc=>http2:{LOOPBACK}:{backend_port}"], tmp / log)


def connect_json(tmp: Path, port: int, name: str = "connect.json") -> Path:
    return write_connect_json(tmp / name, {"scheme": "amqp", "host": LOOPBACK, "port": port})


def ingress_process(
    tmp: Path, amqp_port: int, *args: str, log: str = "ingress.log"
) -> TunnelProcess:
    return TunnelProcess(
        ["--config", str(connect_json(tmp, amqp_port)), *args, f"http2:{LOOPBACK}:0=>amqp:grpc"],
        tmp / log,
    )


@contextlib.asynccontextmanager
async def http2_pair(
    tmp: Path, backend_port: int, *ingress_args: str, router: int | None = None
) -> AsyncIterator[Pair]:
    """An ingress and an egress: the egress in direct mode, or both at ``router``."""
    egress = egress_process(tmp, backend_port, router=router)
    ingress = None
    try:
        amqp_port = router if router is not None else await egress.amqp_port()
        await egress.wait_for(r"consuming 'grpc'")
        ingress = ingress_process(tmp, amqp_port, *ingress_args)
        port = await ingress.listen_port()
        await ingress.wait_for(r"router amqp://\S+ connected")
        await ingress.wait_for(r"reply address|router amqp://\S+ connected")
        running = Pair(port, amqp_port, ingress, egress)
        yield running
        # A test may have put another ingress in the pair.
        ingress = running.ingress
        assert await asyncio.to_thread(ingress.stop) == 0, ingress.log()
        assert await asyncio.to_thread(egress.stop) == 0, egress.log()
    finally:
        if ingress is not None:
            ingress.kill()
        egress.kill()


@pytest.fixture
def backend() -> Iterator[Backend]:
    with Backend("a") as server:
        yield server


@pytest.fixture(params=["direct", "router"])
def router(request: pytest.FixtureRequest) -> Iterator[int | None]:
    """None: the egress's own listener routes; else the stand-in router's port."""
    if request.param == "direct":
        yield None
        return
    stand_in = MessageRouter()
    try:
        yield stand_in.start()
    finally:
        stand_in.stop()


@pytest.fixture
async def pair(tmp_path: Path, backend: Backend, router: int | None) -> AsyncIterator[Pair]:
    async with http2_pair(tmp_path, backend.port, router=router) as running:
        yield running


async def test_unary(pair: Pair) -> None:
    with channel(pair.port) as chan:
        answer = await asyncio.to_thread(method(chan, "Unary"), b"hello", timeout=TIMEOUT)
    assert answer == b"hello"


async def test_server_streams_1000_messages(pair: Pair) -> None:
    def call() -> list[bytes]:
        with channel(pair.port) as chan:
            return list(method(chan, "ServerStream", "unary_stream")(b"1000", timeout=TIMEOUT))

    assert await asyncio.to_thread(call) == [b"%d" % i for i in range(1000)]


async def test_client_streaming(pair: Pair) -> None:
    parts = [bytes([i % 256]) * (1000 + i) for i in range(200)]

    def call() -> bytes:
        with channel(pair.port) as chan:
            answer: bytes = method(chan, "ClientStream", "stream_unary")(
                iter(parts), timeout=TIMEOUT
            )
            return answer

    whole = b"".join(parts)
    expected = b"%d %d " % (len(parts), len(whole)) + hashlib.sha256(whole).hexdigest().encode()
    assert await asyncio.to_thread(call) == expected


async def test_bidirectional_streaming_interleaves(pair: Pair) -> None:
    """Each request is sent only once the answer to the one before it came back:
    a bridge that gathered either direction would stall this call."""

    def call() -> list[bytes]:
        answers: queue.Queue[bytes] = queue.Queue()
        received: list[bytes] = []

        def feed() -> Iterator[bytes]:
            for index in range(100):
                yield b"message %d" % index
                received.append(answers.get(timeout=10))

        with channel(pair.port) as chan:
            for answer in method(chan, "Bidi", "stream_stream")(feed(), timeout=TIMEOUT):
                answers.put(answer)
        return received

    assert await asyncio.to_thread(call) == [b"message %d" % i for i in range(100)]


async def test_16_mib_request_and_response_exact(pair: Pair) -> None:
    payload = hashlib.sha256(b"seed").digest() * (16 * 1024 * 1024 // 32)

    def call() -> bytes:
        with channel(pair.port) as chan:
            answer: bytes = method(chan, "Unary")(payload, timeout=TIMEOUT)
            return answer

    answer = await asyncio.to_thread(call)
    assert len(answer) == len(payload) and answer == payload


async def test_a_cancel_reaches_the_backend(pair: Pair, backend: Backend) -> None:
    with channel(pair.port) as chan:
        call = method(chan, "Hang").future(b"", timeout=TIMEOUT)
        assert await asyncio.to_thread(backend.hanging.wait, 10)
        call.cancel()
        assert await asyncio.to_thread(backend.cancelled.wait, 10), pair.egress.log()
        assert call.cancelled()


async def test_a_deadline_ends_the_call_at_both_ends(pair: Pair, backend: Backend) -> None:
    with channel(pair.port) as chan:
        with pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(method(chan, "Hang"), b"", timeout=1.0)
        assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert await asyncio.to_thread(backend.cancelled.wait, 10), pair.egress.log()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


async def test_backend_down_is_unavailable(tmp_path: Path, router: int | None) -> None:
    async with http2_pair(tmp_path, _closed_port(), router=router) as running:
        with channel(running.port) as chan, pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(method(chan, "Unary"), b"x", timeout=TIMEOUT)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        details = str(failed.value.details())
        assert "did not take the request (11 attempts)" in details
        if router is None:  # the egress's reason, in its modified outcome, reached the ingress
            assert "cannot connect to 127.0.0.1" in details


async def test_no_consumer_is_unavailable_within_the_timeout(
    tmp_path: Path, router: int | None
) -> None:
    """Nobody serves the address: the router grants no credit."""
    listener = None
    if router is None:  # a direct-mode listener that serves another address
        listener = TunnelProcess(
            ["--listen", f"amqp://{LOOPBACK}:0", "amqp:other=>tcp:1"], tmp_path / "l.log"
        )
        router = await listener.amqp_port()
    ingress = ingress_process(tmp_path, router, "--http-timeout", "1")
    try:
        port = await ingress.listen_port()
        await ingress.wait_for(r"router amqp://\S+ connected")
        with channel(port) as chan, pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(method(chan, "Unary"), b"x", timeout=TIMEOUT)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "no consumer of amqp:grpc took the request within 1 s" in str(failed.value.details())
    finally:
        ingress.kill()
        if listener is not None:
            listener.kill()


async def test_two_egresses_both_serve_one_channel(tmp_path: Path, router: int | None) -> None:
    """Per-request balancing: 20 unary calls on one connection reach both sites."""
    with Backend("site-a") as first, Backend("site-b") as second:
        near = egress_process(tmp_path, first.port, "near.log", router=router)
        far = ingress = None
        try:
            amqp_port = router if router is not None else await near.amqp_port()
            await near.wait_for(r"consuming 'grpc'")
            far = TunnelProcess(
                [
                    "--config",
                    str(connect_json(tmp_path, amqp_port, "far.json")),
                    f"amqp:grpc=>http2:{LOOPBACK}:{second.port}",
                ],
                tmp_path / "far.log",
            )
            await far.wait_for(r"consuming 'grpc'")
            ingress = ingress_process(tmp_path, amqp_port)
            port = await ingress.listen_port()
            await ingress.wait_for(r"router amqp://\S+ connected")

            def calls() -> list[bytes]:
                with channel(port) as chan:
                    whoami = method(chan, "Whoami")
                    return [whoami(b"", timeout=TIMEOUT) for _ in range(20)]

            served = await asyncio.to_thread(calls)
            assert set(served) == {b"site-a", b"site-b"}, served
        finally:
            for process in (ingress, far, near):
                if process is not None:
                    process.kill()


async def test_metrics_count_requests_statuses_and_bytes(tmp_path: Path, backend: Backend) -> None:
    async with http2_pair(tmp_path, backend.port, "--admin", f"{LOOPBACK}:0") as running:
        with channel(running.port) as chan:
            for _ in range(3):
                await asyncio.to_thread(method(chan, "Unary"), b"12345", timeout=TIMEOUT)
        base = await admin_base(running.ingress)
        bridge = f"http2:{LOOPBACK}:0=>amqp:grpc"

        def value(name: str, **labels: str) -> float:
            key = (name, tuple(sorted({"bridge": bridge, **labels}.items())))
            return scrape(base).get(key, -1.0)

        await eventually(lambda: value("tunnel_http2_streams_active") == 0, "streams closed")
        assert value("tunnel_http2_requests_total") == 3
        assert value("tunnel_http2_responses_total", status_class="2xx") == 3
        # Each gRPC message is framed in 5 bytes before its 5 bytes of payload.
        assert value("tunnel_http2_bytes_total", direction="request") == 30
        assert value("tunnel_http2_bytes_total", direction="response") == 30


async def test_tls_with_alpn_h2(tmp_path: Path, backend: Backend) -> None:
    """--http2-cert/--http2-key: a gRPC client over TLS, verifying the ingress against its CA."""
    certs = make_certs(tmp_path / "certs")
    tls = ["--http2-cert", str(certs.server_cert), "--http2-key", str(certs.server_key)]
    async with http2_pair(tmp_path, backend.port, *tls) as running:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        with grpc.secure_channel(f"{LOOPBACK}:{running.port}", credentials) as chan:
            answer = await asyncio.to_thread(method(chan, "Unary"), b"sealed", timeout=TIMEOUT)
        assert answer == b"sealed"

        def alpn() -> str | None:
            context = ssl.create_default_context(cafile=str(certs.ca))
            context.set_alpn_protocols(["h2", "http/1.1"])
            with (
                socket.create_connection((LOOPBACK, running.port)) as raw,
                context.wrap_socket(raw, server_hostname=LOOPBACK) as sealed,
            ):
                return sealed.selected_alpn_protocol()

        assert await asyncio.to_thread(alpn) == "h2"


async def test_bad_tls_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    process = TunnelProcess(
        ["--http2-cert", str(missing), "--http2-key", str(missing), "http2:0=>amqp:grpc"],
        tmp_path / "bad.log",
    )
    try:
        assert await asyncio.to_thread(process.proc.wait, 30) != 0
        assert f"--http2-cert {missing}" in process.log()
    finally:
        process.kill()


async def test_egress_to_a_tls_backend(tmp_path: Path) -> None:
    """--http2-backend-ca: the egress reaches a gRPC server over TLS, verifying it."""
    certs = make_certs(tmp_path / "certs")
    key_and_cert = (certs.server_key.read_bytes(), certs.server_cert.read_bytes())
    with Backend("sealed", tls=grpc.ssl_server_credentials([key_and_cert])) as sealed:
        egress = TunnelProcess(
            [
                "--listen",
                f"amqp://{LOOPBACK}:0",
                "--http2-backend-ca",
                str(certs.ca),
                f"amqp:grpc=>http2:{LOOPBACK}:{sealed.port}",
            ],
            tmp_path / "egress.log",
        )
        ingress = None
        try:
            amqp_port = await egress.amqp_port()
            ingress = ingress_process(tmp_path, amqp_port)
            port = await ingress.listen_port()
            await ingress.wait_for(r"router amqp://\S+ connected")
            with channel(port) as chan:
                answer = await asyncio.to_thread(method(chan, "Whoami"), b"", timeout=TIMEOUT)
            assert answer == b"sealed"
        finally:
            if ingress is not None:
                ingress.kill()
            egress.kill()


async def test_sigterm_lets_a_call_in_flight_finish(pair: Pair) -> None:
    """On SIGTERM the ingress sends GOAWAY, lets the open call finish, and exits 0."""
    answered = threading.Event()
    go_on = threading.Event()

    def feed() -> Iterator[bytes]:
        yield b"before"
        answered.wait(10)
        go_on.wait(10)
        yield b"after"

    def call() -> list[bytes]:
        with channel(pair.port) as chan:
            answers = []
            for answer in method(chan, "Bidi", "stream_stream")(feed(), timeout=TIMEOUT):
                answers.append(answer)
                answered.set()
            return answers

    in_flight = asyncio.ensure_future(asyncio.to_thread(call))
    assert await asyncio.to_thread(answered.wait, 10)
    pair.ingress.proc.send_signal(signal.SIGTERM)
    await pair.ingress.wait_for("shutting down: waiting")
    go_on.set()
    assert await asyncio.wait_for(in_flight, 10) == [b"before", b"after"]
    assert await asyncio.to_thread(pair.ingress.proc.wait, 10) == 0


async def test_a_server_that_ends_before_the_client_is_answered(pair: Pair) -> None:
    """The server answers after the first of many requests: the client gets the answer
    and its status, not a reset, though the server stops reading its stream."""

    def call() -> bytes:
        def feed() -> Iterator[bytes]:
            for index in range(10_000):
                yield b"request %d" % index
                time.sleep(0.001)

        with channel(pair.port) as chan:
            answer: bytes = method(chan, "FirstOnly", "stream_unary")(feed(), timeout=TIMEOUT)
            return answer

    assert await asyncio.to_thread(call) == b"request 0"


async def test_a_failed_call_keeps_its_status_and_message(pair: Pair) -> None:
    """Trailers-only answers: the server's status, and one for a method it does not have."""
    with channel(pair.port) as chan:
        with pytest.raises(grpc.RpcError) as failed:
            await asyncio.to_thread(method(chan, "Fail"), b"unicorn", timeout=TIMEOUT)
        assert failed.value.code() is grpc.StatusCode.NOT_FOUND
        assert failed.value.details() == "no unicorn here"
        with pytest.raises(grpc.RpcError) as missing:
            await asyncio.to_thread(method(chan, "Nope"), b"", timeout=TIMEOUT)
        assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_an_ingress_killed_mid_call_cancels_it_at_the_backend(
    tmp_path: Path, backend: Backend
) -> None:
    """Direct mode: the egress's listener sees the ingress go, and its calls are cancelled
    at the backend instead of left hanging there."""
    async with http2_pair(tmp_path, backend.port) as running:
        with channel(running.port) as chan:
            call = method(chan, "Hang").future(b"", timeout=TIMEOUT)
            assert await asyncio.to_thread(backend.hanging.wait, 10)
            running.ingress.kill()
            assert await asyncio.to_thread(backend.cancelled.wait, 10), running.egress.log()
            call.cancel()
        # The egress serves the next ingress as before.
        running.ingress = ingress_process(tmp_path, running.amqp_port, log="again.log")
        port = await running.ingress.listen_port()
        await running.ingress.wait_for(r"router amqp://\S+ connected")
        with channel(port) as chan:
            assert await asyncio.to_thread(method(chan, "Unary"), b"again", timeout=TIMEOUT) == (
                b"again"
            )
