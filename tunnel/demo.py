"""``python -m tunnel.demo``: one byte round trip through the direct-mode default.

Starts a local echo service, runs ``python -m tunnel --listen amqp://127.0.0.1:0
'amqp:echo=>tcp:...' 'tcp:127.0.0.1:0=>amqp:echo'`` (ports chosen by the OS),
sends a line through the tunnel, shuts down its sending side as ``nc -q1`` does,
prints what came back, and stops the tunnel with SIGTERM.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import cast

MESSAGE = b"hello through the tunnel\n"


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True


async def _wait_for(log: Path, pattern: str, proc: asyncio.subprocess.Process) -> int:
    for _ in range(300):
        match = re.search(pattern, log.read_text())
        if match:
            return int(match.group(1))
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise SystemExit(f"tunnel did not start:\n{log.read_text()}")


async def demo() -> int:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "tunnel.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tunnel", "--listen", "amqp://127.0.0.1:0",
                f"amqp:echo=>tcp:127.0.0.1:{echo_port}", "tcp:127.0.0.1:0=>amqp:echo",
                stdout=sink, stderr=sink, stdin=asyncio.subprocess.DEVNULL,
            )
        try:
            port = await _wait_for(log, r"listening on 127\.0\.0\.1:(\d+)", proc)
            await _wait_for(log, r"router amqp://127\.0\.0\.1:(\d+) connected", proc)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(MESSAGE)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            status = await proc.wait()
            print(log.read_text(), end="", file=sys.stderr)
    echo.close()
    print(f"sent     {MESSAGE!r} to tcp:127.0.0.1:{port}")
    print(f"received {reply!r} back through amqp:echo")
    ok = reply == MESSAGE and status == 0
    print("round trip OK" if ok else f"round trip FAILED (tunnel exit status {status})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(demo()))
