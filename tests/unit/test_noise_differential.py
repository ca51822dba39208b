"""Our Noise handshake against noiseprotocol 0.3.1 on random keys, prologues and payloads.

The vectors (test_noise_vectors.py) fix one set of keys per protocol; this
drives both implementations with the same random keys and asserts every
message, payload, split key and handshake hash is identical. noiseprotocol is
a development dependency only (the package no longer imports it).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.noise.handshake import Driver
from synapse_coap.noise.keys import public_key

noise_connection = pytest.importorskip("noise.connection")
noise_keypairs = pytest.importorskip("noise.backends.default.keypairs")

key = st.binary(min_size=32, max_size=32)
payload = st.binary(max_size=64)


def _reference(pattern: str, initiator: bool, s: bytes, rs: bytes | None, e: bytes, pro: bytes):
    conn = noise_connection.NoiseConnection.from_name(
        f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2s".encode()
    )
    conn.set_prologue(pro)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, s)
    if rs is not None:
        conn.set_keypair_from_public_bytes(noise_connection.Keypair.REMOTE_STATIC, rs)
    conn.start_handshake()
    # noiseprotocol has no public way to fix the ephemeral key (the vectors need it too)
    conn.noise_protocol.handshake_state.e = noise_keypairs.KeyPair25519.from_private_bytes(e)
    return conn


@settings(max_examples=25, deadline=None)
@given(
    pattern=st.sampled_from(["IK", "XX"]),
    keys=st.tuples(key, key, key, key),
    prologue=st.binary(max_size=40),
    payloads=st.lists(payload, min_size=3, max_size=3),
)
def test_same_bytes_as_noiseprotocol(
    pattern: str, keys: tuple[bytes, bytes, bytes, bytes], prologue: bytes, payloads: list[bytes]
) -> None:
    i_s, r_s, i_e, r_e = keys
    r_pub = public_key(r_s)
    ours = [
        Driver(
            pattern=pattern,
            initiator=True,
            static_private=i_s,
            remote_static=r_pub if pattern == "IK" else None,
            ephemeral_private=i_e,
            prologue=prologue,
        ),
        Driver(
            pattern=pattern,
            initiator=False,
            static_private=r_s,
            remote_static=None,
            ephemeral_private=r_e,
            prologue=prologue,
        ),
    ]
    ref = [
        _reference(pattern, True, i_s, r_pub if pattern == "IK" else None, i_e, prologue),
        _reference(pattern, False, r_s, None, r_e, prologue),
    ]
    for n in range(2 if pattern == "IK" else 3):
        w, r = n % 2, 1 - n % 2
        ours[w], message = ours[w].write(payloads[n])
        assert message == bytes(ref[w].write_message(payloads[n]))
        ours[r], got = ours[r].read(message)
        assert got == bytes(ref[r].read_message(message)) == payloads[n]
    for side in (0, 1):
        split = ours[side].split
        assert split is not None
        proto = ref[side].noise_protocol
        assert split.send_key == bytes(proto.cipher_state_encrypt.k)
        assert split.recv_key == bytes(proto.cipher_state_decrypt.k)
        assert split.handshake_hash == bytes(ref[side].get_handshake_hash())
