"""``--admin HOST:PORT``: health, readiness and metrics over HTTP, on the tunnel's own loop.

Four fixed GET paths and nothing else, so a minimal HTTP/1.1 responder is
enough: it reads one request head (bounded), answers, and closes.

- ``/healthz``: 200 while the process runs its loop.
- ``/readyz``: 200 when every bridge is up, else 503 with a JSON body naming
  what is missing.
- ``/metrics``: the Prometheus text format (:mod:`tunnel.metrics`).
- ``/flows``: the open and recently closed connections as JSON (:mod:`tunnel.flows`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
FLOWS_PATH = "/flows"
PATHS = (HEALTH_PATH, READY_PATH, METRICS_PATH, FLOWS_PATH)
MAX_HEAD = 8192
READ_TIMEOUT = 10.0


class AdminProtocol(asyncio.Protocol):
    """One admin HTTP connection: one request, one response."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head or b"\n\n" in self.head:
            self._answer(*self.server.respond(self.head.split(b"\r\n", 1)[0]))
        elif len(self.head) > MAX_HEAD:
            self._answer(431, "text/plain", b"request head too large\n")

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


class AdminServer:
    """Answers the four paths; ``readiness`` returns what is missing, empty when ready,
    ``flows`` what ``/flows`` shows."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], list[str]],
        flows: Callable[[], object] = dict,
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.flows = flows
        self._answers: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            HEALTH_PATH: self._health,
            READY_PATH: self._ready,
            METRICS_PATH: self._metrics,
            FLOWS_PATH: self._flows,
        }
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: AdminProtocol(self), host, port, reuse_address=True
        )
        bound = self.server.sockets[0].getsockname()
        logger.info("admin endpoint on http://%s:%d (%s)", bound[0], bound[1], ", ".join(PATHS))

    def respond(self, request_line: bytes) -> tuple[int, str, bytes]:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request line\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in self._answers:
            return 404, "text/plain", b"not found\n"
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        return self._answers[target]()

    def _health(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def _ready(self) -> tuple[int, str, bytes]:
        missing = self.readiness()
        body = json.dumps({"ready": not missing, "missing": missing}).encode() + b"\n"
        return (503 if missing else 200), "application/json", body

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def _flows(self) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(self.flows()).encode() + b"\n"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
