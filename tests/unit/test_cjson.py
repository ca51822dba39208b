"""The C decoder's JSON writer and content hash (synapse_coap/wire/_cbody.c): what the
writer takes it writes byte for byte as Python's json does (the compact dump the HTTP
side gets, the canonical JSON of an event's content hash); everything else it leaves
to Python's json (None), which then gives the answer or the error.

Like test_cbody.py, it runs in both test runs: from the native build, and on the
plain-Python sources (SYNAPSE_COAP_PURE=1) with the build's extension loaded directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.mapping import jsonbody
from synapse_coap.wire import body_encode, body_fast, body_tables
from synapse_coap.wire.profile import load_profile
from tests.harness.cbody_fuzz import c_module
from tests.harness.corpus import json_bodies
from tests.unit.test_body import CTX, json_values, same


@pytest.fixture(scope="module")
def cbody() -> Any:
    return c_module("synapse_coap.wire._cbody", body_fast._C)


def _python_dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8", "surrogatepass"
    )


def _python_hash(event: dict[str, Any]) -> str | None:
    """body_tables.content_hash without the C writer: Python's json and hashlib."""
    stripped = {k: v for k, v in event.items() if k not in ("unsigned", "signatures", "hashes")}
    try:
        data = json.dumps(
            stripped, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return None
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii").rstrip("=")


# (value, the exact bytes): escapes as json writes them (lower-case hex, DEL and U+2028
# left alone), integers past 64 bits, nesting, key order kept
GOLDEN_DUMPS = [
    ({}, b"{}"),
    ([], b"[]"),
    ("", b'""'),
    ('a"b\\c/', b'"a\\"b\\\\c/"'),
    ("\b\f\n\r\t\x00\x1f\x7f", b'"\\b\\f\\n\\r\\t\\u0000\\u001f\x7f"'),
    ("\u2028é😀", '"\u2028é😀"'.encode()),
    (0, b"0"),
    (-(2**63), b"-9223372036854775808"),
    (2**63, b"9223372036854775808"),
    (-(2**70), b"-1180591620717411303424"),
    ([True, False, None], b"[true,false,null]"),
    ({"b": 1, "a": [{}, []]}, b'{"b":1,"a":[{},[]]}'),
]


@pytest.mark.parametrize(
    ("value", "expected"), GOLDEN_DUMPS, ids=[repr(g[1]) for g in GOLDEN_DUMPS]
)
def test_golden_dumps(cbody: Any, value: Any, expected: bytes) -> None:
    assert cbody.dump_json(value) == expected == _python_dump(value)


@pytest.mark.parametrize(
    "value",
    [1.5, [0.0], {"a": float("inf")}, "\ud800", ["\udfff"], {1: 2}, (1, 2), {"a": {True: 1}}],
    ids=repr,
)
def test_what_it_leaves_to_pythons_json(cbody: Any, value: Any) -> None:
    assert cbody.dump_json(value) is None
    # and the package's dump then gives what json gives (or its error)
    try:
        expected: bytes | type[Exception] = _python_dump(value)
    except (ValueError, TypeError) as e:
        expected = type(e)
    try:
        got: bytes | type[Exception] = jsonbody.dump_json(value)
    except (ValueError, TypeError) as e:
        got = type(e)
    assert got == expected


def test_nesting_past_its_depth_is_left_to_python(cbody: Any) -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    assert cbody.dump_json(deep) is None
    assert jsonbody.dump_json(deep) == _python_dump(deep)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_value_is_written_as_json_writes_it_or_left_alone(cbody: Any, value: Any) -> None:
    got = cbody.dump_json(value)
    try:
        expected: bytes | type[Exception] = _python_dump(value)
    except ValueError as e:  # (infinity)
        expected = type(e)
    if got is not None:
        assert got == expected
    try:
        assert jsonbody.dump_json(value) == expected
    except ValueError as e:
        assert type(e) is expected


def test_every_corpus_body_is_written_by_c_exactly(cbody: Any) -> None:
    n = 0
    for value in json_bodies():
        got = cbody.dump_json(value)
        assert got == _python_dump(value) or (got is None and _has_float(value))
        n += got is not None
    assert n > 100


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return isinstance(value, list) and any(_has_float(v) for v in value)


@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000])
def test_sha256_at_the_padding_edges(cbody: Any, size: int) -> None:
    data = bytes((i * 7 + size) % 256 for i in range(size))
    assert cbody.sha256_digest(data) == hashlib.sha256(data).digest()


def test_sha256_golden(cbody: Any) -> None:
    # FIPS 180-4's "abc" example
    assert cbody.sha256_digest(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_sha256_of_any_bytes(cbody: Any, data: bytes) -> None:
    assert cbody.sha256_digest(data) == hashlib.sha256(data).digest()


EVENT = {
    "type": "m.room.message",
    "room_id": "!r:example.org",
    "sender": "@s:example.org",
    "content": {"body": 'é\n"x"', "msgtype": "m.text", "n": [1, -2, 2**64]},
    "depth": 12,
    "prev_events": ["$a"],
    "auth_events": [],
    "origin_server_ts": 1700000000000,
    "unsigned": {"age": 5},
    "signatures": {"example.org": {"ed25519:k": "sig"}},
    "hashes": {"sha256": "left out"},
}


def test_content_hash_golden(cbody: Any) -> None:
    expected = "O3UKB1hXdzVz8KbhYwawJKiaJe8iBSJflquHlQoxIeo"
    assert _python_hash(EVENT) == expected
    assert cbody.content_hash(EVENT) == expected
    assert body_tables.content_hash(EVENT) == expected


def test_content_hash_of_every_corpus_event(cbody: Any) -> None:
    n = 0
    for value in json_bodies():
        pdus = value.get("pdus") if isinstance(value, dict) else None
        for pdu in pdus if isinstance(pdus, list) else ():
            if isinstance(pdu, dict):
                got = cbody.content_hash(pdu)
                assert got is None or got == _python_hash(pdu)
                assert body_tables.content_hash(pdu) == _python_hash(pdu)
                n += got is not None
    assert n > 10


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(["type", "content", "hashes", "unsigned", "x"]), json_values)
)
def test_content_hash_of_any_event(cbody: Any, event: dict[str, Any]) -> None:
    got = cbody.content_hash(event)
    if got is not None:
        assert got == _python_hash(event) == body_tables.content_hash(event)


def test_an_event_with_a_float_is_hashed_by_python_inside_the_decoder(cbody: Any) -> None:
    """The C hash leaves a float to Python: the decoder then calls the tables' Python
    content_hash, so the derived hash still comes back exactly."""
    event: dict[str, Any] = {
        "type": "m.room.message",
        "content": {"n": 1.25},
        "origin_server_ts": 1,
    }
    assert cbody.content_hash(event) is None
    h = body_tables.content_hash(event)
    assert h is not None
    value = {**event, "hashes": {"sha256": h}}
    profile = load_profile(1)
    raw = body_encode._encode_cbor(value, profile, CTX)
    assert b"\xd7\xf6" in raw  # the hash was left out of the wire
    tables = body_fast.c_tables(cbody, profile, CTX.server_names)
    assert same(cbody.decode(raw, tables, 64, None), value)
