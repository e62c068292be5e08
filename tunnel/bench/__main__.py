"""``python -m tunnel.bench [--quick] [--json PATH] [--amqp URL] [--window N] [--delay-ms MS]``.

Measures and compares paths, each to the same servers (``tunnel.bench.servers``,
own process):

- ``direct``: the client connects to the servers;
- ``relay``: client -> relay -> relay -> server, two ``tunnel.bench.relay``
  processes: the plain Python limit for a two-hop path;
- ``tunnel``: client -> ingress -> egress -> server, a tunnel pair in direct
  mode as two ``python -m tunnel`` processes (or both connected to the
  router given by ``--amqp``), with ``--window N`` if given.

The gRPC rows make unary calls to a gRPC server (``tunnel.bench.grpc_calls``,
own process) directly, through the two relays, and through an HTTP/2 tunnel
pair (``http2:`` and ``amqp:...=>http2:``); their ratio is to the direct call.
They need ``grpcio`` (the ``test`` extra) and are left out with ``--amqp``.

The rows "over N ms RTT" put a ``tunnel.bench.delay`` hop (``--delay-ms`` each
way, default 1) where each path crosses from near to far: between client and
servers, between the two relays, and on the tunnel pair's AMQP connection
(ingress -> delay -> egress). That is a router's distance, where what a
tunnel keeps in flight sets its rate rather than the CPU: per direction,
its credit window (``--window``) or its 8 unsettled deliveries, whichever is
fewer, of 128 KiB each. With ``--amqp`` the router is the distance, and these
rows have no tunnel figure.

Each tunnel figure is also given as a ratio to the relay's. The table goes to
stdout, and with ``--json`` to a file. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop

from .. import __version__
from ..limits import DEFAULT_MAX_CONNECTIONS
from . import grpc_calls, rss_kib

_COUNT = struct.Struct(">Q")
MB = 1_000_000
TARGETS = ("echo", "sink", "source")


@dataclass(frozen=True)
class Sizes:
    bulk_bytes: int
    rtt_rounds: int
    new_conns: int
    concurrent: int
    slow_conns: int
    slow_seconds: float
    churn_conns: int
    delayed_rtt_rounds: int
    grpc_calls: int


FULL = Sizes(
    bulk_bytes=1 << 30,
    rtt_rounds=5000,
    new_conns=1000,
    concurrent=10_000,
    slow_conns=100,
    slow_seconds=5.0,
    churn_conns=10_000,
    delayed_rtt_rounds=500,
    grpc_calls=5000,
)
QUICK = Sizes(
    bulk_bytes=64 << 20,
    rtt_rounds=500,
    new_conns=100,
    concurrent=500,
    slow_conns=20,
    slow_seconds=1.5,
    churn_conns=300,
    delayed_rtt_rounds=50,
    grpc_calls=300,
)


# -- processes ------------------------------------------------------------------
@dataclass
class Route:
    """One way to reach the servers: ports for echo/sink/source, and the hop processes."""

    name: str
    ports: dict[str, int]
    hops: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _spawn_json(args: list[str]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{args[0]} did not start")
    ports: dict[str, int] = json.loads(line)
    return proc, ports


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_log(
    log: Path, pattern: str, proc: subprocess.Popen[bytes], count: int = 1
) -> list[re.Match[str]]:
    """The first ``count`` lines of ``log`` that match, once the process has written them."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text()
        matches = list(re.finditer(pattern, text))
        if len(matches) >= count:
            return matches
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"tunnel process did not start:\n{log.read_text()}")


def _hop(
    stack: contextlib.ExitStack, module: list[str], targets: dict[str, int]
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """A relay process (``module``: its name and options) in front of each of ``targets``.

    Stopped when ``stack`` closes; returns it and its ports, by the targets' names.
    """
    proc, bound = _spawn_json([*module, *(f"0=>127.0.0.1:{port}" for port in targets.values())])
    stack.callback(_stop, proc)
    return proc, {name: bound[f"127.0.0.1:{port}"] for name, port in targets.items()}


def _delay(delay_ms: float) -> list[str]:
    return ["tunnel.bench.delay", "--delay-ms", str(delay_ms)]


@contextlib.contextmanager
def direct_path(servers: dict[str, int], delay_ms: float | None = None) -> Iterator[Route]:
    """client -> server; with ``delay_ms``, through a delaying hop."""
    with contextlib.ExitStack() as stack:
        ports = servers if delay_ms is None else _hop(stack, _delay(delay_ms), servers)[1]
        yield Route("direct", ports)


@contextlib.contextmanager
def relay_path(servers: dict[str, int], delay_ms: float | None = None) -> Iterator[Route]:
    """client -> relay -> relay -> server; with ``delay_ms``, a delaying hop between the relays."""
    with contextlib.ExitStack() as stack:
        far, mid = _hop(stack, ["tunnel.bench.relay"], servers)
        if delay_ms is not None:
            mid = _hop(stack, _delay(delay_ms), mid)[1]
        near, ports = _hop(stack, ["tunnel.bench.relay"], mid)
        yield Route("relay", ports, [near, far])


@contextlib.contextmanager
def tunnel_path(
    servers: dict[str, int],
    folder: Path,
    amqp: str | None,
    window: int | None = None,
    delay_ms: float | None = None,
) -> Iterator[Route]:
    """client -> ingress -> egress -> server; with ``delay_ms``, AMQP through a delaying hop.

    The delay needs direct mode (no ``amqp``): it sits in front of the egress's listener.
    """
    assert delay_ms is None or amqp is None
    egress_log, ingress_log = folder / "egress.log", folder / "ingress.log"
    # Every bench client comes from 127.0.0.1, and the ingress is one direct-mode
    # peer: the default per-peer share (half of --max-connections) would cap both.
    common = [
        sys.executable,
        "-m",
        "tunnel",
        "--log-level",
        "INFO",
        "--max-connections-per-peer",
        str(DEFAULT_MAX_CONNECTIONS),
        *([] if window is None else ["--window", str(window)]),
    ]
    egress_specs = [f"amqp:bench-{t}=>tcp:127.0.0.1:{servers[t]}" for t in TARGETS]
    ingress_specs = [f"tcp:127.0.0.1:0=>amqp:bench-{t}" for t in TARGETS]
    config = folder / "connect.json"
    if amqp:
        host, _, port = amqp.partition("://")[2].rpartition(":")
        config.write_text(
            json.dumps({"scheme": amqp.partition("://")[0], "host": host, "port": int(port)})
        )
        egress_args = ["--config", str(config), *egress_specs]
    else:
        egress_args = ["--listen", "amqp://127.0.0.1:0", *egress_specs]
    with contextlib.ExitStack() as stack:
        with egress_log.open("wb") as sink:
            egress = subprocess.Popen(
                [*common, *egress_args], stderr=sink, stdin=subprocess.DEVNULL
            )
        stack.callback(_stop, egress)
        if amqp:
            _wait_log(egress_log, r"link route for 'bench-source' active", egress)
        else:
            found = _wait_log(egress_log, r"accepting AMQP on amqp://[^:]+:(\d+)", egress)
            amqp_port = int(found[0].group(1))
            if delay_ms is not None:
                amqp_port = _hop(stack, _delay(delay_ms), {"amqp": amqp_port})[1]["amqp"]
            config.write_text(json.dumps({"host": "127.0.0.1", "port": amqp_port}))
        with ingress_log.open("wb") as sink:
            ingress = subprocess.Popen(
                [*common, "--config", str(config), *ingress_specs],
                stderr=sink,
                stdin=subprocess.DEVNULL,
            )
        stack.callback(_stop, ingress)
        _wait_log(ingress_log, r"router \S+ connected", ingress)
        # Each bridge says it listens in its own line: wait for all of them.
        found = _wait_log(
            ingress_log,
            r"amqp:bench-(\w+) listening on 127\.0\.0\.1:(\d+)",
            ingress,
            count=len(TARGETS),
        )
        ports = {m.group(1): int(m.group(2)) for m in found}
        if set(ports) != set(TARGETS):
            raise SystemExit(f"ingress bridges missing:\n{ingress_log.read_text()}")
        yield Route("tunnel", ports, [ingress, egress])


# -- client protocols -------------------------------------------------------------
class Counter(asyncio.Protocol):
    """Counts what it reads until EOF."""

    def __init__(self) -> None:
        self.count = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(self.count)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before EOF"))


class Pinger(asyncio.Protocol):
    """One byte out, one byte back."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    async def ping(self) -> None:
        if self.transport.is_closing():
            raise ConnectionError("closed before the ping")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(b"x")
        await self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))


class Echoer(asyncio.Protocol):
    """Writes ``payload`` and is done once it has read the same bytes back."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.got = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= len(self.payload) and not self.done.done():
            if self.got == self.payload:
                self.done.set_result(None)
            else:
                self.done.set_exception(ConnectionError("the echo differs"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the echo"))


class SlowReader(asyncio.Protocol):
    """Reads at most ``budget`` bytes per ``period`` seconds."""

    def __init__(self, budget: int = 64 * 1024, period: float = 0.1) -> None:
        self.budget, self.period = budget, period
        self.window = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(_COUNT.pack(1 << 62))

    def data_received(self, data: bytes) -> None:
        self.window += len(data)
        if self.window >= self.budget:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.period, self._resume)

    def _resume(self) -> None:
        self.window = 0
        if not self.transport.is_closing():
            self.transport.resume_reading()


# -- workloads --------------------------------------------------------------------
BLOCK = bytes(1 << 20)


async def bulk_forward(port: int, nbytes: int) -> float:
    """Client writes ``nbytes`` to the sink; returns MB/s once the sink confirms the count."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    left = nbytes
    view = memoryview(BLOCK)
    while left:
        chunk = view[: min(left, len(view))]
        writer.write(chunk)
        left -= len(chunk)
        await writer.drain()
    writer.write_eof()
    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    elapsed = time.perf_counter() - start
    writer.close()
    if count != nbytes:
        raise RuntimeError(f"sink counted {count} bytes, {nbytes} were sent")
    return nbytes / elapsed / MB


async def bulk_reverse(port: int, nbytes: int) -> float:
    """The source writes ``nbytes`` to the client; returns MB/s at EOF."""
    loop = asyncio.get_running_loop()
    transport, counter = await loop.create_connection(Counter, "127.0.0.1", port)
    start = time.perf_counter()
    transport.write(_COUNT.pack(nbytes))
    count = await counter.done
    elapsed = time.perf_counter() - start
    transport.close()
    if count != nbytes:
        raise RuntimeError(f"received {count} bytes, the source sent {nbytes}")
    return nbytes / elapsed / MB


async def bulk_parallel(port: int, nbytes: int, conns: int) -> float:
    share = nbytes // conns
    start = time.perf_counter()
    rates = await asyncio.gather(*(bulk_forward(port, share) for _ in range(conns)))
    elapsed = time.perf_counter() - start
    assert len(rates) == conns
    return share * conns / elapsed / MB


async def rtt(port: int, rounds: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    transport, pinger = await loop.create_connection(Pinger, "127.0.0.1", port)
    for _ in range(min(100, rounds)):
        await pinger.ping()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await pinger.ping()
        samples.append(time.perf_counter() - start)
    transport.close()
    return _pct(samples, 50) * 1e6, _pct(samples, 99) * 1e6


async def new_connections(port: int, count: int) -> tuple[float, float, int]:
    loop = asyncio.get_running_loop()
    samples, failures = [], 0
    for _ in range(count):
        start = time.perf_counter()
        try:
            transport, pinger = await asyncio.wait_for(
                loop.create_connection(Pinger, "127.0.0.1", port), 2
            )
            await asyncio.wait_for(pinger.ping(), 2)
            samples.append(time.perf_counter() - start)
            transport.close()
        except (OSError, TimeoutError):
            failures += 1
    if not samples:
        return float("nan"), float("nan"), failures
    return _pct(samples, 50) * 1e3, _pct(samples, 99) * 1e3, failures


CHURN_AT_ONCE = 64
CHURN_PAYLOAD = b"churn, 16 bytes."


async def churn(port: int, count: int) -> tuple[float, int]:
    """``count`` short connections, ``CHURN_AT_ONCE`` at a time, each echoing a few bytes.

    Returns the connections completed per second, and how many failed.
    """
    loop = asyncio.get_running_loop()
    left, failures = count, 0

    async def worker() -> None:
        nonlocal left, failures
        while left:
            left -= 1
            try:
                transport, echoer = await asyncio.wait_for(
                    loop.create_connection(lambda: Echoer(CHURN_PAYLOAD), "127.0.0.1", port), 10
                )
                try:
                    await asyncio.wait_for(echoer.done, 10)
                finally:
                    transport.close()
            except (OSError, TimeoutError):
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(CHURN_AT_ONCE, count))))
    return (count - failures) / (time.perf_counter() - start), failures


async def concurrent(
    port: int, count: int, hops: list[subprocess.Popen[bytes]]
) -> tuple[int, list[float], list[float]]:
    """Open ``count`` connections, each echoing once, all held open; RSS per hop."""
    loop = asyncio.get_running_loop()
    idle = [rss_kib(p) for p in hops]
    opened: list[tuple[asyncio.BaseTransport, Pinger]] = []

    async def one() -> tuple[asyncio.BaseTransport, Pinger] | None:
        try:
            transport, pinger = await loop.create_connection(Pinger, "127.0.0.1", port)
            await asyncio.wait_for(pinger.ping(), 30)
        except (OSError, TimeoutError):
            return None  # counted: fewer working connections than asked for
        return transport, pinger

    for offset in range(0, count, 500):
        batch = await asyncio.gather(*(one() for _ in range(min(500, count - offset))))
        opened.extend(item for item in batch if item is not None)
    # Every held connection must still answer, not just have answered once.
    alive = await asyncio.gather(
        *(asyncio.wait_for(p.ping(), 30) for _, p in opened), return_exceptions=True
    )
    working = sum(1 for result in alive if result is None)
    loaded = [rss_kib(p) for p in hops]
    for transport, _ in opened:
        transport.close()
    per_conn = [
        (after - before) / max(working, 1) for after, before in zip(loaded, idle, strict=True)
    ]
    return working, [kib / 1024 for kib in loaded], per_conn


async def slow_readers(
    port: int, conns: int, seconds: float, hops: list[subprocess.Popen[bytes]]
) -> list[float]:
    loop = asyncio.get_running_loop()
    opened = [await loop.create_connection(SlowReader, "127.0.0.1", port) for _ in range(conns)]
    peak = [rss_kib(p) for p in hops]
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        peak = [max(a, rss_kib(p)) for a, p in zip(peak, hops, strict=True)]
    for transport, _ in opened:
        transport.abort()
    return [kib / 1024 for kib in peak]


def _pct(samples: list[float], pct: int) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)]


# -- the run ----------------------------------------------------------------------
@dataclass
class Row:
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    target: str = ""
    values: dict[str, float | None] = field(default_factory=dict)
    #: The path the ratio is to: the relay's, or for some rows the direct one.
    versus: str = "relay"

    def ratio(self) -> float | None:
        tunnel, base = self.values.get("tunnel"), self.values.get(self.versus)
        if tunnel is None or base is None or base == 0:
            return None
        return tunnel / base

    def missed(self, one_conn: float | None) -> bool | None:
        """Whether the tunnel's figure misses the target; None when there is nothing to judge.

        Targets read ``[OP] NUMBER [x relay | conn]``: a multiple of the relay's figure,
        of the one-connection bulk figure (``one_conn``), or a plain number; without an
        operator, a higher-is-better figure must reach it and a lower one stay under it.
        """
        match = _TARGET.fullmatch(self.target.strip())
        tunnel = self.values.get("tunnel")
        if match is None or tunnel is None or math.isnan(tunnel):
            return None
        op, number, of = match.groups()
        bound = float(number)
        if of == "x relay":
            relay = self.values.get("relay")
            if relay is None:
                return None
            bound *= relay
        elif of == "conn":
            if one_conn is None:
                return None
            bound *= one_conn
        op = op or (">=" if self.better == "higher" else "<=")
        return not _COMPARE[op](tunnel, bound)


_TARGET = re.compile(r"(>=|<=|<|>)?\s*([\d.]+)\s*(x relay|conn)?")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


async def measure_speed(
    path: Route, sizes: Sizes, rows: dict[str, Row], log: Callable[[str], None]
) -> None:
    name, ports = path.name, path.ports

    def put(key: str, value: float | None) -> None:
        rows[key].values[name] = value

    log(f"{name}: bulk")
    put("bulk_fwd", await bulk_forward(ports["sink"], sizes.bulk_bytes))
    put("bulk_rev", await bulk_reverse(ports["source"], sizes.bulk_bytes))
    put("bulk_16", await bulk_parallel(ports["sink"], sizes.bulk_bytes, 16))
    put("bulk_64", await bulk_parallel(ports["sink"], sizes.bulk_bytes, 64))
    log(f"{name}: latency")
    p50, p99 = await rtt(ports["echo"], sizes.rtt_rounds)
    put("rtt_p50", p50)
    put("rtt_p99", p99)
    c50, c99, failures = await new_connections(ports["echo"], sizes.new_conns)
    put("conn_p50", c50)
    put("conn_p99", c99)
    put("conn_failures", failures)
    log(f"{name}: churn")
    rate, failures = await churn(ports["echo"], sizes.churn_conns)
    put("churn_rate", rate)
    put("churn_failures", failures)


async def measure_delayed(
    path: Route, sizes: Sizes, rows: dict[str, Row], log: Callable[[str], None]
) -> None:
    """Bulk each way and the round trip, with a delaying hop on the path."""
    name, ports = path.name, path.ports

    def put(key: str, value: float | None) -> None:
        rows[key].values[name] = value

    log(f"{name}: bulk and latency through the delaying hop")
    put("delayed_fwd", await bulk_forward(ports["sink"], sizes.bulk_bytes))
    put("delayed_rev", await bulk_reverse(ports["source"], sizes.bulk_bytes))
    p50, _ = await rtt(ports["echo"], sizes.delayed_rtt_rounds)
    put("delayed_rtt_p50", p50 / 1000)


async def measure_memory(
    path: Route, sizes: Sizes, rows: dict[str, Row], log: Callable[[str], None], workload: str
) -> None:
    """One memory workload on freshly started hops, so no other workload's peak counts."""
    name, ports, hops = path.name, path.ports, path.hops

    def put(key: str, value: float | None) -> None:
        rows[key].values[name] = value

    if workload == "concurrent":
        log(f"{name}: {sizes.concurrent} concurrent connections")
        working, loaded, per_conn = await concurrent(ports["echo"], sizes.concurrent, hops)
        put("concurrent_ok", working)
        for index, hop in enumerate(("near", "far")):
            put(f"concurrent_rss_{hop}", loaded[index] if hops else None)
            put(f"concurrent_per_conn_{hop}", per_conn[index] if hops else None)
    else:
        log(f"{name}: slow readers")
        peak = await slow_readers(ports["source"], sizes.slow_conns, sizes.slow_seconds, hops)
        for index, hop in enumerate(("near", "far")):
            put(f"slow_peak_{hop}", peak[index] if hops else None)


def make_rows(sizes: Sizes, delay_ms: float) -> dict[str, Row]:
    n, far = sizes.concurrent, f"over {2 * delay_ms:g} ms RTT"
    return {
        "bulk_fwd": Row("bulk, 1 conn, client->server", "MB/s", "higher", ">= 0.6x relay"),
        "bulk_rev": Row("bulk, 1 conn, server->client", "MB/s", "higher", ">= 0.6x relay"),
        "bulk_16": Row("bulk, 16 conns aggregate", "MB/s", "higher"),
        "bulk_64": Row("bulk, 64 conns aggregate", "MB/s", "higher", ">= 0.6x relay"),
        "rtt_p50": Row("1-byte RTT p50", "us", "lower", "<= 1.5x relay"),
        "rtt_p99": Row("1-byte RTT p99", "us", "lower"),
        "conn_p50": Row("new conn + 1 RT p50", "ms", "lower", "<= 2x relay"),
        "conn_p99": Row("new conn + 1 RT p99", "ms", "lower"),
        "conn_failures": Row("new conn failures", "count", "lower", "0"),
        "churn_rate": Row(
            f"churn: {sizes.churn_conns} conns, {CHURN_AT_ONCE} at a time", "conn/s", "higher"
        ),
        "churn_failures": Row("churn failures", "count", "lower", "0"),
        "delayed_fwd": Row(f"bulk, 1 conn, {far}, client->server", "MB/s", "higher"),
        "delayed_rev": Row(f"bulk, 1 conn, {far}, server->client", "MB/s", "higher"),
        "delayed_rtt_p50": Row(f"1-byte RTT p50, {far}", "ms", "lower"),
        "concurrent_ok": Row(f"{n} concurrent conns echoing", "count", "higher", f"{n}"),
        "concurrent_rss_near": Row(f"RSS with {n} conns, near hop", "MiB", "lower"),
        "concurrent_rss_far": Row(f"RSS with {n} conns, far hop", "MiB", "lower"),
        "concurrent_per_conn_near": Row("RSS per conn, near hop", "KiB", "lower", "<= 6"),
        "concurrent_per_conn_far": Row("RSS per conn, far hop", "KiB", "lower", "<= 6"),
        "slow_peak_near": Row(
            f"{sizes.slow_conns} slow readers, peak RSS near hop", "MiB", "lower", "<= 1x relay"
        ),
        "slow_peak_far": Row(
            f"{sizes.slow_conns} slow readers, peak RSS far hop", "MiB", "lower", "< 150"
        ),
        "grpc_rate": Row(
            f"gRPC unary calls, {grpc_calls.IN_FLIGHT} in flight",
            "call/s",
            "higher",
            versus="direct",
        ),
        "grpc_p50": Row("gRPC unary call p50, one at a time", "us", "lower", versus="direct"),
    }


def render(rows: dict[str, Row]) -> str:
    def fmt(value: float | None) -> str:
        if value is None:
            return "-"
        if math.isnan(value):  # nothing succeeded
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"

    header = ["metric", "unit", "direct", "relay", "tunnel", "tunnel/relay", "target"]
    lines = [header]
    one_conn = rows["bulk_fwd"].values.get("tunnel") if "bulk_fwd" in rows else None
    for row in rows.values():
        ratio = row.ratio()
        versus = "" if row.versus == "relay" else f" {row.versus}"
        target = f"{row.target} MISSED" if row.missed(one_conn) else row.target
        lines.append(
            [
                row.metric,
                row.unit,
                fmt(row.values.get("direct")),
                fmt(row.values.get("relay")),
                fmt(row.values.get("tunnel")),
                "-" if ratio is None else f"{ratio:.2f}x{versus}",
                target,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


@contextlib.asynccontextmanager
async def _servers() -> AsyncIterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    proc, ports = await asyncio.to_thread(_spawn_json, ["tunnel.bench.servers"])
    try:
        yield proc, ports
    finally:
        _stop(proc)


async def run(
    sizes: Sizes,
    amqp: str | None,
    window: int | None,
    delay_ms: float,
    log: Callable[[str], None],
) -> dict[str, Row]:
    rows = make_rows(sizes, delay_ms)
    async with _servers() as (_, servers):
        with tempfile.TemporaryDirectory() as folder:

            def paths(
                delay: float | None = None,
            ) -> Iterator[contextlib.AbstractContextManager[Route]]:
                yield direct_path(servers, delay)
                yield relay_path(servers, delay)
                if delay is None or amqp is None:
                    yield tunnel_path(servers, Path(folder), amqp, window, delay)

            for opened in paths():
                with opened as path:
                    await measure_speed(path, sizes, rows, log)
            for opened in paths(delay_ms):
                with opened as path:
                    await measure_delayed(path, sizes, rows, log)
            for workload in ("concurrent", "slow"):
                for opened in paths():
                    with opened as path:
                        await measure_memory(path, sizes, rows, log, workload)
            if amqp is None:
                await measure_grpc(sizes, rows, log, Path(folder))
    return rows


async def measure_grpc(
    sizes: Sizes, rows: dict[str, Row], log: Callable[[str], None], folder: Path
) -> None:
    """Unary gRPC calls: direct, through the TCP relay pair, and through the HTTP/2 bridge."""
    with grpc_calls.server() as backend:
        routes: list[tuple[str, contextlib.AbstractContextManager[object]]] = [
            ("direct", contextlib.nullcontext(backend)),
            ("relay", relay_path({"grpc": backend})),
            ("tunnel", grpc_calls.bridge(backend, folder)),
        ]
        for name, opened in routes:
            with opened as reached:
                port = reached if isinstance(reached, int) else cast(Route, reached).ports["grpc"]
                log(f"{name}: gRPC unary calls")
                rate, p50 = await asyncio.to_thread(grpc_calls.unary, port, sizes.grpc_calls)
                rows["grpc_rate"].values[name] = rate
                rows["grpc_p50"].values[name] = p50


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunnel.bench",
        description=(__doc__ or "").replace("``", ""),  # reST markup reads badly in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    parser.add_argument(
        "--amqp", metavar="URL", help="run the tunnel pair through this router (amqp://HOST:PORT)"
    )
    parser.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="the credit window of both tunnel processes, on every path (default: the tunnel's)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="each way, on the paths of the rows 'over N ms RTT' (default %(default)g)",
    )
    args = parser.parse_args(argv)
    if args.amqp and not re.fullmatch(r"amqps?://[^/:]+:\d+", args.amqp):
        parser.error(f"--amqp {args.amqp!r}: expected amqp://HOST:PORT")
    if args.delay_ms < 0:
        parser.error(f"--delay-ms {args.delay_ms}: must be 0 or more")
    _raise_fd_limit()
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    rows = uvloop.run(run(sizes, args.amqp, args.window, args.delay_ms, log))
    table = render(rows)
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tunnel": __version__,
        "uvloop": importlib.metadata.version("uvloop"),
    }
    print(
        f"tunnel {__version__}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{'quick' if args.quick else 'full'} run, "
        f"{'router ' + args.amqp if args.amqp else 'direct mode'}"
        f"{'' if args.window is None else f', --window {args.window}'}"
    )
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "quick": args.quick,
                    "amqp": args.amqp,
                    "window": args.window,
                    "delay_ms": args.delay_ms,
                    "seconds": round(time.monotonic() - started, 1),
                    "rows": {
                        key: {
                            "metric": r.metric,
                            "unit": r.unit,
                            "target": r.target,
                            **r.values,
                            "ratio": r.ratio(),
                        }
                        for key, r in rows.items()
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
