"""NAT keep-alive of the session layer (issue 11 item 4), sans-I/O on the fake network.

The client (initiator) sends a one-way keep-alive after ``keepalive_interval``
seconds in which it sent nothing: a 3-byte NAT ping while it sealed a record
within the last 3 intervals, else a sealed keep-alive record; the server never
answers either (while all is well). The sealed ones keep both ends' sessions from
expiring while nothing is pushed; after a NAT rebinding the ping from the new
address gets a path hint, the client answers with a sealed keep-alive, and that
moves the server's session to the client's new address, so pushes reach the
client again.
"""

from __future__ import annotations

from synapse_coap.noise import NoiseEndpoint, NoiseLimits, Received, TrustPolicy
from synapse_coap.noise.keys import generate_private_key, public_key
from tests.unit.fake_link import Clock, Network, Node

CLIENT_ADDR = ("10.0.0.2", 40000)
SERVER_ADDR = ("10.0.0.1", 5683)
INTERVAL = 110.0
LIMITS = NoiseLimits(idle_timeout=900.0)


class KeepAliveNode(Node):
    def __init__(
        self, *args: object, keepalive: float | None = None, ping: bool = True, **kwargs: object
    ) -> None:
        self.keepalive = keepalive
        self.ping = ping
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _make(self, trust, limits, app_payload, profiles):  # type: ignore[no-untyped-def]
        return NoiseEndpoint(
            self.private,
            trust=trust,
            limits=limits,
            profiles=profiles,
            app_payload=app_payload,
            clock=self.clock,
            rng=self._rng.randbytes,
            keepalive_interval=self.keepalive,
            keepalive_ping=self.ping,
        )


def setup(
    keepalive: float | None = INTERVAL, ping: bool = True
) -> tuple[Network, KeepAliveNode, Node, int]:
    clock = Clock()
    net = Network(clock, seed=1)
    skey = generate_private_key()
    server = net.add(
        Node(
            "server",
            SERVER_ADDR,
            skey,
            trust=TrustPolicy(accept_any_initiator=True),
            clock=clock,
            seed=2,
            limits=LIMITS,
        )
    )
    client = KeepAliveNode(
        "client",
        CLIENT_ADDR,
        generate_private_key(),
        trust=TrustPolicy(pinned={"hs": public_key(skey)}),
        clock=clock,
        seed=3,
        limits=LIMITS,
        keepalive=keepalive,
        ping=ping,
    )
    net.add(client)
    channel, events = client.endpoint.connect(SERVER_ADDR, peer_name="hs", peer_static=None)
    net.emit(client, events)
    net.emit(client, client.endpoint.send(channel, b"hello"))
    net.settle(until=clock.now + 5)
    assert any(isinstance(e, Received) for e in server.events)
    return net, client, server, channel


def idle(net: Network, until: float) -> None:
    """Run every timer and delivery up to ``until``, then stand at ``until``."""
    net.settle(until=until)
    net.clock.now = max(net.clock.now, until)


def test_idle_client_pings_twice_then_seals_one_keepalive_and_nothing_comes_back() -> None:
    net, client, server, _channel = setup()
    start, sent0, bytes0 = net.clock.now, net.datagrams_sent, net.bytes_sent
    idle(net, start + 10 * 60)
    # 10 minutes idle: a keep-alive every 110 s of silence (5 of them): pings (3 bytes)
    # at 110 and 220 s, a sealed record (21 bytes: 1-byte packet number) at 330 s
    # (nothing sealed for 3 intervals), pings at 440 and 550 s; one-way: the server
    # sends nothing
    assert net.datagrams_sent - sent0 == 5
    assert net.bytes_sent - bytes0 == 4 * 3 + 21
    assert client.endpoint.stats.get("pings.out", 0) == 4
    assert client.endpoint.stats.get("keepalives", 0) == 1
    assert server.endpoint.stats.get("pings.in", 0) == 4


def test_without_pings_every_keepalive_is_a_sealed_record() -> None:
    net, client, _server, _channel = setup(ping=False)
    start, sent0, bytes0 = net.clock.now, net.datagrams_sent, net.bytes_sent
    idle(net, start + 10 * 60)
    assert net.datagrams_sent - sent0 == 5
    assert net.bytes_sent - bytes0 == 5 * 21  # (1-byte packet numbers: a young session)
    assert client.endpoint.stats.get("keepalives", 0) == 5


def test_sealed_keepalives_come_often_enough_for_a_short_idle_timeout() -> None:
    # with idle_timeout 300 s, 3 intervals (330 s) would be too late: the cap is 2/3 of it
    from synapse_coap.noise.lost import PING_AUTH_EVERY

    assert PING_AUTH_EVERY * INTERVAL > 300
    net, client, _server, channel = setup()
    client.endpoint.limits = NoiseLimits(idle_timeout=300.0)
    idle(net, net.clock.now + 3 * 900)
    assert client.endpoint.channel_open(channel)
    assert client.endpoint.stats.get("keepalives", 0) >= 3 * 900 // 220


def test_keepalives_keep_both_sessions_past_the_idle_timeout() -> None:
    net, client, server, channel = setup()
    idle(net, net.clock.now + 3 * 900)
    assert client.endpoint.channel_open(channel)
    # the server's session is alive too: a push to the client needs no handshake
    (server_channel,) = {e.channel for e in server.events if isinstance(e, Received)}
    before = len(client.events)
    net.emit(server, server.endpoint.send(server_channel, b"push"))
    idle(net, net.clock.now + 5)
    got = [e for e in client.events[before:] if isinstance(e, Received)]
    assert [e.plaintext for e in got] == [b"push"]


def test_without_keepalives_an_unanswered_client_session_expires() -> None:
    net, client, _server, channel = setup(keepalive=None)
    idle(net, net.clock.now + 901)
    assert not client.endpoint.channel_open(channel)


def test_traffic_postpones_the_keepalive() -> None:
    net, client, _server, channel = setup()
    t0 = net.clock.now
    idle(net, t0 + 100)
    net.emit(client, client.endpoint.send(channel, b"request"))
    idle(net, t0 + 200)  # 110 s after the first exchange, but 100 s after the request
    assert client.endpoint.stats.get("pings.out", 0) == 0
    idle(net, t0 + 211)
    assert client.endpoint.stats.get("pings.out", 0) == 1


def test_a_keepalive_moves_the_server_to_the_clients_new_address_after_a_rebinding() -> None:
    net, client, server, _channel = setup()
    (server_channel,) = {e.channel for e in server.events if isinstance(e, Received)}
    t0 = net.clock.now
    client.addr = ("10.0.0.2", 41234)  # the NAT gave the client a new public port
    # the next keep-alive is a ping from there: the server answers a path hint, the
    # client a sealed keep-alive, which moves the server's session
    idle(net, t0 + INTERVAL + 5)
    assert server.endpoint.stats.get("path_hints.sent", 0) == 1
    assert client.endpoint.stats.get("path_hints.received", 0) == 1
    assert client.endpoint.stats.get("keepalives", 0) == 1
    before = len(client.events)
    net.emit(server, server.endpoint.send(server_channel, b"push"))
    idle(net, net.clock.now + 5)
    got = [e for e in client.events[before:] if isinstance(e, Received)]
    assert [e.plaintext for e in got] == [b"push"]
    assert server.endpoint.stats.get("migrations", 0) == 1


def test_keepalive_interval_must_be_positive() -> None:
    import pytest

    from synapse_coap.errors import ConfigValueError

    with pytest.raises(ConfigValueError) as e:
        NoiseEndpoint(
            generate_private_key(), trust=TrustPolicy(), clock=Clock(), keepalive_interval=0
        )
    assert e.value.path == "keepalive_interval"


def test_on_a_link_of_known_rate_keepalives_take_at_most_half_a_percent() -> None:
    from synapse_coap.transport.link import KEEPALIVE_IP_BYTES, keepalive_interval

    assert keepalive_interval(110.0, None) == 110.0
    assert keepalive_interval(110.0, 1_000_000.0) == 110.0
    slow = keepalive_interval(110.0, 100.0)
    assert slow == 800.0
    assert 8 * KEEPALIVE_IP_BYTES / (slow * 100.0) == 0.005
    assert keepalive_interval(1000.0, 100.0) == 1000.0  # a longer request stands
