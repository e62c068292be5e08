"""The soak's verdict, its failure reasons and its plot (the run itself is too long for CI)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tunnel import soak


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
            egress_rss_kib=40_000,
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
