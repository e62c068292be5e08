"""What is flowing: /flows, ``tunnel flows`` and the one close line per connection."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import LOOPBACK, TunnelProcess, admin_base, echo_server, get


async def test_flows_show_open_and_closed_connections(tmp_path: Path) -> None:
    async with echo_server() as backend:
        ours = TunnelProcess(
            [
                "--admin", f"{LOOPBACK}:0", "--log-format", "json",
                "--listen", f"amqp://{LOOPBACK}:0",
                f"amqp:echo=>tcp:{LOOPBACK}:{backend.port}", f"tcp:{LOOPBACK}:0=>amqp:echo",
            ],
            tmp_path / "tunnel.log",
        )  # fmt: skip
        try:
            base = await admin_base(ours)
            match = await ours.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
            port = int(match.group(1))
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            host, client_port = writer.get_extra_info("sockname")[:2]
            client = f"{host}:{client_port}"
            writer.write(b"x" * 1000)
            assert await reader.readexactly(1000) == b"x" * 1000

            async def flows() -> dict[str, list[dict[str, Any]]]:
                status, body = await get(base, "/flows")
                assert status == 200
                result: dict[str, list[dict[str, object]]] = json.loads(body)
                return result

            seen = await flows()
            ingress = next(f for f in seen["open"] if f["far_end"] == "amqp:echo")
            assert ingress["client"] == client
            assert ingress["dialect"] == "link-route"
            assert ingress["from_peer"] == {"open": True, "bytes": 1000}
            assert ingress["to_peer"]["bytes"] == 1000
            egress = next(
                f for f in seen["open"] if f["far_end"] == f"tcp:{LOOPBACK}:{backend.port}"
            )
            assert egress["client"] == client  # the client's id travels in the link name

            table = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "tunnel", "flows", "--admin", base.removeprefix("http://"),
                 "--once"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            assert "2 open" in table.stdout
            row = (
                rf"tcp:{LOOPBACK}:0=>amqp:echo\s+{client}\s+amqp:echo\s+link-route"
                r"\s+open\s+open\s+1,000\s+1,000\s"
            )
            assert re.search(row, table.stdout), table.stdout

            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            closed: list[dict[str, Any]] = []

            async def both_closed() -> bool:
                closed[:] = (await flows())["closed"]
                return len(closed) == 2

            async with asyncio.timeout(15):
                while not await both_closed():
                    await asyncio.sleep(0.02)
            assert {f["reason"] for f in closed} == {"finished"}
            assert not (await flows())["open"]

            lines = [json.loads(line) for line in ours.log().splitlines() if line.startswith("{")]
            logged = [line["flow"] for line in lines if "flow" in line]
            assert len(logged) == 2
            assert all(entry["level"] == "INFO" for entry in lines if "flow" in entry)
            assert {f["client"] for f in logged} == {client}
            assert sorted(f["to_peer"]["bytes"] for f in logged) == [1000, 1000]
            assert ours.stop() == 0
        finally:
            ours.kill()


def test_tunnel_flows_names_an_endpoint_that_does_not_answer() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunnel", "flows", "--admin", f"{LOOPBACK}:1", "--once"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"http://{LOOPBACK}:1/flows" in result.stderr
