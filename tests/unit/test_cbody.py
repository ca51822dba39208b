"""The native build's C body decoder (synapse_coap/wire/_cbody.c): whatever it accepts,
it answers exactly what the reference decoder answers; everything else is the tables'
fallback object (then the cbor2 path and the reference decoder decide).

It runs here in both test runs: from the native build, and on the plain-Python sources
(SYNAPSE_COAP_PURE=1, where the package cannot import it) loaded from its extension.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap import native
from synapse_coap.errors import RemoteProtocolError
from synapse_coap.wire import body_decode, body_encode, body_fast
from synapse_coap.wire.body import DEFAULT_BODY_LIMITS, BodyLimits
from synapse_coap.wire.profile import Profile, load_profile
from tests.harness.cbody_fuzz import c_module
from tests.harness.corpus import json_bodies
from tests.unit.test_body import CTX, DEPTH_CASES, SERVER, json_values, same

_NAME = "synapse_coap.wire._cbody"


def _module() -> Any:
    return c_module(_NAME, body_fast._C)


@pytest.fixture(scope="module")
def cbody() -> Any:
    return _module()


_TABLES: dict[tuple[int, tuple[str, ...]], Any] = {}


def _tables(mod: Any, profile: Profile, names: tuple[str, ...]) -> Any:
    key = (profile.id, names)
    if key not in _TABLES:
        _TABLES[key] = body_fast.c_tables(mod, profile, names)
    return _TABLES[key]


Resolve = Callable[[int, int], str] | None


def _c(
    mod: Any,
    data: bytes,
    limits: BodyLimits = DEFAULT_BODY_LIMITS,
    resolve: Resolve = None,
    profile: Profile | None = None,
) -> Any:
    p = profile or load_profile(1)
    return mod.decode(data, _tables(mod, p, CTX.server_names), limits.max_depth, resolve)


def _reference(
    data: bytes, limits: BodyLimits = DEFAULT_BODY_LIMITS, resolve: Resolve = None
) -> Any:
    try:
        return body_decode._Decoder(data, load_profile(1), CTX, limits, resolve).decode()
    except RemoteProtocolError as e:
        return type(e)


def _agree(mod: Any, data: bytes, limits: BodyLimits = DEFAULT_BODY_LIMITS) -> Any:
    got = _c(mod, data, limits)
    if got is not body_fast.FALLBACK:
        ref = _reference(data, limits)
        assert not isinstance(ref, type), (data, got, ref)  # the reference accepts it too
        assert same(got, ref), (data, got, ref)
    return got


def test_it_has_the_tag_numbers_of_the_python_decoders(cbody: Any) -> None:
    assert cbody.TAGS == body_fast._C_TAGS


def test_every_corpus_body_takes_the_c_path_and_decodes_exactly(cbody: Any) -> None:
    bodies = json_bodies()
    assert len(bodies) > 100
    for value in bodies:
        raw = body_encode._encode_cbor(value, load_profile(1), CTX)
        got = _c(cbody, raw)
        assert got is not body_fast.FALLBACK, value
        assert same(got, value), value
        assert same(got, _reference(raw))


def test_profile_0_tables(cbody: Any) -> None:
    p0 = load_profile(0)
    for value in json_bodies()[:40]:
        raw = body_encode._encode_cbor(value, p0, CTX)
        assert same(_c(cbody, raw, profile=p0), value)


def _has_big(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_big(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_big(v) for v in value)
    return type(value) is int and not -(2**63) <= value < 2**64


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.data())
def test_what_we_encode_takes_the_c_path(cbody: Any, value: Any, data: st.DataObject) -> None:
    raw = body_encode._encode_cbor(value, load_profile(1), CTX)
    got = _c(cbody, raw)
    if got is body_fast.FALLBACK:
        # only ints outside [-2**63, 2**64) (bignums, and the lowest negative ints) are
        # left to the others
        assert _has_big(value), value
    else:
        assert same(got, value)
    mutated = bytearray(raw)
    i = data.draw(st.integers(0, len(mutated) - 1))
    mutated[i] = data.draw(st.integers(0, 255))
    _agree(cbody, bytes(mutated))
    _agree(cbody, raw, BodyLimits(max_depth=data.draw(st.integers(1, 6))))
    _agree(cbody, raw[: data.draw(st.integers(0, len(raw)))])


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=60))
def test_any_bytes(cbody: Any, data: bytes) -> None:
    _agree(cbody, data)


_ID = bytes(range(32))
_ID_TEXT = base64.urlsafe_b64encode(_ID).rstrip(b"=").decode()


def _keys() -> tuple[str, ...]:
    return load_profile(1).keys


def _value(n: int) -> str:
    return load_profile(1).values[n]


# (CBOR, what it decodes to): golden vectors of each construct the C decoder takes
GOLDEN: list[tuple[bytes, Callable[[], Any]]] = [
    (b"\x00", lambda: 0),
    (b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff", lambda: 2**64 - 1),
    (b"\x3b\x7f\xff\xff\xff\xff\xff\xff\xff", lambda: -(2**63)),
    (b"\x63abc", lambda: "abc"),
    (b"\x62\xc3\xa9", lambda: "\u00e9"),
    (b"\xf4", lambda: False),
    (b"\xf5", lambda: True),
    (b"\xf6", lambda: None),
    (b"\xf9\x3c\x00", lambda: 1.0),
    (b"\xf9\x80\x00", lambda: -0.0),
    (b"\xf9\x00\x01", lambda: 2.0**-24),
    (b"\xf9\x7b\xff", lambda: 65504.0),
    (b"\xf9\x7c\x00", lambda: float("inf")),
    (b"\xfa\x3f\xc0\x00\x00", lambda: 1.5),
    (b"\xfb" + struct.pack(">d", 0.1), lambda: 0.1),
    (b"\x80", lambda: []),
    (b"\xa0", lambda: {}),
    (b"\xa1\x00\xf6", lambda: {_keys()[0]: None}),
    (b"\xa1\x20\xf6", lambda: {_keys()[1]: None}),
    (b"\xa1\x61k\xe0", lambda: {"k": _value(0)}),
    (b"\xa1\xe0\x01", lambda: {_value(0): 1}),
    (b"\xa1\x61k\xf8\x20", lambda: {"k": _value(20)}),
    (b"\xc6\x58\x20" + _ID, lambda: "$" + _ID_TEXT),
    (b"\xc7\x58\x20" + _ID, lambda: "!" + _ID_TEXT),
    (b"\xd3\x58\x40" + _ID + _ID, lambda: ["$" + _ID_TEXT, "$" + _ID_TEXT]),
    (b"\xc8\x43\xfb\xff\xfe", lambda: "+//+"),
    (b"\xc9\x43\xfb\xff\xfe", lambda: "-__-"),
    (b"\xc8\x41\x00", lambda: "AA"),
    (b"\xc8\x40", lambda: ""),
    (b"\xca\x63bob", lambda: "@bob:" + SERVER),
    (b"\xcd\x61x", lambda: "$x:" + SERVER),
    (b"\xd8\x20\x63bob", lambda: "@bob:" + SERVER),
    (b"\xd2\x00", lambda: SERVER),
    (b"\xd4\x66a_key1", lambda: "ed25519:a_key1"),
    (b"\xd6\x61m", lambda: "mxc://" + SERVER + "/m"),
    (b"\xd8\xe0\x61m", lambda: "mxc://" + SERVER + "/m"),
    (b"\xa1\xd2\x00\x01", lambda: {SERVER: 1}),
    # timestamp deltas: from the last big int in value position, forwards and backwards
    (
        b"\x83\x1b\x00\x00\x01\x90\x00\x00\x00\x00\xd5\x05\xd5\x24",
        lambda: [0x19000000000, 0x19000000005, 0x19000000005 - 5],
    ),
    (
        b"\xa2\x61a\x1b\x00\x00\x00\x01\x00\x00\x00\x00\x61b\xd5\x00",
        lambda: {"a": 2**32, "b": 2**32},
    ),
]


@pytest.mark.parametrize(("data", "expected"), GOLDEN, ids=[g[0].hex()[:24] for g in GOLDEN])
def test_golden_vectors(cbody: Any, data: bytes, expected: Callable[[], Any]) -> None:
    got = _c(cbody, data)
    assert same(got, expected()), (got, expected())
    assert same(got, _reference(data))


def test_a_derived_hash_is_recomputed(cbody: Any) -> None:
    event = {"type": "m.room.message", "content": {"body": "hi"}, "origin_server_ts": 1}
    h = body_decode.content_hash(event)
    assert h is not None
    value = {**event, "hashes": {"sha256": h}}
    raw = body_encode._encode_cbor(value, load_profile(1), CTX)
    assert b"\xd7\xf6" in raw  # the hash was left out of the wire
    assert same(_c(cbody, raw), value)


FALLBACKS = [
    b"",
    b"\x00\x00",  # trailing bytes
    b"\xc2\x41\x01",  # a bignum: the cbor2 path's
    b"\x3b\x80\x00\x00\x00\x00\x00\x00\x00",  # below -2**63
    b"\x9f\xff",  # indefinite length
    b"\x7f\xff",
    b"\x41\x00",  # a byte string outside a tag
    b"\x81\x41\x00",
    b"\xd8\x1c\x00",  # a tag that is not ours
    b"\xc1\x00",
    b"\xd9\xd9\xf7\x00",
    b"\x62\xff\xfe",  # not UTF-8
    b"\xca\x62\xff\xfe",
    b"\xa2\x61a\x00\x61a\x00",  # a duplicate key
    b"\xf7",  # undefined
    b"\xf8\x14",  # false in two bytes
    b"\xf8\x1f",
    b"\xfc",  # reserved
    b"\x82\x00",  # runs past the end
    b"\xa2\x00",
    b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",
    b"\x63ab",
    b"\xd5\x00",  # a timestamp delta with nothing before it
    b"\x81\xd5\x00",
    b"\x82\x00\xd5\x00",  # 0 is not a timestamp
    b"\xd7\xf6",  # a derived hash outside a map
    b"\x81\xd7\xf6",
    b"\xa1\x61a\xd7\xf6",  # ... under another key than "hashes"
    b"\xd7\x00",
    b"\xd2\x01",  # a server the context does not have
    b"\xd8\xe1\x61m",
    b"\xd8\x24\x61m",
    b"\xc6\x58\x1f" + _ID[:31],  # an identifier of 31 bytes
    b"\xd3\x40",  # an empty event id list
    b"\xd3\x58\x21" + _ID + b"\x00",
    b"\xc6\x63abc",  # a text where bytes belong and the reverse
    b"\xca\x43bob",
    b"\xca\xc4\x00",  # a sigil around a string reference: the cbor2 path's to try
    b"\xc4\x00",  # a string reference without a resolver
    b"\xa1\xd5\x00\x00",  # a timestamp delta as a key
    b"\xa1\xf5\x00",  # true as a key
    b"\xa1\xf9\x00\x00\x00",  # a float as a key
    b"\xa1\x19\xff\xff\x00",  # a key the key table does not have
    b"\xa1\xf8\xff\x00",  # a value the value table does not have
]


@pytest.mark.parametrize("data", FALLBACKS, ids=[d.hex()[:24] or "empty" for d in FALLBACKS])
def test_what_it_leaves_to_the_other_decoders(cbody: Any, data: bytes) -> None:
    assert _c(cbody, data) is body_fast.FALLBACK


@pytest.mark.parametrize(("data", "depth"), [*DEPTH_CASES, (b"\x81" * 200 + b"\x00", 200)])
def test_the_depth_cap_is_the_reference_one(cbody: Any, data: bytes, depth: int) -> None:
    at_cap = BodyLimits(max_depth=depth)
    got = _c(cbody, data, at_cap)
    assert got is not body_fast.FALLBACK
    assert same(got, _reference(data, at_cap))
    assert _c(cbody, data, BodyLimits(max_depth=depth - 1)) is body_fast.FALLBACK


def test_very_deep_input_is_left_to_the_others_without_recursing(cbody: Any) -> None:
    data = b"\x81" * 100_000 + b"\x00"
    assert _c(cbody, data, BodyLimits(max_depth=10**6)) is body_fast.FALLBACK


def test_string_references(cbody: Any) -> None:
    table = {(4, 0): "!room:" + SERVER, (5, 70): "$" + _ID_TEXT}
    data = b"\xa2\xc4\x00\x01\x61e\xc5\x18\x46"  # {ref 4/0: 1, "e": ref 5/70}
    expected = {"!room:" + SERVER: 1, "e": "$" + _ID_TEXT}
    assert same(_c(cbody, data, resolve=lambda t, i: table[(t, i)]), expected)

    def fails(t: int, i: int) -> str:
        raise RemoteProtocolError("no such reference")

    assert _c(cbody, data, resolve=fails) is body_fast.FALLBACK
    assert _c(cbody, data, resolve=lambda t, i: 7) is body_fast.FALLBACK  # type: ignore[arg-type,return-value]

    def no_memory(t: int, i: int) -> str:
        raise MemoryError

    with pytest.raises(MemoryError):  # Python's own trouble is not hidden
        _c(cbody, data, resolve=no_memory)


def test_through_decode_body_with_and_without_it(
    cbody: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode_body gives the same answers with the C decoder and without it."""
    p1 = load_profile(1)
    bodies = json_bodies()[:60]
    encoded = [body_encode.encode_body(v, p1, CTX) for v in bodies]
    with_c = [body_decode.decode_body(e, p1, CTX) for e in encoded]
    monkeypatch.setattr(body_fast, "_CONTEXTS", {})
    monkeypatch.setattr(body_fast, "_C", None)
    without = [body_decode.decode_body(e, p1, CTX) for e in encoded]
    assert all(same(a, b) and same(a, v) for a, b, v in zip(with_c, without, bodies, strict=True))


def test_the_package_cannot_import_it_when_the_sources_run() -> None:
    """With SYNAPSE_COAP_PURE=1 the package runs as plain Python, C decoder included."""
    import subprocess
    import sys

    env = {**os.environ, native.PURE_ENV: "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from synapse_coap.wire import body_fast; print(body_fast._C)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "None"
