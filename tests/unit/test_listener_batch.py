"""The listener under a handshake flood (issue 14): the order in which datagrams read
ahead are handled (transport/batch.py) and the loop-lag probe (transport/looplag.py).
Sans-I/O: no sockets, no sleeps."""

from __future__ import annotations

import asyncio

from synapse_coap.transport.batch import HELD_HANDSHAKES, order_batch
from synapse_coap.transport.looplag import LoopLagProbe

HANDSHAKE = b"\x80hello"  # first two bits 10
RECORD = b"\xc0record"  # 11
PLAIN = b"\x40coap"  # 01


def host(addr: tuple[str, int]) -> str:
    return addr[0]


def test_a_single_datagram_is_handled_as_it_came() -> None:
    assert order_batch([(HANDSHAKE, ("10.0.0.1", 1))], host) == ([(HANDSHAKE, ("10.0.0.1", 1))], 0)


def test_established_sessions_go_before_a_flood_and_the_flood_is_capped() -> None:
    # issue 14: under the /24 flood the kernel dropped the honest client's record
    # behind hundreds of handshake messages (each validated one costs DH work)
    flood = [(HANDSHAKE, (f"127.0.2.{i % 256}", 5000 + i)) for i in range(200)]
    honest = (RECORD, ("127.0.0.1", 4000))
    ordered, dropped = order_batch([*flood[:100], honest, *flood[100:]], host)
    assert ordered[0] == honest
    assert sum(1 for d, _ in ordered if d == HANDSHAKE) == HELD_HANDSHAKES
    assert dropped == 200 - HELD_HANDSHAKES
    # a burst within the budget (clients reconnecting after a restart) is kept whole
    assert order_batch([*flood[:60], honest], host) == ([honest, *flood[:60]], 0)


def test_a_new_client_elsewhere_is_not_crowded_out_by_one_prefix() -> None:
    flood = [(HANDSHAKE, (f"127.0.2.{i}", 5000)) for i in range(100)]
    newcomer = (HANDSHAKE, ("192.0.2.7", 6000))
    ordered, _dropped = order_batch([*flood, newcomer], host)
    # round robin over prefixes: the newcomer's /24 gets the second slot
    assert ordered.index(newcomer) == 1


def test_a_sources_datagrams_keep_their_order_behind_its_handshake() -> None:
    # a client's last handshake message and its first record, read in one batch:
    # the record must not overtake the handshake that establishes its session
    src = ("198.51.100.1", 7000)
    other = (RECORD, ("203.0.113.9", 1))
    ordered, dropped = order_batch([(HANDSHAKE, src), (RECORD, src), other, (PLAIN, src)], host)
    assert dropped == 0
    assert ordered == [other, (HANDSHAKE, src), (RECORD, src), (PLAIN, src)]


def test_loop_lag_probe_reports_how_late_it_woke() -> None:
    now = [0.0]
    stalls = iter([0.0, 0.2, 0.003])

    async def sleep(seconds: float) -> None:
        now[0] += seconds + next(stalls)  # the loop held up this much longer

    seen: list[float] = []
    probe = LoopLagProbe(seen.append, interval=0.01, clock=lambda: now[0], sleep=sleep)
    asyncio.run(probe.run(count=3))
    assert [round(x, 6) for x in seen] == [0.0, 0.2, 0.003]
