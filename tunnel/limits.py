"""Per-bridge limits, and the sweep that enforces the time-based ones.

Connections are limited twice: all of a bridge's together
(``max_connections``), and those of one peer (``max_connections_per_peer``,
by default half of the total, rounded up), so that one party cannot take
every slot. A peer is a client IP address at an ingress bridge, and one
AMQP connection at an egress bridge (each direct-mode peer is its own);
the connection to a router carries every client's tunnels, so there only
the total applies.

Idle, half-closed and silent timeouts are checked by a sweep a few times
per timeout, comparing each tunnel's byte counters with the previous
sweep, so nothing is timed per chunk. The silent timeout applies to a
tunnel that has not carried a single byte either way, and is on by default
(:data:`DEFAULT_SILENT_TIMEOUT`) even when the idle timeout is off: a client
that connects and says nothing would otherwise hold its slot for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass

from .connection import Phase
from .dialects.carrier import Failure
from .stats import BridgeStats, Carried

DEFAULT_MAX_CONNECTIONS = 16384
DEFAULT_HALF_CLOSED_TIMEOUT = 300.0
DEFAULT_SILENT_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one bridge allows. A timeout of 0 turns that check off."""

    #: Tunnels open at once; past it new connections are reset and counted.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Seconds a tunnel may carry no byte in either direction.
    idle_timeout: float = 0.0
    #: Seconds a tunnel may stay with one direction ended and no byte moving.
    half_closed_timeout: float = DEFAULT_HALF_CLOSED_TIMEOUT
    #: Tunnels one peer may have open at once; None: half of ``max_connections``,
    #: rounded up. Never more than ``max_connections``.
    max_connections_per_peer: int | None = None
    #: Seconds a tunnel may stay open without having carried a single byte.
    silent_timeout: float = DEFAULT_SILENT_TIMEOUT

    @property
    def per_peer(self) -> int:
        """The per-peer share in force."""
        if self.max_connections_per_peer is None:
            return -(-self.max_connections // 2)
        return min(self.max_connections_per_peer, self.max_connections)

    def refusal(
        self, stats: BridgeStats, peer: Hashable | None = None, who: str = ""
    ) -> str | None:
        """Why the connection just counted in ``stats`` must be refused, or None.

        ``peer`` is the key it was counted under (see
        :meth:`BridgeStats.tunnel_opened`), ``who`` that peer for the reason.
        """
        if len(stats.live) + stats.held > self.max_connections:
            return (
                f"over the bridge's limit of {self.max_connections} connections (--max-connections)"
            )
        if peer is not None and stats.of_peer(peer) > self.per_peer:
            return (
                f"over the bridge's limit of {self.per_peer} connections per peer "
                f"(--max-connections-per-peer) for {who or 'this peer'}"
            )
        return None


DEFAULT_LIMITS = Limits()


class Sweeper:
    """Resets the tunnels of one bridge that have been quiet for too long."""

    def __init__(self, stats: BridgeStats, limits: Limits) -> None:
        self.stats = stats
        self.limits = limits
        # Per live tunnel: its byte count at the last sweep, and since when
        # it has not changed. Bounded by the tunnels open.
        self.seen: dict[Carried, tuple[int, float]] = {}
        timeouts = [
            t
            for t in (limits.idle_timeout, limits.half_closed_timeout, limits.silent_timeout)
            if t > 0
        ]
        self.period = min(timeouts) / 4 if timeouts else 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.period:
            self.timer = asyncio.get_running_loop().call_later(self.period, self.sweep)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        limits = self.limits
        seen: dict[Carried, tuple[int, float]] = {}
        for tunnel in list(self.stats.live):
            if tunnel.phase is Phase.CLOSED:
                continue
            moved = tunnel.bytes_in + tunnel.bytes_out
            last, since = self.seen.get(tunnel, (-1, now))
            if moved != last:
                since = now
            quiet = now - since
            half_closed = tunnel.read_open != tunnel.write_open
            if half_closed:
                what, limit = "half-closed", limits.half_closed_timeout
            elif moved == 0:
                # Never carried a byte: the sooner of the two applies.
                what, limit = "silent", _sooner(limits.silent_timeout, limits.idle_timeout)
            else:
                what, limit = "idle", limits.idle_timeout
            if limit > 0 and quiet >= limit:
                tunnel.reset(f"{what} for {quiet:.0f} s", Failure.IDLE)
                continue
            seen[tunnel] = (moved, since)
        self.seen = seen
        self.timer = asyncio.get_running_loop().call_later(self.period, self.sweep)


def _sooner(first: float, second: float) -> float:
    """The shorter of two timeouts, where 0 is none."""
    on = [t for t in (first, second) if t > 0]
    return min(on) if on else 0.0
