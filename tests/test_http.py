"""HTTP/1.1 bridges through a direct-mode pair: real clients, a real server, two real processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import io
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import LOOPBACK, TunnelProcess, eventually, write_connect_json
from http_backend import MAX_BODY, MIB, TIMEOUT, Server, backend, request
from reactor_peer import free_port


@dataclass
class HttpPair:
    port: int
    amqp_port: int
    ingress: TunnelProcess
    egress: TunnelProcess
    backend: Server | None = None


def _ingress(tmp: Path, amqp_port: int, log: str, *args: str) -> TunnelProcess:
    config = write_connect_json(
        tmp / "connect.json", {"scheme": "amqp", "host": LOOPBACK, "port": amqp_port}
    )
    return TunnelProcess(
        ["--config", str(config), *args, f"http:{LOOPBACK}:0=>amqp:web"], tmp / log
    )


def _egress(
    tmp: Path, backend_port: int, amqp_port: int, timeout: float, log: str = "egress.log"
) -> TunnelProcess:
    return TunnelProcess(
        [
            "--listen",
            f"amqp://{LOOPBACK}:{amqp_port}",
            "--http-timeout",
            str(timeout),
            "--http-max-body",
            str(MAX_BODY),
            f"amqp:web=>http:{LOOPBACK}:{backend_port}",
        ],
        tmp / log,
    )


@contextlib.asynccontextmanager
async def http_pair(
    tmp: Path, backend_port: int, timeout: float = TIMEOUT
) -> AsyncIterator[HttpPair]:
    """An HTTP egress in direct mode and an HTTP ingress connected to it."""
    limits = ["--http-timeout", str(timeout), "--http-max-body", str(MAX_BODY)]
    egress = _egress(tmp, backend_port, 0, timeout)
    ingress = None
    running: HttpPair | None = None
    try:
        amqp_port = await egress.amqp_port()
        ingress = _ingress(tmp, amqp_port, "ingress.log", *limits)
        port = await ingress.listen_port()
        await ingress.wait_for(r"router amqp://\S+ connected")
        running = HttpPair(port, amqp_port, ingress, egress)
        yield running
        assert await asyncio.to_thread(ingress.stop) == 0, ingress.log()
        assert await asyncio.to_thread(running.egress.stop) == 0, running.egress.log()
    finally:
        if ingress is not None:
            ingress.kill()
        egress.kill()
        if running is not None:
            running.egress.kill()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[HttpPair]:
    with backend() as server:
        async with http_pair(tmp_path, server.server_address[1]) as running:
            running.backend = server
            yield running


async def test_get_through_the_pair(pair: HttpPair) -> None:
    """A GET reaches the backend with its path and query, and its answer comes back whole."""
    status, headers, body = await asyncio.to_thread(request, pair.port, "GET", "/headers?x=1&y=2")
    assert status == 200
    assert headers["content-type"] == "application/json"
    seen = json.loads(body)
    assert seen["path"] == "/headers?x=1&y=2"
    assert seen["headers"]["host"] == [f"{LOOPBACK}:{pair.port}"]


@pytest.mark.parametrize("size", [0, 1024, 8 * MIB])
async def test_post_bodies_arrive_exactly(pair: HttpPair, size: int) -> None:
    """POST bodies of 0 B, 1 KiB and 8 MiB reach the backend and come back byte for byte."""
    payload = hashlib.sha256(b"seed").digest() * (size // 32) + b"x" * (size % 32)
    status, headers, body = await asyncio.to_thread(
        request, pair.port, "POST", "/echo", payload, [("content-type", "application/x-test")]
    )
    assert status == 200
    assert headers["x-method"] == "POST"
    assert headers["content-type"] == "application/x-test"
    assert len(body) == size
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()


def _chunked_post(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request("POST", "/echo", body=iter([b"one,", b"two,", b"three"]), encode_chunked=True)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_chunked_request_and_response_bodies(pair: HttpPair) -> None:
    """A chunked request body is carried whole, and a chunked response reaches the client whole."""
    status, body = await asyncio.to_thread(_chunked_post, pair.port)
    assert (status, body) == (200, b"one,two,three")
    status, _, body = await asyncio.to_thread(request, pair.port, "GET", "/chunked")
    assert (status, body) == (200, b"first,second,third")


def _keep_alive(port: int, count: int) -> list[bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    conn.auto_open = 0  # a closed connection fails the test instead of being reopened
    conn.connect()
    bodies = []
    try:
        for n in range(count):
            conn.request("POST", "/echo", body=f"request {n}".encode())
            response = conn.getresponse()
            assert response.status == 200
            bodies.append(response.read())
    finally:
        conn.close()
    return bodies


async def test_keep_alive_100_requests_on_one_connection(pair: HttpPair) -> None:
    """100 sequential requests share one client connection and each gets its own answer."""
    bodies = await asyncio.to_thread(_keep_alive, pair.port, 100)
    assert bodies == [f"request {n}".encode() for n in range(100)]


class _KeptOpen(io.BufferedReader):
    """One buffered reader for several responses: each HTTPResponse closes its file when done."""

    def close(self) -> None:
        pass


def _pipelined(port: int) -> list[tuple[int, bytes]]:
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(
            b"".join(
                b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
                for body in (b"first", b"second", b"third")
            )
        )
        stream = _KeptOpen(socket.SocketIO(sock, "rb"))

        class _Reader:
            def makefile(self, *_: object, **__: object) -> object:
                return stream

        answers = []
        for _ in range(3):
            response = http.client.HTTPResponse(_Reader())  # type: ignore[arg-type]
            response.begin()
            answers.append((response.status, response.read()))
        return answers


async def test_pipelined_requests_are_answered_in_order(pair: HttpPair) -> None:
    """Three requests sent at once on one connection are answered in order."""
    answers = await asyncio.to_thread(_pipelined, pair.port)
    assert answers == [(200, b"first"), (200, b"second"), (200, b"third")]


async def _raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return answer


async def test_50_concurrent_clients(pair: HttpPair) -> None:
    """50 clients at once each get their own answer."""

    async def one(n: int) -> bytes:
        body = f"client {n}".encode() * 100
        answer = await _raw_request(
            pair.port,
            b"POST /echo HTTP/1.1\r\nHost: web\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        head, _, received = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        return received

    bodies = await asyncio.gather(*(one(n) for n in range(50)))
    assert bodies == [f"client {n}".encode() * 100 for n in range(50)]


async def test_multi_valued_headers_survive(pair: HttpPair) -> None:
    """A repeated request field reaches the backend with every value; two Set-Cookie
    fields reach the client as two fields, the comma inside one intact."""
    _, _, body = await asyncio.to_thread(
        request, pair.port, "GET", "/headers", None, [("x-multi", "a"), ("x-multi", "b")]
    )
    values = json.loads(body)["headers"]["x-multi"]
    assert ", ".join(values) == "a, b"
    _, headers, _ = await asyncio.to_thread(request, pair.port, "GET", "/cookies")
    assert headers.get_all("set-cookie") == ["a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT", "b=2"]


async def test_request_without_host(pair: HttpPair) -> None:
    """An HTTP/1.0 request without Host is served; an HTTP/1.1 one gets 400 naming Host."""
    answer = await _raw_request(pair.port, b"GET /headers HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(body)["path"] == "/headers"
    answer = await _raw_request(pair.port, b"GET /headers HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Host" in answer


async def test_head_keeps_no_body(pair: HttpPair) -> None:
    """A HEAD request is answered without a body, and the connection stays usable."""

    def head_then_get(port: int) -> tuple[int, bytes, int]:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
        conn.auto_open = 0
        conn.connect()
        try:
            conn.request("HEAD", "/anything")
            first = conn.getresponse()
            first_body = first.read()
            conn.request("GET", "/echo")
            second = conn.getresponse()
            second.read()
            return first.status, first_body, second.status
        finally:
            conn.close()

    assert await asyncio.to_thread(head_then_get, pair.port) == (200, b"", 200)


async def test_backend_down_is_502(tmp_path: Path) -> None:
    """A backend nobody listens on: every retry is refused, and the client gets 502."""
    started = time.monotonic()
    dead = free_port()
    async with http_pair(tmp_path, dead) as running:
        status, headers, body = await asyncio.to_thread(request, running.port, "GET", "/")
        assert status == 502
        assert headers["content-type"].startswith("text/plain")
        assert b"amqp:web did not take the request (11 attempts)" in body
        # The egress's reason travels in its modified outcome.
        assert f"cannot connect to {LOOPBACK}:{dead}".encode() in body
        assert "cannot connect to" in running.egress.log()
        # Eleven refused attempts, one warning: logged per change, not per request.
        assert running.egress.log().count("the backend is unreachable") == 1
    assert time.monotonic() - started < 30


async def test_slow_backend_is_504(pair: HttpPair) -> None:
    """A backend slower than --http-timeout: 504 with the reason, after about the timeout."""
    started = time.monotonic()
    status, _, body = await asyncio.to_thread(request, pair.port, "GET", "/slow")
    took = time.monotonic() - started
    assert status == 504
    assert b"within 4 s" in body
    assert TIMEOUT - 0.5 < took < TIMEOUT + 2


async def test_oversized_bodies(pair: HttpPair) -> None:
    """A request body over --http-max-body gets 413; a response body over it gets 502."""
    status, headers, body = await asyncio.to_thread(
        request, pair.port, "POST", "/echo", bytes(MAX_BODY + 1)
    )
    assert status == 413
    assert headers["connection"] == "close"
    assert f"limited to {MAX_BODY} bytes".encode() in body
    status, _, body = await asyncio.to_thread(request, pair.port, "GET", "/big")
    assert status == 502
    assert f"over the limit of {MAX_BODY} bytes".encode() in body
    assert pair.backend is not None
    assert f"backend {LOOPBACK}:{pair.backend.server_address[1]}:".encode() in body


def _answer(conn: http.client.HTTPConnection) -> tuple[int, bytes]:
    """The status and body of the response to the request ``conn`` has sent."""
    try:
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _unread(server_port: int, client_port: int) -> int | None:
    """Bytes the kernel holds unread for the server end of a loopback connection."""
    ends = f"0100007F:{server_port:04X} 0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if f"{fields[1]} {fields[2]}" == ends:
            return int(fields[4].split(":")[1], 16)
    return None


async def test_request_waits_for_the_egress_to_come_back(tmp_path: Path) -> None:
    """A request made while the far end is down is carried once it is back, not failed."""
    with backend() as server:
        async with http_pair(tmp_path, server.server_address[1], timeout=30) as running:
            running.egress.kill()
            await running.ingress.wait_for("connection lost")
            conn = http.client.HTTPConnection(LOOPBACK, running.port, timeout=30)
            conn.connect()
            client_port = conn.sock.getsockname()[1]
            conn.request("POST", "/echo", b"patient")
            waiting = asyncio.ensure_future(asyncio.to_thread(_answer, conn))
            # The ingress has read the whole request (the kernel holds none of it
            # for the ingress), so it has it in hand while the far end is away.
            await eventually(
                lambda: _unread(running.port, client_port) == 0, "the ingress read the request"
            )
            assert not waiting.done()
            running.egress = _egress(
                tmp_path, server.server_address[1], running.amqp_port, 30, "egress2.log"
            )
            assert await asyncio.wait_for(waiting, 25) == (200, b"patient")


async def test_sigterm_lets_a_request_in_flight_finish(pair: HttpPair) -> None:
    """On SIGTERM the ingress stops accepting, answers what is in flight, and exits 0."""
    in_flight = asyncio.ensure_future(asyncio.to_thread(request, pair.port, "GET", "/pause"))
    assert pair.backend is not None
    assert await asyncio.to_thread(pair.backend.paused.wait, 10)
    pair.ingress.proc.send_signal(signal.SIGTERM)
    await pair.ingress.wait_for("shutting down: waiting")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(LOOPBACK, pair.port)
    status, headers, body = await asyncio.wait_for(in_flight, 10)
    assert (status, body) == (200, b"after a pause")
    assert headers["connection"] == "close"
    assert await asyncio.to_thread(pair.ingress.proc.wait, 10) == 0


async def test_egress_survives_an_answer_for_a_vanished_ingress(tmp_path: Path) -> None:
    """The ingress dies while its request is at the backend: the answer, ready after the
    connection is gone, is dropped, and the egress goes on serving (and exits 0)."""
    with backend() as server:
        egress = _egress(tmp_path, server.server_address[1], 0, TIMEOUT)
        try:
            amqp_port = await egress.amqp_port()
            ingress = _ingress(tmp_path, amqp_port, "ingress.log")
            port = await ingress.listen_port()
            await ingress.wait_for(r"router amqp://\S+ connected")
            doomed = asyncio.ensure_future(
                _raw_request(port, b"GET /pause HTTP/1.1\r\nHost: web\r\n\r\n")
            )
            assert await asyncio.to_thread(server.paused.wait, 10)
            ingress.kill()
            with contextlib.suppress(ConnectionResetError):  # FIN or RST: the ingress died
                await doomed
            assert await asyncio.to_thread(server.answered.wait, 10)
            assert egress.proc.poll() is None, egress.log()
            again = _ingress(tmp_path, amqp_port, "ingress2.log")
            try:
                port = await again.listen_port()
                status, _, body = await asyncio.to_thread(request, port, "POST", "/echo", b"ok")
                assert (status, body) == (200, b"ok")
            finally:
                assert await asyncio.to_thread(again.stop) == 0, again.log()
            assert await asyncio.to_thread(egress.stop) == 0, egress.log()
        finally:
            egress.kill()
