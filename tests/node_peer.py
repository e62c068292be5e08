"""The rhea peer of ``tests/node_peer/peer.js``, run as a real node process.

It behaves on the wire as skupper-proxy's bridges do, down to what rhea
leaves out (null termini in its attach answers), which a stand-in written
with proton's reactor would fill in. Its events arrive as JSON lines on its
stdout.

Without node or without ``npm ci`` in ``tests/node_peer`` (both part of the
README's set-up), the tests that need it fail with the reason: a skipped
interoperability test would prove nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

PEER = Path(__file__).resolve().parent / "node_peer"


def node_or_fail() -> str:
    """The node executable; the test fails, saying what is missing, without it."""
    node = shutil.which("node")
    if node is None:
        missing = "node is not installed"
    elif not (PEER / "node_modules" / "rhea").is_dir():
        missing = f"rhea is not installed: run `npm ci --prefix {PEER}`"
    else:
        return node
    pytest.fail(f"{missing}: the rhea peer is part of the test set-up")


class NodePeer:
    """``node peer.js MODE AMQP_PORT ARGS...``; stopped with :meth:`stop`."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(
        cls,
        mode: str,
        amqp_port: int,
        *args: str | int,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> NodePeer:
        proc = await asyncio.create_subprocess_exec(
            node_or_fail(),
            str(PEER / "peer.js"),
            mode,
            str(amqp_port),
            *map(str, args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log.open("ab"),
            env={**os.environ, **(env or {})},
        )
        return cls(proc, log)

    async def wait_for(self, key: str, timeout: float = 15.0) -> Any:
        """The value of the first event named ``key``, reading events until it comes."""
        for event in self.events:
            if key in event:
                return event[key]
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while line := await self.proc.stdout.readline():
                event = json.loads(line)
                self.events.append(event)
                if key in event:
                    return event[key]
        raise AssertionError(
            f"the node peer exited ({await self.proc.wait()}) before "
            f"{key!r}, having said {self.events}:\n{self.log.read_text()}"
        )

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()
