"""``python -m tunnel.soak --minutes 10``: a long mixed run with faults, checking every byte.

A tunnel pair in direct mode (egress and ingress as separate processes) in
front of an echo backend in this process. Workers run bulk transfers,
ping-pong and connection churn through it, while the egress process is
killed and restarted, and the backend stopped and restarted, at random.

Each transfer sends a random payload, half-closes, and expects the same
bytes back and then EOF. An RST or a refused connection during a fault is
an accepted failure, counted by reason; a clean EOF after fewer bytes than
were sent, or different bytes, is a *truncation*, which must never happen.

The ingress's RSS is read at the start (after a warm-up) and at the end
with nothing in flight (:meth:`Soak.quiet_rss`), so that the two compare
what the process keeps rather than what a bulk transfer happens to hold
at that instant; under load it is also sampled once a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
from dataclasses import dataclass, field
from pathlib import Path

from .bench import rss_kib
from .bench.servers import Echo
from .memory import PERIOD as MEMORY_RELEASE_PERIOD

QUIET_SECONDS = MEMORY_RELEASE_PERIOD + 2


@dataclass
class Report:
    connections: int = 0
    bytes_verified: int = 0
    truncations: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    #: The ingress's RSS once a minute, to tell a leak (steady growth) from
    #: buffers and pools filling up once.
    rss_each_minute_kib: list[int] = field(default_factory=list)


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
        # Cleared while the RSS is read with nothing in flight.
        self.running = asyncio.Event()
        self.running.set()
        self.busy = 0

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.folder / log).open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "tunnel", *args],
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
            ["--config", str(config), "tcp:127.0.0.1:0=>amqp:echo"], "ingress.log"
        )
        self.port = int(
            (await self._wait_log("ingress.log", r"listening on 127\.0\.0\.1:(\d+)")).group(1)
        )
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
            self.report.failures[f"connect: {type(exc).__name__}"] += 1
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
            else:
                self.report.truncations += 1
        except ConnectionResetError:
            self.report.failures["reset"] += 1
        except TimeoutError:
            self.report.failures["timeout"] += 1
        except OSError as exc:
            self.report.failures[type(exc).__name__] += 1
        finally:
            writer.close()

    async def ping_pong(self) -> None:
        """One connection, many small round trips, each checked."""
        self.report.connections += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.report.failures[f"connect: {type(exc).__name__}"] += 1
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
        except asyncio.IncompleteReadError:
            self.report.truncations += 1  # a clean EOF in the middle of a reply
        except ConnectionResetError:
            self.report.failures["reset"] += 1
        except (TimeoutError, OSError) as exc:
            self.report.failures[type(exc).__name__] += 1
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
            if self.rng.random() < 0.5:
                assert self.egress is not None
                self.egress.kill()
                await asyncio.to_thread(self.egress.wait)
                self.report.faults["egress killed"] += 1
                await asyncio.sleep(self.rng.uniform(0.1, 3))
                await self.start_egress()
            else:
                assert self.backend is not None
                self.backend.close()
                self.report.faults["backend stopped"] += 1
                await asyncio.sleep(self.rng.uniform(0.1, 3))
                await self.start_backend()

    async def run(self) -> Report:
        await self.start()
        assert self.ingress is not None
        workers = [
            self.worker(kind)
            for kind in ("bulk", "bulk", "churn", "churn", "churn", "pingpong", "pingpong")
        ]
        warm = asyncio.create_task(self._record_start())
        sampler = asyncio.create_task(self._sample_rss())
        await asyncio.gather(self.chaos(), *workers)
        await warm
        sampler.cancel()
        self.report.rss_end_kib = await self.quiet_rss()
        return self.report

    async def _record_start(self) -> None:
        # After warm-up: the first connections grow pools and buffers once.
        await asyncio.sleep(min(30.0, max(0.0, self.deadline - time.monotonic()) / 4))
        self.report.rss_start_kib = await self.quiet_rss()

    async def _sample_rss(self) -> None:
        assert self.ingress is not None
        while True:
            await asyncio.sleep(60)
            self.report.rss_each_minute_kib.append(rss_kib(self.ingress))

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


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunnel.soak",
        description=(__doc__ or "").replace("``", ""),  # reST markup reads badly in a terminal
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        soak = Soak(Path(folder), args.minutes, args.seed)
        try:
            report = asyncio.run(soak.run())
        finally:
            soak.stop()
    growth = (report.rss_end_kib - report.rss_start_kib) / max(report.rss_start_kib, 1)
    summary = {
        "minutes": args.minutes,
        "seed": args.seed,
        "connections": report.connections,
        "bytes_verified": report.bytes_verified,
        "truncations": report.truncations,
        "failures": dict(report.failures),
        "faults_injected": dict(report.faults),
        "ingress_rss_start_kib": report.rss_start_kib,
        "ingress_rss_end_kib": report.rss_end_kib,
        "ingress_rss_growth": round(growth, 3),
        "ingress_rss_each_minute_kib": report.rss_each_minute_kib,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if report.truncations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
