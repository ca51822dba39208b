"""The bounded cache of ChaCha20-Poly1305 objects (noise/records.py): same results as a
fresh object, bounded, and no key kept once it is replaced (rekey) or its session ends."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from fake_link import Clock, Network, Node
from hypothesis import given
from hypothesis import strategies as st

from synapse_coap.noise import MemoryTrustStore, NoiseLimits, TrustPolicy, records
from synapse_coap.noise.events import Received

SERVER = ("127.0.0.1", 5683)
CLIENT = ("127.0.0.1", 40000)


@given(key=st.binary(min_size=32, max_size=32), plaintext=st.binary(max_size=300))
def test_a_cached_object_seals_and_opens_as_a_fresh_one(key: bytes, plaintext: bytes) -> None:
    header = b"\x40\x01\x02"
    sealed = records.aead_for(key).encrypt(records.nonce(7), plaintext, header)
    assert sealed == ChaCha20Poly1305(key).encrypt(records.nonce(7), plaintext, header)
    assert records.aead_for(key) is records.aead_for(key)
    assert records.open_record(records.aead_for(key), 7, header, sealed) == plaintext


def test_the_cache_is_bounded_and_drops_the_oldest_key_first() -> None:
    keys = [os.urandom(32) for _ in range(records.AEAD_CACHE_SIZE + 10)]
    for key in keys:
        records.aead_for(key)
    assert records.aead_cache_len() <= records.AEAD_CACHE_SIZE
    assert not any(records.cached_aead(k) for k in keys[:10])
    assert all(records.cached_aead(k) for k in keys[-records.AEAD_CACHE_SIZE :])
    for key in keys:
        records.forget_aead(key)
    assert not any(records.cached_aead(k) for k in keys)


def test_a_rekey_forgets_the_replaced_send_key() -> None:
    keys = records.SendKeys(os.urandom(32), now=0.0)
    old = keys.key
    keys.aead.encrypt(records.nonce(0), b"x", b"")
    assert records.cached_aead(old)
    keys.update(now=1.0)
    assert not records.cached_aead(old) and keys.key != old
    records.forget_aead(keys.key)


def _session_keys(node: Node) -> set[bytes]:
    sessions = node.endpoint.state_snapshot()[0]
    keys: set[bytes] = set()
    for _sid, snap in sessions:
        assert isinstance(snap, tuple)
        for part in (snap[9], snap[10]):
            if part is not None:
                keys.add(part[0])
    return keys


def test_the_keys_of_a_closed_session_leave_the_cache() -> None:
    clock = Clock()
    net = Network(clock, seed=3)
    server = net.add(
        Node(
            "server",
            SERVER,
            os.urandom(32),
            trust=TrustPolicy(accept_any_initiator=True),
            clock=clock,
            seed=1,
            limits=NoiseLimits(),
        )
    )
    client = net.add(
        Node(
            "client",
            CLIENT,
            os.urandom(32),
            trust=TrustPolicy(store=MemoryTrustStore()),
            clock=clock,
            seed=2,
        )
    )
    channel, events = client.endpoint.connect(SERVER, peer_name="example.org", peer_static=None)
    net.emit(client, events)
    net.settle(until=clock.now + 1.0)
    net.emit(client, client.endpoint.send(channel, b"\x40\x01\x00\x01"))
    net.settle(until=clock.now + 1.0)
    assert any(isinstance(e, Received) for e in server.events)
    keys = _session_keys(client)
    assert keys and all(records.cached_aead(k) for k in keys)
    net.emit(client, client.endpoint.close(channel))
    assert not any(records.cached_aead(k) for k in keys)
