"""Property/fuzz tests: hostile datagrams are dropped and counted, never raise, change nothing.

"State" is everything that defines the sessions (keys, packet numbers, replay
windows, queues, channels: ``NoiseEndpoint.state_snapshot()``); the counters
and the rate limiter's buckets are accounting and are allowed to move.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.noise import (
    ChannelEstablished,
    Dropped,
    Heard,
    MemoryTrustStore,
    NoiseEndpoint,
    NoiseLimits,
    Received,
    Transmit,
    TrustPolicy,
)

SERVER = ("127.0.0.1", 5683)
CLIENT = ("127.0.0.1", 40000)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class World:
    """An established pair plus a stock of genuine records (for replay / mutation)."""

    def __init__(self) -> None:
        self.now = 1000.0
        clock = lambda: self.now  # noqa: E731
        r1, r2 = random.Random(1), random.Random(2)
        self.server = NoiseEndpoint(
            r1.randbytes(32),
            trust=TrustPolicy(accept_any_initiator=True),
            clock=clock,
            rng=r1.randbytes,
            limits=NoiseLimits(reply_wait=0.0),
        )
        self.client = NoiseEndpoint(
            r2.randbytes(32),
            trust=TrustPolicy(store=MemoryTrustStore()),
            clock=clock,
            rng=r2.randbytes,
        )
        ch, events = self.client.connect(SERVER, peer_name="s", peer_static=None)
        self.handshake: list[bytes] = []
        for _ in range(6):
            s_events = []
            for t in events:
                if isinstance(t, Transmit):
                    self.handshake.append(t.data)
                    s_events += self.server.datagram_received(t.data, CLIENT)
            events = []
            for t in s_events:
                if isinstance(t, Transmit):
                    self.handshake.append(t.data)
                    events += self.client.datagram_received(t.data, SERVER)
        assert self.client.channel_info(ch).established
        self.channel = ch
        # Genuine records, delivered once (so every later copy is a replay).
        self.records: list[bytes] = []
        for i in range(5):
            (t,) = [e for e in self.client.send(ch, b"m%d" % i) if isinstance(e, Transmit)]
            self.records.append(t.data)
            got = self.server.datagram_received(t.data, CLIENT)
            assert [e.plaintext for e in got if isinstance(e, Received)] == [b"m%d" % i]
        # One genuine record held back (never delivered): mutations of it must fail.
        (t,) = [e for e in self.client.send(ch, b"held") if isinstance(e, Transmit)]
        self.held = t.data


WORLD = World()


def _check_dropped(data: bytes, addr: tuple[str, int] = CLIENT) -> None:
    before = WORLD.server.state_snapshot()
    dropped_before = WORLD.server.stats.get("dropped", 0)
    events = WORLD.server.datagram_received(data, addr)
    if len(data) == 3 and data[0] == 0x89 and not any(isinstance(e, Dropped) for e in events):
        # a NAT ping that names a session the server holds, from its address: only
        # "heard", no answer, no state (docs/security.md "NAT pings")
        assert [type(e) for e in events] == [Heard], events
        assert WORLD.server.state_snapshot() == before
        return
    dropped = [e for e in events if isinstance(e, Dropped)]
    # a well-formed record for a session id the server does not hold may get the 3-byte
    # unknown-session hint (stateless, rate-limited): nothing else may answer bad input
    others = [e for e in events if not isinstance(e, Dropped)]
    assert len(dropped) == 1, events
    assert all(
        isinstance(e, Transmit)
        and len(e.data) == 3
        and (
            (e.data[0] == 0x88 and len(data) >= 20)  # a record for an unknown session
            or (e.data[0] in (0x88, 0x8A) and len(data) == 3 and data[0] == 0x89)  # a ping
        )
        for e in others
    ), events
    assert len(others) <= 1, events
    assert WORLD.server.stats["dropped"] == dropped_before + 1
    assert WORLD.server.state_snapshot() == before


def _not_an_xx1(data: bytes) -> bool:
    # An XX message 1 is unauthenticated by design: a well-formed one starts a
    # (bounded, rate-limited) half-open handshake. Covered by test_xx1_garbage below.
    return not data or data[0] != 0x83


@SETTINGS
@given(st.binary(max_size=1500).filter(_not_an_xx1))
def test_arbitrary_bytes_are_dropped(data: bytes) -> None:
    _check_dropped(data)


@SETTINGS
@given(st.data())
def test_truncated_records_are_dropped(data: st.DataObject) -> None:
    src = data.draw(st.sampled_from([WORLD.held, *WORLD.handshake]))
    cut = data.draw(st.integers(0, len(src) - 1))
    _check_dropped(src[:cut])


@SETTINGS
@given(st.data())
def test_flipped_bits_are_dropped(data: st.DataObject) -> None:
    src = bytearray(data.draw(st.sampled_from([WORLD.held, *WORLD.records])))
    positions = data.draw(
        st.lists(st.integers(0, len(src) * 8 - 1), min_size=1, max_size=4, unique=True)
    )
    for bit in positions:
        src[bit // 8] ^= 1 << (bit % 8)
    _check_dropped(bytes(src))


@SETTINGS
@given(st.sampled_from(range(5)), st.sampled_from([CLIENT, ("127.0.0.1", 1), ("::1", 9)]))
def test_replayed_records_are_dropped_from_any_address(i: int, addr: tuple[str, int]) -> None:
    _check_dropped(WORLD.records[i], addr)


@SETTINGS
@given(st.sampled_from(range(3)))
def test_replayed_handshake_messages_are_dropped(i: int) -> None:
    # The client's handshake messages (XX1 and XX3) replayed after completion.
    client_msgs = [m for m in WORLD.handshake if m[0] in (0x83, 0x85)]
    msg = client_msgs[i % len(client_msgs)]
    before = WORLD.server.state_snapshot()
    events = WORLD.server.datagram_received(msg, ("127.0.0.1", 4444))
    assert not any(isinstance(e, (Received, ChannelEstablished)) for e in events)
    assert any(isinstance(e, Dropped) for e in events)
    assert WORLD.server.state_snapshot() == before


@SETTINGS
@given(st.integers(0, 0xFFFF), st.binary(min_size=17, max_size=64), st.integers(0, 2))
def test_records_for_unknown_sessions_are_dropped(sid: int, body: bytes, ll: int) -> None:
    header = bytes([0xC0 | (ll << 2)]) + sid.to_bytes(2, "big") + b"\x00" * (ll + 1)
    _check_dropped(header + body)


def test_reordered_records_are_each_accepted_once() -> None:
    w = World()
    sent = [
        next(e.data for e in w.client.send(w.channel, b"r%d" % i) if isinstance(e, Transmit))
        for i in range(40)
    ]
    order = list(range(40))
    random.Random(3).shuffle(order)
    got = []
    for i in order + order[:10]:
        got += [
            e.plaintext
            for e in w.server.datagram_received(sent[i], CLIENT)
            if isinstance(e, Received)
        ]
    assert sorted(got) == sorted(b"r%d" % i for i in range(40))
    assert w.server.stats["dropped.replay"] == 10


def test_records_older_than_the_window_are_dropped() -> None:
    w = World()
    sent = [
        next(e.data for e in w.client.send(w.channel, b"o%d" % i) if isinstance(e, Transmit))
        for i in range(400)
    ]
    w.server.datagram_received(sent[-1], CLIENT)
    before = w.server.state_snapshot()
    ev = w.server.datagram_received(sent[200], CLIENT)
    assert [e.reason for e in ev if isinstance(e, Dropped)] == ["too_old"]
    assert w.server.state_snapshot() == before
    # a record of the first 128 (a 1-byte packet number) that long after expands to a
    # number it was not sealed with: dropped all the same
    ev = w.server.datagram_received(sent[0], CLIENT)
    assert [e.reason for e in ev if isinstance(e, Dropped)] == ["auth_failed"]
    assert w.server.state_snapshot() == before
    assert [
        e.plaintext
        for e in w.server.datagram_received(sent[350], CLIENT)
        if isinstance(e, Received)
    ] == [b"o350"]


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=200))
def test_xx1_garbage_never_raises_and_touches_no_established_session(body: bytes) -> None:
    w = WORLD
    established = [c for c in w.server.state_snapshot()[1]]
    events = w.server.datagram_received(b"\x83\x00\x01" + body, ("192.0.2.7", 5))
    assert not any(isinstance(e, (Received, ChannelEstablished)) for e in events)
    assert [c for c in w.server.state_snapshot()[1]] == established
