"""Direct mode towards a node-proxy-style ingress: no extension, one connection per stream.

The ingress here is proton's own blocking client, doing what skupper-proxy's
``tunnel.Client`` does on the wire (protocols.md §1.2): a dynamic receiver, a
sender whose source is the dynamic address, amqp-value binary bodies with
``reply-to``, and, when its client is done, a clean close of the whole
connection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from helpers import LOOPBACK, TunnelProcess, echo_server
from proton import Message
from proton.reactor import LinkOption
from proton.utils import BlockingConnection


class _Source(LinkOption):
    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: Any) -> None:
        link.source.address = self.address


def _node_style_session(port: int, payload: bytes) -> bytes:
    """Send ``payload`` as the node ingress would, read the echo, then close the connection."""
    conn = BlockingConnection(f"amqp://{LOOPBACK}:{port}", timeout=10)
    try:
        receiver = conn.create_receiver(None, dynamic=True)
        reply_to = receiver.link.remote_source.address
        assert reply_to, "direct mode gave no dynamic address"
        sender = conn.create_sender("echo", name=f"{LOOPBACK}:40000@undefined",
                                    options=_Source(reply_to))
        sender.send(Message(body=payload, reply_to=reply_to))
        echoed = b""
        while len(echoed) < len(payload):
            message = receiver.receive(timeout=10)
            receiver.accept()
            echoed += bytes(message.body)  # type: ignore[arg-type]
    finally:
        conn.close()
    return echoed


async def test_node_ingress_close_is_a_clean_end(tmp_path: Path) -> None:
    """A node ingress that closes its connection after its data ends the backend with a FIN."""
    async with echo_server() as backend:
        egress = TunnelProcess(
            ["--listen", f"amqp://{LOOPBACK}:0", f"amqp:echo=>tcp:{LOOPBACK}:{backend.port}"],
            tmp_path / "egress.log",
        )
        try:
            port = await egress.amqp_port()
            echoed = await asyncio.to_thread(_node_style_session, port, b"hello from node")
            assert echoed == b"hello from node"
            await egress.wait_for(r"closed \(far end closed its connection\)")
            for _ in range(200):
                if backend.lost:
                    break
                await asyncio.sleep(0.01)
            assert backend.lost == [None], "the backend saw a reset, not a clean FIN"
            assert egress.stop() == 0
        finally:
            egress.kill()
