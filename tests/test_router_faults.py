"""The faults a router network has: a router killed and restarted, frozen, a certificate rotated.

The router is the stand-in skupper-router (:mod:`skrouter_peer`) in a process
of its own (:mod:`router_process`), so that it can be killed with SIGKILL and
frozen with SIGSTOP like a real one; both tunnel processes connect to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import (
    LOOPBACK,
    TunnelProcess,
    echo_server,
    make_certs,
    round_trip,
    write_connect_json,
)
from reactor_peer import free_port

ROUTER = Path(__file__).resolve().parent / "router_process.py"
#: The tunnels' AMQP idle timeout in these tests: a frozen router is found within it.
IDLE_TIMEOUT = 2.0
IN_FLIGHT = 5


class RouterProcess:
    """The stand-in router as a subprocess on a fixed port, so that it can come back there."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, str(ROUTER), str(port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line == f"listening on {port}\n", line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def signal(self, number: signal.Signals) -> None:
        self.proc.send_signal(number)


@contextlib.contextmanager
def router_at(port: int) -> Iterator[RouterProcess]:
    router = RouterProcess(port)
    try:
        yield router
    finally:
        router.signal(signal.SIGCONT)  # a frozen one could not hear the kill otherwise
        router.kill()


@dataclass
class Pair:
    ingress: TunnelProcess
    egress: TunnelProcess
    port: int


@contextlib.asynccontextmanager
async def pair_through(tmp: Path, router_port: int) -> AsyncIterator[Pair]:
    """An egress (to an echo server) and an ingress, both connected to the router's port."""
    config = write_connect_json(tmp / "connect.json", {"host": LOOPBACK, "port": router_port})
    common = ["--amqp-idle-timeout", str(IDLE_TIMEOUT), "--config", str(config)]
    egress: TunnelProcess | None = None
    ingress: TunnelProcess | None = None
    try:
        async with echo_server() as echo:
            egress = TunnelProcess(
                [*common, f"amqp:echo=>tcp:{LOOPBACK}:{echo.port}"], tmp / "egress.log"
            )
            await egress.wait_for(r"tcp-adaptor dialect")
            ingress = TunnelProcess([*common, f"tcp:{LOOPBACK}:0=>amqp:echo"], tmp / "ingress.log")
            port = await ingress.listen_port()
            await ingress.wait_for(r"tcp-adaptor dialect")
            yield Pair(ingress, egress, port)
            for process in (ingress, egress):
                assert await asyncio.to_thread(process.stop) == 0, process.log()
    finally:
        for started in (ingress, egress):
            if started is not None:
                started.kill()


async def open_streams(port: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``IN_FLIGHT`` clients, each having had one echo: streams open both ways."""
    streams = []
    for index in range(IN_FLIGHT):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        message = b"stream %d\n" % index
        writer.write(message)
        assert await asyncio.wait_for(reader.readexactly(len(message)), 10) == message
        streams.append((reader, writer))
    return streams


async def how_each_ended(
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
) -> list[str]:
    """For each stream: "reset", or what else its next read gave (a clean EOF, bytes)."""

    async def ended(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        try:
            data = await asyncio.wait_for(reader.read(100), 15)
        except ConnectionResetError:
            return "reset"
        finally:
            writer.close()
        return "clean EOF" if data == b"" else f"bytes {data!r}"

    return list(await asyncio.gather(*(ended(r, w) for r, w in streams)))


async def fate(client: asyncio.Task[bytes], expected: bytes) -> str:
    """How a client's round trip ended: "carried", "reset", or what it got instead."""
    try:
        got = await asyncio.wait_for(client, 15)
    except ConnectionResetError:
        return "reset"
    return "carried" if got == expected else f"got {got!r}"


async def test_router_killed_then_restarted(tmp_path: Path) -> None:
    """Every stream in flight ends in an RST, none cleanly; service is back within 2 s.

    The 2 s is the reconnect schedule's promise, not a speed: while the router
    does not listen, retries are at most 0.75 s apart, and a client that
    connects meanwhile is held, then carried.
    """
    port = free_port()
    router = RouterProcess(port)
    try:
        async with pair_through(tmp_path, port) as pair:
            streams = await open_streams(pair.port)
            router.kill()
            assert await how_each_ended(streams) == ["reset"] * IN_FLIGHT
            await pair.ingress.wait_for(r"connection lost")
            with router_at(port):
                back = time.monotonic()
                assert await round_trip(pair.port, b"after the restart\n") == b"after the restart\n"
                assert time.monotonic() - back < 2.0, pair.ingress.log()
    finally:
        router.kill()


async def test_router_frozen_past_the_idle_timeout(tmp_path: Path) -> None:
    """The idle timeout finds a frozen router: streams reset, new clients held; then service.

    A client held while the router is frozen is let go once the ingress is back.
    The router may then still route its stream to the egress's consumer of before
    the freeze, gone since: it is refused (modified), and the client reset, as
    skupper-router does. Either way it neither hangs nor ends cleanly. Once both
    tunnel processes are back, new clients are carried.
    """
    port = free_port()
    with router_at(port) as router:
        async with pair_through(tmp_path, port) as pair:
            streams = await open_streams(pair.port)
            marks = {p: len(p.log()) for p in (pair.ingress, pair.egress)}
            router.signal(signal.SIGSTOP)
            assert await how_each_ended(streams) == ["reset"] * IN_FLIGHT
            await pair.ingress.wait_for(r"connection lost")
            held = asyncio.create_task(round_trip(pair.port, b"held meanwhile\n"))
            # Held: accepted, and not answered while the router stays frozen.
            await pair.ingress.wait_for(r"held until the router is back")
            assert not held.done()
            router.signal(signal.SIGCONT)
            # Refused by the router (see above) is a reset; a hang would time out here.
            assert await fate(held, b"held meanwhile\n") in ("carried", "reset")
            for process, mark in marks.items():
                await process.wait_for(r"connected \(skupper-router", after=mark)
            assert await round_trip(pair.port, b"after the freeze\n") == b"after the freeze\n"


class Relay:
    """A TCP relay on loopback whose connections can all be dropped at once."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def drop_all(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    def close(self) -> None:
        self.drop_all()
        if self.server is not None:
            self.server.close()


def install(source: Path, live: Path) -> None:
    """Replace ``live`` with ``source`` in one rename, as a secret's update swaps its files."""
    staged = live.with_suffix(".new")
    shutil.copyfile(source, staged)
    staged.chmod(0o600)
    staged.replace(live)


async def test_rotated_certificates_are_used_on_reconnect(tmp_path: Path) -> None:
    """New files on disk, from another CA, both sides: the next connection uses them.

    The egress listens with amqps and requires a client certificate; the ingress
    connects to it through a relay. After the rotation no old certificate is
    trusted any more, so the reconnect works only if both processes load the new
    files: the egress for the handshake it accepts, the ingress for the one it makes.
    """
    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    files = {
        "ca.crt": (old.ca, new.ca),
        "server.crt": (old.server_cert, new.server_cert),
        "server.key": (old.server_key, new.server_key),
        "client.crt": (old.client_cert, new.client_cert),
        "client.key": (old.client_key, new.client_key),
    }
    for name, (before, _) in files.items():
        install(before, live / name)
    relay = None
    async with echo_server() as echo:
        egress = TunnelProcess(
            [
                "--listen",
                f"amqps://{LOOPBACK}:0",
                "--listen-cert",
                str(live / "server.crt"),
                "--listen-key",
                str(live / "server.key"),
                "--listen-ca",
                str(live / "ca.crt"),
                f"amqp:echo=>tcp:{LOOPBACK}:{echo.port}",
            ],
            tmp_path / "egress.log",
        )
        ingress: TunnelProcess | None = None
        try:
            relay = Relay(await egress.amqp_port())
            await relay.start()
            tls = {
                "cert": str(live / "client.crt"),
                "key": str(live / "client.key"),
                "ca": str(live / "ca.crt"),
            }
            config = write_connect_json(
                tmp_path / "connect.json",
                {"scheme": "amqps", "host": LOOPBACK, "port": relay.port, "tls": tls},
            )
            ingress = TunnelProcess(
                ["--config", str(config), f"tcp:{LOOPBACK}:0=>amqp:echo"], tmp_path / "ingress.log"
            )
            port = await ingress.listen_port()
            await ingress.wait_for(r"router \S+ connected")
            assert await round_trip(port, b"old certificates\n") == b"old certificates\n"

            for name, (_, after) in files.items():
                install(after, live / name)
            relay.drop_all()
            await ingress.wait_for(r"connection lost")
            assert await round_trip(port, b"new certificates\n") == b"new certificates\n"
            await ingress.wait_for(r"TLS files for router \S+ changed: new connections use them")
            await egress.wait_for(r"TLS files for the listener \S+ changed: new connections use")
            for process in (ingress, egress):
                assert await asyncio.to_thread(process.stop) == 0, process.log()
        finally:
            if relay is not None:
                relay.close()
            for started in (ingress, egress):
                if started is not None:
                    started.kill()
