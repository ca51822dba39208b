"""Body codec: exact round trips, sizes, caps, fuzz."""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from synapse_coap.wire import body_decode, body_encode, body_tables
from synapse_coap.wire.body import (
    DEFAULT_BODY_LIMITS as DEFAULT_LIMITS,
)
from synapse_coap.wire.body import (
    MARKER_DEFLATE,
    MARKER_DEFLATE_DICT,
    BodyLimits,
    decode_body,
    encode_body,
    encode_stages,
)
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import Profile, load_profile

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
SERVER = "corpus.example.org"
CTX = WireContext(server_names=(SERVER,))


@pytest.fixture(scope="module")
def p1() -> Profile:
    return load_profile(1)


@pytest.fixture(scope="module")
def p0() -> Profile:
    return load_profile(0)


def same(a: Any, b: Any) -> bool:
    """Equality that also tells 1 from 1.0 and 0.0 from -0.0, and keeps key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def roundtrip(value: Any, profile: Profile, ctx: WireContext = CTX) -> bytes:
    data = encode_body(value, profile, ctx)
    back = decode_body(data, profile, ctx)
    assert same(back, value), (value, back)
    return data


def corpus_records(name: str) -> list[dict[str, Any]]:
    with open(CORPUS / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def rand_b64url(n: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(n)).rstrip(b"=").decode()


# --- exact round trip ------------------------------------------------------------------

EDGE_CASES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    23,
    24,
    -25,
    2**32,
    2**63,
    2**64 - 1,
    2**64,
    -(2**64),
    -(2**64) - 1,
    10**40,
    -(10**40),
    1.0,
    -0.0,
    0.0,
    0.1,
    1e300,
    5e-324,
    65504.0,
    float("inf"),
    "",
    "m.text",
    "😀 astral 𝄞",
    [],
    {},
    [[], {}, [[]]],
    {"b": 1, "a": 2},  # key order kept
    {"type": "x", "zz_unknown_key": [1, 2.5, None]},
    "$" + "A" * 43,  # 43 chars whose last char carries non-zero pad bits: must stay text
    "$abc",
    "!short:elsewhere.org",
    "@alice:" + SERVER,
    "@:" + SERVER,
    "@alice:" + SERVER + ":8448",
    "#room:" + SERVER,
    "mxc://" + SERVER + "/abcdef",
    "mxc://" + SERVER + "/",
    "ed25519:",
    "ed25519:abc",
    SERVER,
    "syt_YWxpY2U_LjDggCvCuSAoZMBrgXEB_04ZG1f",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZab",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZa=",
    {"hashes": {"sha256": "not the hash"}, "type": "m.room.message"},
    {"hashes": {"sha256": "x", "other": 1}},
    [1732000000000, 1732000000001, 1731000000000, 1, 2**40, 2**63],
    {"origin_server_ts": 1732000000000, "unsigned": {"age_ts": 1732000005000}},
]


@pytest.mark.parametrize("value", EDGE_CASES, ids=lambda v: repr(v)[:40])
@pytest.mark.parametrize("ctx", [WireContext(), CTX, WireContext(("a.b", SERVER))])
def test_edge_cases_round_trip(value: Any, ctx: WireContext, p1: Profile, p0: Profile) -> None:
    roundtrip(value, p1, ctx)
    roundtrip(value, p0, ctx)


def test_float_stays_float_and_int_stays_int(p1: Profile) -> None:
    back = decode_body(encode_body({"a": 1.0, "b": 1, "c": -0.0}, p1), p1)
    assert isinstance(back, dict)
    assert type(back["a"]) is float and type(back["b"]) is int
    assert math.copysign(1, back["c"]) == -1


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**31, max_value=2**66)
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(
        [
            "m.room.message",
            "@bob:" + SERVER,
            "!room:" + SERVER,
            SERVER,
            "$" + "B" * 42 + "A",
            "ed25519:a_test",
            "mxc://" + SERVER + "/x",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["type", "content", "body", "hashes"]),
            children,
            max_size=6,
        )
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_hypothesis_round_trip(value: Any) -> None:
    p1 = load_profile(1)
    roundtrip(value, p1, CTX)
    roundtrip(value, p1, WireContext())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=5))
def test_event_id_lists_round_trip(raws: list[bytes]) -> None:
    ids = ["$" + base64.urlsafe_b64encode(r).rstrip(b"=").decode() for r in raws]
    value = {"prev_events": ids, "mixed": [*ids, "x"]}
    roundtrip(value, load_profile(1), CTX)


def test_lone_surrogate_is_a_local_error(p1: Profile) -> None:
    with pytest.raises(LocalProtocolError):
        encode_body({"body": "\ud800"}, p1)
    with pytest.raises(LocalProtocolError):
        encode_body({1: "int key"}, p1)  # type: ignore[dict-item]
    with pytest.raises(LocalProtocolError):
        encode_body({"x": object()}, p1)  # type: ignore[dict-item]


def test_whole_corpus_round_trips(p1: Profile) -> None:
    n = 0
    for name in ("client.jsonl", "federation.jsonl"):
        for rec in corpus_records(name):
            for part in ("request", "response"):
                body = rec[part]["body"]
                if body is not None:
                    roundtrip(body, p1, CTX)
                    roundtrip(body, p1, WireContext())
                    n += 1
    assert n > 100


def test_signatures_verify_after_round_trip(p1: Profile) -> None:
    from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key
    from signedjson.sign import sign_json, verify_signed_json

    key = generate_signing_key("a_test")
    key = decode_signing_key_base64("ed25519", "a_test", base64.b64encode(key.encode()).decode())
    doc = {
        "type": "m.room.message",
        "content": {"body": 'Héllo 𝄞 "quoted"\n', "n": 2**53, "f": 1.5, "neg": -7},
        "sender": "@alice:" + SERVER,
        "prev_events": ["$" + rand_b64url(32)],
        "origin_server_ts": 1732000000000,
    }
    signed = sign_json(doc, SERVER, key)
    back = decode_body(encode_body(signed, p1, CTX), p1, CTX)
    verify_signed_json(back, SERVER, get_verify_key(key))


def test_real_pdus_keep_hashes_and_signatures(p1: Profile) -> None:
    """Every PDU Synapse produced comes back byte-identical in canonical JSON."""
    from canonicaljson import encode_canonical_json

    for rec in corpus_records("federation.jsonl"):
        txn = rec["request"]["body"]
        back = decode_body(encode_body(txn, p1, CTX), p1, CTX)
        assert isinstance(back, dict)
        for pdu, pdu_back in zip(txn["pdus"], back["pdus"], strict=True):
            assert encode_canonical_json(pdu_back) == encode_canonical_json(pdu)
            assert compact(pdu_back) == compact(pdu)


# --- sizes -------------------------------------------------------------------------------


def test_size_hello_world(p1: Profile) -> None:
    data = roundtrip({"msgtype": "m.text", "body": "Hello world"}, p1)
    assert len(data) <= 18
    # Without the dictionary (profile 0) it still fits.
    assert len(roundtrip({"msgtype": "m.text", "body": "Hello world"}, load_profile(0))) <= 18
    # A message text the dictionary has never seen:
    assert len(roundtrip({"msgtype": "m.text", "body": "Qzx wvk jpr"}, p1)) <= 18


def test_size_event_id_response(p1: Profile) -> None:
    for _ in range(20):
        data = roundtrip({"event_id": "$" + rand_b64url(32)}, p1)
        assert len(data) <= 37


def federation_message_txn() -> dict[str, Any]:
    for rec in corpus_records("federation.jsonl"):
        if rec["name"] == "federation.send.m.room.message":
            body: dict[str, Any] = rec["request"]["body"]
            return body
    raise AssertionError("no m.room.message transaction in the corpus")


def test_size_federation_transaction(p1: Profile) -> None:
    txn = federation_message_txn()
    data = roundtrip(txn, p1, CTX)
    assert len(txn["pdus"]) == 1 and txn["pdus"][0]["type"] == "m.room.message"
    # Measured 35.0% with the dictionary trained on live federation (scripts/build-maps).
    assert len(data) <= 0.38 * len(compact(txn)), (len(data), len(compact(txn)))


def test_every_corpus_message_pdu_is_small(p1: Profile) -> None:
    for rec in corpus_records("federation.jsonl"):
        txn = rec["request"]["body"]
        if rec["name"] == "federation.send.m.room.message":
            # the target is 45 %; measured 30-36 % over the corpus
            assert len(encode_body(txn, p1, CTX)) <= 0.40 * len(compact(txn))


def test_stages(p1: Profile) -> None:
    txn = federation_message_txn()
    stages = encode_stages(txn, p1, CTX)
    assert set(stages) == {"cbor", "cbor_int_keys", "deflate", "dictionary", "final"}
    assert cbor2.loads(stages["cbor"]) == txn
    assert len(stages["cbor_int_keys"]) < len(stages["cbor"])
    assert stages["final"] == encode_body(txn, p1, CTX)
    assert stages["final"][0] == MARKER_DEFLATE_DICT
    assert (
        zlib.decompressobj(-15, zdict=p1.dictionary).decompress(stages["dictionary"])
        == (stages["cbor_int_keys"])
    )


def test_dictionary_helps_on_the_corpus(p1: Profile, p0: Profile) -> None:
    with_dict = without = 0
    for rec in corpus_records("client.jsonl"):
        body = rec["response"]["body"]
        if body is not None:
            with_dict += len(encode_body(body, p1, CTX))
            without += len(encode_body(body, p0, CTX))
    assert with_dict < 0.9 * without


def test_context_shortens_identifiers(p1: Profile) -> None:
    v = {"sender": "@alice:" + SERVER}
    assert len(encode_body(v, p1, CTX)) < len(encode_body(v, p1, WireContext()))


# --- errors, caps, fuzz --------------------------------------------------------------------


def test_server_reference_needs_context(p1: Profile) -> None:
    data = encode_body({"sender": "@alice:" + SERVER}, p1, CTX)
    with pytest.raises(RemoteProtocolError, match="server reference"):
        decode_body(data, p1, WireContext())


def test_dictionary_marker_refused_by_profile_0(p1: Profile, p0: Profile) -> None:
    data = encode_body(federation_message_txn(), p1, CTX)
    assert data[0] == MARKER_DEFLATE_DICT
    with pytest.raises(RemoteProtocolError):
        decode_body(data, p0, CTX)


def test_decompression_bomb(p1: Profile) -> None:
    bomb_cbor = b"\x5a" + (50_000_000).to_bytes(4, "big") + b"\0" * 50_000_000
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = bytes([MARKER_DEFLATE]) + c.compress(bomb_cbor) + c.flush()
    assert len(bomb) < 100_000
    with pytest.raises(LimitExceeded):
        decode_body(bomb, p1, limits=BodyLimits(max_decoded_bytes=1_000_000))


def test_encoded_size_cap(p1: Profile) -> None:
    data = encode_body({"body": os.urandom(3000).hex()}, p1)
    assert len(data) > 100
    with pytest.raises(LimitExceeded):
        decode_body(data, p1, limits=BodyLimits(max_encoded_bytes=100))


def test_depth_cap_without_recursion_error(p1: Profile) -> None:
    deep = b"\x81" * 100_000 + b"\x00"
    with pytest.raises(LimitExceeded):
        decode_body(deep, p1)
    nested: Any = 1
    for _ in range(20):
        nested = [nested]
    data = encode_body(nested, p1)
    assert decode_body(data, p1) == nested
    with pytest.raises(LimitExceeded):
        decode_body(data, p1, limits=BodyLimits(max_depth=10))


def test_item_cap(p1: Profile) -> None:
    data = encode_body(list(range(1000)), p1)
    with pytest.raises(LimitExceeded):
        decode_body(data, p1, limits=BodyLimits(max_items=500))
    # a header announcing a huge array is refused before allocating anything
    with pytest.raises(RemoteProtocolError):
        decode_body(b"\x9b" + (2**63).to_bytes(8, "big"), p1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"\xfe",
        b"\xfc",
        b"\xfd\x00",
        b"\x1f",
        b"\x5f\x41a\xff",  # indefinite byte string
        b"\xa1\x00",  # map missing its value
        b"\xa2\x00\x00\x00\x00",  # duplicate key
        b"\xa1\xf5\x00",  # bool as key
        b"\xc6\x41a",  # event id tag with 1 byte
        b"\xd8\x1c\x00",  # tag 28 (value sharing) is refused
        b"\xd5\x01",  # timestamp delta without a previous timestamp
        b"\xd7\x00",  # derived hash outside an event
        b"\x62\xff\xfe",  # invalid UTF-8
        b"\xf8\x05",  # non-shortest simple value
        b"\xf7",  # undefined
        b"\x00\x00",  # trailing bytes
        b"\xf8\xff",  # simple value not in the table
        b"\x41a",  # a byte string: JSON has none (only a tag's content is one)
        b"\x81\x41a",  # ... in an array
        b"\xa1\x61a\x41a",  # ... as a map's value
    ],
)
def test_malformed_bodies(data: bytes, p1: Profile) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(data, p1, CTX)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_any_bytes(data: bytes) -> None:
    p1 = load_profile(1)
    for candidate in (data, bytes([MARKER_DEFLATE]) + data, bytes([MARKER_DEFLATE_DICT]) + data):
        try:
            decode_body(candidate, p1, CTX, BodyLimits(max_decoded_bytes=10_000))
        except RemoteProtocolError:
            pass


@settings(max_examples=500, deadline=None)
@given(json_values, st.data())
def test_fuzz_mutated_bodies(value: Any, data: st.DataObject) -> None:
    p1 = load_profile(1)
    enc = bytearray(encode_body(value, p1, CTX))
    i = data.draw(st.integers(0, len(enc) - 1))
    enc[i] = data.draw(st.integers(0, 255))
    try:
        decode_body(bytes(enc), p1, CTX)
    except RemoteProtocolError:
        pass


# --- the fast decoder (cbor2 + one pass) agrees with the reference byte walk -------------


def _both(data: bytes, limits: BodyLimits = DEFAULT_LIMITS) -> tuple[Any, Any]:
    """(fast result or _FALLBACK, reference result or the exception type it raised)."""
    p1 = load_profile(1)
    fast = body_decode._decode_fast(data, p1, CTX, limits, None)
    try:
        ref = body_decode._Decoder(data, p1, CTX, limits, None).decode()
    except RemoteProtocolError as e:
        ref = type(e)
    return fast, ref


def _agree(data: bytes, limits: BodyLimits = DEFAULT_LIMITS) -> None:
    fast, ref = _both(data, limits)
    if fast is not body_decode._FALLBACK:
        assert not isinstance(ref, type), (data, fast, ref)  # the reference accepts it too
        assert same(fast, ref), (data, fast, ref)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.data())
def test_fast_decoder_agrees_with_reference(value: Any, data: st.DataObject) -> None:
    p1 = load_profile(1)
    raw = body_encode._encode_cbor(value, p1, CTX)
    fast, ref = _both(raw)
    assert fast is not body_decode._FALLBACK  # what we encode takes the fast path
    assert same(fast, value) and same(ref, value)
    mutated = bytearray(raw)
    i = data.draw(st.integers(0, len(mutated) - 1))
    mutated[i] = data.draw(st.integers(0, 255))
    _agree(bytes(mutated))
    _agree(raw, BodyLimits(max_depth=data.draw(st.integers(1, 6))))


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=60))
def test_fast_decoder_agrees_on_any_bytes(data: bytes) -> None:
    _agree(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00",  # trailing bytes: cbor2.loads would ignore them
        b"\x82\xd8\x1c\x81\x00\xd8\x1d\x00",  # cbor2's shared values (tags 28/29)
        b"\xd9\x01\x00\x82\x63abc\xd8\x19\x00",  # cbor2's string references (tags 256/25)
        b"\xc1\x00",  # cbor2's epoch date
        b"\xa2\x00\x00\xe0\x00",  # key 0 and simple value 0: different strings, both keys
        b"\x81" * 130 + b"\x00",  # deeper than the cap
        b"\xd8\x1c\x61a",  # cbor2's shareable (tag 28): decoded natively into what it wraps
        b"\xda\x00\x00\x00\x1c\x61a",  # the same tag in a 4-byte head
        b"\xd9\xd9\xf7\x00",  # self-described CBOR (tag 55799): also transparent in cbor2
        b"\xd9\x01\x00\x61a",  # a string reference namespace (tag 256) alone
        b"\xd8\x34\x61a",  # tag 52: ours (a sigil of server 5), cbor2's IPv4 address
        b"\xc4\x00",  # a string reference without a table (tag 4: cbor2's decimal fraction)
        b"\xd4\xd2\x00",  # ed25519 tag around a server tag: the reference decoder's to judge
    ],
)
def test_fast_decoder_edge_cases(data: bytes) -> None:
    _agree(data)


#: (CBOR, its depth as the caps count it)
DEPTH_CASES = [
    (b"\x81\x81\xd4\x61a", 3),  # arrays and a tag count as levels
    (b"\x81\x81\x80", 2),  # an empty array does not
    (b"\xa1\x00\x81\xa0", 2),
    (b"\xd4\x61a", 1),
]


@pytest.mark.parametrize(("data", "depth"), DEPTH_CASES)
def test_fast_decoder_depth_cap_is_the_reference_one(data: bytes, depth: int) -> None:
    """cbor2's max_depth counts as the reference decoder does: at the cap both accept
    (the fast path does not fall back), one level under it the reference refuses and
    the fast path leaves it the answer."""
    p1 = load_profile(1)
    at_cap = BodyLimits(max_depth=depth)
    fast = body_decode._decode_fast(data, p1, CTX, at_cap, None)
    assert fast is not body_decode._FALLBACK
    assert same(fast, body_decode._Decoder(data, p1, CTX, at_cap, None).decode())
    under = BodyLimits(max_depth=depth - 1)
    assert body_decode._decode_fast(data, p1, CTX, under, None) is body_decode._FALLBACK
    with pytest.raises(LimitExceeded):
        decode_body(data, p1, CTX, under)


def test_fast_decoder_takes_string_references(p1: Profile) -> None:
    room = "!" + rand_b64url(32)
    events = ["$" + rand_b64url(32) for _ in range(3)]
    value = {"room_id": room, "auth_events": events, "rooms": {room: {"x": 1}}}
    refs = {room: (4, 0), events[1]: (5, 70)}
    table = {(4, 0): room, (5, 70): events[1]}
    raw = body_encode._encode_cbor(value, p1, CTX, refs)
    limits = DEFAULT_LIMITS.for_input(len(raw))
    fast = body_decode._decode_fast(raw, p1, CTX, limits, lambda t, i: table[(t, i)])
    assert fast is not body_decode._FALLBACK  # references (also as map keys) stay fast
    assert same(fast, value)
    assert body_decode._decode_fast(raw, p1, CTX, limits, None) is body_decode._FALLBACK


def test_fast_decoder_recovers_after_a_failed_parse(p1: Profile) -> None:
    """A decoder object that failed mid-body is not reused: the next body decodes."""
    value = {"event_id": "$" + rand_b64url(32), "n": [1, 2, {"a": None}]}
    raw = body_encode._encode_cbor(value, p1, CTX)
    for bad in (raw[:-1], raw[:5], b"\x81" * 200 + b"\x00", b"\xd8\x1c" + raw):
        assert body_decode._decode_fast(bad, p1, CTX, DEFAULT_LIMITS, None) is body_decode._FALLBACK
        assert same(body_decode._decode_fast(raw, p1, CTX, DEFAULT_LIMITS, None), value)


def test_string_cache_gives_the_bytes_of_a_fresh_encoder(p1: Profile) -> None:
    values = [r["request"]["body"] for r in corpus_records("federation.jsonl")]
    warm = [encode_body(v, p1, CTX) for v in values] + [encode_body(v, p1) for v in values]
    body_tables._TABLES.clear()  # the per-context string caches go with the tables
    fresh = [encode_body(v, p1, CTX) for v in values]
    body_tables._TABLES.clear()
    fresh += [encode_body(v, p1) for v in values]
    assert warm == fresh
