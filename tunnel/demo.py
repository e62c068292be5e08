"""``python -m tunnel.demo [--tunnel COMMAND]``: one byte round trip through a tunnel pair.

Starts a local echo service and a tunnel pair in direct mode, two processes
with ports chosen by the OS::

    tunnel --listen amqp://127.0.0.1:0 'amqp:echo=>tcp:127.0.0.1:ECHO'   # egress
    tunnel --config connect.json 'tcp:127.0.0.1:0=>amqp:echo'           # ingress

then sends a line through the ingress, shuts down its sending side as
``nc -q1`` does, prints what came back, and stops both with SIGTERM.
``--tunnel dist/tunnel`` runs the pair with the single-file binary instead
of ``python -m tunnel``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from tunnel.bench.servers import Echo

MESSAGE = b"hello through the tunnel\n"


@contextlib.asynccontextmanager
async def _process(command: list[str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=sink, stderr=sink, stdin=asyncio.subprocess.DEVNULL
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


async def _wait_for(log: Path, pattern: str, proc: asyncio.subprocess.Process) -> str:
    for _ in range(300):
        match = re.search(pattern, log.read_text())
        if match:
            return match.group(1)
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise SystemExit(f"tunnel did not start:\n{log.read_text()}")


async def demo(tunnel: list[str]) -> int:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        egress_log, ingress_log = Path(folder) / "egress.log", Path(folder) / "ingress.log"
        async with _process(
            [*tunnel, "--listen", "amqp://127.0.0.1:0", f"amqp:echo=>tcp:127.0.0.1:{echo_port}"],
            egress_log,
        ) as egress:
            amqp_port = await _wait_for(egress_log, r"accepting AMQP on amqp://[^:]+:(\d+)", egress)
            config = Path(folder) / "connect.json"
            config.write_text(json.dumps({"host": "127.0.0.1", "port": int(amqp_port)}))
            async with _process(
                [*tunnel, "--config", str(config), "tcp:127.0.0.1:0=>amqp:echo"], ingress_log
            ) as ingress:
                port = await _wait_for(ingress_log, r"listening on 127\.0\.0\.1:(\d+)", ingress)
                await _wait_for(ingress_log, r"router amqp://\S+ (connected)", ingress)
                reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
                writer.write(MESSAGE)
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), 10)
                writer.close()
        statuses = (ingress.returncode, egress.returncode)
        for log in (egress_log, ingress_log):
            print(f"--- {log.stem} log", file=sys.stderr)
            print(log.read_text(), end="", file=sys.stderr)
    echo.close()
    print(f"sent     {MESSAGE!r} to tcp:127.0.0.1:{port}")
    print(f"received {reply!r} back through amqp:echo")
    ok = reply == MESSAGE and statuses == (0, 0)
    print("round trip OK" if ok else f"round trip FAILED (exit statuses {statuses})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunnel.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tunnel",
        metavar="COMMAND",
        default=f"{sys.executable} -m tunnel",
        help="how to run the tunnel (default: %(default)s)",
    )
    args = parser.parse_args()
    return asyncio.run(demo(shlex.split(args.tunnel)))


if __name__ == "__main__":
    sys.exit(main())
