"""A request's identifiers and texts for the session string table in one C walk
(``wire/_cbody.c`` ``request_strings``) against the Python reference
(``strings._identifiers_of`` / ``_texts_of`` over ``strings._strings``): the same
tuples on every JSON request body of the corpus and on hypothesis values (identifiers
repeated, texts at the caps, deep nesting, tuples), None for a subclass of dict, list,
tuple or str; ``request_identifiers`` gives ``python_request_identifiers``' answer.

It runs here in both test runs: from the native build, and on the plain-Python sources
(SYNAPSE_COAP_PURE=1) loaded from its extension.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.wire import body_fast, strings
from tests.harness.cbody_fuzz import c_module
from tests.harness.cbody_fuzz import reference_strings as _reference
from tests.harness.corpus import json_requests

LIMITS = (strings.MAX_IDS, strings.MIN_TEXT, strings.MAX_TEXT, strings.MAX_TEXT_TOTAL)


@pytest.fixture(scope="module")
def cbody() -> Any:
    return c_module("synapse_coap.wire._cbody", body_fast._C)


def _hash_id(sigil: str, body: str, last: str) -> str:
    return sigil + body + last


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_IDS = st.builds(
    _hash_id,
    st.sampled_from("$!#"),  # '#' is no identifier's sigil
    st.text(alphabet=_B64 + "+/=é", min_size=41, max_size=43),  # +, /, = and é: no id
    st.sampled_from("AEIMQUYcgkosw048Bz-"),  # B, z and -: not canonical last characters
)
_TEXTS = st.one_of(
    st.text(alphabet="ab \u00e9\u4e16\U0001f600", min_size=8, max_size=20),
    st.text(alphabet="xy ", min_size=500, max_size=520),  # around MAX_TEXT
    st.sampled_from(["a text with spaces", "another text here", "no_space_in_this_one"]),
)
_LEAVES = st.one_of(
    _IDS, _TEXTS, st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False)
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(_IDS, _TEXTS, st.text(max_size=4)), inner, max_size=6),
    ),
    max_leaves=80,
)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES, repeat=st.integers(1, 3))
def test_the_same_tuples_as_the_python_walk(cbody: Any, value: Any, repeat: int) -> None:
    value = [value] * repeat  # the same strings again: distinct ones only, first kept
    assert cbody.request_strings(value, *LIMITS) == _reference(value)


@settings(max_examples=200, deadline=None)
@given(value=_VALUES, max_ids=st.integers(0, 4))
def test_small_caps_stop_as_the_python_walk_stops(cbody: Any, value: Any, max_ids: int) -> None:
    got = cbody.request_strings(value, max_ids, *LIMITS[1:])
    assert got == _reference(value, max_ids)


def test_every_json_request_body_of_the_corpus(cbody: Any) -> None:
    bodies = json_requests()
    assert len(bodies) > 50
    for _method, target, body in bodies:
        assert cbody.request_strings(body, *LIMITS) == _reference(body), target
        assert strings.request_identifiers(
            target.encode(), body
        ) == strings.python_request_identifiers(target.encode(), body)


def test_caps_of_count_and_total() -> None:
    ids = [f"${i:042d}A" for i in range(100)]
    texts = [f"text number {i:03d}" + " " * 40 for i in range(100)]
    value = {"ids": ids, "texts": texts}
    got = strings.request_identifiers(b"/x", value)
    assert got == strings.python_request_identifiers(b"/x", value)
    assert len(got) == strings.MAX_IDS and got[0] == ids[0]


def test_a_subclass_is_left_to_the_reference(cbody: Any) -> None:
    class Text(str):
        pass

    ident = "$" + "A" * 43
    for odd in (
        collections.OrderedDict(a=ident),
        {"a": Text("a text with spaces")},
        [collections.UserList([ident])],  # not a list: no strings, in both
    ):
        if isinstance(odd, (dict, list)) and type(odd) not in (dict, list):
            assert cbody.request_strings(odd, *LIMITS) is None
        got = strings.request_identifiers(b"/x", odd)
        assert got == strings.python_request_identifiers(b"/x", odd)
    assert cbody.request_strings({"a": Text("a text with spaces")}, *LIMITS) is None
    assert cbody.request_strings([collections.UserList([ident])], *LIMITS) == ((), ())
    # after the walk is complete, what follows is not looked at (as the reference)
    first = [ident] * 1 + [f"${i:042d}A" for i in range(strings.MAX_IDS)]
    many = [("w " * 250) + str(i) for i in range(5)]  # 2,505 characters of texts
    full = {"a": first, "b": many, "c": {"d": Text("a text with spaces")}}
    assert cbody.request_strings(full, *LIMITS) == _reference(full)
    assert len(_reference(full)[0]) == strings.MAX_IDS and len(_reference(full)[1]) == 4


def test_deep_nesting_and_bad_arguments(cbody: Any) -> None:
    value: Any = "$" + "A" * 43
    for _ in range(10_000):
        value = [value]
    assert cbody.request_strings(value, *LIMITS) == (("$" + "A" * 43,), ())
    with pytest.raises(TypeError):
        cbody.request_strings(value)
    with pytest.raises(TypeError):
        cbody.request_strings(value, "64", 1, 2, 3)
