"""The native build's ChaCha20-Poly1305 (synapse_coap/noise/_caead.c, libsodium): RFC
8439's AEAD vector, the same bytes as cryptography's ChaCha20Poly1305 (what the
plain-Python sources use), and nothing out of a record that does not authenticate.

It runs here in both test runs: from the native build, and on the plain-Python sources
(SYNAPSE_COAP_PURE=1, where the package cannot import it) loaded from its extension.
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.noise import records
from tests.harness.cbody_fuzz import c_module

# RFC 8439 section 2.8.2
KEY = bytes(range(0x80, 0xA0))
NONCE = bytes.fromhex("070000004041424344454647")
AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)
CIPHERTEXT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")


@pytest.fixture(scope="module")
def caead() -> Any:
    return c_module("synapse_coap.noise._caead", records._CAEAD)


def test_rfc_8439_aead_vector(caead: Any) -> None:
    assert caead.seal(KEY, NONCE, PLAINTEXT, AAD) == CIPHERTEXT + TAG
    assert caead.open(KEY, NONCE, CIPHERTEXT + TAG, AAD) == PLAINTEXT
    assert caead.TAG_BYTES == 16


@settings(max_examples=300, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    plaintext=st.binary(max_size=1500),
    ad=st.binary(max_size=64),
)
def test_the_same_bytes_as_cryptography(
    caead: Any, key: bytes, nonce: bytes, plaintext: bytes, ad: bytes
) -> None:
    sealed = caead.seal(key, nonce, plaintext, ad)
    assert sealed == ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)
    assert caead.open(key, nonce, sealed, ad) == plaintext
    # buffers other than bytes (a record's body is sliced from the datagram)
    assert caead.open(key, nonce, memoryview(bytearray(sealed)), bytearray(ad)) == plaintext


@settings(max_examples=100, deadline=None)
@given(
    plaintext=st.binary(max_size=200),
    ad=st.binary(max_size=16),
    at=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
)
def test_a_changed_bit_anywhere_opens_to_nothing(
    caead: Any, plaintext: bytes, ad: bytes, at: int, bit: int
) -> None:
    sealed = bytearray(caead.seal(KEY, NONCE, plaintext, ad))
    sealed[at % len(sealed)] ^= 1 << bit
    assert caead.open(KEY, NONCE, bytes(sealed), ad) is None
    if ad:
        changed = bytearray(ad)
        changed[at % len(ad)] ^= 1 << bit
        assert caead.open(KEY, NONCE, caead.seal(KEY, NONCE, plaintext, ad), bytes(changed)) is None
    other_nonce = bytes([NONCE[0] ^ 1]) + NONCE[1:]
    assert caead.open(KEY, other_nonce, caead.seal(KEY, NONCE, plaintext, ad), ad) is None


def test_short_records_and_bad_lengths(caead: Any) -> None:
    for n in range(16):
        assert caead.open(KEY, NONCE, bytes(n), AAD) is None
    assert caead.open(KEY, NONCE, caead.seal(KEY, NONCE, b"", b""), b"") == b""
    with pytest.raises(ValueError):
        caead.seal(KEY[:31], NONCE, b"x", b"")
    with pytest.raises(ValueError):
        caead.open(KEY, NONCE + b"\x00", bytes(20), b"")
    with pytest.raises(TypeError):
        caead.seal(KEY, NONCE, b"x")
    with pytest.raises(TypeError):
        caead.seal(KEY, NONCE, "text", b"")


def test_the_record_path_uses_it_where_the_build_has_it() -> None:
    # (the plain-Python sources keep cryptography's object: the same bytes, above)
    aead = records.make_aead(KEY)
    if records._CAEAD is None:
        assert isinstance(aead, ChaCha20Poly1305)
        return
    assert isinstance(aead, records.SodiumAead)
    assert aead.encrypt(NONCE, PLAINTEXT, AAD) == CIPHERTEXT + TAG
    assert aead.decrypt(NONCE, CIPHERTEXT + TAG, AAD) == PLAINTEXT
    with pytest.raises(InvalidTag):
        aead.decrypt(NONCE, CIPHERTEXT + bytes(16), AAD)
    assert aead.encrypt(NONCE, b"", None) == ChaCha20Poly1305(KEY).encrypt(NONCE, b"", None)
    with pytest.raises(ValueError):
        records.SodiumAead(KEY[:16])
    header = bytes([0xC0, 0, 1, 5])
    sealed = aead.encrypt(records.nonce(5), b"coap", header)
    assert records.open_record(aead, 5, header, sealed) == b"coap"
    assert records.open_record(aead, 6, header, sealed) is None
    assert records.open_record(ChaCha20Poly1305(KEY), 5, header, sealed) == b"coap"
    assert "key" not in repr(aead) and KEY.hex() not in repr(aead)
