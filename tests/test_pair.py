"""Tunnel pairs as real processes in direct mode: ingress process -> egress process -> backend."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import (
    LOOPBACK,
    Certs,
    EchoServer,
    TunnelProcess,
    echo_exact,
    echo_server,
    expect_reset,
    make_certs,
    round_trip,
    send_then_shutdown,
    write_connect_json,
)
from reactor_peer import free_port

MIB = 1024 * 1024


@dataclass
class Pair:
    egress: TunnelProcess
    tmp: Path
    ingress: TunnelProcess = None  # type: ignore[assignment]  # set once the egress is up
    port: int = 0
    amqp_port: int = 0
    backend: EchoServer = field(default_factory=EchoServer)


def _egress_args(certs: Certs | None, backend_port: int, amqp_port: int = 0) -> list[str]:
    spec = f"amqp:echo=>tcp:{LOOPBACK}:{backend_port}"
    if certs is not None:
        return [
            "--listen",
            f"amqps://localhost:{amqp_port}",
            "--listen-cert",
            str(certs.server_cert),
            "--listen-key",
            str(certs.server_key),
            "--listen-ca",
            str(certs.ca),
            spec,
        ]
    return ["--listen", f"amqp://{LOOPBACK}:{amqp_port}", spec]


def _connect_json(mode: str, tmp: Path, amqp_port: int) -> Path:
    if mode == "tls":
        # Relative names: resolved against the file's own folder.
        return write_connect_json(
            tmp / "certs" / "connect.json",
            {
                "scheme": "amqps",
                "host": "localhost",
                "port": str(amqp_port),
                "tls": {"ca": "test-ca.crt", "cert": "client.crt", "key": "client.key"},
            },
        )
    return write_connect_json(
        tmp / "connect.json",
        {
            "scheme": "amqp",
            "host": LOOPBACK,
            "port": amqp_port,
        },
    )


@contextlib.asynccontextmanager
async def processes(
    tmp: Path,
    egress_args: list[str],
    *,
    config: Callable[[int], Path] | None = None,
    address: str = "echo",
    loop: str = "uvloop",
    ingress_args: tuple[str, ...] = (),
) -> AsyncIterator[Pair]:
    """An egress process in direct mode and an ingress process connected to it.

    Both must exit 0 on SIGTERM at the end; whatever is left is killed.
    """
    pair = Pair(TunnelProcess(["--loop", loop, *egress_args], tmp / "egress.log"), tmp)
    try:
        pair.amqp_port = await pair.egress.amqp_port()
        config_path = (config or (lambda port: _connect_json("plain", tmp, port)))(pair.amqp_port)
        pair.ingress = TunnelProcess(
            [
                "--loop",
                loop,
                "--config",
                str(config_path),
                *ingress_args,
                f"tcp:{LOOPBACK}:0=>amqp:{address}",
            ],
            tmp / "ingress.log",
        )
        pair.port = await pair.ingress.listen_port()
        yield pair
        # Off the loop: the backends run on it and must keep answering meanwhile.
        assert await asyncio.to_thread(pair.ingress.stop) == 0, pair.ingress.log()
        assert await asyncio.to_thread(pair.egress.stop) == 0, pair.egress.log()
    finally:
        if pair.ingress is not None:
            pair.ingress.kill()
        pair.egress.kill()


@contextlib.asynccontextmanager
async def tunnel_pair(tmp: Path, mode: str, loop: str) -> AsyncIterator[Pair]:
    """A pair in front of an echo backend, connected, over plain AMQP or mutual TLS."""
    certs = make_certs(tmp / "certs") if mode == "tls" else None
    async with (
        echo_server() as backend,
        processes(
            tmp,
            _egress_args(certs, backend.port),
            loop=loop,
            config=lambda port: _connect_json(mode, tmp, port),
        ) as pair,
    ):
        pair.backend = backend
        await pair.ingress.wait_for(r"router amqps?://\S+ connected")
        yield pair


@pytest.fixture(params=[("plain", "uvloop"), ("tls", "uvloop"), ("plain", "asyncio")], ids="-".join)
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    mode, loop = request.param
    async with tunnel_pair(tmp_path, mode, loop) as value:
        yield value


async def test_echo_round_trip(pair: Pair) -> None:
    """A few bytes go through both tunnels and come back intact."""
    assert await round_trip(pair.port, b"hello, tunnel\n") == b"hello, tunnel\n"


async def test_64_mib_each_way(pair: Pair) -> None:
    """64 MiB through the pair and back arrive byte-exact (SHA-256)."""
    payload = os.urandom(64 * MIB)
    assert await echo_exact(pair.port, payload) == (
        len(payload),
        hashlib.sha256(payload).hexdigest(),
    )


async def test_200_concurrent_connections(pair: Pair) -> None:
    """200 connections at once each get exactly their own bytes back."""
    payloads = [os.urandom(10_000) + b"%d" % i for i in range(200)]
    results = await asyncio.gather(*(round_trip(pair.port, p) for p in payloads))
    assert results == payloads


async def test_half_close(pair: Pair) -> None:
    """A client that shuts down its sending side still reads the whole reply (nc -q1)."""
    # A blocking socket, off the loop: the echo backend runs on this loop.
    assert await asyncio.to_thread(send_then_shutdown, pair.port, b"hello") == b"hello"


async def test_client_reset_resets_backend(pair: Pair) -> None:
    """An RST from the client reaches the backend as an RST, not a clean FIN."""
    reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    before = len(pair.backend.lost)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    for _ in range(500):
        if len(pair.backend.lost) > before:
            break
        await asyncio.sleep(0.01)
    assert len(pair.backend.lost) == before + 1
    assert isinstance(pair.backend.lost[-1], ConnectionResetError)


async def test_backend_refused_resets_client(tmp_path: Path) -> None:
    """When the egress cannot reach its backend, the client gets an RST, not a clean close."""
    dead_port = free_port()
    async with processes(tmp_path, _egress_args(None, dead_port)) as pair:
        await pair.ingress.wait_for("connected")
        await expect_reset(pair.port)
        await pair.egress.wait_for("unreachable")


async def test_an_unreachable_backend_is_one_warning_until_it_answers(tmp_path: Path) -> None:
    """Not a line per connection: one WARNING, then the recovery with the count."""
    dead_port = free_port()
    async with processes(tmp_path, _egress_args(None, dead_port)) as pair:
        await pair.ingress.wait_for("connected")
        for _ in range(3):
            await expect_reset(pair.port)
        warnings = re.findall(r"WARNING .*unreachable.*", pair.egress.log())
        assert warnings == [
            f"WARNING tunnel.bridge: amqp:echo=>tcp:{LOOPBACK}:{dead_port}: backend "
            f"{LOOPBACK}:{dead_port} unreachable: Connection refused"
        ]
        server = await asyncio.start_server(lambda r, w: None, LOOPBACK, dead_port)
        async with server:
            # The egress connects to its backend when the client's link arrives.
            _, writer = await asyncio.open_connection(LOOPBACK, pair.port)
            await pair.egress.wait_for(r"answers again, after 3 failed connects")
            writer.close()


async def test_unknown_address_resets_client(tmp_path: Path) -> None:
    """Direct mode refuses an address nobody serves, and the client gets an RST."""
    async with echo_server() as backend:
        async with processes(tmp_path, _egress_args(None, backend.port), address="nobody") as pair:
            await expect_reset(pair.port)
            await pair.ingress.wait_for("amqp:not-found")
        assert backend.accepted == 0


async def test_slow_reader_memory_is_bounded(tmp_path: Path) -> None:
    """A backend pushing at full speed to a slow client is held back, not buffered."""
    pushed = 0
    push_stop = asyncio.Event()

    async def source(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        block = os.urandom(256 * 1024)
        try:
            while not push_stop.is_set():
                writer.write(block)
                pushed += len(block)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(source, LOOPBACK, 0)
    backend_port = server.sockets[0].getsockname()[1]
    try:
        async with processes(tmp_path, _egress_args(None, backend_port)) as pair:
            await pair.ingress.wait_for("connected")
            base = (pair.egress.rss_kib(), pair.ingress.rss_kib())
            readers = []
            for _ in range(10):
                readers.append(await asyncio.open_connection(LOOPBACK, pair.port))
            read = 0
            peak = base
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 4
            while loop.time() < deadline:
                for reader, _ in readers:
                    read += len(await reader.read(4096))
                await asyncio.sleep(0.01)
                peak = (max(peak[0], pair.egress.rss_kib()), max(peak[1], pair.ingress.rss_kib()))
            in_flight = pushed - read
            push_stop.set()
            for _, writer in readers:
                writer.close()
    finally:
        server.close()
    growth_mib = [(p - b) / 1024 for p, b in zip(peak, base, strict=True)]
    # Without back-pressure the source writes gigabytes in 4 s; with it, what is
    # in flight is socket buffers plus each tunnel's window.
    assert in_flight < 160 * MIB, f"{in_flight / MIB:.0f} MiB in flight"
    assert max(growth_mib) < 96, f"RSS grew by {growth_mib} MiB"


async def test_many_tunnels_sending_in_one_turn_hold_the_socket_bound(tmp_path: Path) -> None:
    """A hundred tunnels with a full budget each, readable at once: the egress frames
    what its AMQP socket's bound allows, not a budget per tunnel (100 MiB here)."""
    push_stop = asyncio.Event()

    async def source(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = os.urandom(256 * 1024)
        try:
            while not push_stop.is_set():
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(source, LOOPBACK, 0)
    backend_port = server.sockets[0].getsockname()[1]
    try:
        egress_args = ["--window", "8", *_egress_args(None, backend_port)]
        async with processes(tmp_path, egress_args, ingress_args=("--window", "8")) as pair:
            await pair.ingress.wait_for("connected")
            base = pair.egress.rss_kib()
            # Clients that never read: everything in flight stops somewhere.
            clients = [await asyncio.open_connection(LOOPBACK, pair.port) for _ in range(100)]
            peak = base
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3
            while loop.time() < deadline:
                await asyncio.sleep(0.02)
                peak = max(peak, pair.egress.rss_kib())
            push_stop.set()
            for _, writer in clients:
                writer.close()
    finally:
        server.close()
    growth = (peak - base) / 1024
    # With the socket's bound it grows by 15-20 MiB (parked reads, mostly); with
    # a budget framed per tunnel, by 90-95.
    assert growth < 56, f"the egress grew {growth:.0f} MiB"


async def test_egress_restart_reconnects(tmp_path: Path) -> None:
    """After the AMQP peer is killed and restarted, the ingress reconnects and works again."""
    async with tunnel_pair(tmp_path, "plain", "uvloop") as pair:
        assert await round_trip(pair.port, b"before") == b"before"
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(b"open across the crash")
        assert await reader.readexactly(21) == b"open across the crash"
        pair.egress.kill()
        await pair.ingress.wait_for("connection lost")
        # The open tunnel lost its far end mid-stream: a reset, never a clean EOF.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # Marked before the restart: the reconnect may be logged before the new
        # process has even logged its own port.
        mark = len(pair.ingress.log())
        restarted = TunnelProcess(
            _egress_args(None, pair.backend.port, pair.amqp_port),
            tmp_path / "egress2.log",
        )
        try:
            await restarted.amqp_port()
            await pair.ingress.wait_for("connected", timeout=20, after=mark)
            assert await round_trip(pair.port, b"after") == b"after"
            # Logged once per state change, not once per retry.
            assert len(re.findall(r"router \S+ connection lost", pair.ingress.log())) == 1
        finally:
            assert restarted.stop() == 0
        pair.egress = restarted


async def test_closed_tunnels_release_memory(tmp_path: Path) -> None:
    """Thousands of finished tunnels leave nothing behind: RSS stays flat after warm-up."""
    async with tunnel_pair(tmp_path, "plain", "uvloop") as pair:

        async def batch() -> None:
            for _ in range(5):
                payloads = [b"x%d" % i for i in range(100)]
                results = await asyncio.gather(*(round_trip(pair.port, p) for p in payloads))
                assert results == payloads

        await batch()
        warm = (pair.ingress.rss_kib(), pair.egress.rss_kib())
        for _ in range(3):
            await batch()
        after = (pair.ingress.rss_kib(), pair.egress.rss_kib())
        growth = [(a - w) / 1024 for a, w in zip(after, warm, strict=True)]
        assert max(growth) < 6, f"RSS grew by {growth} MiB over 1500 closed tunnels"
        assert "closed (finished)" in pair.ingress.log()


@pytest.mark.parametrize(
    ("tls", "expect"),
    [
        # The server's CA is not trusted: verification is on by default.
        ({"cert": "client.crt", "key": "client.key"}, "CERTIFICATE_VERIFY_FAILED"),
        # A client certificate from another CA: the direct-mode listener refuses it.
        (
            {"ca": "test-ca.crt", "cert": "intruder.crt", "key": "intruder.key"},
            "refused the connection",
        ),
        # No client certificate at all, though --listen-ca requires one.
        ({"ca": "test-ca.crt"}, "refused the connection"),
    ],
)
async def test_tls_refusals(tmp_path: Path, tls: dict[str, str], expect: str) -> None:
    """Mutual TLS is enforced both ways; a refused ingress resets its clients."""
    certs = make_certs(tmp_path / "certs")
    async with echo_server() as backend:
        async with processes(
            tmp_path,
            _egress_args(certs, backend.port),
            ingress_args=("--hold-timeout", "0.5"),
            config=lambda port: write_connect_json(
                tmp_path / "certs" / "bad.json",
                {
                    "scheme": "amqps",
                    "host": "localhost",
                    "port": port,
                    "tls": tls,
                },
            ),
        ) as pair:
            await pair.ingress.wait_for(expect)
            await expect_reset(pair.port)
        assert backend.accepted == 0


async def test_verify_false_connects_with_a_warning(tmp_path: Path) -> None:
    """verify:false turns verification off, and says so in the log."""
    certs = make_certs(tmp_path / "certs")
    async with (
        echo_server() as backend,
        processes(
            tmp_path,
            _egress_args(certs, backend.port),
            config=lambda port: write_connect_json(
                tmp_path / "certs" / "insecure.json",
                {
                    "scheme": "amqps",
                    "host": "localhost",
                    "port": port,
                    "verify": False,
                    "tls": {"cert": "client.crt", "key": "client.key"},
                },
            ),
        ) as pair,
    ):
        await pair.ingress.wait_for("connected")
        assert "TLS verification off" in pair.ingress.log()
        assert await round_trip(pair.port, b"insecure but working") == b"insecure but working"


async def test_sigterm_grace_then_reset(tmp_path: Path) -> None:
    """On SIGTERM the ingress stops accepting, waits out the grace, resets what is open, exits 0."""
    async with (
        echo_server() as backend,
        processes(tmp_path, _egress_args(None, backend.port)) as pair,
    ):
        await pair.ingress.wait_for("connected")
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(b"still talking")
        assert await reader.readexactly(13) == b"still talking"
        pair.ingress.proc.send_signal(signal.SIGTERM)
        await pair.ingress.wait_for("waiting up to 5s for 1 tunnels")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LOOPBACK, pair.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 15)
        writer.close()
        await pair.ingress.wait_for("tunnel stopped")
        assert await asyncio.to_thread(pair.ingress.proc.wait, 10) == 0


async def test_a_second_signal_ends_the_grace_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice: the tunnels left open are reset now, not after --grace."""
    async with (
        echo_server() as backend,
        processes(
            tmp_path, _egress_args(None, backend.port), ingress_args=("--grace", "600")
        ) as pair,
    ):
        await pair.ingress.wait_for("connected")
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(b"still talking")
        assert await reader.readexactly(13) == b"still talking"
        pair.ingress.proc.send_signal(signal.SIGINT)
        await pair.ingress.wait_for("waiting up to 600s for 1 tunnels")
        pair.ingress.proc.send_signal(signal.SIGINT)
        await pair.ingress.wait_for("stop asked again")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 15)
        writer.close()
        assert await asyncio.to_thread(pair.ingress.proc.wait, 15) == 0


async def test_resets_right_after_connect_leave_other_tunnels_alone(tmp_path: Path) -> None:
    """Clients that reset before their links are up cost nothing to the tunnels beside them."""
    async with (
        echo_server() as backend,
        processes(tmp_path, _egress_args(None, backend.port)) as pair,
    ):
        await pair.ingress.wait_for("connected")
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(b"survivor")
        assert await reader.readexactly(8) == b"survivor"
        loop = asyncio.get_running_loop()
        for i in range(500):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (LOOPBACK, pair.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            if i % 3 == 0:
                await asyncio.sleep(0.002)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
        writer.close()
        assert "connection lost" not in pair.ingress.log()
        assert "already attached" not in pair.ingress.log() + pair.egress.log()


async def test_sigterm_resets_even_when_the_peer_is_frozen(tmp_path: Path) -> None:
    """After the grace the ingress resets its clients itself: no FIN left to the exit."""
    async with (
        echo_server() as backend,
        processes(
            tmp_path,
            _egress_args(None, backend.port),
            ingress_args=("--grace", "0.3"),
        ) as pair,
    ):
        await pair.ingress.wait_for("connected")
        reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        pair.egress.proc.send_signal(signal.SIGSTOP)
        try:
            pair.ingress.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 15)
            assert await asyncio.to_thread(pair.ingress.proc.wait, 15) == 0
        finally:
            pair.egress.proc.send_signal(signal.SIGCONT)
        writer.close()


async def test_backend_reset_mid_stream_resets_client(tmp_path: Path) -> None:
    """A backend that resets in the middle of a transfer gives the client an RST, not a FIN."""

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"partial reply")
        await writer.drain()
        # Reset only once the client has the partial reply: an RST discards
        # what the client's kernel holds unread.
        await reader.readexactly(2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(resetting, LOOPBACK, 0)
    try:
        async with processes(
            tmp_path, _egress_args(None, server.sockets[0].getsockname()[1])
        ) as pair:
            await pair.ingress.wait_for("connected")
            reader, writer = await asyncio.open_connection(LOOPBACK, pair.port)
            writer.write(b"hello")
            assert await reader.readexactly(13) == b"partial reply"
            writer.write(b"ok")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
    finally:
        server.close()


async def test_small_frames_and_session_window(tmp_path: Path) -> None:
    """With 4 KiB frames and a 16 KiB session window both ways, 8 MiB still arrive intact."""
    limits = ("--max-frame-size", "4096", "--session-window", "16384")
    async with (
        echo_server() as backend,
        processes(
            tmp_path,
            [*limits, *_egress_args(None, backend.port)],
            ingress_args=limits,
        ) as pair,
    ):
        await pair.ingress.wait_for("connected")
        payload = os.urandom(8 * MIB)
        assert await round_trip(pair.port, payload) == payload


async def test_tls_hostname_is_verified(tmp_path: Path) -> None:
    """A router whose certificate does not name the host we dialled is refused."""
    certs = make_certs(tmp_path / "certs")
    async with echo_server() as backend:
        # 127.0.0.2 is loopback too, but the certificate names localhost and 127.0.0.1 only.
        egress_args = [
            "--listen",
            "amqps://127.0.0.2:0",
            "--listen-cert",
            str(certs.server_cert),
            "--listen-key",
            str(certs.server_key),
            f"amqp:echo=>tcp:{LOOPBACK}:{backend.port}",
        ]
        async with processes(
            tmp_path,
            egress_args,
            ingress_args=("--hold-timeout", "0.5"),
            config=lambda port: write_connect_json(
                tmp_path / "certs" / "ip.json",
                {
                    "scheme": "amqps",
                    "host": "127.0.0.2",
                    "port": port,
                    "tls": {"ca": "test-ca.crt", "cert": "client.crt", "key": "client.key"},
                },
            ),
        ) as pair:
            await pair.ingress.wait_for("CERTIFICATE_VERIFY_FAILED")
            assert "IP address mismatch" in pair.ingress.log()
            await expect_reset(pair.port)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_tls_router_that_leaves_gives_no_asyncio_warning(tmp_path: Path, loop: str) -> None:
    """A TLS connection cannot be half-closed: its end is taken without asyncio's complaint."""
    async with tunnel_pair(tmp_path, "tls", loop) as pair:
        assert pair.egress.stop() == 0
        await pair.ingress.wait_for(r"connection lost")
        assert "eof_received" not in pair.ingress.log()
