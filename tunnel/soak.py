"""``python -m tunnel.soak --minutes 30``: a long mixed run with faults, checking every byte.

A tunnel pair in direct mode (egress and ingress as separate processes) in
front of an echo backend in this process. Workers run bulk transfers,
ping-pong and connection churn through it, while at random the egress
process (the ingress's router, in this setting) is killed (-9) and
restarted or frozen (SIGSTOP) for longer than the AMQP idle timeout and
then let go, the backend is stopped and restarted, and a hostile AMQP peer
(:mod:`tunnel.soak_peers`) ignores credit or holds its session window shut
against the egress, whose RSS must not grow by more than
:data:`MAX_HOSTILE_GROWTH_KIB` through it.

Each transfer sends a random payload, half-closes, and expects the same
bytes back and then EOF. An RST or a refused connection during a fault is
an accepted failure, counted by where it happened and its errno (say
``echo: ECONNRESET``); a clean EOF after fewer bytes than were sent, or
different bytes, is a *truncation*, which must never happen.

The ingress's RSS is read with nothing in flight (:meth:`Soak.quiet_rss`)
after a warm-up, at minute 5 and at the end, so that the readings compare
what the process keeps rather than what a bulk transfer happens to hold at
that instant. The verdict: no truncation, RSS growth from the start to the
end under :data:`MAX_GROWTH`, and from minute 5 to the end under
:data:`MAX_GROWTH_AFTER_5`. Under load, every :data:`SAMPLE_PERIOD` seconds,
the run also records both processes' RSS, connections completed and
failures per second, and the ingress's live object counts and heap from its
``/metrics``: the curve a soak is read by. ``--json`` writes it all;
``--plot`` draws it (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import soak_peers
from .bench import rss_kib
from .bench.servers import Echo
from .memory import PERIOD as MEMORY_RELEASE_PERIOD

QUIET_SECONDS = MEMORY_RELEASE_PERIOD + 2
#: Seconds between samples of the curve.
SAMPLE_PERIOD = 10.0
#: The pair's AMQP idle timeout, short so that a frozen peer is found in seconds.
IDLE_TIMEOUT = 4.0
#: How long a frozen egress stays stopped: past the idle timeout.
FREEZE_SECONDS = 1.5 * IDLE_TIMEOUT
#: The verdict's bounds on the ingress's quiet RSS growth.
MAX_GROWTH = 0.10
MAX_GROWTH_AFTER_5 = 0.05
#: Each fault, drawn when a uniform draw in [0, 1) falls under its bound.
FAULTS = (
    ("egress killed", 0.25),
    ("egress frozen", 0.4),
    ("peer ignoring credit", 0.55),
    ("peer with a shut window", 0.7),
    ("backend stopped", 1.0),
)
#: What a hostile peer may add to the egress's RSS (the bound of the hostile tests).
MAX_HOSTILE_GROWTH_KIB = 16 * 1024
#: How long the peer with a shut session window keeps its tunnels, and how many.
SHUT_WINDOW_SECONDS = 20.0
#: What a hostile peer may take beyond its hold to attach and to be refused.
HOSTILE_SLACK = 60.0
SHUT_WINDOW_TUNNELS = 8
#: The ingress's live counts sampled into the curve (kinds of tunnel_live_objects).
SAMPLED_KINDS = ("tcp_connections", "link_handles", "proton_links", "proton_deliveries")


def failure_reason(where: str, exc: BaseException) -> str:
    """``where: ERRNO`` for an OSError, ``where: timed out``, else the exception's type."""
    if isinstance(exc, TimeoutError):
        return f"{where}: timed out"
    if isinstance(exc, OSError) and exc.errno:
        return f"{where}: {errno.errorcode.get(exc.errno, str(exc.errno))}"
    return f"{where}: {type(exc).__name__}"


@dataclass
class Sample:
    """One point of the curve."""

    seconds: float
    ingress_rss_kib: int
    #: None while the egress is down (killed, not yet back).
    egress_rss_kib: int | None
    connections_per_second: float
    failures_per_second: float
    #: The ingress's tunnel_live_objects of SAMPLED_KINDS, and its heap (bytes).
    ingress_live: dict[str, float] = field(default_factory=dict)
    ingress_heap: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    connections: int = 0
    completed: int = 0
    bytes_verified: int = 0
    truncations: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    rss_start_kib: int = 0
    rss_minute_5_kib: int | None = None
    rss_end_kib: int = 0
    #: Under load, to tell a leak (steady growth) from pools filling up once.
    samples: list[Sample] = field(default_factory=list)
    #: When each fault began, in seconds from the start, and which.
    fault_times: list[tuple[float, str]] = field(default_factory=list)
    #: Each hostile peer: what the egress did, and its RSS before and after (KiB).
    hostile: list[dict[str, Any]] = field(default_factory=list)


class Soak:
    def __init__(self, folder: Path, minutes: float, seed: int) -> None:
        self.folder = folder
        self.deadline = time.monotonic() + minutes * 60
        self.rng = random.Random(seed)
        self.report = Report()
        self.backend: asyncio.Server | None = None
        self.backend_port = 0
        self.amqp_port = 0
        self.egress: subprocess.Popen[bytes] | None = None
        self.ingress: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin = ""
        self.started = time.monotonic()
        # Cleared while the RSS is read with nothing in flight.
        self.running = asyncio.Event()
        self.running.set()
        self.busy = 0

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.folder / log).open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "tunnel", "--amqp-idle-timeout", str(IDLE_TIMEOUT), *args],
                stdout=sink,
                stderr=sink,
                stdin=subprocess.DEVNULL,
            )

    async def _wait_log(self, log: str, pattern: str, after: int = 0) -> re.Match[str]:
        for _ in range(400):
            match = re.search(pattern, (self.folder / log).read_text()[after:])
            if match:
                return match
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{log}: no {pattern!r}")

    async def start_backend(self) -> None:
        self.backend = await asyncio.get_running_loop().create_server(
            Echo, "127.0.0.1", self.backend_port, reuse_address=True
        )
        self.backend_port = self.backend.sockets[0].getsockname()[1]

    async def start_egress(self) -> None:
        mark = len((self.folder / "egress.log").read_text()) if self.egress else 0
        self.egress = self._spawn(
            [
                "--listen",
                f"amqp://127.0.0.1:{self.amqp_port}",
                f"amqp:echo=>tcp:127.0.0.1:{self.backend_port}",
            ],
            "egress.log",
        )
        match = await self._wait_log("egress.log", r"accepting AMQP on amqp://[^:]+:(\d+)", mark)
        self.amqp_port = int(match.group(1))

    async def start(self) -> None:
        await self.start_backend()
        await self.start_egress()
        config = self.folder / "connect.json"
        config.write_text(json.dumps({"host": "127.0.0.1", "port": self.amqp_port}))
        self.ingress = self._spawn(
            ["--admin", "127.0.0.1:0", "--config", str(config), "tcp:127.0.0.1:0=>amqp:echo"],
            "ingress.log",
        )
        self.port = int(
            (await self._wait_log("ingress.log", r"listening on 127\.0\.0\.1:(\d+)")).group(1)
        )
        admin = await self._wait_log("ingress.log", r"admin endpoint on (http://[\d.:]+)")
        self.admin = admin.group(1)
        await self._wait_log("ingress.log", r"router \S+ connected")

    async def transfer(self, size: int) -> None:
        """One connection: send ``size`` random bytes, half-close, check the echo."""
        payload = self.rng.randbytes(size)
        self.report.connections += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 10
            )
        except (OSError, TimeoutError) as exc:
            self.report.failures[failure_reason("connect", exc)] += 1
            return
        try:
            writer.write(payload)
            writer.write_eof()
            digest, received = hashlib.sha256(), 0
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
                digest.update(chunk)
                received += len(chunk)
            if received == size and digest.digest() == hashlib.sha256(payload).digest():
                self.report.bytes_verified += 2 * size
                self.report.completed += 1
            else:
                self.report.truncations += 1
        except (OSError, TimeoutError) as exc:
            self.report.failures[failure_reason("echo", exc)] += 1
        finally:
            writer.close()

    async def ping_pong(self) -> None:
        """One connection, many small round trips, each checked."""
        self.report.connections += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.report.failures[failure_reason("connect", exc)] += 1
            return
        try:
            for n in range(self.rng.randint(10, 200)):
                message = b"%d." % n
                writer.write(message)
                if await asyncio.wait_for(reader.readexactly(len(message)), 10) != message:
                    self.report.truncations += 1
                    return
                self.report.bytes_verified += 2 * len(message)
            writer.write_eof()
            if await asyncio.wait_for(reader.read(), 10) != b"":
                self.report.truncations += 1
            else:
                self.report.completed += 1
        except asyncio.IncompleteReadError:
            self.report.truncations += 1  # a clean EOF in the middle of a reply
        except (TimeoutError, OSError) as exc:
            self.report.failures[failure_reason("ping", exc)] += 1
        finally:
            writer.close()

    async def worker(self, kind: str) -> None:
        while time.monotonic() < self.deadline:
            await self.running.wait()
            self.busy += 1
            try:
                if kind == "bulk":
                    await self.transfer(self.rng.randint(1, 8 << 20))
                elif kind == "churn":
                    await self.transfer(self.rng.randint(1, 2000))
                else:
                    await self.ping_pong()
            finally:
                self.busy -= 1

    async def quiet_rss(self) -> int:
        """The ingress's RSS with nothing in flight: what it keeps, not what it is using.

        New work waits while the connections under way finish, then for
        longer than the tunnel's memory release period.
        """
        assert self.ingress is not None
        self.running.clear()
        try:
            while self.busy:
                await asyncio.sleep(0.05)
            await asyncio.sleep(QUIET_SECONDS)
            return rss_kib(self.ingress)
        finally:
            self.running.set()

    async def chaos(self) -> None:
        while time.monotonic() < self.deadline - 20:
            await asyncio.sleep(self.rng.uniform(15, 40))
            await self.running.wait()
            if time.monotonic() > self.deadline - 20:
                break  # no fault may run past the end
            fault = self.rng.random()
            assert self.egress is not None and self.backend is not None
            began = round(time.monotonic() - self.started, 1)
            kind = next(name for name, below in FAULTS if fault < below)
            self.report.faults[kind] += 1
            self.report.fault_times.append((began, kind))
            if kind == "egress killed":
                self.egress.kill()
                await asyncio.to_thread(self.egress.wait)
                await asyncio.sleep(self.rng.uniform(0.1, 3))
                await self.start_egress()
            elif kind == "egress frozen":
                # Past the idle timeout: the ingress must find it dead, and
                # reconnect once it answers again.
                self.egress.send_signal(signal.SIGSTOP)
                await asyncio.sleep(FREEZE_SECONDS)
                self.egress.send_signal(signal.SIGCONT)
            elif kind == "backend stopped":
                self.backend.close()
                await asyncio.sleep(self.rng.uniform(0.1, 3))
                await self.start_backend()
            else:
                await self.hostile_peer(kind)

    async def hostile_peer(self, kind: str) -> None:
        """One hostile peer against the egress, with its RSS before and after."""
        assert self.egress is not None
        before = rss_kib(self.egress)
        if kind == "peer ignoring credit":
            fault = soak_peers.ignore_credit(self.amqp_port, "echo")
        else:
            fault = soak_peers.shut_window(
                self.amqp_port, "echo", SHUT_WINDOW_TUNNELS, SHUT_WINDOW_SECONDS
            )
        try:
            # A peer that never finishes would stop every later fault: it fails the verdict instead.
            outcome = await asyncio.wait_for(fault, SHUT_WINDOW_SECONDS + HOSTILE_SLACK)
        except TimeoutError:
            outcome = "the hostile peer never finished"
        self.report.hostile.append(
            {
                "peer": kind,
                "outcome": outcome,
                "egress_rss_before_kib": before,
                "egress_rss_after_kib": rss_kib(self.egress),
            }
        )

    async def run(self) -> Report:
        await self.start()
        assert self.ingress is not None
        workers = [
            self.worker(kind)
            for kind in ("bulk", "bulk", "churn", "churn", "churn", "pingpong", "pingpong")
        ]
        warm = asyncio.create_task(self._record_start())
        minute_5 = asyncio.create_task(self._record_minute_5())
        sampler = asyncio.create_task(self._sample())
        await asyncio.gather(self.chaos(), *workers)
        await warm
        await minute_5
        sampler.cancel()
        self.report.rss_end_kib = await self.quiet_rss()
        return self.report

    async def _record_start(self) -> None:
        # After warm-up: the first connections grow pools and buffers once.
        await asyncio.sleep(min(30.0, max(0.0, self.deadline - time.monotonic()) / 4))
        self.report.rss_start_kib = await self.quiet_rss()

    async def _record_minute_5(self) -> None:
        # Only if the run goes on long enough after it for growth to show.
        if self.deadline - self.started < 5 * 60 + 4 * SAMPLE_PERIOD:
            return
        await asyncio.sleep(max(0.0, self.started + 5 * 60 - time.monotonic()))
        self.report.rss_minute_5_kib = await self.quiet_rss()

    async def _sample(self) -> None:
        assert self.ingress is not None
        report = self.report
        completed, failed = report.completed, report.failures.total()
        while True:
            await asyncio.sleep(SAMPLE_PERIOD)
            live, heap = await asyncio.to_thread(self._scrape)
            egress = self.egress
            report.samples.append(
                Sample(
                    seconds=round(time.monotonic() - self.started, 1),
                    ingress_rss_kib=rss_kib(self.ingress),
                    egress_rss_kib=(rss_kib(egress) or None)
                    if egress and egress.poll() is None
                    else None,
                    connections_per_second=(report.completed - completed) / SAMPLE_PERIOD,
                    failures_per_second=(report.failures.total() - failed) / SAMPLE_PERIOD,
                    ingress_live=live,
                    ingress_heap=heap,
                )
            )
            completed, failed = report.completed, report.failures.total()

    def _scrape(self) -> tuple[dict[str, float], dict[str, float]]:
        """The ingress's live counts of SAMPLED_KINDS and its heap, from its /metrics."""
        with urllib.request.urlopen(self.admin + "/metrics", timeout=10) as page:  # noqa: S310
            text = page.read().decode()
        live: dict[str, float] = {}
        heap: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "tunnel_live_objects" and sample.labels["kind"] in SAMPLED_KINDS:
                    live[sample.labels["kind"]] = sample.value
                elif sample.name == "tunnel_heap_bytes":
                    heap[sample.labels["part"]] = sample.value
        return live, heap

    def stop(self) -> None:
        for proc in (self.ingress, self.egress):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.backend is not None:
            self.backend.close()


def verdict(report: Report) -> dict[str, Any]:
    """Whether the run passed: no truncation, and the quiet RSS within its growth bounds."""
    start, end, minute_5 = report.rss_start_kib, report.rss_end_kib, report.rss_minute_5_kib
    growth = (end - start) / max(start, 1)
    after_5 = None if minute_5 is None else (end - minute_5) / max(minute_5, 1)
    failed = []
    if report.truncations:
        failed.append(f"{report.truncations} truncations")
    if growth >= MAX_GROWTH:
        failed.append(f"RSS grew {growth:.1%} from the start (bound {MAX_GROWTH:.0%})")
    if after_5 is not None and after_5 >= MAX_GROWTH_AFTER_5:
        failed.append(f"RSS grew {after_5:.1%} from minute 5 (bound {MAX_GROWTH_AFTER_5:.0%})")
    expected = {"peer ignoring credit": "amqp:link:transfer-limit-exceeded"}
    for peer in report.hostile:
        grown = peer["egress_rss_after_kib"] - peer["egress_rss_before_kib"]
        if grown > MAX_HOSTILE_GROWTH_KIB:
            failed.append(f"a {peer['peer']} grew the egress by {grown} KiB")
        if peer["outcome"] != expected.get(peer["peer"], "held"):
            failed.append(f"a {peer['peer']}: {peer['outcome']}")
    return {
        "ingress_rss_growth": round(growth, 3),
        "ingress_rss_growth_after_minute_5": None if after_5 is None else round(after_5, 3),
        "passed": not failed,
        "failed": failed,
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    """RSS, connections per second and failures per second over time, one panel each."""
    import matplotlib  # noqa: PLC0415 - an optional extra, needed only here

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    samples = summary["samples"]
    minutes = [sample["seconds"] / 60 for sample in samples]
    figure, (rss, rate, failures) = pyplot.subplots(3, 1, sharex=True, figsize=(9, 8))
    rss.plot(minutes, [s["ingress_rss_kib"] / 1024 for s in samples], label="ingress")
    down = float("nan")  # a gap in the line while the egress is down
    egress = [down if s["egress_rss_kib"] is None else s["egress_rss_kib"] / 1024 for s in samples]
    rss.plot(minutes, egress, label="egress")
    rss.set_ylabel("RSS, MiB")
    rss.legend()
    rate.plot(minutes, [s["connections_per_second"] for s in samples])
    rate.set_ylabel("connections/s")
    failures.plot(minutes, [s["failures_per_second"] for s in samples], color="tab:red")
    failures.set_ylabel("failures/s")
    failures.set_xlabel("minutes (dotted: a fault began)")
    for seconds, _ in summary["fault_times"]:
        for panel in (rss, rate, failures):
            panel.axvline(seconds / 60, color="grey", linestyle=":", linewidth=1)
    figure.suptitle(
        f"tunnel soak, {summary['minutes']:g} min, seed {summary['seed']}: "
        f"{summary['connections']} connections, {summary['truncations']} truncations"
    )
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunnel.soak",
        description=(__doc__ or "").replace("``", ""),  # reST markup reads badly in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the curve to a PNG (matplotlib)")
    args = parser.parse_args()
    if args.plot:
        try:
            import matplotlib  # noqa: F401, PLC0415 - checked before a long run, not after
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'tunnel[plot]'")
    with tempfile.TemporaryDirectory() as folder:
        soak = Soak(Path(folder), args.minutes, args.seed)
        try:
            report = asyncio.run(soak.run())
        finally:
            soak.stop()
    summary: dict[str, Any] = {
        "minutes": args.minutes,
        "seed": args.seed,
        "connections": report.connections,
        "completed": report.completed,
        "bytes_verified": report.bytes_verified,
        "truncations": report.truncations,
        "failures": dict(report.failures.most_common()),
        "faults_injected": dict(report.faults),
        "fault_times": report.fault_times,
        "hostile_peers": report.hostile,
        "ingress_rss_start_kib": report.rss_start_kib,
        "ingress_rss_minute_5_kib": report.rss_minute_5_kib,
        "ingress_rss_end_kib": report.rss_end_kib,
        **verdict(report),
        "samples": [asdict(sample) for sample in report.samples],
    }
    shown = {key: value for key, value in summary.items() if key != "samples"}
    print(json.dumps(shown, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.plot:
        plot(summary, Path(args.plot))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
