"""The unknown-session hint (0x88) and the Heard event, sans-I/O on the fake network.

A restarted server answers the idle client's next keep-alive with a 3-byte hint;
the client re-handshakes and carries on. Forged hints cost at most one handshake
per holdoff and never break a session; a responder ignores them; hints are
rate-limited both ways.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.noise import (
    ChannelEstablished,
    Dropped,
    Heard,
    Received,
    Transmit,
)
from synapse_coap.noise.lost import HINT_BURST, SMALL_TYPES, UNKNOWN_SESSION, hint
from tests.unit.test_keepalive import INTERVAL, SERVER_ADDR, KeepAliveNode, idle, setup

ATTACKER = ("10.9.9.9", 6666)


def _server_channel(server: KeepAliveNode) -> int:
    (channel,) = {e.channel for e in server.events if isinstance(e, Received)}
    return channel


def _client_sid_of_server(client: KeepAliveNode, channel: int) -> int:
    """The session id the client addresses its records to (the server's own id)."""
    ch = client.endpoint._channels[channel]
    assert ch.session is not None and ch.session.remote_sid is not None
    return ch.session.remote_sid


def test_golden_hint() -> None:
    assert hint(0x1234) == bytes.fromhex("881234")
    assert hint(0xFFFF) == b"\x88\xff\xff"
    assert UNKNOWN_SESSION == 0x88


def test_a_restarted_server_answers_the_next_keepalive_with_a_hint_and_the_client_reconnects() -> (
    None
):
    net, client, server, channel = setup()
    server.restart()  # all session state lost, same static key
    established_before = sum(isinstance(e, ChannelEstablished) for e in client.events)
    sent0, bytes0 = net.datagrams_sent, net.bytes_sent
    idle(net, net.clock.now + INTERVAL + 5)
    assert server.endpoint.stats.get("lost_hints.sent", 0) == 1
    assert client.endpoint.stats.get("lost_hints.received", 0) == 1
    # the client re-handshook at once (not after the 900 s idle timeout)
    established = [e for e in client.events if isinstance(e, ChannelEstablished)]
    assert len(established) == established_before + 1
    assert established[-1].channel == channel
    # keep-alive (22) + hint (3) + the IK handshake, nothing more
    assert net.datagrams_sent - sent0 <= 2 + 3
    # and the new session works both ways
    net.emit(client, client.endpoint.send(channel, b"after"))
    idle(net, net.clock.now + 5)
    got = [e for e in server.events if isinstance(e, Received)]
    assert got and got[-1].plaintext == b"after"
    net.emit(server, server.endpoint.send(got[-1].channel, b"push"))
    idle(net, net.clock.now + 5)
    assert [e.plaintext for e in client.events if isinstance(e, Received)][-1] == b"push"
    assert net.bytes_sent > bytes0


def test_a_keepalive_is_heard_on_the_server_side() -> None:
    net, _client, server, _channel = setup()
    server_channel = _server_channel(server)
    idle(net, net.clock.now + INTERVAL + 5)
    heard = [e for e in server.events if isinstance(e, Heard)]
    assert heard == [Heard(server_channel)]


def test_forged_hints_cost_at_most_one_rehandshake_and_never_break_the_session() -> None:
    net, client, server, channel = setup()
    sid = _client_sid_of_server(client, channel)
    # from another address, or with another session id: ignored
    assert all(
        isinstance(e, Dropped) and e.reason == "unexpected_lost_hint"
        for e in client.endpoint.datagram_received(hint(sid), ATTACKER)
        + client.endpoint.datagram_received(hint(sid ^ 1), SERVER_ADDR)
    )
    # spoofing the server's address with the right id, many times: one re-handshake
    # (the holdoff suppresses the rest), and the session keeps working
    for _ in range(50):
        net.emit(client, client.endpoint.datagram_received(hint(sid), SERVER_ADDR))
    assert client.endpoint.stats.get("rehandshakes", 0) == 1
    idle(net, net.clock.now + 5)
    net.emit(client, client.endpoint.send(channel, b"still"))
    idle(net, net.clock.now + 5)
    assert [e.plaintext for e in server.events if isinstance(e, Received)][-1] == b"still"
    assert client.endpoint.channel_open(channel)
    assert not client.reused_nonces() and not server.reused_nonces()


def test_a_responder_ignores_hints() -> None:
    net, client, server, _channel = setup()
    server_channel = _server_channel(server)
    ch = server.endpoint._channels[server_channel]
    assert ch.session is not None and ch.session.remote_sid is not None
    before = server.endpoint.state_snapshot()
    events = server.endpoint.datagram_received(hint(ch.session.remote_sid), client.addr)
    assert [(type(e), getattr(e, "reason", None)) for e in events] == [
        (Dropped, "unexpected_lost_hint")
    ]
    assert server.endpoint.state_snapshot() == before
    assert server.endpoint.stats.get("rehandshakes", 0) == 0
    del net


def test_hints_are_rate_limited() -> None:
    net, _client, server, _channel = setup()
    record = bytes([0xC0, 0x12, 0x34, 0x00, 0x00]) + b"\x00" * 16  # unknown session 0x1234
    hints = 0
    for _ in range(200):  # all at the same instant
        events = server.endpoint.datagram_received(record, ATTACKER)
        hints += sum(isinstance(e, Transmit) for e in events)
        assert all(
            not isinstance(e, Transmit) or (e.data == hint(0x1234) and e.addr == ATTACKER)
            for e in events
        )
    assert hints == HINT_BURST
    assert server.endpoint.stats["lost_hints.suppressed"] == 200 - HINT_BURST
    net.clock.now += 1.0  # ten more a second
    got = sum(
        isinstance(e, Transmit)
        for _ in range(50)
        for e in server.endpoint.datagram_received(record, ATTACKER)
    )
    assert got == 10


def test_a_record_too_short_to_be_one_gets_no_hint() -> None:
    _net, _client, server, _channel = setup()
    events = server.endpoint.datagram_received(
        bytes([0xC0, 0x12, 0x34, 0x00]) + b"\x00" * 10, ATTACKER
    )
    assert not any(isinstance(e, Transmit) for e in events)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=8))
def test_any_hint_shaped_datagram_leaves_the_client_working(tail: bytes) -> None:
    net, client, server, channel = setup()
    for addr in (SERVER_ADDR, ATTACKER):
        for kind in sorted(SMALL_TYPES):
            for ev in client.endpoint.datagram_received(bytes([kind]) + tail, addr):
                # at most a re-handshake or a keep-alive toward the server it talks to,
                # or a hint no longer than the datagram, to its source
                assert not isinstance(ev, Transmit) or (
                    ev.addr == SERVER_ADDR or len(ev.data) <= 1 + len(tail)
                )
                assert not isinstance(ev, Received)
            # and the server answers nothing longer than what it got, only to its source
            for ev in server.endpoint.datagram_received(bytes([kind]) + tail, addr):
                assert not isinstance(ev, Transmit) or (
                    ev.addr == addr and len(ev.data) <= 1 + len(tail)
                )
    net.emit(client, client.endpoint.send(channel, b"ok"))
    idle(net, net.clock.now + 10)
    assert [e.plaintext for e in server.events if isinstance(e, Received)][-1] == b"ok"
    assert client.endpoint.channel_open(channel)


def test_golden_ping_and_path_hint() -> None:
    from synapse_coap.noise.lost import NAT_PING, PATH_HINT

    assert hint(0x1234, NAT_PING) == bytes.fromhex("891234")
    assert hint(0x1234, PATH_HINT) == bytes.fromhex("8a1234")


def test_a_restarted_server_answers_the_next_ping_with_the_unknown_session_hint() -> None:
    net, client, server, channel = setup()
    server.restart()
    idle(net, net.clock.now + INTERVAL + 5)
    # the keep-alive was a ping (a record was sealed lately), answered as a record would be
    assert client.endpoint.stats.get("pings.out", 0) == 1
    assert server.endpoint.stats.get("lost_hints.sent", 0) == 1
    assert client.endpoint.stats.get("rehandshakes", 0) == 1
    assert client.endpoint.channel_open(channel)


def test_a_ping_from_the_sessions_address_gets_no_answer_and_others_get_three_bytes() -> None:
    from synapse_coap.noise.lost import NAT_PING, PATH_HINT

    _net, client, server, channel = setup()
    sid = _client_sid_of_server(client, channel)
    assert server.endpoint.datagram_received(hint(sid, NAT_PING), client.addr) == [
        Heard(_server_channel(server))
    ]
    moved = server.endpoint.datagram_received(hint(sid, NAT_PING), ATTACKER)
    assert [e.data for e in moved if isinstance(e, Transmit)] == [hint(sid, PATH_HINT)]
    unknown = server.endpoint.datagram_received(hint(sid ^ 1, NAT_PING), ATTACKER)
    assert [e.data for e in unknown if isinstance(e, Transmit)] == [hint(sid ^ 1)]
    # nothing of a ping's is ever longer than the ping; a malformed one gets nothing
    assert all(len(e.data) <= 3 for e in moved + unknown if isinstance(e, Transmit))
    assert not any(
        isinstance(e, Transmit)
        for e in server.endpoint.datagram_received(hint(sid, NAT_PING) + b"x", client.addr)
    )


def test_forged_path_hints_cost_at_most_a_sealed_keepalive_each_and_are_limited() -> None:
    from synapse_coap.noise.lost import PATH_HINT

    net, client, server, channel = setup()
    sid = _client_sid_of_server(client, channel)
    # from another address, or for another session id: dropped
    assert all(
        isinstance(e, Dropped) and e.reason == "unexpected_path_hint"
        for e in client.endpoint.datagram_received(hint(sid, PATH_HINT), ATTACKER)
        + client.endpoint.datagram_received(hint(sid ^ 1, PATH_HINT), SERVER_ADDR)
    )
    sent = 0
    for _ in range(100):  # spoofing the server's address, all at one instant
        evs = client.endpoint.datagram_received(hint(sid, PATH_HINT), SERVER_ADDR)
        sent += sum(isinstance(e, Transmit) for e in evs)
        net.emit(client, evs)
    assert sent <= HINT_BURST
    idle(net, net.clock.now + 5)
    net.emit(client, client.endpoint.send(channel, b"still"))
    idle(net, net.clock.now + 5)
    assert [e.plaintext for e in server.events if isinstance(e, Received)][-1] == b"still"
    assert not client.reused_nonces() and not server.reused_nonces()
