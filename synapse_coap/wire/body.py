"""The body codec: a JSON value <-> compact bytes, exactly.

Layout (documented in docs/wire-body.md):

* the value becomes CBOR (RFC 8949) where
  - map keys found in the profile's key table are small integers
    (zig-zag: table index 0, 1, 2, 3 ... -> 0, -1, 1, -2 ..., so 48 keys take one byte);
  - strings found in the profile's value table are CBOR simple values
    (index 0-19 -> one byte, 20-243 -> two bytes);
  - identifiers and base64 are binary under private tags, only when the
    decoder gives back the identical string (checked on encode);
  - a federation PDU's ``hashes.sha256`` is left out when the receiver can
    recompute it exactly;
  - in a session with a string table (wire/strings.py), strings the receiver
    certainly holds are tags 4/5 wrapping a short reference;
* then raw DEFLATE (level 9) is tried: with the profile's preset dictionary
  only, for bodies up to ``ONE_ATTEMPT_MAX`` when the profile has one (it won on
  every corpus body), else with and without it; the smallest form is sent.
  Plain CBOR is sent as
  is (its first byte is never 0xfc-0xfe); compressed forms start with a
  one-byte marker: 0xfc = DEFLATE, 0xfd = DEFLATE with the profile dictionary.

Decoding checks every cap before allocating: encoded size, inflated size
(``max_length``), nesting depth and item count.  Two decoders give the same
result: a fast one (:mod:`~synapse_coap.wire.body_fast`: cbor2's native decoder
with the depth cap, duplicate-key and indefinite-length checks and the tags it
knows overridden, then one Python pass over the tree in document order for the
profile's keys and values and every tag of ours: identifiers, timestamp deltas,
string references, derived hashes...), used when the body has at most ``max_items`` bytes (so at most
that many items); and the reference decoder, an iterative byte walk (no input can
cause a RecursionError).  Any input the fast path does not accept completely is
decoded by the reference decoder, which gives the answer or the error; a property
test checks that the two agree.

The codec is split by responsibility: :mod:`~synapse_coap.wire.body_tables`
(markers, tags, limits, the profile's tables), :mod:`~synapse_coap.wire.body_encode`,
:mod:`~synapse_coap.wire.body_decode` and :mod:`~synapse_coap.wire.body_fast`; this
module is the one the rest of the package imports.
"""

from __future__ import annotations

from synapse_coap.wire.body_decode import (
    body_cbor,
    decode_body,
    decode_cbor,
)
from synapse_coap.wire.body_encode import (
    ONE_ATTEMPT_MAX,
    encode_body,
    encode_json_fast,
    encode_stages,
)
from synapse_coap.wire.body_tables import (
    DEFAULT_BODY_LIMITS,
    MARKER_DEFLATE,
    MARKER_DEFLATE_BASE,
    MARKER_DEFLATE_DICT,
    MAX_SERVER_REFS,
    REQUEST_BODY_LIMITS,
    SIGILS,
    TAG_B64,
    TAG_B64URL,
    TAG_BIGNUM_NEG,
    TAG_BIGNUM_POS,
    TAG_DERIVED_SHA256,
    TAG_ED25519_KEY_ID,
    TAG_EVENT_ID,
    TAG_EVENT_ID_LIST,
    TAG_MXC_0,
    TAG_MXC_BASE,
    TAG_ROOM_HASH_ID,
    TAG_SERVER,
    TAG_SIGIL_0,
    TAG_SIGIL_BASE,
    TAG_TS_DELTA,
    BaseResolver,
    BodyLimits,
    JSONValue,
    StringRefs,
    StringResolver,
    content_hash,
)

__all__ = [
    "DEFAULT_BODY_LIMITS",
    "MARKER_DEFLATE",
    "MARKER_DEFLATE_BASE",
    "MARKER_DEFLATE_DICT",
    "MAX_SERVER_REFS",
    "ONE_ATTEMPT_MAX",
    "REQUEST_BODY_LIMITS",
    "SIGILS",
    "TAG_B64",
    "TAG_B64URL",
    "TAG_BIGNUM_NEG",
    "TAG_BIGNUM_POS",
    "TAG_DERIVED_SHA256",
    "TAG_ED25519_KEY_ID",
    "TAG_EVENT_ID",
    "TAG_EVENT_ID_LIST",
    "TAG_MXC_0",
    "TAG_MXC_BASE",
    "TAG_ROOM_HASH_ID",
    "TAG_SERVER",
    "TAG_SIGIL_0",
    "TAG_SIGIL_BASE",
    "TAG_TS_DELTA",
    "BaseResolver",
    "BodyLimits",
    "JSONValue",
    "StringRefs",
    "StringResolver",
    "body_cbor",
    "content_hash",
    "decode_body",
    "decode_cbor",
    "encode_body",
    "encode_json_fast",
    "encode_stages",
]
