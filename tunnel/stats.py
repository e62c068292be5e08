"""Per-bridge counters, kept as plain integers and read only when metrics are scraped.

Nothing here runs per chunk: a tunnel's byte counts are its own attributes;
they are added to its bridge's totals when it closes, and a scrape adds up
the tunnels still open. So every total only ever grows, and the number of
series depends on the bridges, never on the connections.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Protocol

from .flows import FLOW_LOG, record, refused_record

if TYPE_CHECKING:
    from .connection import Phase
    from .dialects.carrier import Failure


class Carried(Protocol):
    """One TCP connection a bridge carries, in either dialect, as stats and limits see it."""

    #: ``<client-ip>:<client-port>@<site>...``, as in its link names.
    name: str
    phase: Phase
    failure: Failure | None
    #: Bytes written to the TCP peer, and read from it.
    bytes_in: int
    bytes_out: int

    @property
    def dialect(self) -> str:
        """How it travels: "link-route" or "tcp-adaptor"."""
        ...

    @property
    def read_open(self) -> bool: ...
    @property
    def write_open(self) -> bool: ...

    def reset(self, reason: str, failure: Failure) -> None: ...


class BridgeStats:
    """What one bridge has done, for ``/metrics``."""

    __slots__ = (
        "closed",
        "done_read",
        "done_written",
        "failures",
        "far_end",
        "held",
        "live",
        "name",
        "opened",
        "peer_of",
        "per_peer",
    )

    def __init__(self, name: str, far_end: str) -> None:
        self.name = name
        #: Where the bridge's connections go: ``amqp:ADDRESS`` or ``tcp:HOST:PORT``.
        self.far_end = far_end
        self.opened = 0
        self.closed = 0
        self.failures: collections.Counter[str] = collections.Counter()
        # Bytes of tunnels already closed: read from and written to TCP peers.
        self.done_read = 0
        self.done_written = 0
        #: The connections open now, with when each started (monotonic seconds).
        self.live: dict[Carried, float] = {}
        # The peer each live connection counts against (for the per-peer
        # limit), and how many each peer has: both bounded by ``live``.
        self.peer_of: dict[Carried, Hashable] = {}
        self.per_peer: collections.Counter[Hashable] = collections.Counter()
        #: Accepted sockets waiting for a connection (an ingress's router is away).
        self.held = 0

    def tunnel_opened(self, tunnel: Carried, peer: Hashable | None = None) -> None:
        """``tunnel`` is open; it counts against ``peer`` (a client address, a connection)."""
        self.opened += 1
        self.live[tunnel] = time.monotonic()
        if peer is not None:
            self.peer_of[tunnel] = peer
            self.per_peer[peer] += 1

    def of_peer(self, peer: Hashable) -> int:
        """How many connections open now count against ``peer``."""
        return self.per_peer[peer]

    def hold(self, peer: Hashable) -> None:
        """An accepted socket of ``peer`` waits for its connection; it counts as one."""
        self.held += 1
        self.per_peer[peer] += 1

    def unhold(self, peer: Hashable) -> None:
        """The socket :meth:`hold` counted got its connection, or went."""
        self.held -= 1
        self.per_peer[peer] -= 1
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]

    def refused(self, name: str, failure: Failure) -> None:
        """A socket refused before it had a connection: counted, and its flow record logged."""
        self.opened += 1
        self.closed += 1
        self.failures[failure.value] += 1
        FLOW_LOG.closed(refused_record(self, name), failure.value)

    def tunnel_closed(self, tunnel: Carried) -> None:
        self.closed += 1
        started = self.live.pop(tunnel, None)
        if (peer := self.peer_of.pop(tunnel, None)) is not None:
            self.per_peer[peer] -= 1
            if self.per_peer[peer] <= 0:
                del self.per_peer[peer]
        self.done_read += tunnel.bytes_out
        self.done_written += tunnel.bytes_in
        if tunnel.failure is not None:
            self.failures[tunnel.failure.value] += 1
        if started is not None:
            reason = tunnel.failure.value if tunnel.failure is not None else "finished"
            FLOW_LOG.closed(record(self, tunnel, started, time.monotonic()), reason)

    def bytes_read(self) -> int:
        """Bytes read from this bridge's TCP peers (client or backend), ever."""
        return self.done_read + sum(t.bytes_out for t in self.live)

    def bytes_written(self) -> int:
        """Bytes written to this bridge's TCP peers, ever."""
        return self.done_written + sum(t.bytes_in for t in self.live)
