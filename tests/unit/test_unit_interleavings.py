"""Random interleavings of TCP events at both ends of a link-route tunnel, and pumps.

The client's links attach at the first pump, so early rules also cover the
bytes a client sends before the far end is there. Whatever the order:
bytes out equal bytes in, in order; a FIN passes on only after every byte;
nothing is done to a socket once its connection is closed; and a clean run
ends with both connections closed without a reset.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from unit_harness import Pair, Side

from tunnel.connection import Phase


class End:
    """One TCP peer of the tunnel: what it sent, whether it sent its FIN."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.fin = False
        self.paused = False
        self.closed_log: list[str] | None = None


class Tunnel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(window=2)
        self.client = self.pair.client()
        self.ends: dict[str, End] = {"client": End(), "server": End()}

    @property
    def server(self) -> Side | None:
        return self.pair.egress.sides[0] if self.pair.egress.sides else None

    def side(self, which: str) -> Side | None:
        return self.client if which == "client" else self.server

    def _can_send(self, which: str) -> bool:
        side = self.side(which)
        return (
            side is not None
            and not self.ends[which].fin
            and side.conn.phase is not Phase.CLOSED
            and side.tcp.reading is not False
        )

    def _send(self, which: str, data: bytes) -> None:
        side = self.side(which)
        assert side is not None
        self.ends[which].sent += data
        side.data(data)

    # -- rules ---------------------------------------------------------------------
    @rule()
    def pump(self) -> None:
        self.pair.pump()

    @precondition(lambda self: self._can_send("client"))
    @rule(data=st.binary(min_size=1, max_size=3000))
    def client_data(self, data: bytes) -> None:
        self._send("client", data)

    @precondition(lambda self: self._can_send("server"))
    @rule(data=st.binary(min_size=1, max_size=3000))
    def server_data(self, data: bytes) -> None:
        self._send("server", data)

    @precondition(lambda self: self._can_send("client") or self._can_send("server"))
    @rule(
        which=st.sampled_from(["client", "server"]),
        size=st.integers(100_000, 400_000),
        seed=st.integers(0, 2**16),
    )
    def big_data(self, which: str, size: int, seed: int) -> None:
        if self._can_send(which):
            self._send(which, random.Random(seed).randbytes(size))

    @rule(which=st.sampled_from(["client", "server"]))
    def fin(self, which: str) -> None:
        side = self.side(which)
        end = self.ends[which]
        if side is not None and not end.fin and side.conn.phase is not Phase.CLOSED:
            end.fin = True
            side.fin()

    @rule(which=st.sampled_from(["client", "server"]))
    def pause_or_resume(self, which: str) -> None:
        side = self.side(which)
        if side is None:
            return
        end = self.ends[which]
        end.paused = not end.paused
        if end.paused:
            side.conn.on_tcp_write_paused()
        else:
            side.conn.on_tcp_write_resumed()

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def bytes_arrive_in_order_and_fin_last(self) -> None:
        for writer, reader in (("client", "server"), ("server", "client")):
            side = self.side(reader)
            if side is None:
                continue
            sent = self.ends[writer].sent
            got = side.tcp.written
            assert sent[: len(got)] == got, f"{writer}'s bytes arrived out of order"
            if side.tcp.eof:
                assert self.ends[writer].fin and got == sent, "a FIN before every byte"
            assert not side.tcp.violations, side.tcp.violations
            assert not side.tcp.was_reset and side.conn.failure is None

    @invariant()
    def nothing_changes_after_close(self) -> None:
        for which in ("client", "server"):
            side = self.side(which)
            if side is None or side.conn.phase is not Phase.CLOSED:
                continue
            end = self.ends[which]
            if end.closed_log is None:
                end.closed_log = list(side.tcp.log)
                assert side.tcp.closed
            assert side.tcp.log == end.closed_log

    def teardown(self) -> None:
        pair = self.pair
        for which in ("client", "server"):
            side = self.side(which)
            if side is not None and self.ends[which].paused:
                side.conn.on_tcp_write_resumed()
        pair.pump()
        for which in ("client", "server"):
            side = self.side(which)
            assert side is not None
            if not self.ends[which].fin:
                self.ends[which].fin = True
                side.fin()
        pair.pump()
        self.bytes_arrive_in_order_and_fin_last()
        server = self.server
        assert server is not None
        for side in (self.client, server):
            assert side.conn.phase is Phase.CLOSED, side.conn.phase
            assert side.conn.failure is None and side.tcp.closed and not side.tcp.was_reset
        assert server.tcp.written == self.ends["client"].sent
        assert self.client.tcp.written == self.ends["server"].sent


Tunnel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_interleavings = Tunnel.TestCase
