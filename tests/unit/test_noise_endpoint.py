"""NoiseEndpoint behaviour: handshakes, 0-RTT, trust, migration, anti-amplification,
lost state, rekeying, limits. Deterministic: injected clock and seeded RNG, no sleeps."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import pytest

from synapse_coap.errors import ConfigValueError, KeyChangedError, TrustError
from synapse_coap.noise import (
    ChannelClosed,
    ChannelEstablished,
    Dropped,
    Event,
    HandshakeFailed,
    MemoryTrustStore,
    NoiseEndpoint,
    NoiseLimits,
    Received,
    Transmit,
    TrustPolicy,
    fingerprint,
    public_key,
    records,
)

SERVER = ("127.0.0.1", 5683)
CLIENT = ("127.0.0.1", 40000)
PROFILES = ((2, b"\x22" * 32), (1, b"\x11" * 32), (0, b""))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(seed: int) -> bytes:
    return random.Random(seed).randbytes(32)


def endpoint(
    private: bytes,
    clock: Clock,
    trust: TrustPolicy,
    *,
    seed: int,
    limits: NoiseLimits = NoiseLimits(),
    profiles: tuple[tuple[int, bytes], ...] = PROFILES,
    app: bytes = b"",
    nonces: list[tuple[bytes, int]] | None = None,
) -> NoiseEndpoint:
    r = random.Random(seed)
    return NoiseEndpoint(
        private,
        trust=trust,
        limits=limits,
        profiles=profiles,
        app_payload=app,
        clock=clock,
        rng=r.randbytes,
        seal_observer=None if nonces is None else lambda k, n: nonces.append((k, n)),
    )


def tx(events: Iterable[Event]) -> list[Transmit]:
    return [e for e in events if isinstance(e, Transmit)]


def of(events: Iterable[Event], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, kind)]


class Pair:
    """A server and a client endpoint wired by hand (each Transmit delivered explicitly)."""

    def __init__(
        self,
        *,
        client_trust: TrustPolicy | None = None,
        server_trust: TrustPolicy | None = None,
        limits: NoiseLimits = NoiseLimits(reply_wait=0.05),
        server_app: bytes = b"example.org",
        client_profiles: tuple[tuple[int, bytes], ...] = PROFILES,
    ) -> None:
        self.clock = Clock()
        self.ks, self.kc = key(1), key(2)
        self.server_pub = public_key(self.ks)
        self.client_trust = client_trust or TrustPolicy(store=MemoryTrustStore())
        self.server_trust = server_trust or TrustPolicy(accept_any_initiator=True)
        self.limits = limits
        self.server_app = server_app
        self.server = endpoint(
            self.ks, self.clock, self.server_trust, seed=11, limits=limits, app=server_app
        )
        self.client = endpoint(
            self.kc, self.clock, self.client_trust, seed=12, limits=limits, profiles=client_profiles
        )
        self.client_addr = CLIENT
        self.server_events: list[Event] = []
        self.client_events: list[Event] = []
        self.wire: list[tuple[str, int]] = []  # (direction, size) of every datagram delivered

    def to_server(self, events: Iterable[Event]) -> list[Event]:
        out: list[Event] = []
        for t in tx(events):
            self.wire.append(("c>s", len(t.data)))
            out += self.server.datagram_received(t.data, self.client_addr)
        self.server_events += out
        return out

    def to_client(self, events: Iterable[Event]) -> list[Event]:
        out: list[Event] = []
        for t in tx(events):
            assert t.addr == self.client_addr or t.addr[1] != self.client_addr[1]
            if t.addr != self.client_addr:
                continue  # sent to an address the client no longer has
            self.wire.append(("s>c", len(t.data)))
            out += self.client.datagram_received(t.data, SERVER)
        self.client_events += out
        return out

    def pump(self, client_events: list[Event], *, server_reply: bool = True) -> None:
        """Deliver until quiet; the server answers every b"Q..." with b"R...", on time."""
        c_out = client_events
        for _ in range(50):
            s_in = self.to_server(c_out)
            s_out = list(s_in)
            if server_reply:
                for ev in of(s_in, Received):
                    if ev.plaintext.startswith(b"Q"):
                        s_out += self.server.send(ev.channel, b"R" + ev.plaintext[1:])
            self.clock.now += 0.1
            s_out += self.server.handle_timers()
            c_out = self.to_client(s_out)
            c_out += self.client.handle_timers()
            if not tx(s_out) and not tx(c_out):
                return

    def connect(self, early: bytes | None = None, peer_static: bytes | None = None) -> int:
        ch, events = self.client.connect(
            SERVER, peer_name="example.org", peer_static=peer_static, early_data=early
        )
        self.pump(events)
        return ch


# --------------------------------------------------------------------------- records


def test_data_record_overhead_is_at_most_22_bytes() -> None:
    p = Pair()
    ch = p.connect()
    # the first 128 records of a session carry a 1-byte packet number, then 2 bytes
    sizes = (0, 1, 13, 500, p.client.max_plaintext())
    overheads = []
    for i in range(200):
        size = sizes[i % len(sizes)]
        (t,) = tx(p.client.send(ch, b"x" * size))
        overheads.append(len(t.data) - size)
        got = of(p.server.datagram_received(t.data, CLIENT), Received)
        assert got[0].plaintext == b"x" * size
    assert overheads == sorted(overheads)
    assert overheads.count(20) >= 120 and overheads[-1] == records.DATA_OVERHEAD == 21
    # Sending far ahead of anything heard from the peer widens the packet number to 3 bytes.
    for _ in range(1 << 14):
        (t,) = tx(p.client.send(ch, b"y"))
    assert len(t.data) - 1 == records.MAX_OVERHEAD == 22
    # ... and the receiver still expands it correctly.
    assert of(p.server.datagram_received(t.data, CLIENT), Received)[0].plaintext == b"y"
    with pytest.raises(Exception, match="exceeds the maximum"):
        p.client.send(ch, b"x" * (p.client.max_plaintext() + 1))


# --------------------------------------------------------------------------- handshakes


def test_xx_first_contact_then_tofu_then_ik() -> None:
    store = MemoryTrustStore()
    p = Pair(client_trust=TrustPolicy(store=store))
    _ch, events = p.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q1"
    )
    (xx1,) = tx(events)
    assert xx1.data[0] == 0x83 and len(xx1.data) == 64  # XX1, padded for anti-amplification
    p.pump(events)
    (est,) = of(p.client_events, ChannelEstablished)
    assert est.peer_static == p.server_pub and est.profile_id == 2
    assert est.peer_app_payload == b"example.org" and est.initiator
    (s_est,) = of(p.server_events, ChannelEstablished)
    assert s_est.peer_static == public_key(p.kc) and s_est.profile_id == 2 and not s_est.initiator
    assert [e.plaintext for e in of(p.server_events, Received)] == [b"Q1"]  # rode in XX3
    assert [e.plaintext for e in of(p.client_events, Received)] == [b"R1"]
    assert store.get("example.org") == p.server_pub  # trust on first use
    # Second contact: the key is known, so IK.
    ch2, events = p.client.connect(SERVER, peer_name="example.org", peer_static=None)
    assert tx(events)[0].data[0] == 0x81
    p.pump(events)
    assert p.client.channel_info(ch2).established


def test_profile_negotiation_falls_back_to_zero() -> None:
    p = Pair(client_profiles=((1, b"\x99" * 32), (0, b"")))  # same id, different content
    p.connect()
    assert of(p.client_events, ChannelEstablished)[0].profile_id == 0
    q = Pair(client_profiles=((1, b"\x11" * 32), (0, b"")))
    q.connect()
    assert of(q.client_events, ChannelEstablished)[0].profile_id == 1


def test_ik_early_data_is_delivered_exactly_once_and_answer_rides_in_ik2() -> None:
    p = Pair(client_trust=TrustPolicy(pinned={"example.org": public_key(key(1))}))
    ch, events = p.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q-get"
    )
    (ik1,) = tx(events)
    assert ik1.data[0] == 0x81
    s_events = p.to_server(events) + p.to_server(events)  # duplicated on the link
    assert [e.plaintext for e in of(s_events, Received)] == [b"Q-get"]
    # The client retransmits the same request (CoAP): IK1 goes again, nothing is queued twice.
    again = p.client.send(ch, b"Q-get")
    assert [t.data for t in tx(again)] == [ik1.data]
    assert not of(p.to_server(again), Received)
    # The server answers before reply_wait ends: the answer rides in IK2, sent at once
    # (the clock has not moved: no waiting for reply_wait).
    srv_ch = of(s_events, ChannelEstablished)[0].channel
    timer_events = p.server.send(srv_ch, b"R-get")
    (ik2,) = tx(timer_events)
    assert ik2.data[0] == 0x82
    c_events = p.to_client(timer_events)
    assert [type(e) for e in c_events] == [ChannelEstablished, Received]
    assert c_events[1].plaintext == b"R-get"  # type: ignore[union-attr]
    # Much later, a replay of the captured IK1 is not delivered again.
    p.clock.now += 30
    late = p.server.datagram_received(ik1.data, ("127.0.0.1", 41234))
    assert not of(late, Received) and of(late, Dropped)
    # 2 datagrams for a full 0-RTT exchange; sizes are exact.
    assert len(ik1.data) == 99 + (2 + 2 * 9) + (2 + 5) + (2 + 4)  # offers, early, its date
    assert len(ik2.data) == 53 + (2 + 9) + (2 + len(b"example.org")) + (2 + 5)


def test_changed_server_key_is_refused_with_both_fingerprints() -> None:
    old = public_key(key(99))
    store = MemoryTrustStore({"example.org": old})
    p = Pair(client_trust=TrustPolicy(store=store))
    ch, events = p.client.connect(SERVER, peer_name="example.org", peer_static=None)
    assert tx(events)[0].data[0] == 0x81  # IK to the remembered key
    failures: list[HandshakeFailed] = []
    closed: list[ChannelClosed] = []
    c_out = events
    for _ in range(10):  # IK1 is undecryptable; after retries the client falls back to XX
        s_out = p.to_server(c_out)
        assert not of(s_out, ChannelEstablished)
        c_in = p.to_client(s_out)
        failures += of(c_in, HandshakeFailed)
        closed += of(c_in, ChannelClosed)
        if failures:
            break
        p.clock.now = p.client.next_timer() or p.clock.now
        c_out = p.client.handle_timers()
    (failure,) = failures
    assert isinstance(failure.error, KeyChangedError)
    msg = str(failure.error)
    assert "example.org" in msg and fingerprint(old) in msg and fingerprint(p.server_pub) in msg
    assert closed == [ChannelClosed(ch, "peer key refused")]
    assert store.get("example.org") == old
    with pytest.raises(Exception, match="closed or unknown"):
        p.client.send(ch, b"Q")


def test_explicit_key_conflicting_with_pin_is_refused() -> None:
    wrong_pin = public_key(key(98))
    p = Pair(client_trust=TrustPolicy(pinned={"example.org": wrong_pin}))
    _ch, events = p.client.connect(SERVER, peer_name="example.org", peer_static=public_key(key(1)))
    p.pump(events)
    (failure,) = of(p.client_events, HandshakeFailed)
    assert isinstance(failure.error, KeyChangedError)


def test_responder_refuses_unpinned_initiator_when_not_accepting_any() -> None:
    p = Pair(server_trust=TrustPolicy(pinned={"friend.example": public_key(key(2))}))
    p.connect()
    (est,) = of(p.server_events, ChannelEstablished)
    assert est.peer_name == "friend.example"
    q = Pair(server_trust=TrustPolicy(pinned={"friend.example": public_key(key(3))}))
    q.connect(peer_static=q.server_pub)
    (failure,) = of(q.server_events, HandshakeFailed)
    assert failure.channel is None and isinstance(failure.error, TrustError)
    assert not of(q.server_events, ChannelEstablished)


# --------------------------------------------------------------------------- migration


def test_port_change_moves_the_session_without_a_handshake() -> None:
    p = Pair()
    ch = p.connect(early=b"Q0")
    started = p.client.stats["handshakes.started"], p.server.stats["handshakes.accepted"]
    p.client_addr = ("127.0.0.1", 40999)  # NAT rebinding
    p.pump(p.client.send(ch, b"Q1"))
    assert [e.plaintext for e in of(p.client_events, Received)] == [b"R0", b"R1"]
    s_recv = of(p.server_events, Received)
    assert s_recv[-1].addr == ("127.0.0.1", 40999)
    assert (p.client.stats["handshakes.started"], p.server.stats["handshakes.accepted"]) == started
    assert p.server.stats["migrations"] == 1 and p.server.stats["paths_validated"] == 1
    assert p.server.channel_info(s_recv[-1].channel).addr == ("127.0.0.1", 40999)


def test_unvalidated_new_address_gets_at_most_3x_the_bytes_received() -> None:
    p = Pair()
    ch = p.connect()
    new = ("127.0.0.1", 41000)
    p.client_addr = new
    (rec,) = tx(p.client.send(ch, b"Q-small"))
    s_out = p.server.datagram_received(rec.data, new)
    (got,) = of(s_out, Received)
    big = b"R" + b"z" * 900
    s_out += p.server.send(got.channel, big)
    sent = sum(len(t.data) for t in tx(s_out) if t.addr == new)
    assert 0 < sent <= 3 * len(rec.data)  # only the path challenge
    assert all(len(t.data) < len(big) for t in tx(s_out))
    # The client answers the challenge; the validated path gets the queued reply.
    c_out = p.to_client(s_out)
    s_out2 = p.to_server(c_out)
    assert any(len(t.data) == len(big) + 20 for t in tx(s_out2))
    assert p.server.stats["paths_validated"] == 1


def test_handshake_replies_respect_3x_of_what_the_unauthenticated_peer_sent() -> None:
    # IK: a large first answer does not ride in IK2 and is held until the client confirms.
    p = Pair(client_trust=TrustPolicy(pinned={"example.org": public_key(key(1))}))
    _ch, events = p.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q"
    )
    in_bytes = sum(len(t.data) for t in tx(events))
    s_in = p.to_server(events)
    srv_ch = of(s_in, ChannelEstablished)[0].channel
    s_out = p.server.send(srv_ch, b"R" + b"w" * 1000)  # IK2 goes at once, without the reply
    p.clock.now += 0.1
    s_out += p.server.handle_timers()
    assert sum(len(t.data) for t in tx(s_out)) <= 3 * in_bytes
    c_in = p.to_client(s_out)
    assert of(c_in, ChannelEstablished) and not of(c_in, Received)
    confirm = [e for e in c_in if isinstance(e, Transmit)]
    assert len(confirm) == 1 and len(confirm[0].data) == 21  # a PING record (1-byte number)
    c_in2 = p.to_client(p.to_server(confirm))
    assert [len(e.plaintext) for e in of(c_in2, Received)] == [1001]
    # XX: a responder whose XX2 exceeds 3x XX1 waits for the retransmitted XX1.
    q = Pair(server_app=b"a" * 150)
    _ch, events = q.client.connect(SERVER, peer_name="example.org", peer_static=None)
    assert tx(q.to_server(events)) == []
    assert q.server.stats["amplification_limited"] == 1
    q.clock.now += 2.0
    retry = q.client.handle_timers()
    out = q.to_server(retry)
    (xx2,) = tx(out)
    assert len(xx2.data) <= 3 * 2 * 64


# --------------------------------------------------------------------------- lost state


def test_server_restart_is_recovered_by_suspect_lost_within_one_retransmission() -> None:
    p = Pair()
    ch = p.connect(early=b"Q0")
    # The server restarts (same static key, no sessions).
    p.server = endpoint(p.ks, p.clock, p.server_trust, seed=21, app=b"example.org")
    p.server_events.clear()
    p.client_events.clear()
    first = p.client.send(ch, b"Q1")
    assert [d.reason for d in of(p.to_server(first), Dropped)] == ["unknown_session"]
    # The transport's first retransmission: suspect_lost, then the same message again.
    events = p.client.suspect_lost(ch)
    assert tx(events)[0].data[0] == 0x81  # a fresh IK handshake, no reset message involved
    # The retransmission is not held for the handshake: it goes on the old session (which
    # the restarted server drops) and again on the new one once that is up.
    events += p.client.send(ch, b"Q1")
    assert [t.data[0] >> 6 for t in tx(events)] == [0b10, 0b11]  # IK1, then a record
    p.pump(events)
    assert [e.plaintext for e in of(p.server_events, Received)] == [b"Q1"]
    assert [e.plaintext for e in of(p.client_events, Received)] == [b"R1"]
    (est,) = of(p.client_events, ChannelEstablished)
    assert est.channel == ch  # the channel is stable across the re-handshake


def test_suspect_lost_on_a_live_peer_swaps_sessions_without_loss() -> None:
    p = Pair()
    ch = p.connect(early=b"Q0")
    s_ch = of(p.server_events, ChannelEstablished)[0].channel
    p.pump(p.client.suspect_lost(ch) + p.client.send(ch, b"Q1"))
    assert [e.plaintext for e in of(p.client_events, Received)] == [b"R0", b"R1"]
    # The responder moved its channel to the new session ("replaces").
    assert {e.channel for e in of(p.server_events, ChannelEstablished)} == {s_ch}
    p.pump(p.client.send(ch, b"Q2"))
    assert of(p.client_events, Received)[-1].plaintext == b"R2"


def test_restarted_client_from_the_same_address_replaces_its_channel() -> None:
    p = Pair()
    p.connect(early=b"Q0")
    s_ch = of(p.server_events, ChannelEstablished)[0].channel
    p.client = endpoint(p.kc, p.clock, p.client_trust, seed=31)
    p.connect(early=b"Q1")
    assert [e.channel for e in of(p.server_events, ChannelEstablished)] == [s_ch, s_ch]
    assert p.server.active_channels() == 1


def test_idle_sessions_expire() -> None:
    p = Pair(limits=NoiseLimits(idle_timeout=100.0))
    ch = p.connect(early=b"Q0")
    p.clock.now += 101
    assert of(p.client.handle_timers(), ChannelClosed) == [ChannelClosed(ch, "idle")]
    assert of(p.server.handle_timers(), ChannelClosed)[0].reason == "idle"
    assert p.server.active_channels() == 0 and p.server.next_timer() is None


# --------------------------------------------------------------------------- rekey


def test_rekey_across_the_key_phase_boundary_with_reordering() -> None:
    nonces: list[tuple[bytes, int]] = []
    p = Pair(limits=NoiseLimits(rekey_after_packets=5))
    p.client = endpoint(p.kc, p.clock, p.client_trust, seed=12, limits=p.limits, nonces=nonces)
    ch = p.connect()
    rnd = random.Random(5)
    phases: list[int] = []
    delivered: list[bytes] = []
    for batch in range(12):
        sent = [b"Q%d-%d" % (batch, i) for i in range(7)]
        out = [t for pt in sent for t in tx(p.client.send(ch, pt))]
        phases += [(t.data[0] >> 5) & 1 for t in out]
        rnd.shuffle(out)  # reordered across the key-phase boundary
        s_in = p.to_server(out + out[:2])  # plus two replays
        got = [e.plaintext for e in of(s_in, Received)]
        assert sorted(got) == sorted(sent)
        delivered += got
        replies = [e for ev in of(s_in, Received) for e in p.server.send(ev.channel, b"R")]
        rnd.shuffle(replies)
        p.to_client(replies)
    flips = sum(1 for a, b in itertools.pairwise(phases) if a != b)
    assert flips >= 10
    assert p.client.stats["rekeys"] >= 10 and p.server.stats["rekeys"] >= 10
    assert len(delivered) == len(set(delivered)) == 84
    assert len(nonces) == len(set(nonces))


# --------------------------------------------------------------------------- limits


def _xx1(ep: NoiseEndpoint, clock: Clock) -> bytes:
    _, events = ep.connect(SERVER, peer_name="x", peer_static=None)
    return tx(events)[0].data


def test_handshake_flood_gets_retries_without_evicting_established_sessions() -> None:
    clock = Clock()
    limits = NoiseLimits(max_sessions=8, handshakes_per_second=1000.0, handshake_burst=1000)
    server = endpoint(key(1), clock, TrustPolicy(accept_any_initiator=True), seed=1, limits=limits)
    clients = []
    for i in range(3):
        c = endpoint(key(10 + i), clock, TrustPolicy(pinned={"s": public_key(key(1))}), seed=10 + i)
        ch, ev = c.connect(SERVER, peer_name="s", peer_static=None, early_data=b"hi")
        addr = ("127.0.0.1", 50000 + i)
        s_ev = [e for t in tx(ev) for e in server.datagram_received(t.data, addr)]
        clock.now += 0.1
        c_ev = [e for t in tx(server.handle_timers()) for e in c.datagram_received(t.data, SERVER)]
        s_ev += [
            e for t in tx(c.send(ch, b"confirm")) for e in server.datagram_received(t.data, addr)
        ]
        clients.append((c, ch, addr, of(s_ev, ChannelEstablished)[0].channel))
        assert of(c_ev, ChannelEstablished)
    flooder = endpoint(key(50), clock, TrustPolicy(store=MemoryTrustStore()), seed=50)
    reasons = []
    for i in range(200):
        ev = server.datagram_received(_xx1(flooder, clock), (f"10.0.{i // 250}.{i % 250}", 1000))
        reasons += [d.reason for d in of(ev, Dropped)]
    # Past half the half-open table (4 of 8 sessions: 2 here) the spoofed flood only gets
    # stateless retry cookies; the half-open state it made is bounded and evictable.
    assert not reasons and server.half_open() <= limits.max_pending
    assert server.stats["handshakes.retry_sent"] == 200 - server.stats["handshakes.accepted"] + 3
    # Every established session still works.
    for c, ch, addr, s_ch in clients:
        got = [
            e for t in tx(c.send(ch, b"still here")) for e in server.datagram_received(t.data, addr)
        ]
        assert [e.plaintext for e in of(got, Received)] == [b"still here"]
        back = [
            e for t in tx(server.send(s_ch, b"yes")) for e in c.datagram_received(t.data, SERVER)
        ]
        assert [e.plaintext for e in of(back, Received)] == [b"yes"]
    # Half-open XX sessions expire after handshake_timeout; new handshakes are possible again.
    clock.now += limits.handshake_timeout + 1
    server.handle_timers()
    ev = server.datagram_received(_xx1(flooder, clock), ("10.9.9.9", 1))
    assert tx(ev)


def test_handshake_rate_limit_per_ipv4_address_and_per_ipv6_64() -> None:
    clock = Clock()
    limits = NoiseLimits(handshakes_per_second=1.0, handshake_burst=2)
    server = endpoint(key(1), clock, TrustPolicy(accept_any_initiator=True), seed=1, limits=limits)
    flooder = endpoint(key(50), clock, TrustPolicy(store=MemoryTrustStore()), seed=50)

    def attempt(host: str) -> str:
        ev = server.datagram_received(_xx1(flooder, clock), (host, 1234))
        drops = of(ev, Dropped)
        return drops[0].reason if drops else "ok"

    assert [attempt("192.0.2.1") for _ in range(3)] == ["ok", "ok", "rate_limited"]
    assert attempt("192.0.2.2") == "ok"  # another IPv4 address has its own bucket
    assert [attempt("2001:db8::1"), attempt("2001:db8::2"), attempt("2001:db8::ffff:1")] == [
        "ok",
        "ok",
        "rate_limited",
    ]  # one bucket per /64
    assert attempt("2001:db8:0:1::1") == "ok"  # the next /64
    assert attempt("::ffff:192.0.2.1") == "rate_limited"  # IPv4-mapped = the IPv4 address
    clock.now += 1.0
    assert attempt("192.0.2.1") == "ok"  # one token back per second


def test_limits_from_config() -> None:
    limits = NoiseLimits.from_config({"max_sessions": 10, "idle_timeout": 30}, "coap.noise")
    assert limits.max_sessions == 10 and limits.idle_timeout == 30
    assert NoiseLimits.from_config(None, "x") == NoiseLimits()
    for bad, field in [
        ({"max_sessions": 0}, "coap.noise.max_sessions"),
        ({"max_sessions": True}, "coap.noise.max_sessions"),
        ({"max_datagram_size": 10}, "coap.noise.max_datagram_size"),
        ({"idle_timeout": -1}, "coap.noise.idle_timeout"),
        ({"handshakes_per_second": "fast"}, "coap.noise.handshakes_per_second"),
        ({"max_sesions": 3}, "coap.noise.max_sesions"),
    ]:
        with pytest.raises(ConfigValueError) as info:
            NoiseLimits.from_config(bad, "coap.noise")
        assert info.value.path == field, bad


def test_oversized_and_plain_coap_datagrams_are_dropped() -> None:
    p = Pair(limits=NoiseLimits(max_datagram_size=300))
    assert of(p.server.datagram_received(b"\xc0" * 301, CLIENT), Dropped)[0].reason == "too_large"
    plain = bytes([0x40, 0x01, 0x12, 0x34])  # a CoAP GET
    assert of(p.server.datagram_received(plain, CLIENT), Dropped)[0].reason == "plain_coap"
    assert p.server.stats["dropped"] == 2


# --------------------------------------------------------------------------- heavy loss


def test_ik_reply_leaves_as_soon_as_it_is_queued_not_after_reply_wait() -> None:
    # reply_wait is long (5 s): the reply still goes at once, in IK2, with the clock unmoved.
    p = Pair(
        client_trust=TrustPolicy(pinned={"example.org": public_key(key(1))}),
        limits=NoiseLimits(reply_wait=5.0),
    )
    _ch, events = p.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q-get"
    )
    s_in = p.to_server(events)
    assert p.server.next_timer() == p.clock.now + 5.0  # a bare IK2 only if nothing comes
    t0 = p.clock.now
    out = p.server.send(of(s_in, ChannelEstablished)[0].channel, b"R-get")
    assert p.clock.now == t0
    (ik2,) = tx(out)
    assert ik2.data[0] == 0x82
    assert [e.plaintext for e in of(p.to_client(out), Received)] == [b"R-get"]
    # Nothing is left for the timer to send.
    p.clock.now += 5.0
    assert tx(p.server.handle_timers()) == []


def test_bare_ik2_after_reply_wait_when_no_reply_comes() -> None:
    p = Pair(
        client_trust=TrustPolicy(pinned={"example.org": public_key(key(1))}),
        limits=NoiseLimits(reply_wait=0.5),
    )
    _ch, events = p.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q-slow"
    )
    p.to_server(events)
    p.clock.now += 0.4
    assert tx(p.server.handle_timers()) == []
    p.clock.now += 0.1
    (ik2,) = tx(p.server.handle_timers())
    assert of(p.to_client([ik2]), ChannelEstablished)


def test_failed_rehandshake_keeps_the_old_session_and_channel() -> None:
    limits = NoiseLimits(reply_wait=0.05, handshake_timeout=20.0)
    p = Pair(limits=limits)
    ch = p.connect(early=b"Q0")
    start = p.client.suspect_lost(ch)
    assert tx(start)[0].data[0] == 0x81
    # Every handshake datagram is lost; requests keep flowing on the old session meanwhile.
    during = p.client.send(ch, b"Q1")
    assert [t.data[0] >> 6 for t in tx(during)] == [0b11]
    p.pump(during)
    assert of(p.client_events, Received)[-1].plaintext == b"R1"
    failed: list[Event] = []
    for _ in range(100):
        at = p.client.next_timer()
        assert at is not None
        p.clock.now = at
        failed += p.client.handle_timers()  # retransmissions: lost
        if of(failed, HandshakeFailed):
            break
    (hf,) = of(failed, HandshakeFailed)
    assert hf.channel == ch and not of(failed, ChannelClosed)
    assert p.client.channel_open(ch)
    assert p.client.stats["handshakes.timeout"] == 1
    p.pump(p.client.send(ch, b"Q2"))
    assert of(p.client_events, Received)[-1].plaintext == b"R2"
    assert [e.plaintext for e in of(p.server_events, Received)] == [b"Q0", b"Q1", b"Q2"]


def test_retransmission_is_not_held_by_a_pending_rehandshake() -> None:
    p = Pair()
    ch = p.connect(early=b"Q0")
    p.client.suspect_lost(ch)  # its IK1 is lost
    # The same request retransmitted three times: three records on the old session, no
    # handshake datagram triggered by them.
    for _ in range(3):
        out = p.client.send(ch, b"Q1")
        assert [t.data[0] >> 6 for t in tx(out)] == [0b11]
    assert [e.plaintext for e in of(p.to_server(out), Received)] == [b"Q1"]


def test_useless_rehandshakes_back_off() -> None:
    # Loss, not lost state: the old session answers during each re-handshake, so each
    # one proves useless and the next suspect_lost is held off for twice as long.
    p = Pair()
    ch = p.connect(early=b"Q0")
    started = 0
    holdoffs: list[float] = []
    last_start = None
    for i in range(120):
        ev = p.client.suspect_lost(ch)
        if tx(ev):
            started += 1
            if last_start is not None:
                holdoffs.append(p.clock.now - last_start)
            last_start = p.clock.now
        p.pump(ev + p.client.send(ch, b"Q%d" % i))
        p.clock.now += 1.0
    assert p.client.stats["rehandshakes"] == started
    assert started <= 6
    assert holdoffs == sorted(holdoffs) and holdoffs[-1] >= 3 * holdoffs[0]
    # Every request was answered exactly once despite the re-handshakes.
    answers = [e.plaintext for e in of(p.client_events, Received)]
    assert answers == [b"R0"] + [b"R%d" % i for i in range(120)]


def test_handshake_retransmission_follows_the_link_hint() -> None:
    clock = Clock()
    c = endpoint(key(2), clock, TrustPolicy(store=MemoryTrustStore()), seed=3)
    _ch, ev = c.connect(SERVER, peer_name="s", peer_static=None, rto=6.0, bandwidth_bps=100.0)
    (xx1,) = tx(ev)
    first = c.next_timer()
    assert first is not None
    # 6 s RTO + XX1 and an answer of its size (+28 header bytes) at 100 bit/s
    assert first - clock.now == pytest.approx(6.0 + 2 * 8 * (len(xx1.data) + 28) / 100.0)
    # Without a hint: the configured handshake_retransmit (2 s).
    _ch2, _ev2 = c.connect(SERVER, peer_name="t", peer_static=None)
    assert min(t for t in [c.next_timer()] if t is not None) - clock.now == pytest.approx(2.0)


def test_default_handshake_timeout_fits_a_100_bit_per_second_link() -> None:
    # a full XX: three ~100-byte datagrams at 8 s each, plus 10 s latency each way
    assert NoiseLimits().handshake_timeout >= 3 * (8 + 10) * 2


def test_fifty_sequential_exchanges_at_30_percent_loss_with_default_limits() -> None:
    # The fake CoAP-like layer calls suspect_lost on EVERY first retransmission with
    # nothing heard since the request (harsher than the transport): the session layer's
    # own rate limiting still keeps re-handshakes rare, and no exchange is lost or doubled.
    from fake_link import (
        Clock as NetClock,
    )
    from fake_link import (
        ExchangeClient,
        ExchangeServer,
        LinkProfile,
        Network,
        Node,
    )

    clock = NetClock()
    net = Network(clock, seed=5, profile=LinkProfile(loss=0.3, delay=0.3, jitter=0.05))
    server = net.add(
        Node(
            "server",
            SERVER,
            key(1),
            trust=TrustPolicy(accept_any_initiator=True),
            clock=clock,
            seed=11,
            app_payload=b"example.org",
        )
    )
    client = net.add(
        Node(
            "client",
            CLIENT,
            key(2),
            trust=TrustPolicy(store=MemoryTrustStore()),
            clock=clock,
            seed=12,
        )
    )
    channel, events = client.endpoint.connect(
        SERVER, peer_name="example.org", peer_static=public_key(key(1))
    )
    net.emit(client, events)
    srv = ExchangeServer(server, net)
    cli = ExchangeClient(client, net, channel, rto=2.0, max_rto=60.0)
    for xid in range(50):
        clock.now += 0.5  # think time: each request starts after the previous answer
        cli.start(xid)
        for _ in range(100_000):
            if not cli.pending:
                break
            t = cli.next_timer()
            net.step([t])
            if t is not None and t <= clock.now:
                cli.run_timers()
        assert not cli.pending, f"exchange {xid} never completed"
    assert srv.executed == {xid: 1 for xid in range(50)}
    assert cli.completed == {xid: 1 for xid in range(50)}
    stats = client.endpoint.stats
    assert cli.suspicions > 10  # the loss did make the layer above suspicious, often
    assert stats.get("rehandshakes", 0) < 10, stats
    assert not of(client.events, ChannelClosed)
    assert client.endpoint.channel_open(channel)


def test_reply_wait_follows_a_known_slow_link_rate() -> None:
    """At 100 bit/s a bare IK2 (81 B with headers) takes 6.5 s on the link: the responder
    holds it up to ~1 s for the first reply, so the handshake and the answer are one
    datagram (one round trip for the request). Fast links keep the short default."""
    slow = Pair(
        client_trust=TrustPolicy(pinned={"example.org": public_key(key(1))}),
        limits=NoiseLimits(reply_wait=0.05),
    )
    slow.server.link_bandwidth_bps = 100.0
    assert slow.server.reply_wait() == pytest.approx(0.15 * 8 * (53 + 28) / 100)
    _ch, events = slow.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q-send"
    )
    s_in = slow.to_server(events)
    slow.clock.now += 0.5  # the homeserver takes 0.5 s to answer
    assert tx(slow.server.handle_timers()) == []
    out = slow.server.send(of(s_in, ChannelEstablished)[0].channel, b"R-send")
    (ik2,) = tx(out)
    assert ik2.data[0] == 0x82
    assert [e.plaintext for e in of(slow.to_client(out), Received)] == [b"R-send"]
    assert [d for d, _ in slow.wire] == ["c>s", "s>c"]

    # The same 0.5 s answer on a link of unknown (fast) rate: a bare IK2 went at 0.05 s
    # and the answer follows in a record of its own.
    fast = Pair(
        client_trust=TrustPolicy(pinned={"example.org": public_key(key(1))}),
        limits=NoiseLimits(reply_wait=0.05),
    )
    _ch, events = fast.client.connect(
        SERVER, peer_name="example.org", peer_static=None, early_data=b"Q-send"
    )
    s_in = fast.to_server(events)
    fast.clock.now += 0.05
    fast.to_client(fast.server.handle_timers())
    fast.clock.now += 0.45
    fast.to_client(fast.server.send(of(s_in, ChannelEstablished)[0].channel, b"R-send"))
    assert [d for d, _ in fast.wire] == ["c>s", "s>c", "s>c"]
    assert [e.plaintext for e in of(fast.client_events, Received)] == [b"R-send"]

    # 9.6 kbit/s: the default already covers it; reply_wait 0 stays 0 on any link.
    fast.server.link_bandwidth_bps = 9600.0
    assert fast.server.reply_wait() == 0.05
    zero = Pair(limits=NoiseLimits(reply_wait=0.0))
    zero.server.link_bandwidth_bps = 100.0
    assert zero.server.reply_wait() == 0.0
