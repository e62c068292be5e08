"""The admin endpoint: liveness, readiness before and after the router, and metrics."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from helpers import (
    LOOPBACK,
    TunnelProcess,
    admin_base,
    echo_server,
    get,
    round_trip,
    samples,
    write_connect_json,
)
from reactor_peer import free_port

from tunnel.metrics import METRICS


async def test_readiness_follows_the_router_and_metrics_count_a_transfer(tmp_path: Path) -> None:
    """/readyz is 503 naming the router until it connects, then 200; /metrics counts bytes."""
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))  # reserved, not listening: connections are refused
    amqp_port = holder.getsockname()[1]
    config = write_connect_json(tmp_path / "connect.json", {"host": LOOPBACK, "port": amqp_port})
    ingress = TunnelProcess(
        ["--admin", f"{LOOPBACK}:0", "--config", str(config), f"tcp:{LOOPBACK}:0=>amqp:echo"],
        tmp_path / "ingress.log",
    )
    egress: TunnelProcess | None = None
    try:
        base = await admin_base(ingress)
        port = await ingress.listen_port()
        assert await get(base, "/healthz") == (200, "ok\n")
        status, body = await get(base, "/readyz")
        assert status == 503
        assert json.loads(body) == {
            "ready": False,
            "missing": [f"router amqp://{LOOPBACK}:{amqp_port} not connected"],
        }
        async with echo_server() as backend:
            holder.close()
            egress = TunnelProcess(
                [
                    "--admin",
                    f"{LOOPBACK}:0",
                    "--listen",
                    f"amqp://{LOOPBACK}:{amqp_port}",
                    f"amqp:echo=>tcp:{LOOPBACK}:{backend.port}",
                ],
                tmp_path / "egress.log",
            )
            egress_base = await admin_base(egress)
            assert (await get(egress_base, "/readyz"))[0] == 200
            await ingress.wait_for("connected", timeout=20)
            assert await get(base, "/readyz") == (200, '{"ready": true, "missing": []}\n')
            payload = b"x" * 100_000
            assert await round_trip(port, payload) == payload
            await ingress.wait_for(r"closed \(finished\)")
            await egress.wait_for(r"closed \(finished\)")
            ingress_metrics = samples((await get(base, "/metrics"))[1])
            egress_metrics = samples((await get(egress_base, "/metrics"))[1])
        for metrics, spec in (
            (ingress_metrics, f"tcp:{LOOPBACK}:0=>amqp:echo"),
            (egress_metrics, f"amqp:echo=>tcp:{LOOPBACK}:{backend.port}"),
        ):
            bridge = (("bridge", spec),)
            assert metrics[("tunnel_connections_opened_total", bridge)] == 1
            assert metrics[("tunnel_connections_closed_total", bridge)] == 1
            assert metrics[("tunnel_connections_active", bridge)] == 0
            assert metrics[("tunnel_tcp_bytes_read_total", bridge)] == len(payload)
            assert metrics[("tunnel_tcp_bytes_written_total", bridge)] == len(payload)
            failures = [
                v for (name, _), v in metrics.items() if name == "tunnel_connection_failures_total"
            ]
            assert failures and not any(failures)
        assert ingress_metrics[("tunnel_router_connected", ())] == 1
        assert ingress_metrics[("tunnel_router_connects_total", ())] == 1
        assert ingress_metrics[("tunnel_router_disconnects_total", ())] == 0
        assert ingress.stop() == 0
        assert egress.stop() == 0
    finally:
        holder.close()
        ingress.kill()
        if egress is not None:
            egress.kill()


async def test_failures_are_counted_by_reason(tmp_path: Path) -> None:
    """A refused backend counts once on each side, under a fixed reason label."""
    dead = free_port()
    egress = TunnelProcess(
        [
            "--admin",
            f"{LOOPBACK}:0",
            "--listen",
            f"amqp://{LOOPBACK}:0",
            f"amqp:echo=>tcp:{LOOPBACK}:{dead}",
        ],
        tmp_path / "egress.log",
    )
    ingress: TunnelProcess | None = None
    try:
        egress_base = await admin_base(egress)
        config = write_connect_json(
            tmp_path / "connect.json", {"host": LOOPBACK, "port": await egress.amqp_port()}
        )
        ingress = TunnelProcess(
            ["--admin", f"{LOOPBACK}:0", "--config", str(config), f"tcp:{LOOPBACK}:0=>amqp:echo"],
            tmp_path / "ingress.log",
        )
        base = await admin_base(ingress)
        port = await ingress.listen_port()
        await ingress.wait_for("connected")
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"hello?")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await ingress.wait_for(r"reset \(")
        ingress_metrics = samples((await get(base, "/metrics"))[1])
        egress_metrics = samples((await get(egress_base, "/metrics"))[1])
        egress_bridge = ("bridge", f"amqp:echo=>tcp:{LOOPBACK}:{dead}")
        assert (
            egress_metrics[
                (
                    "tunnel_connection_failures_total",
                    (egress_bridge, ("reason", "backend-unreachable")),
                )
            ]
            == 1
        )
        ingress_bridge = ("bridge", f"tcp:{LOOPBACK}:0=>amqp:echo")
        assert (
            ingress_metrics[
                ("tunnel_connection_failures_total", (ingress_bridge, ("reason", "far-end-reset")))
            ]
            == 1
        )
        assert await get(base, "/nope") == (404, "not found\n")
        assert ingress.stop() == 0
        assert egress.stop() == 0
    finally:
        if ingress is not None:
            ingress.kill()
        egress.kill()


def test_every_metric_is_documented() -> None:
    """Each metric the collector produces has a row in the README's metrics table."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in METRICS:
        assert f"| `{name}` |" in readme, name
