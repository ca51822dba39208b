"""The native build's C transcoder (synapse_coap/wire/_cenc.c): whatever JSON body it
takes, it gives exactly the profile CBOR of the reference path (parse_json_exact, then
body_encode._encode_cbor); everything else is None (then the reference path decides).

It runs here in both test runs: from the native build, and on the plain-Python sources
(SYNAPSE_COAP_PURE=1, where the package cannot import it) loaded from its extension.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.mapping.jsonbody import parse_json_exact
from synapse_coap.wire import body_encode
from synapse_coap.wire.body_tables import _tables
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import Profile, load_profile, profile_ids
from tests.harness.cbody_fuzz import c_module
from tests.harness.corpus import json_bodies

_NAME = "synapse_coap.wire._cenc"
SERVER = "corpus.example.org"
CONTEXTS = (WireContext(), WireContext(server_names=(SERVER, "matrix.org")))


def _module() -> Any:
    return c_module(_NAME, body_encode._CENC)


@pytest.fixture(scope="module")
def cenc() -> Any:
    return _module()


def _transcode(mod: Any, body: bytes, profile: Profile, context: WireContext) -> bytes | None:
    t = _tables(profile)
    miss = body_encode._Miss(profile, context)
    out: bytes | None = mod.transcode(body, t.key_bytes, t.value_bytes, miss.enc.cache, miss)
    return out


def _reference(body: bytes, profile: Profile, context: WireContext) -> bytes | Exception:
    try:
        return body_encode._encode_cbor(parse_json_exact(body), profile, context)
    except Exception as e:  # the reference path's error: the transcoder must not take it
        return e


def _compact(value: Any) -> bytes:
    """A body as Synapse writes it (canonical JSON's separators, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _check(mod: Any, body: bytes, profile: Profile, context: WireContext) -> bool:
    """True if the transcoder took ``body`` (and then gave the reference's bytes)."""
    got = _transcode(mod, body, profile, context)
    if got is None:
        return False
    want = _reference(body, profile, context)
    assert got == want, body[:200]
    return True


@pytest.mark.parametrize("profile_id", profile_ids())
def test_same_bytes_as_the_reference_on_the_corpora(cenc: Any, profile_id: int) -> None:
    profile = load_profile(profile_id)
    bodies = json_bodies()
    assert len(bodies) > 500
    for context in CONTEXTS:
        taken = 0
        for value in bodies:
            for text in (_compact(value), json.dumps(value, indent=1).encode()):
                taken += _check(cenc, text, profile, context)
        # most bodies have no float, derived hash or event id list: the transcoder
        # takes them (a transcoder that declined everything would pass the rest)
        assert taken > len(bodies), taken


def test_the_codec_sends_the_same_bytes_through_the_transcoder(cenc: Any) -> None:
    profile = load_profile(max(profile_ids()))
    taken = 0
    for value in json_bodies()[:200]:
        body = _compact(value)
        for context in CONTEXTS:
            fast = body_encode.encode_json_fast(body, profile, context)
            if fast is not None:
                taken += 1
                assert fast == body_encode.encode_body(parse_json_exact(body), profile, context)
    # the sources run (SYNAPSE_COAP_PURE=1): the package does not use the transcoder
    assert taken > 200 if body_encode._CENC is not None else taken == 0


GOLDEN = [
    # (JSON, profile 0's CBOR, hex): the key and value tables are empty in profile 0
    (b'{"a":1}', "a1616101"),
    (b' [ true , false , null , "" ] ', "84f5f4f660"),
    (b"-0", "00"),
    (b"-1", "20"),
    (b"18446744073709551615", "1bffffffffffffffff"),
    (b"-18446744073709551615", "3bfffffffffffffffe"),
    (b'"\\u00e9\\ud83d\\ude00\\n"', "67c3a9f09f98800a"),
    # timestamps: the second within 2**32 of the first is a delta (tag 21)
    (
        b"[1700000000000,1700000000500,4294967296]",
        "831b0000018bcfe56800d51901f41b0000000100000000",
    ),
]


@pytest.mark.parametrize(("body", "hexed"), GOLDEN)
def test_golden_vectors(cenc: Any, body: bytes, hexed: str) -> None:
    profile = load_profile(0)
    got = _transcode(cenc, body, profile, WireContext())
    assert got is not None
    assert got == _reference(body, profile, WireContext())
    assert got.hex() == hexed


DECLINED = [
    b"1.5",
    b"1e3",
    b"18446744073709551616",  # 2**64: a bignum
    b"-18446744073709551617",
    b'{"a":1,"a":2}',
    b'{"a":1,"b":2,"a":3}',
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"a\x01"',
    b'"\xff"',
    b"[1] x",
    b"[1,]",
    b'{"a" 1}',
    b"01",
    b"NaN",
    b"Infinity",
    b"",
    b'{"hashes":{"sha256":"x"},"b":1}',
    b'["$' + b"A" * 43 + b'"]',
    b"[" * 401 + b"]" * 401,
]


@pytest.mark.parametrize("body", DECLINED)
def test_what_it_does_not_take_goes_to_the_reference_path(cenc: Any, body: bytes) -> None:
    for profile_id in profile_ids():
        assert _transcode(cenc, body, load_profile(profile_id), CONTEXTS[1]) is None


def test_nesting_under_the_cap_is_taken(cenc: Any) -> None:
    body = b"[" * 400 + b"]" * 400
    assert _check(cenc, body, load_profile(0), WireContext())


_text = st.text(max_size=12) | st.sampled_from(
    ["m.room.message", "@u:corpus.example.org", "!r:matrix.org", "ed25519:abc", "", "$" * 3]
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.integers(min_value=2**32, max_value=2**32 + 2**33)
    | _text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json, ascii_only=st.booleans(), spaced=st.booleans())
def test_any_plain_json_is_taken_and_gives_the_reference_bytes(
    cenc: Any, value: Any, ascii_only: bool, spaced: bool
) -> None:
    body = json.dumps(
        value, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":")
    ).encode("utf-8", "surrogatepass")
    profile = load_profile(max(profile_ids()))
    for context in CONTEXTS:
        want = _reference(body, profile, context)
        got = _transcode(cenc, body, profile, context)
        if isinstance(want, Exception):
            assert got is None
        elif got is not None:
            assert got == want
        else:
            # declined only for what the module docstring lists
            assert _declinable(value), body


def _declinable(value: Any) -> bool:
    """A derived-hash candidate (a key "hashes") or an integer under -(2**64 - 1)."""
    if isinstance(value, dict):
        return "hashes" in value or any(_declinable(v) for v in value.values())
    if isinstance(value, list):
        return any(_declinable(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value < -(2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(cenc: Any, data: bytes) -> None:
    profile = load_profile(0)
    got = _transcode(cenc, data, profile, WireContext())
    if got is not None:
        assert got == _reference(data, profile, WireContext())


def test_threads_encoding_at_once_get_their_own_bytes(cenc: Any) -> None:
    # the decode pool encodes large answers while the loop's thread encodes the others:
    # the Python encoder the transcoder calls for a cache miss is not shared between them
    import random
    import sys
    import threading

    profile = load_profile(max(profile_ids()))
    context = CONTEXTS[1]
    rng = random.Random(5)
    # strings over the cache's length limit: every one is a miss, in every thread
    bodies = [
        _compact({"a": [rng.randbytes(60).hex() for _ in range(6)], "b": rng.randbytes(50).hex()})
        for _ in range(40)
    ]
    want = [body_encode.encode_body(parse_json_exact(b), profile, context) for b in bodies]
    wrong: list[int] = []

    def work(seed: int) -> None:
        for i in range(300):
            n = (seed * 7 + i) % len(bodies)
            got = body_encode.encode_json_fast(bodies[n], profile, context)
            if got is not None and got != want[n]:
                wrong.append(n)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong


def test_short_ascii_strings_kept_between_bodies_give_the_same_bytes(cenc: Any) -> None:
    # short ASCII strings are kept from one body to the next (a direct-mapped table of
    # 1024): strings that share a slot, that differ in one byte or in length, at the
    # 64-byte edge and past it, non-ASCII ones, and a second pass after thousands of
    # other strings went through every slot, each as the reference encodes it
    import random

    profile = load_profile(max(profile_ids()))
    rng = random.Random(11)
    words = [f"k{i}" for i in range(3000)]
    edge = ["x" * 63, "x" * 64, "x" * 65, "y" * 64, "x" * 63 + "y", "é" * 10, "a\u2028b"]
    near = ["m.room.message", "m.room.messagE", "m.room.messag", "m.room.messages", ""]
    bodies = [
        _compact({w: [w, w.upper(), rng.choice(edge + near)] for w in words[i : i + 40]})
        for i in range(0, len(words), 40)
    ]
    bodies += [_compact({e: e for e in edge + near}), _compact(edge + near + words[:50])]
    for context in CONTEXTS:
        for _ in range(2):
            for body in bodies:
                assert _check(cenc, body, profile, context), body[:80]
