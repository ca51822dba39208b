"""A NoiseEndpoint holding many sessions: no per-datagram pass over all of them.

Deterministic (injected clock, seeded keys). Counts work exactly (how many
sessions a timer question looks at), never wall time.
"""

from __future__ import annotations

import random

from synapse_coap.noise import (
    ChannelClosed,
    ChannelEstablished,
    NoiseEndpoint,
    NoiseLimits,
    Received,
    Transmit,
    TrustPolicy,
    public_key,
)

SERVER = ("127.0.0.1", 5683)
N = 200


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(seed: int) -> bytes:
    return random.Random(seed).randbytes(32)


def _brute_force_next_timer(ep: NoiseEndpoint) -> float | None:
    times = [ep._deadlines._session_deadline(s) for s in ep._sessions.values()]
    found = [t for t in times if t is not None]
    return min(found) if found else None


def _open_many(
    n: int,
) -> tuple[Clock, NoiseEndpoint, list[tuple[NoiseEndpoint, int, tuple[str, int]]]]:
    """``n`` clients (each its own key and address) with one session each to a server."""
    clock = Clock()
    limits = NoiseLimits(max_sessions=4 * n, handshakes_per_second=1e6, handshake_burst=10**6)
    server = NoiseEndpoint(
        _key(1), trust=TrustPolicy(accept_any_initiator=True), limits=limits, clock=clock
    )
    clients: list[tuple[NoiseEndpoint, int, tuple[str, int]]] = []
    for i in range(n):
        client = NoiseEndpoint(_key(100 + i), trust=TrustPolicy(), clock=clock)
        addr = (f"127.0.{i // 250}.{i % 250 + 1}", 40000)
        cid, events = client.connect(SERVER, peer_name="s", peer_static=public_key(_key(1)))
        clients.append((client, cid, addr))
        for _ in range(6):
            out = []
            for ev in events:
                if not isinstance(ev, Transmit):
                    continue
                if ev.addr == SERVER:
                    out += server.datagram_received(ev.data, addr)
                else:
                    out += client.datagram_received(ev.data, SERVER)
            if not out:
                clock.now += 0.1  # IK2 may wait for a reply to piggyback (reply_wait)
                out = server.handle_timers()
            events = out
            if any(isinstance(e, ChannelEstablished) and e.initiator for e in events):
                break
        clock.now += 0.001
    return clock, server, clients


def test_a_record_on_a_full_endpoint_looks_at_one_session_for_the_next_timer() -> None:
    _clock, server, clients = _open_many(N)
    assert server.active_channels() == N
    server.next_timer()
    before = server._deadlines.deadlines_computed
    got = []
    client, cid, addr = clients[N // 2]
    for ev in client.send(cid, b"\x40\x01\x00\x01"):
        assert isinstance(ev, Transmit)
        got += server.datagram_received(ev.data, addr)
    assert [type(e) for e in got if not isinstance(e, Transmit)] == [Received]
    at = server.next_timer()
    looked = server._deadlines.deadlines_computed - before
    assert looked <= 3, looked  # the touched session (and the heap's top), not all N
    assert at == _brute_force_next_timer(server)


def test_next_timer_is_exact_and_idle_sessions_all_close_on_time() -> None:
    clock, server, _clients = _open_many(N)
    first = server.next_timer()
    assert first == _brute_force_next_timer(server)
    assert first is not None
    closed = 0
    # walk the timers: every session closes at its own idle deadline, none early
    while (at := server.next_timer()) is not None:
        assert at == _brute_force_next_timer(server)
        clock.now = at - 1e-6
        assert not any(isinstance(e, ChannelClosed) for e in server.handle_timers())
        clock.now = at
        closed += sum(isinstance(e, ChannelClosed) for e in server.handle_timers())
    assert closed == N and server.active_channels() == 0
    assert at is None and clock.now >= first + 0  # (the last deadline was reached)


def test_sessions_hold_no_per_instance_dict_and_no_cipher_objects() -> None:
    _clock, server, _clients = _open_many(3)
    for s in server._sessions.values():
        assert not hasattr(s, "__dict__")
        assert s.send is not None and not hasattr(s.send, "__dict__")
        assert isinstance(s.send.key, bytes)  # the AEAD context is made per record
