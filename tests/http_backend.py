"""The HTTP server behind the egress in the HTTP tests: each path is one behaviour."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from helpers import LOOPBACK

MIB = 1024 * 1024
#: The --http-timeout the tests give both sides; /slow answers later than that.
TIMEOUT = 4.0
#: The --http-max-body they give; /big answers one byte more.
MAX_BODY = 9 * MIB


class Backend(BaseHTTPRequestHandler):
    """The HTTP server behind the egress: each path is one behaviour."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            raise AssertionError("the egress forwarded a chunked body")
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._route(b"")

    def do_POST(self) -> None:
        self._route(self._body())

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "1234")
        self.end_headers()

    def _route(self, body: bytes) -> None:
        path = self.path.split("?")[0]
        if path == "/echo":
            self._send(
                200,
                body,
                [
                    ("content-type", self.headers.get("content-type", "x/none")),
                    ("x-method", self.command),
                ],
            )
        elif path == "/headers":
            seen = {name.lower(): self.headers.get_all(name) for name in set(self.headers)}
            self._send(
                200,
                json.dumps(
                    {"headers": seen, "path": self.path, "version": self.request_version}
                ).encode(),
                [("content-type", "application/json")],
            )
        elif path == "/cookies":
            self._send(
                200,
                b"two cookies",
                [
                    ("set-cookie", "a=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
                    ("set-cookie", "b=2"),
                ],
            )
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            time.sleep(TIMEOUT + 2)
            self._send(200, b"too late")
        elif path == "/pause":
            server = self.server
            assert isinstance(server, Server)
            server.paused.set()
            time.sleep(1)
            self._send(200, b"after a pause")
            server.answered.set()
        elif path == "/latin1":
            # send_header writes latin-1: each character below is one byte on the wire,
            # obs-text (RFC 9110 §5.5), and the last two are the UTF-8 of "é".
            self._send(
                200,
                b"pdf",
                [
                    ("content-disposition", 'attachment; filename="r\xe9sum\xe9.pdf"'),
                    ("x-utf8", "caf\u00c3\u00a9"),
                ],
            )
        elif path == "/big":
            self._send(200, bytes(MAX_BODY + 1))
        else:
            self._send(404, b"no such path")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: /pause has its request, and has answered it.
        self.paused = threading.Event()
        self.answered = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # /slow writes after the egress gave up on it; that is the point


@contextlib.contextmanager
def backend() -> Iterator[Server]:
    server = Server((LOOPBACK, 0), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.putrequest(method, path)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()
