"""The benchmark harness works end to end (figures are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tunnel.bench.__main__ import (
    Row,
    _servers,
    bulk_forward,
    bulk_reverse,
    direct_path,
    render,
    rtt,
)


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    """--quick measures every row on every path and writes the JSON table."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tunnel/relay" in result.stdout
    table = json.loads(out.read_text())
    rows = table["rows"]
    for key in (
        "bulk_fwd",
        "bulk_rev",
        "bulk_16",
        "bulk_64",
        "rtt_p50",
        "conn_p50",
        "churn_rate",
        "delayed_fwd",
        "delayed_rev",
        "delayed_rtt_p50",
    ):
        for path in ("direct", "relay", "tunnel"):
            assert rows[key][path] > 0, (key, path)
        assert rows[key]["ratio"] > 0, key
    for key in (
        "concurrent_rss_near",
        "concurrent_per_conn_far",
        "slow_peak_near",
        "slow_peak_far",
    ):
        assert rows[key]["direct"] is None
        assert rows[key]["relay"] > 0 and rows[key]["tunnel"] > 0, key
    # gRPC unary calls: direct, through the TCP relays, through the HTTP/2 bridge.
    for key in ("grpc_rate", "grpc_p50"):
        for path in ("direct", "relay", "tunnel"):
            assert rows[key][path] > 0, (key, path)
        assert rows[key]["ratio"] == rows[key]["tunnel"] / rows[key]["direct"], key
    assert "x direct" in result.stdout
    # Correctness, not speed: every held connection through every path echoed.
    count = int(rows["concurrent_ok"]["metric"].split()[0])
    assert [rows["concurrent_ok"][p] for p in ("direct", "relay", "tunnel")] == [count] * 3
    assert rows["conn_failures"]["tunnel"] == 0
    assert [rows["churn_failures"][p] for p in ("direct", "relay", "tunnel")] == [0] * 3


async def test_the_delaying_hop_delays_each_way_and_carries_half_close() -> None:
    """An echo through tunnel.bench.delay takes twice its delay; bulk ends, both ways, counted."""
    async with _servers() as (_, servers):
        with direct_path(servers, delay_ms=5) as path:
            p50, _ = await rtt(path.ports["echo"], 20)
            # In microseconds: 5 ms each way, less at most half a timer tick; the
            # upper bound only keeps a loaded machine from failing the test.
            assert 9_000 <= p50 <= 50_000
            # Each checks the byte count, which the far end gives only after the FIN.
            assert await bulk_forward(path.ports["sink"], 8 << 20) > 0
            assert await bulk_reverse(path.ports["source"], 8 << 20) > 0


def test_bad_router_url_is_refused() -> None:
    """--amqp takes amqp://HOST:PORT and says so otherwise."""
    result = subprocess.run(
        [sys.executable, "-m", "tunnel.bench", "--amqp", "localhost"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "expected amqp://HOST:PORT" in result.stderr


def test_the_table_flags_each_missed_target() -> None:
    """A target the tunnel misses is marked in the table; one it meets is not."""
    rows = {
        "bulk_fwd": Row("bulk", "MB/s", "higher", ">= 0.5x relay", {"relay": 100, "tunnel": 40}),
        "bulk_64": Row("bulk 64", "MB/s", "higher", ">= 1 conn", {"relay": 100, "tunnel": 50}),
        "rtt": Row("rtt", "us", "lower", "<= 3x relay", {"relay": 10, "tunnel": 25}),
        "fail": Row("failures", "count", "lower", "0", {"tunnel": 2}),
        "rss": Row("rss", "MiB", "lower", "< 150", {"relay": 1, "tunnel": 149}),
    }
    table = {line.split("|")[1].strip(): line for line in render(rows).splitlines()[2:]}
    assert "MISSED" in table["bulk"]
    assert "MISSED" not in table["bulk 64"]
    assert "MISSED" not in table["rtt"]
    assert "MISSED" in table["failures"]
    assert "MISSED" not in table["rss"]
