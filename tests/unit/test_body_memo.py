"""BodyMemo (synapse_coap/mapping/codec.py): memoised body conversions are exact and bounded."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from synapse_coap.errors import LimitExceeded
from synapse_coap.mapping import codec as codec_mod
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.jsonbody import BodyMemo, parse_json_exact
from synapse_coap.mapping.messages import HttpResponse
from synapse_coap.wire.body import BodyLimits, decode_body, encode_body
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile

CTX = WireContext(("example.org",))
BODY = json.dumps(
    {"versions": ["r0.6.1", "v1.1", "v1.2"], "unstable_features": {"org.matrix.msc3440": True}},
    separators=(",", ":"),
).encode()


@pytest.fixture
def memo(monkeypatch: pytest.MonkeyPatch) -> Iterator[BodyMemo]:
    """A fresh shared memo for the codec under test (other tests' entries do not leak in)."""
    fresh = BodyMemo()
    monkeypatch.setattr(codec_mod, "BODY_MEMO", fresh)
    yield fresh


def response(body: bytes = BODY) -> HttpResponse:
    return HttpResponse(200, (("content-type", "application/json"),), body)


def test_encode_hit_gives_the_bytes_of_a_fresh_encode(memo: BodyMemo) -> None:
    profile = load_profile(1)
    codec = WireCodec(profile, CTX)
    first = codec.encode_response(response())
    assert len(memo._items) == 1  # remembered
    second = codec.encode_response(response())
    fresh = encode_body(parse_json_exact(BODY), profile, CTX)
    assert second.payload == first.payload == fresh
    assert len(memo._items) == 1  # a hit, no new entry


def test_decode_hit_gives_the_bytes_of_a_fresh_decode(memo: BodyMemo) -> None:
    profile = load_profile(1)
    codec = WireCodec(profile, CTX)
    msg = codec.encode_response(response())
    first = codec.decode_response(msg)
    entries = len(memo._items)
    second = codec.decode_response(msg)
    assert len(memo._items) == entries
    assert second.body == first.body
    assert json.loads(second.body) == decode_body(msg.payload, profile, CTX)
    assert json.loads(second.body) == json.loads(BODY)


def test_other_limits_do_not_reuse_an_entry(memo: BodyMemo) -> None:
    """A body that passed the default caps is still refused under tighter caps (and back)."""
    codec = WireCodec(load_profile(1), CTX)
    msg = codec.encode_response(response())
    assert json.loads(codec.decode_response(msg).body) == json.loads(BODY)
    tight = BodyLimits(max_items=3)
    with pytest.raises(LimitExceeded):
        codec.decode_response(msg, tight)
    # ... and the other order: a refusal is not remembered as anything.
    other = WireCodec(load_profile(1), WireContext(("other.example",)))
    msg2 = other.encode_response(response(b'{"a":[1,2,3,4,5,6]}'))
    with pytest.raises(LimitExceeded):
        other.decode_response(msg2, tight)
    assert json.loads(other.decode_response(msg2).body) == {"a": [1, 2, 3, 4, 5, 6]}


def test_other_context_or_profile_do_not_reuse_an_entry(memo: BodyMemo) -> None:
    body = json.dumps({"user_id": "@a:example.org"}).encode()
    a = WireCodec(load_profile(1), CTX).encode_response(response(body)).payload
    b = WireCodec(load_profile(1), WireContext(("x.example",))).encode_response(response(body))
    c = WireCodec(load_profile(0), CTX).encode_response(response(body))
    assert a == encode_body(parse_json_exact(body), load_profile(1), CTX)
    assert b.payload == encode_body(
        parse_json_exact(body), load_profile(1), WireContext(("x.example",))
    )
    assert c.payload == encode_body(parse_json_exact(body), load_profile(0), CTX)
    assert a != b.payload  # the server name is a reference in one context, literal in the other
    # With and without the dictionary (profile 1 / 0) a longer body differs.
    p1 = WireCodec(load_profile(1), CTX).encode_response(response()).payload
    p0 = WireCodec(load_profile(0), CTX).encode_response(response()).payload
    assert p0 == encode_body(parse_json_exact(BODY), load_profile(0), CTX) != p1


def _held(memo: BodyMemo) -> int:
    return sum(len(k[-1]) + len(v) for k, v in memo._items.items())


def test_memory_cap_holds() -> None:
    memo = BodyMemo(max_entries=1000, max_item=100, max_total=2000)
    calls = 0

    def convert(data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return data[::-1] + b"!"

    for i in range(500):
        data = f"{i:05d}".encode() * 8  # 40 bytes in, 41 out
        assert memo.convert(("k", data), data, lambda d=data: convert(d)) == data[::-1] + b"!"
        assert memo._total == _held(memo) <= 2000
    assert len(memo._items) == 2000 // 81
    # The newest entries are the ones kept: a hit does not call convert() again.
    newest = b"00499" * 8
    before = calls
    assert memo.convert(("k", newest), newest, lambda: convert(newest)) == newest[::-1] + b"!"
    assert calls == before
    # The oldest are gone: converted again.
    oldest = b"00000" * 8
    memo.convert(("k", oldest), oldest, lambda: convert(oldest))
    assert calls == before + 1


def test_entry_count_cap_and_big_items_not_kept() -> None:
    memo = BodyMemo(max_entries=4, max_item=16, max_total=1 << 20)
    for i in range(10):
        data = bytes([i]) * 4
        memo.convert(("k", data), data, lambda d=data: d + d)
    assert len(memo._items) == 4
    big = b"x" * 17
    assert memo.convert(("k", big), big, lambda: b"y") == b"y"
    assert ("k", big) not in memo._items
    assert memo._total == _held(memo)
