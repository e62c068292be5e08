"""``/metrics``: the Prometheus view of the bridges and the router connection.

A custom collector reads the plain counters in :mod:`tunnel.stats` at scrape
time, so nothing is updated per chunk and a closed connection leaves no series
behind. Labels are ``bridge`` (the spec, as given), ``reason``, and for the
memory figures ``kind`` and ``part``: never anything per connection.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import census, memory, peer_text
from .amqp import engine
from .dialects.carrier import Failure
from .http2_stats import STATUS_CLASSES

if TYPE_CHECKING:
    from .app import App

#: Every metric, with its help text; the README's table is checked against it.
METRICS = {
    "tunnel_connections_opened_total": "TCP connections the bridge started tunnels for.",
    "tunnel_connections_closed_total": "Tunnels that ended, cleanly or not.",
    "tunnel_connections_active": "Tunnels open now.",
    "tunnel_connection_failures_total": "Tunnels that ended in a reset, by reason.",
    "tunnel_tcp_bytes_read_total": "Bytes read from the bridge's TCP peers and carried over AMQP.",
    "tunnel_tcp_bytes_written_total": "Bytes carried over AMQP and written to the TCP peers.",
    "tunnel_router_connects_total": "Times the router connection was opened.",
    "tunnel_router_disconnects_total": "Times an open router connection was lost.",
    "tunnel_router_connected": "1 while the router connection is open, else 0.",
    "tunnel_log_suppressed_total": "Repeats of a peer's failure counted instead of logged.",
    "tunnel_http2_requests_total": "HTTP/2 streams the bridge carried (requests).",
    "tunnel_http2_streams_active": "HTTP/2 streams open now.",
    "tunnel_http2_bytes_total": "HTTP/2 data bytes carried, by direction (request, response).",
    "tunnel_http2_resets_total": "HTTP/2 streams reset, by either side or by the tunnel.",
    "tunnel_http2_responses_total": "HTTP/2 responses by status class (2xx, 5xx, ...).",
    "tunnel_live_objects": (
        "Objects alive now, by kind: ours per connection, link or request, and proton's."
    ),
    "tunnel_heap_bytes": "The C heap as glibc counts it: in use, free inside it, mapped apart.",
    "tunnel_python_blocks": "Memory blocks Python's own allocator has handed out and not freed.",
}


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, labels: list[str]
) -> CounterMetricFamily | GaugeMetricFamily:
    base = name.removesuffix("_total") if kind is CounterMetricFamily else name
    return kind(base, METRICS[name], labels=labels)


class TunnelCollector(Collector):
    """Reads the application's counters on each scrape."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        opened = _family(CounterMetricFamily, "tunnel_connections_opened_total", ["bridge"])
        closed = _family(CounterMetricFamily, "tunnel_connections_closed_total", ["bridge"])
        active = _family(GaugeMetricFamily, "tunnel_connections_active", ["bridge"])
        failures = _family(
            CounterMetricFamily, "tunnel_connection_failures_total", ["bridge", "reason"]
        )
        read = _family(CounterMetricFamily, "tunnel_tcp_bytes_read_total", ["bridge"])
        written = _family(CounterMetricFamily, "tunnel_tcp_bytes_written_total", ["bridge"])
        for stats in self.app.bridge_stats():
            opened.add_metric([stats.name], stats.opened)
            closed.add_metric([stats.name], stats.closed)
            active.add_metric([stats.name], len(stats.live))
            # Every reason is listed, at zero too, so rates work from the start.
            for reason in Failure:
                failures.add_metric([stats.name, reason.value], stats.failures[reason.value])
            read.add_metric([stats.name], stats.bytes_read())
            written.add_metric([stats.name], stats.bytes_written())
        yield from (opened, closed, active, failures, read, written)
        router = self.app.router
        connects = _family(CounterMetricFamily, "tunnel_router_connects_total", [])
        disconnects = _family(CounterMetricFamily, "tunnel_router_disconnects_total", [])
        connected = _family(GaugeMetricFamily, "tunnel_router_connected", [])
        connects.add_metric([], router.connects if router else 0)
        disconnects.add_metric([], router.disconnects if router else 0)
        connected.add_metric([], 1 if router and router.connection is not None else 0)
        yield from (connects, disconnects, connected)
        suppressed = _family(CounterMetricFamily, "tunnel_log_suppressed_total", ["reason"])
        counts = peer_text.PEER_LOG.suppressed + engine.FAILURES.suppressed
        for why, count in sorted(counts.items()):
            suppressed.add_metric([why], count)
        yield suppressed
        yield from self._http2()
        yield from _memory()

    def _http2(self) -> Iterator[Metric]:
        requests = _family(CounterMetricFamily, "tunnel_http2_requests_total", ["bridge"])
        active = _family(GaugeMetricFamily, "tunnel_http2_streams_active", ["bridge"])
        carried = _family(CounterMetricFamily, "tunnel_http2_bytes_total", ["bridge", "direction"])
        resets = _family(CounterMetricFamily, "tunnel_http2_resets_total", ["bridge"])
        responses = _family(
            CounterMetricFamily, "tunnel_http2_responses_total", ["bridge", "status_class"]
        )
        bridges = [(b.stats, len(b.streams)) for b in self.app.http2_ingress]
        bridges += [(b.stats, len(b.streams)) for b in self.app.http2_egress]
        for stats, open_streams in bridges:
            requests.add_metric([stats.name], stats.requests)
            active.add_metric([stats.name], open_streams)
            carried.add_metric([stats.name, "request"], stats.request_bytes)
            carried.add_metric([stats.name, "response"], stats.response_bytes)
            resets.add_metric([stats.name], stats.resets)
            for status_class in STATUS_CLASSES:
                responses.add_metric([stats.name, status_class], stats.statuses[status_class])
        yield from (requests, active, carried, resets, responses)


def _memory() -> Iterator[Metric]:
    """What a climbing RSS is made of: live objects, the heap, Python's blocks."""
    live = _family(GaugeMetricFamily, "tunnel_live_objects", ["kind"])
    for kind, count in sorted(census.LIVE.items()):
        live.add_metric([kind], count)
    for kind, count in engine.proton_census().items():
        live.add_metric([f"proton_{kind}"], count)
    yield live
    if (parts := memory.heap()) is not None:
        heap = _family(GaugeMetricFamily, "tunnel_heap_bytes", ["part"])
        for part, size in parts.items():
            heap.add_metric([part], size)
        yield heap
    blocks = _family(GaugeMetricFamily, "tunnel_python_blocks", [])
    blocks.add_metric([], sys.getallocatedblocks())
    yield blocks


def registry_for(app: App) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TunnelCollector(app))
    return registry
