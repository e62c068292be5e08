"""Per-bridge limits, and the sweep that enforces the time-based ones.

Idle and half-closed timeouts are checked by a sweep a few times per
timeout, comparing each tunnel's byte counters with the previous sweep, so
nothing is timed per chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .relay import Failure, Phase
from .stats import BridgeStats, Carried

DEFAULT_MAX_CONNECTIONS = 16384
DEFAULT_HALF_CLOSED_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one bridge allows. A timeout of 0 turns that check off."""

    #: Tunnels open at once; past it new connections are reset and counted.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Seconds a tunnel may carry no byte in either direction.
    idle_timeout: float = 0.0
    #: Seconds a tunnel may stay with one direction ended and no byte moving.
    half_closed_timeout: float = DEFAULT_HALF_CLOSED_TIMEOUT

    def refusal(self, stats: BridgeStats) -> str | None:
        """Why the connection just counted in ``stats`` must be refused, or None."""
        if len(stats.live) > self.max_connections:
            return f"over the bridge's limit of {self.max_connections} connections"
        return None


DEFAULT_LIMITS = Limits()


class Sweeper:
    """Resets the tunnels of one bridge that have been quiet for too long."""

    def __init__(self, stats: BridgeStats, limits: Limits) -> None:
        self.stats = stats
        self.limits = limits
        self.seen: dict[Carried, tuple[int, float]] = {}
        timeouts = [t for t in (limits.idle_timeout, limits.half_closed_timeout) if t > 0]
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
            limit = self.limits.half_closed_timeout if half_closed else self.limits.idle_timeout
            if limit > 0 and quiet >= limit:
                what = "half-closed" if half_closed else "idle"
                tunnel.reset(f"{what} for {quiet:.0f} s", Failure.IDLE)
                continue
            seen[tunnel] = (moved, since)
        self.seen = seen
        self.timer = asyncio.get_running_loop().call_later(self.period, self.sweep)
