"""The C scan of a response's identifiers (synapse_coap/wire/_cenc.c ``response_ids``):
for what it takes, the tuple of the reference (``strings.python_response_identifiers``:
json.loads and a walk over every string); everything else it leaves to the reference
(None), which then gives the tuple or ().

Like test_cjson.py, it runs in both test runs: from the native build, and on the
plain-Python sources (SYNAPSE_COAP_PURE=1) with the build's extension loaded directly.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_coap.wire import body_encode, strings
from tests.harness.cbody_fuzz import c_module
from tests.harness.corpus import json_bodies
from tests.unit.test_body import json_values

LIMIT = strings.MAX_RESPONSE_IDS


@pytest.fixture(scope="module")
def cenc() -> Any:
    return c_module("synapse_coap.wire._cenc", body_encode._CENC)


def _id(sigil: str, seed: int) -> str:
    raw = random.Random(seed).randbytes(32)
    return sigil + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


ROOMS = [_id("!", i) for i in range(40)]
EVENTS = [_id("$", 1000 + i) for i in range(40)]
#: canonical base64 ends in a character whose two low bits are zero ("A", "E", ...)
NOT_CANONICAL = EVENTS[0][:-1] + ("B" if EVENTS[0][-1] == "A" else "A")


def _check(cenc: Any, body: bytes, taken: bool | None = None) -> tuple[str, ...] | None:
    """The C result; checks it against the reference (and whether it was taken)."""
    ref = strings.python_response_identifiers(body)
    got = cenc.response_ids(body, LIMIT)
    if got is not None:
        assert got == ref, body
        assert all(type(x) is str for x in got)
    if taken is not None:
        assert (got is not None) == taken, body
    assert strings.response_identifiers(body) == ref
    return got


def test_golden(cenc: Any) -> None:
    r, e = ROOMS, EVENTS
    sync = {"rooms": {"join": {r[0]: {"timeline": {"events": [{"event_id": e[0]}]}}}}}
    assert _check(cenc, json.dumps(sync).encode(), True) == (r[0], e[0])
    # rooms first, document order, distinct; keys before their values
    body = json.dumps({e[1]: r[1], "x": [e[0], r[0], e[1], r[1]], r[2]: e[2]}).encode()
    assert _check(cenc, body, True) == (r[1], r[0], r[2], e[1], e[0], e[2])
    # the walk stops at 16 rooms: events after them are not kept, and at most 16 in all
    many = json.dumps({"a": r[:20], "b": e[:3]}).encode()
    assert _check(cenc, many, True) == tuple(r[:16])
    mixed = json.dumps({"b": e[:20], "a": r[:3]}).encode()
    assert _check(cenc, mixed, True) == tuple(r[:3] + e[:13])
    # not ids: a wrong length, a non-canonical last character, another sigil or alphabet
    others = [e[0][:-1], e[0] + "A", NOT_CANONICAL, "#" + e[0][1:], e[0][:-1] + "+", "@" * 44]
    assert _check(cenc, json.dumps(others).encode(), True) == ()
    # nothing to find, any JSON value
    for v in (None, True, 0, -1.5e-3, "s", [], {}, [[]], {"a": {"b": [1, 2.0, None]}}):
        assert _check(cenc, json.dumps(v).encode(), True) == ()
    # whitespace json.loads takes
    assert _check(cenc, f' \t\n\r{{ "k" : [ "{e[0]}" , 1 ] }} \n'.encode(), True) == (e[0],)
    # escapes: one other than \\u leaves a character no id has
    assert _check(cenc, json.dumps([e[0][:-1] + "\n"]).encode(), True) == ()
    assert _check(cenc, b'["a\\"b\\\\c\\/d\\b\\f\\n\\r\\t"]', True) == ()


def test_left_to_the_reference(cenc: Any) -> None:
    e = EVENTS
    escaped = json.dumps([e[0]]).replace("A", "\\u0041", 1).encode()
    not_taken = [
        escaped,  # a \u escape in a string that could be an id
        json.dumps({"k": 1, "j": [e[0]], "k ": 2}).encode().replace(b'"k "', b'"k"'),
        b'{"\\u006b": 1}',  # an escaped key
        b"[NaN]",
        b"[Infinity]",
        b"[-Infinity]",
        b"[1] x",  # trailing data
        b"[1,]",
        b"{'a': 1}",
        b"\xef\xbb\xbf[]",  # a BOM
        b'["\xff"]',  # not UTF-8: json.loads fails, ()
        b'["\x01"]',  # a raw control character
        b"[" + b"1" * 4001 + b"]",  # past Python's int digits limit
        b"[" * 300 + b"]" * 300,  # deeper than the scan goes
        b"",
        b"   ",
        b"[01]",
        b"[1.]",
        b"[.5]",
        b'"\\x"',
        b'"\\u12"',
    ]
    for body in not_taken:
        _check(cenc, body, False)
    assert cenc.response_ids(escaped, LIMIT) is None
    assert strings.response_identifiers(escaped) == (e[0],)


def test_duplicate_keys_beyond_the_inline_list(cenc: Any) -> None:
    """An object's keys are checked for duplicates in a list and then a table."""
    e = EVENTS
    for n in (2, 31, 32, 33, 64, 200, 1000):
        keys = [f"k{i}" for i in range(n)]
        obj = ", ".join(f'"{k}": "{e[i % 8]}"' for i, k in enumerate(keys))
        _check(cenc, ("{" + obj + "}").encode(), True)
        dup = ", ".join(f'"{k}": "{e[i % 8]}"' for i, k in enumerate([*keys, keys[n // 2]]))
        _check(cenc, ("{" + dup + ', "z": "' + e[9] + '"}').encode(), False)
    # the same key in two objects is no duplicate
    _check(cenc, json.dumps([{"a": e[0]}, {"a": e[1]}]).encode(), True)


def test_non_ascii_and_surrogates(cenc: Any) -> None:
    e = EVENTS
    _check(cenc, json.dumps({"body": "é 😀", "id": e[0]}, ensure_ascii=False).encode(), True)
    # a UTF-8 encoded surrogate: json.loads decodes with surrogatepass and takes it
    _check(cenc, b'["\xed\xa0\x80", "' + e[0].encode() + b'"]', True)
    _check(cenc, b'["\\ud800"]', True)  # a lone surrogate escape (a short string)


def test_limit(cenc: Any) -> None:
    body = json.dumps(ROOMS[:5] + EVENTS[:5]).encode()
    assert cenc.response_ids(body, 0) == ()
    assert cenc.response_ids(body, 7) == tuple(ROOMS[:5] + EVENTS[:2])
    assert cenc.response_ids(body, 64) == tuple(ROOMS[:5] + EVENTS[:5])
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="limit"):
            cenc.response_ids(body, bad)
    with pytest.raises(TypeError):
        cenc.response_ids("[]", 16)


def test_every_corpus_body(cenc: Any) -> None:
    """Every body of the corpora, compact as Synapse writes it and with json's defaults."""
    for value in json_bodies():
        for text in (
            json.dumps(value, ensure_ascii=False, separators=(",", ":")),
            json.dumps(value),
        ):
            _check(cenc, text.encode("utf-8", "surrogatepass"))
        _check(
            cenc,
            json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8", "surrogatepass"
            ),
            True,
        )


ids = st.sampled_from(ROOMS[:20] + EVENTS[:20] + [NOT_CANONICAL, EVENTS[0][:-1]])
values_with_ids = st.recursive(
    json_values | ids,
    lambda children: (
        st.lists(children, max_size=8)
        | st.dictionaries(st.text(max_size=4) | ids, children, max_size=8)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values_with_ids, st.booleans(), st.sampled_from([None, 0, 2]))
def test_values_against_the_reference(cenc: Any, value: Any, ascii: bool, indent: Any) -> None:
    text = json.dumps(value, ensure_ascii=ascii, indent=indent)
    _check(cenc, text.encode("utf-8", "surrogatepass"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values_with_ids, st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3))))
def test_mutated_bodies_against_the_reference(
    cenc: Any, value: Any, edits: list[tuple[int, bytes]]
) -> None:
    body = bytearray(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    for at, data in edits:
        at %= len(body) + 1
        body[at : at + len(data) % 2] = data  # replace one byte, or insert
    _check(cenc, bytes(body))
