"""gRPC rows of the benchmark: unary calls through the HTTP/2 bridge, against a direct call.

``python -m tunnel.bench.grpc_calls`` is the server: one generic unary method that
answers with the request (raw bytes, no generated code), on a port of the
OS's choosing, printed as one JSON line. The client side, :func:`unary`,
makes the calls: one at a time for the latency, then :data:`IN_FLIGHT` at
once for the rate. Both need ``grpcio`` (the ``test`` extra).
"""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

METHOD = "/bench.Echo/Unary"
#: Calls outstanding at once while the rate is measured.
IN_FLIGHT = 32
PAYLOAD = bytes(100)


def _raw(data: bytes) -> bytes:
    return data


def unary(port: int, calls: int) -> tuple[float, float]:
    """Calls per second with IN_FLIGHT outstanding, and the p50 of single calls (us)."""
    import grpc  # noqa: PLC0415 - a test extra, needed for these rows only

    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as chan:
        call: Any = chan.unary_unary(METHOD, request_serializer=_raw, response_deserializer=_raw)
        for _ in range(20):  # the connection, and the first calls' setup
            call(PAYLOAD, timeout=10)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            call(PAYLOAD, timeout=10)
            samples.append(time.perf_counter() - started)
        samples.sort()
        p50 = samples[len(samples) // 2] * 1e6
        started = time.perf_counter()
        pending = collections.deque(call.future(PAYLOAD, timeout=30) for _ in range(IN_FLIGHT))
        done = 0
        while pending:
            pending.popleft().result()
            done += 1
            if done + len(pending) < calls:
                pending.append(call.future(PAYLOAD, timeout=30))
        rate = done / (time.perf_counter() - started)
    return rate, p50


@contextlib.contextmanager
def server() -> Iterator[int]:
    """The gRPC server in a process of its own; its port."""
    from .__main__ import _stop  # noqa: PLC0415 - the harness imports this module

    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel.bench.grpc_calls"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("tunnel.bench.grpc_calls did not start (is grpcio installed?)")
        yield int(json.loads(line)["grpc"])
    finally:
        _stop(proc)


@contextlib.contextmanager
def bridge(backend: int, folder: Path) -> Iterator[int]:
    """An HTTP/2 tunnel pair in direct mode in front of ``backend``; the ingress's port."""
    from .__main__ import _stop, _wait_log  # noqa: PLC0415 - the harness imports this module

    common = [sys.executable, "-m", "tunnel", "--log-level", "INFO"]
    where = f"127.0.0.1:{backend}"
    egress_log, ingress_log = folder / "grpc-egress.log", folder / "grpc-ingress.log"
    with contextlib.ExitStack() as stack:
        with egress_log.open("wb") as sink:
            egress = subprocess.Popen(
                [
                    *common,
                    "--listen",
                    "amqp://127.0.0.1:0",
                    f"amqp:grpc=>http2:{where}",
                ],
                stderr=sink,
                stdin=subprocess.DEVNULL,
            )
        stack.callback(_stop, egress)
        found = _wait_log(egress_log, r"accepting AMQP on amqp://[^:]+:(\d+)", egress)
        _wait_log(egress_log, r"consuming 'grpc'", egress)
        config = folder / "grpc-connect.json"
        config.write_text(json.dumps({"host": "127.0.0.1", "port": int(found[0].group(1))}))
        with ingress_log.open("wb") as sink:
            ingress = subprocess.Popen(
                [*common, "--config", str(config), "http2:127.0.0.1:0=>amqp:grpc"],
                stderr=sink,
                stdin=subprocess.DEVNULL,
            )
        stack.callback(_stop, ingress)
        _wait_log(ingress_log, r"router \S+ connected", ingress)
        listening = _wait_log(ingress_log, r"listening on 127\.0\.0\.1:(\d+)", ingress)
        yield int(listening[0].group(1))


def main() -> None:
    import grpc  # noqa: PLC0415 - a test extra

    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request, request_deserializer=_raw, response_serializer=_raw
    )
    service, name = METHOD.strip("/").split("/")
    app = grpc.server(futures.ThreadPoolExecutor(max_workers=IN_FLIGHT))
    app.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {name: handler}),))
    port = app.add_insecure_port("127.0.0.1:0")
    app.start()
    print(json.dumps({"grpc": port}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    app.stop(0)


if __name__ == "__main__":
    main()
