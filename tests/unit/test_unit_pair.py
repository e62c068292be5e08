"""Link-route tunnels between our own ingress and egress engines, pumped in memory.

Each test is a short transcript: what the TCP peers do at each end, a pump,
and what each side's connection and socket show.
"""

from __future__ import annotations

import random

from proton import Transport
from unit_harness import RESET, Pair, Side, carrier_of

from tunnel.amqp.engine import SLICE
from tunnel.connection import Open, Phase
from tunnel.dialects.carrier import Failure
from tunnel.dialects.link_route import CREDIT_BUDGET, MAX_DELIVERY, PROVEN_FAST, START_WINDOW


def phase(side: Side) -> Phase:
    return side.conn.phase


def closed_cleanly(*sides: Side) -> bool:
    return all(
        s.conn.phase is Phase.CLOSED
        and s.conn.failure is None
        and s.tcp.closed
        and not s.tcp.was_reset
        and not s.tcp.violations
        for s in sides
    )


def test_bytes_cross_both_ways_and_the_tunnel_opens() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    assert client.conn.phase is Phase.OPEN and client.conn.deadline is None
    client.data(b"hello")
    pair.pump()
    assert bytes(server.tcp.written) == b"hello"
    server.data(b"world")
    pair.pump()
    assert bytes(client.tcp.written) == b"world"
    assert carrier_of(client).peer_half_close and carrier_of(server).peer_half_close
    assert client.conn.bytes_out == 5 and client.conn.bytes_in == 5


def test_first_bytes_before_credit_are_not_lost() -> None:
    pair = Pair(auto_connect=False)
    client = pair.client()
    # One read is taken before credit, to leave with the first credit.
    assert client.conn.phase is Phase.OPENING and client.tcp.reading is True
    client.data(b"GET / HTTP/1.0\r\n")  # before any link is attached
    assert client.conn.parked and client.tcp.reading is False
    client.data(b"\r\n")  # a read already under way when reading paused
    pair.pump()
    server = pair.egress.sides[-1]
    # The egress answered with a first window while its backend connects: the
    # bytes crossed, and are kept until the backend is there.
    assert client.conn.phase is Phase.OPEN and not client.conn.parked
    assert server.tcp.written == b"" and server.conn.tcp is None
    pair.egress.connect()
    pair.pump()
    assert bytes(server.tcp.written) == b"GET / HTTP/1.0\r\n\r\n"
    assert client.tcp.reading is True and not server.tcp.violations


def test_before_the_backend_connects_one_window_crosses_and_no_more() -> None:
    pair = Pair(auto_connect=False)
    client = pair.client()
    pair.pump()
    big = random.Random(3).randbytes(4 * MAX_DELIVERY)
    client.data(big[: 2 * MAX_DELIVERY])
    pair.pump()
    client.data(big[2 * MAX_DELIVERY :])
    pair.pump()
    server = pair.egress.sides[-1]
    receiver = carrier_of(server).receiver
    assert receiver is not None and receiver.credit == 0  # the window used, none added
    assert client.conn.parked and client.conn.bytes_out == 2 * MAX_DELIVERY
    pair.egress.connect()
    pair.pump()
    assert bytes(server.tcp.written) == big


def test_fin_from_the_client_then_the_server() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.data(b"request")
    client.fin()
    pair.pump()
    assert server.tcp.log == ["write", "eof"]
    assert client.conn.open == Open.WRITE and server.conn.open == Open.READ
    server.data(b"reply after the client's FIN")
    pair.pump()
    assert bytes(client.tcp.written) == b"reply after the client's FIN"
    assert not client.tcp.eof
    server.fin()
    pair.pump()
    assert client.tcp.log == ["write", "eof", "close"]
    assert closed_cleanly(client, server)


def test_fin_from_the_server_then_the_client() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    server.data(b"banner")
    server.fin()
    pair.pump()
    assert client.tcp.log == ["write", "eof"]
    assert server.conn.phase is Phase.OPEN and client.conn.open == Open.READ
    client.data(b"still talking")
    pair.pump()
    assert bytes(server.tcp.written) == b"still talking"
    client.fin()
    pair.pump()
    assert server.tcp.log == ["write", "eof", "close"]
    assert closed_cleanly(client, server)


def test_fin_from_both_at_once() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.data(b"a")
    server.data(b"b")
    client.fin()
    server.fin()
    pair.pump()
    assert client.tcp.written == b"b" and server.tcp.written == b"a"
    assert closed_cleanly(client, server)


def test_fin_waits_for_parked_bytes() -> None:
    pair = Pair(window=2)
    client, server = pair.tunnel()
    big = bytes(range(256)) * (MAX_DELIVERY * 3 // 256)  # more than two deliveries' credit
    client.data(big)
    client.fin()
    assert client.conn.parked
    pair.pump()
    assert bytes(server.tcp.written) == big
    assert server.tcp.log[-1] == "eof" and server.tcp.log.count("eof") == 1
    assert not server.tcp.violations


def test_rst_at_the_client_resets_the_server() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.data(b"x")
    pair.pump()
    client.rst()
    assert client.conn.phase is Phase.CLOSED and client.conn.failure is Failure.TCP_RESET
    pair.pump()
    assert server.tcp.was_reset and not server.tcp.closed
    assert server.conn.failure is Failure.FAR_END
    assert (False, RESET) in carrier_of(server).detaches
    assert all(name == RESET for _, name in carrier_of(server).detaches)


def test_rst_at_the_server_resets_the_client() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    server.rst()
    pair.pump()
    assert client.tcp.was_reset and client.conn.failure is Failure.FAR_END
    assert server.conn.failure is Failure.TCP_RESET
    assert {name for _, name in carrier_of(client).detaches} == {RESET}
    assert not client.tcp.violations and not server.tcp.violations


def test_rst_after_a_half_close_still_resets_the_other_side() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.fin()
    pair.pump()
    assert server.tcp.eof
    client.rst()
    pair.pump()
    assert server.tcp.was_reset and server.conn.failure is Failure.FAR_END


def test_close_without_fin_is_a_reset() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.conn.on_tcp_closed(None)  # gone with both directions still open
    pair.pump()
    assert client.conn.failure is Failure.TCP_RESET
    assert server.tcp.was_reset


def test_write_eof_failing_resets_both() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.tcp.eof_error = BrokenPipeError(32, "Broken pipe")
    server.fin()
    pair.pump()
    assert client.conn.failure is Failure.TCP_RESET and client.tcp.was_reset
    assert server.tcp.was_reset and server.conn.failure is Failure.FAR_END


def test_no_credit_ever_then_the_open_timeout() -> None:
    pair = Pair(open_timeout=5.0)
    pair.egress.serving = False
    client = pair.client(now=100.0)
    client.data(b"hello?")
    pair.pump()
    assert client.conn.deadline == 105.0
    client.conn.on_deadline(104.9)
    assert phase(client) is Phase.OPENING
    client.conn.on_deadline(105.0)
    assert phase(client) is Phase.CLOSED and client.conn.failure is Failure.NO_CREDIT
    assert client.tcp.was_reset and client.tcp.written == b""
    pair.pump()
    (routed,) = pair.egress.held
    assert routed.remote_condition is not None and routed.remote_condition.name == RESET


def test_the_deadline_is_moot_once_open() -> None:
    pair = Pair(open_timeout=1.0)
    client, _ = pair.tunnel()
    client.conn.on_deadline(1e9)
    assert client.conn.phase is Phase.OPEN and client.conn.failure is None


def test_a_slow_reader_holds_back_credit() -> None:
    pair = Pair(window=2)
    client, server = pair.tunnel()
    server.conn.on_tcp_write_paused()
    chunks = [bytes([n]) * 1000 for n in range(4)]
    for chunk in chunks:
        client.data(chunk)
        pair.pump()
    receiver = carrier_of(server).receiver
    assert receiver is not None and receiver.credit == 0
    assert bytes(server.tcp.written) == chunks[0] + chunks[1]  # the window, no more
    assert client.conn.parked and client.tcp.reading is False
    server.conn.on_tcp_write_resumed()
    pair.pump()
    assert bytes(server.tcp.written) == b"".join(chunks)
    assert client.tcp.reading is True and not client.conn.parked


def test_a_slow_client_holds_back_the_server() -> None:
    pair = Pair(window=2)
    client, server = pair.tunnel()
    client.conn.on_tcp_write_paused()
    for n in range(5):
        server.data(bytes([n]) * 10)
        pair.pump()
    assert len(client.tcp.written) == 20 and server.tcp.reading is False
    client.conn.on_tcp_write_resumed()
    pair.pump()
    assert len(client.tcp.written) == 50 and server.tcp.reading is True


def test_a_message_larger_than_max_frame() -> None:
    pair = Pair(max_frame_size=512)
    client, server = pair.tunnel()
    payload = random.Random(1).randbytes(300_000)
    client.data(payload)
    server.data(payload[::-1])
    pair.pump()
    assert bytes(server.tcp.written) == payload
    assert bytes(client.tcp.written) == payload[::-1]


def test_bytes_out_equal_bytes_in_across_many_chunks() -> None:
    rng = random.Random(7)
    pair = Pair()
    client, server = pair.tunnel()
    up = bytearray()
    down = bytearray()
    for _ in range(200):
        chunk = rng.randbytes(rng.randint(1, 5000))
        if rng.random() < 0.5:
            up += chunk
            client.data(chunk)
        else:
            down += chunk
            server.data(chunk)
        if rng.random() < 0.3:
            pair.pump()
    client.fin()
    server.fin()
    pair.pump()
    assert server.tcp.written == up and client.tcp.written == down
    assert client.conn.bytes_out == len(up) == server.conn.bytes_in
    assert closed_cleanly(client, server)


def test_many_tunnels_on_one_connection_stay_apart() -> None:
    pair = Pair()
    tunnels = [pair.tunnel() for _ in range(5)]
    for n, (client, server) in enumerate(tunnels):
        client.data(b"c%d" % n)
        server.data(b"s%d" % n)
    pair.pump()
    for n, (client, server) in enumerate(tunnels):
        assert server.tcp.written == b"c%d" % n and client.tcp.written == b"s%d" % n
    tunnels[2][0].rst()
    pair.pump()
    assert tunnels[2][1].tcp.was_reset
    assert all(c.conn.phase is Phase.OPEN for i, (c, _) in enumerate(tunnels) if i != 2)


def test_nothing_happens_after_close() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    client.fin()
    server.fin()
    pair.pump()
    assert closed_cleanly(client, server)
    for side in (client, server):
        side.data(b"late")
        side.fin()
        side.rst()
        side.conn.on_far_data(b"late")
        side.conn.on_far_end()
        side.conn.on_deadline(1e9)
        side.conn.on_tcp_write_resumed()
    pair.pump()
    assert closed_cleanly(client, server)
    assert client.tcp.log == ["eof", "close"] and server.tcp.log == ["eof", "close"]


def test_the_amqp_connection_lost_resets_every_tunnel() -> None:
    pair = Pair()
    client, _ = pair.tunnel()
    client.conn.on_amqp_lost()
    assert client.conn.failure is Failure.AMQP_LOST and client.tcp.was_reset


def test_data_after_a_node_style_end_is_a_reset() -> None:
    pair = Pair()
    client, _ = pair.tunnel()
    carrier = carrier_of(client)
    carrier.sender = None  # the far end closed our sending side for good
    client.data(b"nowhere to go")
    assert client.conn.failure is Failure.FAR_END and client.tcp.was_reset


# -- the credit window, sized for the reader ------------------------------------------
def _push(client: Side, pair: Pair, total: int) -> None:
    """``total`` bytes from the client, a read at a time, pumped as a socket would be."""
    chunk = bytes(2 * MAX_DELIVERY)
    for _ in range(total // len(chunk)):
        client.data(chunk)
        pair.pump()


def test_a_reader_that_keeps_up_earns_the_whole_budget() -> None:
    pair = Pair(window=None)
    client, server = pair.tunnel()
    receiver = carrier_of(server)
    assert receiver.window == START_WINDOW
    _push(client, pair, PROVEN_FAST - 2 * MAX_DELIVERY)
    assert receiver.window == START_WINDOW  # not proven yet
    _push(client, pair, 2 * MAX_DELIVERY)
    assert receiver.window * MAX_DELIVERY == CREDIT_BUDGET
    assert receiver.receiver is not None and receiver.receiver.credit > START_WINDOW
    assert len(server.tcp.written) == PROVEN_FAST


def test_a_reader_the_kernel_buffers_for_never_earns_more() -> None:
    pair = Pair(window=None)
    client, server = pair.tunnel()
    server.tcp.unsent_bytes = 1  # each write left something behind
    _push(client, pair, 2 * PROVEN_FAST)
    assert carrier_of(server).window == START_WINDOW
    receiver = carrier_of(server).receiver
    assert receiver is not None and receiver.credit <= START_WINDOW


def test_one_write_held_back_starts_the_proof_again() -> None:
    pair = Pair(window=None)
    client, server = pair.tunnel()
    _push(client, pair, PROVEN_FAST // 2)
    server.tcp.unsent_bytes = 1
    _push(client, pair, 2 * MAX_DELIVERY)
    server.tcp.unsent_bytes = 0
    _push(client, pair, PROVEN_FAST // 2)
    assert carrier_of(server).window == START_WINDOW


def test_a_reader_that_falls_behind_goes_back_to_the_start() -> None:
    pair = Pair(window=None)
    client, server = pair.tunnel()
    _push(client, pair, PROVEN_FAST)
    assert carrier_of(server).window * MAX_DELIVERY == CREDIT_BUDGET
    receiver = carrier_of(server).receiver
    assert receiver is not None
    server.conn.on_tcp_write_paused()
    client.data(bytes(MAX_DELIVERY))
    pair.pump()
    assert carrier_of(server).window == START_WINDOW
    outstanding = receiver.credit  # granted already: AMQP has no taking it back
    server.conn.on_tcp_write_resumed()
    pair.pump()
    assert receiver.credit <= outstanding
    _push(client, pair, CREDIT_BUDGET)  # uses up what was granted before
    assert receiver.credit <= START_WINDOW
    assert len(server.tcp.written) == PROVEN_FAST + MAX_DELIVERY + CREDIT_BUDGET


def test_a_fixed_window_stays_fixed() -> None:
    pair = Pair(window=3)
    client, server = pair.tunnel()
    _push(client, pair, PROVEN_FAST + 2 * MAX_DELIVERY)
    assert carrier_of(server).window == 3
    receiver = carrier_of(server).receiver
    assert receiver is not None and receiver.credit <= 3


def _transfers_seen(pair: Pair) -> list[str]:
    """The transfer frames the egress engine receives from now on, as proton traces them."""
    seen: list[str] = []
    pair.b.transport.trace(Transport.TRACE_FRM)
    pair.b.transport.tracer = lambda _, line: seen.append(line) if "<- @transfer" in line else None
    return seen


def test_a_small_delivery_is_one_transfer() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    seen = _transfers_seen(pair)
    client.data(b"x")
    pair.pump()
    assert server.tcp.written == b"x"
    assert len(seen) == 1 and "more=true" not in seen[0]


def test_a_sliced_delivery_ends_with_its_last_slice() -> None:
    pair = Pair()
    client, server = pair.tunnel()
    seen = _transfers_seen(pair)
    payload = random.Random(2).randbytes(3 * SLICE)  # the header makes it four slices
    client.data(payload)
    pair.pump()
    assert bytes(server.tcp.written) == payload
    assert len(seen) == 4
    assert all("more=true" in line for line in seen[:-1]) and "more=true" not in seen[-1]
