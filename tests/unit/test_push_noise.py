"""A forged or replayed push notification is dropped by the Noise layer.

A notification is a record the *server* sends unprompted (no request in
flight from the client), so it is checked on the client's endpoint: the
genuine record is delivered once; the same bytes again (a replay), a record
with one bit flipped (forged) and a record sealed by someone else are dropped
and counted, never delivered.
"""

from __future__ import annotations

from test_noise_endpoint import Pair, of, tx

from synapse_coap.noise.events import Dropped, Received


def test_replayed_and_forged_notifications_are_dropped_by_the_client() -> None:
    p = Pair()
    ch = p.connect()
    (server_ch,) = {e.channel for e in p.server_events if hasattr(e, "channel")}
    notification = b"\x44\x45\x12\x34push: a /sync response"
    (record,) = tx(p.server.send(server_ch, notification))
    got = p.client.datagram_received(record.data, ("127.0.0.1", 5683))
    assert [e.plaintext for e in of(got, Received)] == [notification]
    assert all(e.channel == ch for e in of(got, Received))

    replay = p.client.datagram_received(record.data, ("127.0.0.1", 5683))
    forged = bytearray(record.data)
    forged[-1] ^= 0x01
    tampered = p.client.datagram_received(bytes(forged), ("127.0.0.1", 5683))
    # a record from an attacker who knows the session id but not the keys
    fake = bytes(record.data[:8]) + b"\x00" * (len(record.data) - 8)
    spoofed = p.client.datagram_received(fake, ("127.0.0.1", 5683))
    for events in (replay, tampered, spoofed):
        assert not of(events, Received), events
        assert of(events, Dropped), events
