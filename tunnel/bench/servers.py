"""``python -m tunnel.bench.servers``: the far end of every benchmark path.

- echo: writes back what it reads; a FIN is answered with a FIN.
- sink: counts what it reads; on FIN writes the count (8 bytes) and closes.
- source: reads an 8-byte count N, then writes N bytes as fast as the
  reader takes them (honouring back-pressure), then FIN.

Prints one JSON line with the three ports.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
from typing import cast

import uvloop

_COUNT = struct.Struct(">Q")
BLOCK = bytes(256 * 1024)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.transport.write_eof()
        self.transport.close()
        return True


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(_COUNT.pack(self.count))
        self.transport.close()
        return True


class Source(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=512 * 1024, low=128 * 1024)
        self.request = b""
        self.left = -1
        self.paused = False
        self.got_eof = False

    def data_received(self, data: bytes) -> None:
        if self.left >= 0:
            return
        self.request += data
        if len(self.request) >= _COUNT.size:
            (self.left,) = _COUNT.unpack_from(self.request)
            self._push()

    def _push(self) -> None:
        transport = self.transport
        while self.left > 0 and not self.paused and not transport.is_closing():
            chunk = BLOCK if self.left >= len(BLOCK) else BLOCK[: self.left]
            self.left -= len(chunk)
            transport.write(chunk)
        if self.left == 0 and not transport.is_closing():
            transport.write_eof()
            self.left = -2
            if self.got_eof:
                transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._push()

    def eof_received(self) -> bool:
        # Closed once both ways have ended: see tunnel.bench.relay.Half.forward_eof.
        self.got_eof = True
        return self.left != -2

    def connection_lost(self, exc: Exception | None) -> None:
        self.left = 0


async def serve() -> None:
    loop = asyncio.get_running_loop()
    ports = {}
    for name, factory in (("echo", Echo), ("sink", Sink), ("source", Source)):
        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)
        ports[name] = server.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    uvloop.run(serve())
