"""The public Noise test vectors (cacophony, snow) for the two protocol names we use.

The vectors' fixed ephemeral keys and prologue are fed to our handshake driver
(:class:`synapse_coap.noise.handshake.Driver`, our Noise handshake), and
the transport messages are sealed with our explicit-nonce record primitives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from synapse_coap.noise import records
from synapse_coap.noise.handshake import Driver
from synapse_coap.noise.keys import public_key

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors" / "noise"
NAMES = {
    "Noise_IK_25519_ChaChaPoly_BLAKE2s": "IK",
    "Noise_XX_25519_ChaChaPoly_BLAKE2s": "XX",
}


def _load() -> list[tuple[str, dict[str, object]]]:
    out = []
    for path in sorted(VECTOR_DIR.glob("*.json")):
        for vector in json.loads(path.read_text())["vectors"]:
            name = vector.get("protocol_name") or vector.get("name")
            if name in NAMES:
                out.append((f"{path.stem}:{name}", vector))
    return out


VECTORS = _load()


def test_both_names_from_both_sources_are_present() -> None:
    ids = {vid for vid, _ in VECTORS}
    for src in ("cacophony", "snow"):
        for name in NAMES:
            assert f"{src}:{name}" in ids


@pytest.mark.parametrize(("vid", "vector"), VECTORS, ids=[v for v, _ in VECTORS])
def test_vector(vid: str, vector: dict[str, object]) -> None:
    h = bytes.fromhex
    pattern = NAMES[str(vector.get("protocol_name") or vector.get("name"))]
    init_remote = vector.get("init_remote_static")
    resp_static = h(str(vector["resp_static"]))
    if init_remote is not None:
        assert h(str(init_remote)) == public_key(resp_static)
    initiator = Driver(
        pattern=pattern,
        initiator=True,
        static_private=h(str(vector["init_static"])),
        remote_static=h(str(init_remote)) if init_remote is not None else None,
        ephemeral_private=h(str(vector["init_ephemeral"])),
        prologue=h(str(vector["init_prologue"])),
    )
    responder = Driver(
        pattern=pattern,
        initiator=False,
        static_private=resp_static,
        remote_static=None,
        ephemeral_private=h(str(vector["resp_ephemeral"])),
        prologue=h(str(vector["resp_prologue"])),
    )
    messages = vector["messages"]
    assert isinstance(messages, list)
    n_handshake = 2 if pattern == "IK" else 3
    for i, msg in enumerate(messages[:n_handshake]):
        payload, ciphertext = h(msg["payload"]), h(msg["ciphertext"])
        writer, reader = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        writer, wire = writer.write(payload)
        assert wire == ciphertext, f"handshake message {i}"
        reader, got = reader.read(wire)
        assert got == payload
        if i % 2 == 0:
            initiator, responder = writer, reader
        else:
            responder, initiator = writer, reader
    assert initiator.split is not None and responder.split is not None
    assert initiator.split.handshake_hash == responder.split.handshake_hash
    if "handshake_hash" in vector:
        assert initiator.split.handshake_hash == h(str(vector["handshake_hash"]))
    assert initiator.split.send_key == responder.split.recv_key
    assert initiator.split.recv_key == responder.split.send_key
    assert initiator.split.remote_static == public_key(resp_static)
    assert responder.split.remote_static == public_key(h(str(vector["init_static"])))
    # Transport messages: explicit nonces counting from 0 in each direction.
    counters = {True: 0, False: 0}
    for i, msg in enumerate(messages[n_handshake:], start=n_handshake):
        from_initiator = i % 2 == 0
        side = initiator.split if from_initiator else responder.split
        other = responder.split if from_initiator else initiator.split
        n = counters[from_initiator]
        counters[from_initiator] += 1
        sealed = ChaCha20Poly1305(side.send_key).encrypt(records.nonce(n), h(msg["payload"]), b"")
        assert sealed == h(msg["ciphertext"]), f"transport message {i}"
        opened = records.open_record(ChaCha20Poly1305(other.recv_key), n, b"", sealed)
        assert opened == h(msg["payload"])


def test_corrupted_message_leaves_driver_unchanged() -> None:
    _vid, vector = next(v for v in VECTORS if v[0] == "cacophony:Noise_XX_25519_ChaChaPoly_BLAKE2s")
    h = bytes.fromhex
    responder = Driver(
        pattern="XX",
        initiator=False,
        static_private=h(str(vector["resp_static"])),
        remote_static=None,
        ephemeral_private=h(str(vector["resp_ephemeral"])),
        prologue=h(str(vector["resp_prologue"])),
    )
    messages = vector["messages"]
    assert isinstance(messages, list)
    responder, _ = responder.read(h(messages[0]["ciphertext"]))
    responder, _ = responder.write(h(messages[1]["payload"]))
    bad = bytearray(h(messages[2]["ciphertext"]))
    bad[5] ^= 1
    from synapse_coap.errors import HandshakeError

    with pytest.raises(HandshakeError):
        responder.read(bytes(bad))
    done, payload = responder.read(h(messages[2]["ciphertext"]))
    assert payload == h(messages[2]["payload"])
    assert done.split is not None
