"""Two NoiseEndpoints over a hostile fake link: loss, reordering, duplication, rebinding."""

from __future__ import annotations

import random

from fake_link import (
    Clock,
    ExchangeClient,
    ExchangeServer,
    LinkProfile,
    Network,
    Node,
)

from synapse_coap.noise import MemoryTrustStore, NoiseLimits, TrustPolicy

SERVER = ("127.0.0.1", 5683)
CLIENT = ("127.0.0.1", 40000)
N_EXCHANGES = 10_000
IN_FLIGHT = 16


def _keys(seed: int) -> tuple[bytes, bytes]:
    r = random.Random(seed)
    return r.randbytes(32), r.randbytes(32)


def test_10000_exchanges_over_a_lossy_reordering_duplicating_rebinding_link() -> None:
    clock = Clock()
    net = Network(
        clock, seed=7, profile=LinkProfile(loss=0.3, duplicate=0.05, delay=0.05, jitter=0.3)
    )
    ks, kc = _keys(1)
    limits = NoiseLimits(rekey_after_packets=700)  # many key-phase flips under reordering
    server = net.add(
        Node(
            "server",
            SERVER,
            ks,
            trust=TrustPolicy(accept_any_initiator=True),
            clock=clock,
            seed=11,
            limits=limits,
            app_payload=b"example.org",
        )
    )
    client = net.add(
        Node(
            "client",
            CLIENT,
            kc,
            trust=TrustPolicy(store=MemoryTrustStore()),
            clock=clock,
            seed=12,
            limits=limits,
        )
    )
    channel, events = client.endpoint.connect(SERVER, peer_name="example.org", peer_static=None)
    net.emit(client, events)
    srv = ExchangeServer(server, net)
    cli = ExchangeClient(client, net, channel)
    next_xid = 0
    rebinds = 0
    steps = 0
    while (next_xid < N_EXCHANGES or cli.pending) and steps < 2_000_000:
        steps += 1
        while len(cli.pending) < IN_FLIGHT and next_xid < N_EXCHANGES:
            cli.start(next_xid)
            next_xid += 1
            if next_xid % 2500 == 0:
                # NAT rebinding: the client's port changes; in-flight replies to the old port are lost.
                rebinds += 1
                client.addr = ("127.0.0.1", 40000 + rebinds)
        t = cli.next_timer()
        if not net.step([t]):
            break
        if t is not None and t <= clock.now:
            cli.run_timers()

    assert set(srv.executed) == set(range(N_EXCHANGES))
    assert all(n == 1 for n in srv.executed.values())
    assert set(cli.completed) == set(range(N_EXCHANGES))
    assert all(n == 1 for n in cli.completed.values())
    assert not cli.pending
    # No nonce reused under any key, on either side.
    assert client.reused_nonces() == [] and server.reused_nonces() == []
    assert len(client.nonces) > N_EXCHANGES and len(server.nonces) > N_EXCHANGES
    # No duplicated or replayed datagram was ever accepted twice.
    assert client.replays_accepted == 0 and server.replays_accepted == 0
    s_stats, c_stats = server.endpoint.stats, client.endpoint.stats
    assert s_stats.get("dropped.replay", 0) > 0  # the link did duplicate records
    assert s_stats.get("rekeys", 0) > 5 and c_stats.get("rekeys", 0) > 5
    assert s_stats.get("migrations", 0) >= rebinds
    assert server.endpoint.channel_info(1).addr == client.addr
    print(
        f"\nexchanges={N_EXCHANGES} virtual_seconds={clock.now - 1000:.0f} "
        f"retransmissions={cli.retransmissions} suspicions={cli.suspicions} "
        f"client={c_stats} server={s_stats}"
    )
