"""A real gRPC server for the HTTP/2 bridge tests: generic handlers, raw bytes, no generated code.

Methods of service ``test.Echo`` (requests and responses are bytes):

- ``Unary``: the request back;
- ``Whoami``: the server's name, to tell which site served a call;
- ``ServerStream``: the request is a count N (decimal); N messages ``b"<i>"``;
- ``ClientStream``: every request concatenated, answered with their number and
  total length (``b"<n> <bytes>"``) and the SHA-256 of the whole;
- ``Bidi``: each request echoed as it comes;
- ``FirstOnly``: answers with the first request and reads no more: the server
  ends the call while the client is still sending (RST_STREAM NO_ERROR);
- ``Fail``: fails with NOT_FOUND and a message naming the request;
- ``Hang``: never answers; records that the call was cancelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "test.Echo"


def _raw(data: bytes) -> bytes:
    return data


class Backend:
    """A gRPC server on 127.0.0.1, port chosen by the OS."""

    def __init__(self, name: str = "backend", tls: grpc.ServerCredentials | None = None) -> None:
        self.name = name
        self.cancelled = threading.Event()
        self.hanging = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(
                self.unary, request_deserializer=_raw, response_serializer=_raw
            ),
            "Whoami": grpc.unary_unary_rpc_method_handler(
                self.whoami, request_deserializer=_raw, response_serializer=_raw
            ),
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                self.server_stream, request_deserializer=_raw, response_serializer=_raw
            ),
            "ClientStream": grpc.stream_unary_rpc_method_handler(
                self.client_stream, request_deserializer=_raw, response_serializer=_raw
            ),
            "Bidi": grpc.stream_stream_rpc_method_handler(
                self.bidi, request_deserializer=_raw, response_serializer=_raw
            ),
            "FirstOnly": grpc.stream_unary_rpc_method_handler(
                self.first_only, request_deserializer=_raw, response_serializer=_raw
            ),
            "Fail": grpc.unary_unary_rpc_method_handler(
                self.fail, request_deserializer=_raw, response_serializer=_raw
            ),
            "Hang": grpc.unary_unary_rpc_method_handler(
                self.hang, request_deserializer=_raw, response_serializer=_raw
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", tls)

    def __enter__(self) -> Backend:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)

    def unary(self, request: bytes, context: Any) -> bytes:
        return request

    def whoami(self, request: bytes, context: Any) -> bytes:
        return self.name.encode()

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        for index in range(int(request)):
            yield b"%d" % index

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        digest, count, size = hashlib.sha256(), 0, 0
        for request in requests:
            digest.update(request)
            count += 1
            size += len(request)
        return b"%d %d " % (count, size) + digest.hexdigest().encode()

    def fail(self, request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.decode()} here")
        return b""

    def first_only(self, requests: Iterator[bytes], context: Any) -> bytes:
        return next(requests)

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    def hang(self, request: bytes, context: Any) -> bytes:
        context.add_callback(self.cancelled.set)
        self.hanging.set()
        with contextlib.suppress(Exception):
            self.cancelled.wait(60)
        return b""


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            # Each test's calls on one connection: per-request balancing is the bridge's.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def method(chan: grpc.Channel, name: str, kind: str = "unary_unary") -> Any:
    factory = getattr(chan, kind)
    return factory(f"/{SERVICE}/{name}", request_serializer=_raw, response_deserializer=_raw)
