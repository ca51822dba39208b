"""NoiseEndpoint under attack: half-open floods, retry cookies, eviction order.

Deterministic: injected clock and seeded RNG, no sleeps. Each test reproduced its
finding (issue 14) before the fix.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from synapse_coap.noise import (
    ChannelEstablished,
    Dropped,
    Event,
    MemoryTrustStore,
    NoiseEndpoint,
    NoiseLimits,
    Received,
    Transmit,
    TrustPolicy,
    public_key,
)

SERVER = ("127.0.0.1", 5683)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(seed: int) -> bytes:
    return random.Random(seed).randbytes(32)


def tx(events: Iterable[Event]) -> list[Transmit]:
    return [e for e in events if isinstance(e, Transmit)]


def of(events: Iterable[Event], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, kind)]


def make(clock: Clock, seed: int, trust: TrustPolicy, limits: NoiseLimits) -> NoiseEndpoint:
    return NoiseEndpoint(
        key(seed), trust=trust, limits=limits, clock=clock, rng=random.Random(seed).randbytes
    )


class Net:
    """A server endpoint and any number of client endpoints, each at its own address."""

    def __init__(self, limits: NoiseLimits, server_trust: TrustPolicy | None = None) -> None:
        self.clock = Clock()
        self.limits = limits
        self.server = make(
            self.clock, 1, server_trust or TrustPolicy(accept_any_initiator=True), limits
        )
        self.server_pub = public_key(key(1))
        self.received: list[Event] = []

    def client(self, seed: int, *, pinned: bool = False) -> NoiseEndpoint:
        trust = (
            TrustPolicy(pinned={"s": self.server_pub})
            if pinned
            else TrustPolicy(store=MemoryTrustStore())
        )
        return make(self.clock, seed, trust, NoiseLimits(max_sessions=32768))

    def run(self, client: NoiseEndpoint, addr: tuple[str, int], events: list[Event]) -> list[Event]:
        """Deliver both ways until quiet; returns the client's events."""
        got: list[Event] = []
        for _ in range(20):
            s_out = [e for t in tx(events) for e in self.server.datagram_received(t.data, addr)]
            self.received += s_out
            for ev in of(s_out, Received):
                s_out += self.server.send(ev.channel, b"R" + ev.plaintext)
            self.clock.now += 0.01
            s_out += self.server.handle_timers()
            events = [
                e
                for t in tx(s_out)
                if t.addr == addr
                for e in client.datagram_received(t.data, SERVER)
            ]
            got += events
            if not tx(events):
                break
        return got


def _flood_xx1(net: Net, hosts: list[str], count: int, *, answer_retry: bool = False) -> int:
    """``count`` first messages (XX1) from ``hosts`` round robin, each from a fresh port.
    With ``answer_retry`` the flooder answers retry cookies (it owns the addresses).
    Returns how many half-open sessions the flood created."""
    flooder = net.client(500)
    created = 0
    for i in range(count):
        addr = (hosts[i % len(hosts)], 1024 + i)
        _ch, ev = flooder.connect(SERVER, peer_name="x", peer_static=None)
        for _ in range(2):
            out = [e for t in tx(ev) for e in net.server.datagram_received(t.data, addr)]
            replies = tx(out)
            if replies and replies[0].data[0] == 0x84:
                created += 1
                break
            if not (answer_retry and replies and replies[0].data[0] == 0x86):
                break
            ev = [e for t in replies for e in flooder.datagram_received(t.data, SERVER)]
    return created


def test_half_open_flood_from_one_address_does_not_lock_out_new_clients() -> None:
    # issue 14: ~220 XX1 from one IP within its rate limit filled every half-open slot
    # for handshake_timeout, and every new client was refused meanwhile.
    limits = NoiseLimits(max_sessions=64, handshakes_per_second=1000.0, handshake_burst=1000)
    net = Net(limits)
    _flood_xx1(net, ["192.0.2.7"], 500, answer_retry=True)
    client = net.client(7)
    _ch, ev = client.connect(SERVER, peer_name="s", peer_static=None, early_data=b"Q")
    got = net.run(client, ("198.51.100.1", 4000), ev)
    assert of(got, ChannelEstablished)
    assert [e.plaintext for e in of(got, Received)] == [b"RQ"]


def test_spoofed_flood_holds_no_state_and_gets_only_small_retries() -> None:
    limits = NoiseLimits(max_sessions=64, handshakes_per_second=1000.0, handshake_burst=1000)
    net = Net(limits)
    hosts = [f"10.{i // 256}.{i % 256}.1" for i in range(4000)]
    flooder = net.client(500)
    sent = back = 0
    for i, host in enumerate(hosts):
        _ch, ev = flooder.connect(SERVER, peer_name="x", peer_static=None)
        (t,) = tx(ev)
        out = tx(net.server.datagram_received(t.data, (host, 1024 + i)))
        sent += len(t.data)
        back += sum(len(o.data) for o in out)
        assert sum(len(o.data) for o in out) <= 3 * len(t.data)
    # Half-open state stays within its bound; past it, only stateless retries went out.
    assert net.server.half_open() <= limits.max_pending
    assert net.server.stats["handshakes.retry_sent"] >= len(hosts) - limits.max_pending
    assert back <= sent  # the retries are smaller than what they answer
    # A new client still connects (one extra round trip under pressure).
    client = net.client(7)
    _ch, ev = client.connect(SERVER, peer_name="s", peer_static=None, early_data=b"Q")
    got = net.run(client, ("198.51.100.1", 4000), ev)
    assert of(got, ChannelEstablished)
    assert [e.plaintext for e in of(got, Received)] == [b"RQ"]


def test_quiet_server_answers_first_contact_without_a_retry() -> None:
    net = Net(NoiseLimits())
    client = net.client(7)
    _ch, ev = client.connect(SERVER, peer_name="s", peer_static=None)
    (xx1,) = tx(ev)
    (xx2,) = tx(net.server.datagram_received(xx1.data, ("198.51.100.1", 4000)))
    assert xx2.data[0] == 0x84
    assert net.server.stats.get("handshakes.retry_sent", 0) == 0


def test_half_open_state_is_bounded_per_prefix_and_evicted_oldest_first() -> None:
    limits = NoiseLimits(
        max_sessions=256,
        handshakes_per_second=1000.0,
        handshake_burst=1000,
        max_half_open_per_prefix=8,
        retry="never",
    )
    net = Net(limits)
    created = _flood_xx1(net, [f"192.0.2.{i}" for i in range(1, 255)], 100)
    assert created == 100
    half = [s for s in net.server._sessions.values() if s.state.value == "xx-received-1"]
    assert len(half) == 8  # one /24: its 8 newest
    assert sorted(s.addr[1] for s in half) == [1024 + i for i in range(92, 100)]
    assert net.server.stats["handshakes.evicted"] == 92


def test_established_and_0rtt_sessions_are_never_evicted_for_half_open_ones() -> None:
    # issue 14: an IK session that had done only a 0-RTT exchange was evicted for a
    # half-open one, and its client got 504 on its next request.
    limits = NoiseLimits(
        max_sessions=16, handshakes_per_second=1000.0, handshake_burst=1000, retry="never"
    )
    net = Net(limits)
    clients = []
    for i in range(4):
        c = net.client(20 + i, pinned=True)
        addr = (f"198.51.100.{i + 1}", 4000)
        ch, ev = c.connect(SERVER, peer_name="s", peer_static=None, early_data=b"Q0")
        got = net.run(c, addr, ev)  # 0-RTT exchange only: no record from the client yet
        assert [e.plaintext for e in of(got, Received)] == [b"RQ0"]
        clients.append((c, ch, addr))
    _flood_xx1(net, [f"203.0.{i}.1" for i in range(200)], 200)
    for c, ch, addr in clients:
        got = net.run(c, addr, c.send(ch, b"Q1"))
        assert [e.plaintext for e in of(got, Received)] == [b"RQ1"]
    assert net.server.stats["handshakes.evicted"] >= 200 - limits.max_pending


def test_retry_round_trip_for_ik_with_early_data_and_cookie_bound_to_address() -> None:
    net = Net(NoiseLimits(retry="always"))
    client = net.client(7, pinned=True)
    addr = ("198.51.100.1", 4000)
    _ch, ev = client.connect(SERVER, peer_name="s", peer_static=None, early_data=b"Q")
    (ik1,) = tx(ev)
    (rt,) = tx(net.server.datagram_received(ik1.data, addr))
    assert rt.data[0] == 0x86 and len(rt.data) == 21 and not net.server._sessions
    (echo,) = tx(client.datagram_received(rt.data, SERVER))
    assert echo.data[0] == 0x87 and echo.data[19:] == ik1.data
    # The cookie is bound to the address and port it was sent to.
    stolen = net.server.datagram_received(echo.data, ("198.51.100.2", 4000))
    assert [d.reason for d in of(stolen, Dropped)] == ["bad_cookie"]
    # A retry the client did not ask for (wrong session id) is ignored.
    forged = bytes([0x86, 0, 1]) + bytes(18)
    assert [d.reason for d in of(client.datagram_received(forged, SERVER), Dropped)] == [
        "unexpected_retry"
    ]
    got = net.run(client, addr, [Transmit(SERVER, echo.data)])
    assert of(got, ChannelEstablished)
    assert [e.plaintext for e in of(got, Received)] == [b"RQ"]
    assert [e.plaintext for e in of(net.received, Received)] == [b"Q"]
    # A retransmitted echo is a duplicate, never delivered again.
    again = net.server.datagram_received(echo.data, addr)
    assert not of(again, Received)
    # The cookie expires.
    net.clock.now += 600
    late = net.server.datagram_received(echo.data, ("198.51.100.9", 4000))
    assert not of(late, Received)


def test_replies_to_unvalidated_sources_stay_within_3x_under_flood() -> None:
    net = Net(NoiseLimits(max_sessions=64, handshakes_per_second=1e6, handshake_burst=10**6))
    flooder = net.client(500)
    per_source: dict[tuple[str, int], list[int]] = {}
    for i in range(300):
        addr = (f"10.1.{i % 7}.{i % 250}", 2000 + i)
        _ch, ev = flooder.connect(
            SERVER, peer_name="x", peer_static=net.server_pub if i % 2 else None, early_data=b"Q"
        )
        for t in tx(ev):
            io = per_source.setdefault(addr, [0, 0])
            io[0] += len(t.data)
            io[1] += sum(len(o.data) for o in tx(net.server.datagram_received(t.data, addr)))
    assert max(out / inp for inp, out in per_source.values()) <= 3.0


# --------------------------------------------------------------------------- 0-RTT


def _ik_server(clock: Clock, wall: list[float], **kw: object) -> NoiseEndpoint:
    return NoiseEndpoint(
        key(1),
        trust=TrustPolicy(accept_any_initiator=True),
        limits=kw.pop("limits", NoiseLimits()),  # type: ignore[arg-type]
        clock=clock,
        rng=random.Random(1).randbytes,
        wall_clock=lambda: wall[0],
        **kw,  # type: ignore[arg-type]
    )


def _ik_client(clock: Clock, wall: list[float], seed: int) -> NoiseEndpoint:
    return NoiseEndpoint(
        key(seed),
        trust=TrustPolicy(pinned={"s": public_key(key(1))}),
        clock=clock,
        rng=random.Random(seed).randbytes,
        wall_clock=lambda: wall[0],
    )


def test_0rtt_from_an_unvalidated_address_is_marked_until_validated() -> None:
    # issue 14: a request riding in IK1 was forwarded with its (spoofable) source
    # address as the client's identity before the address was validated.
    net = Net(NoiseLimits())
    client = net.client(7, pinned=True)
    addr = ("198.51.100.1", 4000)
    ch, ev = client.connect(SERVER, peer_name="s", peer_static=None, early_data=b"Q0")
    (ik1,) = tx(ev)
    (early,) = of(net.server.datagram_received(ik1.data, addr), Received)
    assert early.plaintext == b"Q0" and early.validated is False
    net.clock.now += 0.1  # no reply: a bare IK2 goes after reply_wait
    for t in tx(net.server.handle_timers()):
        assert of(client.datagram_received(t.data, SERVER), ChannelEstablished)
    got = [
        e for t in tx(client.send(ch, b"Q1")) for e in net.server.datagram_received(t.data, addr)
    ]
    (later,) = of(got, Received)
    assert later.plaintext == b"Q1" and later.validated is True
    # Under pressure the retry cookie validates the address before the 0-RTT data.
    net2 = Net(NoiseLimits(retry="always"))
    client2 = net2.client(8, pinned=True)
    _ch, ev = client2.connect(SERVER, peer_name="s", peer_static=None, early_data=b"Q0")
    net2.run(client2, addr, ev)
    (early2,) = of(net2.received, Received)
    assert early2.plaintext == b"Q0" and early2.validated is True


def test_captured_0rtt_is_refused_after_a_restart_and_the_client_resends() -> None:
    # issue 14: a captured 0-RTT PUT replayed once after a gateway restart.
    clock, wall = Clock(), [1_700_000_000.0]
    server = _ik_server(clock, wall)
    client = _ik_client(clock, wall, 7)
    addr = ("198.51.100.1", 4000)
    _ch, ev = client.connect(SERVER, peer_name="s", peer_static=None, early_data=b"PUT-txn")
    (ik1,) = tx(ev)
    assert [e.plaintext for e in of(server.datagram_received(ik1.data, addr), Received)] == [
        b"PUT-txn"
    ]
    # Restart 5 s later with the same key; the old run's watermark was persisted.
    watermark = server.replay_watermark(horizon=30.0)
    wall[0] += 5
    restarted = _ik_server(clock, wall, early_data_not_before=watermark)
    out = restarted.datagram_received(ik1.data, ("203.0.113.5", 4000))
    assert not of(out, Received)
    assert restarted.stats["early_data.refused.before_restart"] == 1
    # Without the watermark it would have been delivered again.
    naive = _ik_server(clock, wall)
    assert of(naive.datagram_received(ik1.data, ("203.0.113.5", 4000)), Received)
    # An honest client whose 0-RTT is refused sends the request again at once, in a record.
    client2 = _ik_client(clock, wall, 8)
    _ch2, ev = client2.connect(SERVER, peer_name="s", peer_static=None, early_data=b"GET-1")
    s_ev = [e for t in tx(ev) for e in restarted.datagram_received(t.data, addr)]
    assert not of(s_ev, Received)
    c_ev = [e for t in tx(s_ev) for e in client2.datagram_received(t.data, SERVER)]
    assert client2.stats["early_data.resent"] == 1
    s_ev = [e for t in tx(c_ev) for e in restarted.datagram_received(t.data, addr)]
    assert [e.plaintext for e in of(s_ev, Received)] == [b"GET-1"]
    # Once the watermark has passed, 0-RTT is accepted again.
    wall[0] = watermark + 1
    client3 = _ik_client(clock, wall, 9)
    _ch3, ev = client3.connect(SERVER, peer_name="s", peer_static=None, early_data=b"GET-2")
    s_ev = [e for t in tx(ev) for e in restarted.datagram_received(t.data, addr)]
    assert [e.plaintext for e in of(s_ev, Received)] == [b"GET-2"]


def test_stale_0rtt_is_refused() -> None:
    clock, wall = Clock(), [1_700_000_000.0]
    server = _ik_server(clock, wall)
    client = _ik_client(clock, wall, 7)
    _ch, ev = client.connect(SERVER, peer_name="s", peer_static=None, early_data=b"GET")
    wall[0] += NoiseLimits().early_data_window + 1
    out = [e for t in tx(ev) for e in server.datagram_received(t.data, ("198.51.100.1", 1))]
    assert not of(out, Received) and server.stats["early_data.refused.stale"] == 1


def test_replay_cache_cannot_be_flushed_by_fresh_handshakes() -> None:
    # issue 14: the 0-RTT replay cache (4 x max_sessions, oldest dropped) could be
    # flushed by fresh handshakes from many addresses, after which a captured 0-RTT
    # request replayed.
    clock, wall = Clock(), [1_700_000_000.0]
    limits = NoiseLimits(max_sessions=8, handshakes_per_second=1e6, handshake_burst=10**6)
    server = _ik_server(clock, wall, limits=limits)
    victim = _ik_client(clock, wall, 7)
    _ch, ev = victim.connect(SERVER, peer_name="s", peer_static=None, early_data=b"PUT-txn")
    (captured,) = tx(ev)
    assert of(server.datagram_received(captured.data, ("198.51.100.1", 1)), Received)
    delivered = 1
    for i in range(100):  # fresh 0-RTT handshakes from many addresses
        c = _ik_client(clock, wall, 100 + i)
        _c, ev = c.connect(SERVER, peer_name="s", peer_static=None, early_data=b"GET")
        for t in tx(ev):
            server.datagram_received(t.data, (f"10.9.{i}.1", 1000))
        clock.now += 0.01
        server.handle_timers()
    replay = server.datagram_received(captured.data, ("203.0.113.9", 2))
    delivered += len(of(replay, Received))
    assert delivered == 1
