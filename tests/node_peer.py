"""The rhea peer of ``tests/node_peer/peer.js``, run as a real node process.

It behaves on the wire as skupper-proxy's bridges do, down to what rhea
leaves out (null termini in its attach answers), which a stand-in written
with proton's reactor would fill in. Its events arrive as JSON lines on its
stdout.

Without node or without ``npm ci`` in ``tests/node_peer``, the tests that
need it are skipped with the reason, unless ``TUNNEL_REQUIRE_NODE_PEER=1``
(as ``.ci/run`` sets): then they fail, so CI never passes without them.
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
REQUIRED = "TUNNEL_REQUIRE_NODE_PEER"


def node_or_skip() -> str:
    """The node executable, or the test is skipped (failed, when the peer is required)."""
    node = shutil.which("node")
    if node is None:
        missing = "node is not installed"
    elif not (PEER / "node_modules" / "rhea").is_dir():
        missing = f"rhea is not installed: run `npm ci --prefix {PEER}`"
    else:
        return node
    if os.environ.get(REQUIRED) == "1":
        pytest.fail(f"{missing}, and {REQUIRED}=1 requires the rhea peer")
    pytest.skip(missing)


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
            node_or_skip(),
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
