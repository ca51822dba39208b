"""Body decoder caps proportional to the input (issue 14): cheap bodies cannot buy
expensive decoding. Each case reproduced its finding before the fix."""

from __future__ import annotations

import zlib

import cbor2
import pytest

from synapse_coap.errors import LimitExceeded, RemoteProtocolError
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.wire.body import (
    DEFAULT_BODY_LIMITS,
    MARKER_DEFLATE,
    REQUEST_BODY_LIMITS,
    decode_body,
)
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile

PROFILE = load_profile(0)


def deflated(raw: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return bytes([MARKER_DEFLATE]) + z.compress(raw) + z.flush()


def test_two_million_items_in_two_kilobytes_are_refused_at_a_proportional_cap() -> None:
    # issue 14: a 1.9 KB body with 2 million items blocked the event loop 1.1 s.
    body = deflated(cbor2.dumps([0] * 2_000_000))
    assert len(body) < 2000
    caps = DEFAULT_BODY_LIMITS.for_input(len(body))
    assert caps.max_decoded_bytes <= max(64 * 1024, 32 * len(body))
    assert caps.max_items <= max(4096, 8 * len(body))
    with pytest.raises(LimitExceeded, match="inflates to more than 65536 bytes"):
        decode_body(body, PROFILE)


def test_61kb_high_expansion_body_is_refused() -> None:
    # issue 14: a 61 KB body grew memory by 176 MB and went upstream as 60 MiB.
    raw = cbor2.dumps("a" * (60 * 1024 * 1024))
    body = deflated(raw)
    assert 55_000 < len(body) < 70_000
    with pytest.raises(LimitExceeded, match="inflates to more than"):
        decode_body(body, PROFILE)
    assert DEFAULT_BODY_LIMITS.for_input(len(body)).max_decoded_bytes == 32 * len(body)


def test_real_ratios_pass_and_plain_cbor_is_never_limited_by_the_ratio() -> None:
    value = {"msgtype": "m.text", "body": "hello " * 200}
    raw = cbor2.dumps(value)
    assert decode_body(deflated(raw), PROFILE) == value
    many = list(range(3000))
    assert decode_body(cbor2.dumps(many), PROFILE) == many


def test_nesting_and_length_prefix_attacks() -> None:
    deep = b"\x81" * 10_000 + b"\x00"  # arrays nested 10,000 deep
    with pytest.raises(LimitExceeded, match="nested deeper"):
        decode_body(deep, PROFILE)
    huge = b"\x5b" + (1 << 32).to_bytes(8, "big") + b"x"  # a byte string of 2^32 bytes
    with pytest.raises((LimitExceeded, RemoteProtocolError)):
        decode_body(huge, PROFILE)
    huge_array = b"\x9b" + (1 << 32).to_bytes(8, "big") + b"\x00"
    with pytest.raises((LimitExceeded, RemoteProtocolError)):
        decode_body(huge_array, PROFILE)


def test_request_bodies_have_the_listener_caps() -> None:
    codec = WireCodec(PROFILE, WireContext())
    ok = codec.encode_request(
        HttpRequest(
            "PUT",
            b"/_matrix/client/v3/sendToDevice/m.x/t1",
            (("content-type", "application/json"),),
            cbor_json(list(range(10_000))),
        )
    )
    assert codec.decode_request(ok).body
    big = codec.encode_request(
        HttpRequest(
            "PUT",
            b"/_matrix/client/v3/sendToDevice/m.x/t2",
            (("content-type", "application/json"),),
            cbor_json(list(range(REQUEST_BODY_LIMITS.max_items))),
        )
    )
    with pytest.raises(LimitExceeded, match="items"):
        codec.decode_request(big)


def cbor_json(value: object) -> bytes:
    import json

    return json.dumps({"messages": value}).encode()


def test_event_id_lists_count_against_the_item_cap() -> None:
    # issue 14 (found by bench/attack.py): one event-id list tag is one CBOR item but
    # one JSON string per 32 bytes, so a body at the item cap still decoded to an id
    # per 32 bytes of its size (61,000 ids from a 61 KB body)
    cap = REQUEST_BODY_LIMITS.max_items
    ident = bytes(range(32))
    ok = cbor2.dumps({"ids": cbor2.CBORTag(19, ident * 1000)})
    assert len(decode_body(ok, PROFILE, limits=REQUEST_BODY_LIMITS)["ids"]) == 1000  # type: ignore[index, arg-type]
    over = cbor2.dumps(
        {"a": cbor2.CBORTag(19, ident * (cap // 2)), "b": cbor2.CBORTag(19, ident * (cap // 2 + 1))}
    )
    with pytest.raises(LimitExceeded, match="event ids"):
        decode_body(over, PROFILE, limits=REQUEST_BODY_LIMITS)


def test_request_bodies_inflate_at_most_8x_past_64_kib() -> None:
    # issue 14: a 61 KB request body could inflate to 1.9 MB (32x) and, as control
    # characters, reach Synapse as 11 MB of JSON (the loop stalled ~25-50 ms)
    import random

    pad = "".join(random.Random(14).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=30_000))
    value = {"pad": pad, "x": "\x01" * 300_000}
    raw = cbor2.dumps(value)
    body = deflated(raw)
    assert 8 * len(body) < len(raw) < 32 * len(body) and len(raw) > 64 * 1024
    assert decode_body(body, PROFILE) == value  # responses: 32x
    with pytest.raises(LimitExceeded, match="inflates to more than"):
        decode_body(body, PROFILE, limits=REQUEST_BODY_LIMITS)


def test_senders_keep_to_the_receivers_expansion_cap() -> None:
    import json
    import random

    codec = WireCodec(PROFILE, WireContext())
    # a request body that DEFLATE shrinks more than 8x: sent as plain CBOR, accepted
    value = {"messages": "a" * 200_000}
    req = codec.encode_request(
        HttpRequest(
            "PUT",
            b"/_matrix/client/v3/sendToDevice/m.x/t3",
            (("content-type", "application/json"),),
            json.dumps(value).encode(),
        )
    )
    assert req.payload[0] not in (0xFC, 0xFD)  # not DEFLATE
    assert json.loads(codec.decode_request(req).body) == value
    # a response between 8x and 32x stays compressed (the client's cap is 32x)
    block = "".join(random.Random(8).choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12_000))
    text = block * 16
    resp = codec.encode_response(
        HttpResponse(200, (("content-type", "application/json"),), json.dumps({"t": text}).encode())
    )
    assert resp.payload[0] in (0xFC, 0xFD)
    assert 8 * len(resp.payload) < len(text) < 32 * len(resp.payload)
