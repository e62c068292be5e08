"""The soak's verdict, failure reasons, plot and hostile peers (a run is too long for CI)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from pathlib import Path

import pytest
from helpers import LOOPBACK, TunnelProcess, echo_server

from tunnel import soak, soak_peers


@pytest.mark.parametrize(
    ("where", "exc", "reason"),
    [
        ("echo", ConnectionResetError(errno.ECONNRESET, "reset"), "echo: ECONNRESET"),
        ("connect", ConnectionRefusedError(errno.ECONNREFUSED, "no"), "connect: ECONNREFUSED"),
        ("ping", TimeoutError(), "ping: timed out"),
        ("echo", OSError("no errno"), "echo: OSError"),
    ],
)
def test_failures_are_named_by_where_and_errno(where: str, exc: OSError, reason: str) -> None:
    assert soak.failure_reason(where, exc) == reason


def report(start: int, minute_5: int | None, end: int, truncations: int = 0) -> soak.Report:
    return soak.Report(
        rss_start_kib=start, rss_minute_5_kib=minute_5, rss_end_kib=end, truncations=truncations
    )


def test_verdict_passes_flat_memory() -> None:
    found = soak.verdict(report(50_000, 52_000, 53_000))
    assert found["passed"], found
    assert found["ingress_rss_growth"] == 0.06
    assert found["ingress_rss_growth_after_minute_5"] == 0.019


@pytest.mark.parametrize(
    ("run", "why"),
    [
        (report(50_000, 52_000, 56_000), "from the start"),
        (report(50_000, 50_000, 53_000), "from minute 5"),
        (report(50_000, None, 50_000, truncations=1), "1 truncations"),
    ],
)
def test_verdict_fails_growth_or_truncation(run: soak.Report, why: str) -> None:
    found = soak.verdict(run)
    assert not found["passed"]
    assert any(why in failure for failure in found["failed"]), found["failed"]


def test_plot_draws_the_curve(tmp_path: Path) -> None:
    samples = [
        soak.Sample(
            seconds=10.0 * n,
            ingress_rss_kib=50_000 + n,
            egress_rss_kib=None if n == 5 else 40_000,
            connections_per_second=250.0,
            failures_per_second=0.1 * (n % 3),
        )
        for n in range(1, 13)
    ]
    summary = {
        "minutes": 2.0,
        "seed": 7,
        "connections": 30_000,
        "truncations": 0,
        "fault_times": [(35.0, "egress killed"), (80.0, "egress frozen")],
        "samples": [vars(sample) for sample in samples],
    }
    path = tmp_path / "soak.png"
    soak.plot(summary, path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


async def test_the_soaks_hostile_peers_meet_the_egress_bounds(tmp_path: Path) -> None:
    """The two hostile faults, each once against a real egress: refused, held, RSS flat."""
    async with echo_server() as echo:
        # The soak's idle timeout, and a hold past it: the shut window must outlast it.
        egress = TunnelProcess(
            [
                "--amqp-idle-timeout",
                "1",
                "--listen",
                f"amqp://{LOOPBACK}:0",
                f"amqp:echo=>tcp:{LOOPBACK}:{echo.port}",
            ],
            tmp_path / "egress.log",
        )
        try:
            port = await egress.amqp_port()
            before = egress.rss_kib()
            refused = await soak_peers.ignore_credit(port, "echo")
            assert refused == "amqp:link:transfer-limit-exceeded", egress.log()
            held = await soak_peers.shut_window(port, "echo", tunnels=8, seconds=3.0)
            assert held == "held", egress.log()
            assert egress.rss_kib() - before < soak.MAX_HOSTILE_GROWTH_KIB
            assert await asyncio.to_thread(egress.stop) == 0, egress.log()
        finally:
            egress.kill()


async def test_a_hostile_peer_closes_while_its_far_end_keeps_sending() -> None:
    """close() returns even when the cancel lands as a read completes (it once hung the soak).

    The far end sends AMQP empty frames without pause, so the peer's reads
    complete all the time; asyncio.wait_for on 3.11 dropped a cancel that
    met one, and close() waited for ever on a loop that went on.
    """
    heartbeat = b"\x00\x00\x00\x08\x02\x00\x00\x00"

    async def chatter(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"AMQP\x00\x01\x00\x00")
        with contextlib.suppress(OSError):
            while not writer.is_closing():
                writer.write(heartbeat * 4)
                await writer.drain()
                await asyncio.sleep(0)

    server = await asyncio.start_server(chatter, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for attempt in range(200):
            peer = await soak_peers.Peer.connect(port)
            await asyncio.sleep(0.001 * (attempt % 7))
            async with asyncio.timeout(5):
                await peer.close()
            assert peer.task.done()
    finally:
        server.close()
