"""Thousands of connections through each path, then every live count back to its baseline.

Each path runs a warm-up first, so what fills once (the reply pool, the
egress's idle backend connections, proton's wrappers for the session) is in
the baseline. Then :data:`CONNECTIONS` connections, :data:`AT_ONCE` at a
time, each checked end to end; once the last has ended, every count of
``tunnel_live_objects`` in both processes must come back to at most where it
was. One that stays above is an object kept past its connection: a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from grpc_backend import Backend, channel, method
from helpers import (
    LOOPBACK,
    TunnelProcess,
    admin_base,
    echo_server,
    eventually,
    round_trip,
    scrape,
    write_connect_json,
)
from http_backend import backend, request
from skrouter_peer import SkRouterPeer

CONNECTIONS = 2000
AT_ONCE = 32
WARM_UP = 200
ADMIN = ["--admin", f"{LOOPBACK}:0"]


def live_objects(base: str) -> dict[str, float]:
    return {
        dict(labels)["kind"]: value
        for (name, labels), value in scrape(base).items()
        if name == "tunnel_live_objects"
    }


async def burst(one: Callable[[int], Awaitable[None]], count: int) -> None:
    """``count`` calls of ``one``, at most :data:`AT_ONCE` at a time; any failure fails."""
    slots = asyncio.Semaphore(AT_ONCE)

    async def limited(index: int) -> None:
        async with slots:
            await one(index)

    await asyncio.gather(*(limited(index) for index in range(count)))


async def check_no_leak(
    processes: dict[str, TunnelProcess], one: Callable[[int], Awaitable[None]]
) -> None:
    bases = {role: await admin_base(process) for role, process in processes.items()}
    await burst(one, WARM_UP)

    def idle() -> dict[str, dict[str, float]] | None:
        pages = {role: scrape(base) for role, base in bases.items()}
        busy = any(
            value
            for page in pages.values()
            for (name, _), value in page.items()
            if name in ("tunnel_connections_active", "tunnel_http2_streams_active")
        )
        return None if busy else {role: live_objects(base) for role, base in bases.items()}

    found = await eventually(idle, "the warm-up's connections ended", 20)
    assert found is not None
    baseline = found
    for role, counts in baseline.items():
        # Without these the comparison below would pass on an empty page.
        assert {"tcp_connections", "link_handles", "proton_links"} <= counts.keys(), role
    await burst(one, CONNECTIONS)

    def grown() -> dict[str, tuple[float, float]]:
        return {
            f"{role} {kind}": (before, now)
            for role, base in bases.items()
            for kind, now in live_objects(base).items()
            if now > (before := baseline[role].get(kind, 0))
        }

    await eventually(
        lambda: not grown(),
        f"live objects back to their baseline after {CONNECTIONS} connections",
        20,
        detail=lambda: f"(baseline, now) of those above it: {grown()}",
    )


def tcp_echo(port: int) -> Callable[[int], Awaitable[None]]:
    async def one(index: int) -> None:
        payload = b"connection %d\n" % index
        assert await round_trip(port, payload) == payload

    return one


@contextlib.asynccontextmanager
async def stopped_cleanly(processes: dict[str, TunnelProcess]) -> AsyncIterator[None]:
    try:
        yield
        for process in processes.values():
            assert await asyncio.to_thread(process.stop) == 0, process.log()
    finally:
        for process in processes.values():
            process.kill()


@contextlib.asynccontextmanager
async def direct_pair(
    tmp: Path, egress_spec: str, ingress_spec: str
) -> AsyncIterator[tuple[dict[str, TunnelProcess], int]]:
    """An egress listening in direct mode and an ingress connected to it; the ingress's port."""
    egress = TunnelProcess(
        [*ADMIN, "--listen", f"amqp://{LOOPBACK}:0", egress_spec], tmp / "egress.log"
    )
    processes = {"egress": egress}
    async with stopped_cleanly(processes):
        config = write_connect_json(
            tmp / "connect.json", {"host": LOOPBACK, "port": await egress.amqp_port()}
        )
        ingress = processes["ingress"] = TunnelProcess(
            [*ADMIN, "--config", str(config), ingress_spec], tmp / "ingress.log"
        )
        port = await ingress.listen_port()
        await ingress.wait_for(r"router amqp://\S+ connected")
        yield processes, port


async def test_link_route_pair_in_direct_mode(tmp_path: Path) -> None:
    async with echo_server() as echo:
        egress, ingress = f"amqp:echo=>tcp:{LOOPBACK}:{echo.port}", f"tcp:{LOOPBACK}:0=>amqp:echo"
        async with direct_pair(tmp_path, egress, ingress) as (processes, port):
            await check_no_leak(processes, tcp_echo(port))


async def test_tcp_adaptor_pair_through_the_stand_in_router(tmp_path: Path) -> None:
    peer = SkRouterPeer()
    config = write_connect_json(tmp_path / "connect.json", {"host": LOOPBACK, "port": peer.start()})
    processes: dict[str, TunnelProcess] = {}
    try:
        async with echo_server() as echo, stopped_cleanly(processes):
            egress = processes["egress"] = TunnelProcess(
                [*ADMIN, "--config", str(config), f"amqp:echo=>tcp:{LOOPBACK}:{echo.port}"],
                tmp_path / "egress.log",
            )
            await egress.wait_for(r"tcp-adaptor dialect")
            ingress = processes["ingress"] = TunnelProcess(
                [*ADMIN, "--config", str(config), f"tcp:{LOOPBACK}:0=>amqp:echo"],
                tmp_path / "ingress.log",
            )
            port = await ingress.listen_port()
            await ingress.wait_for(r"tcp-adaptor dialect")
            await check_no_leak(processes, tcp_echo(port))
    finally:
        peer.stop()


async def test_http_pair_in_direct_mode(tmp_path: Path) -> None:
    with backend() as server:
        egress = f"amqp:web=>http:{LOOPBACK}:{server.server_address[1]}"
        async with direct_pair(tmp_path, egress, f"http:{LOOPBACK}:0=>amqp:web") as (
            processes,
            port,
        ):

            async def one(index: int) -> None:
                body = b"request %d" % index
                status, _, answer = await asyncio.to_thread(request, port, "POST", "/echo", body)
                assert (status, answer) == (200, body)

            await check_no_leak(processes, one)


async def test_http2_pair_in_direct_mode(tmp_path: Path) -> None:
    """gRPC calls on one channel: each a stream, all through one client connection."""
    with Backend("leaks") as server:
        egress = f"amqp:grpc=>http2:{LOOPBACK}:{server.port}"
        async with direct_pair(tmp_path, egress, f"http2:{LOOPBACK}:0=>amqp:grpc") as (
            processes,
            port,
        ):
            with channel(port) as chan:
                call = method(chan, "Unary")

                async def one(index: int) -> None:
                    body = b"call %d" % index
                    assert await asyncio.to_thread(call, body, timeout=30) == body

                await check_no_leak(processes, one)
