"""The secure session layer: Noise handshakes and explicit-nonce records over UDP (sans-I/O).

Public API: :class:`NoiseEndpoint`, :class:`NoiseLimits`, the events, the
trust policy and stores, and the key helpers. See docs/security.md.
"""

from __future__ import annotations

from synapse_coap.noise.endpoint import NoiseEndpoint, NoiseLimits
from synapse_coap.noise.events import (
    Address,
    ChannelClosed,
    ChannelEstablished,
    ChannelInfo,
    Dropped,
    Event,
    HandshakeFailed,
    Heard,
    Received,
    Transmit,
)
from synapse_coap.noise.keys import (
    decode_public,
    encode_public,
    generate_private_key,
    public_key,
    read_key_file,
    write_key_file,
)
from synapse_coap.noise.trust import (
    FileTrustStore,
    MemoryTrustStore,
    TrustPolicy,
    TrustStore,
    fingerprint,
)

__all__ = [
    "Address",
    "ChannelClosed",
    "ChannelEstablished",
    "ChannelInfo",
    "Dropped",
    "Event",
    "FileTrustStore",
    "HandshakeFailed",
    "Heard",
    "MemoryTrustStore",
    "NoiseEndpoint",
    "NoiseLimits",
    "Received",
    "Transmit",
    "TrustPolicy",
    "TrustStore",
    "decode_public",
    "encode_public",
    "fingerprint",
    "generate_private_key",
    "public_key",
    "read_key_file",
    "write_key_file",
]
