"""A CoAP request's JSON body is handed to Synapse as the value the codec decoded
(``HttpRequest.value``; synapse_coap/synapse/channel.py ``take_json_value``, installed
by ``compat.parse_json_first``) instead of Synapse parsing the text the codec wrote
from that value: the same value, one parse less a request.

Held to: the value is what ``json.loads`` of the body gives, types included, on
every JSON request body of the corpus (training and held-out); Synapse's own
``parse_json_object_from_request`` returns it without parsing, once, and then
behaves as after its own read; a body Synapse would refuse (a lone surrogate) and any
other request's body are parsed by Synapse's function as before.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import synapse.http.servlet as synapse_servlet
from synapse.api.errors import SynapseError
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from synapse_coap.mapping.codec import WireCodec, request_seq
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import ReceiverTokens, SenderTokens
from synapse_coap.synapse import compat
from synapse_coap.synapse.channel import NO_VALUE, take_json_value
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile, profile_ids
from synapse_coap.wire.strings import ReceiverStrings, SenderStrings
from tests.harness.corpus import json_requests
from tests.harness.gc_cycles import dispatch_at_once

#: floats, big and negative integers, nesting, non-ASCII text, an empty key
VALUE = {
    "pdus": [{"content": {"body": "caf\u00e9 \u2603", "n": 1.0, "big": 2**70, "neg": -3}}],
    "": [[], {}, None, True, False, 0.5e-7],
}


@pytest.fixture(autouse=True)
def _installed() -> Any:
    """The parser installed as the module's dispatcher installs it; Synapse's put back."""
    before = synapse_servlet.parse_json_value_from_request
    assert compat.parse_json_first(take_json_value, NO_VALUE)
    yield
    synapse_servlet.parse_json_value_from_request = before


def _same(a: Any, b: Any) -> bool:
    """Equal with the same types throughout (1 and 1.0, True and 1 differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_the_codecs_value_is_what_json_loads_gives_on_every_corpus_request() -> None:
    profile = load_profile(max(profile_ids()))
    codec = WireCodec(profile, WireContext(("remote.example", "origin.example")))
    sender = SenderTokens(strings=SenderStrings(first_seq=0))
    receiver = ReceiverTokens(strings=ReceiverStrings())
    checked = 0
    for method, target, body in json_requests():
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        req = HttpRequest(method, target.encode(), (("content-type", "application/json"),), text)
        msg = codec.encode_request(req, sender)
        got = codec.decode_request(msg, receiver)
        assert got == req
        if request_seq(msg) is None:
            continue  # (decoded through the body memo: no value, Synapse parses the text)
        assert got.value is not None, req.target
        assert _same(got.value, json.loads(got.body)), req.target
        checked += 1
    assert checked > 20


class _Parse(Resource):
    """Parses the body with Synapse's own ``parse_json_object_from_request`` (as its
    servlets do), twice, and records what it got."""

    isLeaf = True

    def __init__(self, second_allows_empty: bool = False) -> None:
        super().__init__()
        self.got: list[Any] = []
        self.second_allows_empty = second_allows_empty

    def render_PUT(self, request: Request) -> bytes:
        for parse in (
            synapse_servlet.parse_json_object_from_request,
            lambda r: synapse_servlet.parse_json_value_from_request(
                r, allow_empty_body=self.second_allows_empty
            ),
        ):
            try:
                self.got.append(parse(request))
            except SynapseError as e:
                self.got.append(e)
        return b"{}"


def _put(resource: _Parse, request: HttpRequest) -> HttpResponse:
    result: HttpResponse = dispatch_at_once(resource, request)
    return result


def _request(value: Any, body: bytes | None = None) -> HttpRequest:
    text = json.dumps(value, ensure_ascii=False).encode() if body is None else body
    return HttpRequest("PUT", b"/p", (("content-type", "application/json"),), text, value)


@pytest.mark.parametrize("allows_empty", [False, True], ids=["second-refused", "second-empty"])
def test_synapse_is_handed_the_value_once_then_reads_as_after_its_own_parse(
    allows_empty: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = synapse_servlet.parse_json_value_from_request.synapse_coap_original
    parsed: list[Any] = []

    def spy(request: Any, allow_empty_body: bool = False) -> Any:
        parsed.append(request.content.tell())
        return original(request, allow_empty_body)

    monkeypatch.setattr(synapse_servlet.parse_json_value_from_request, "synapse_coap_original", spy)
    request = _request(VALUE)
    resource = _Parse(allows_empty)
    assert _put(resource, request).status == 200
    first, second = resource.got
    assert first is request.value, "the codec's value itself, not a parse of the text"
    # the second parse is Synapse's, on content left at its end as its own read leaves it
    assert parsed == [len(request.body)]
    if allows_empty:
        assert second is None
    else:
        assert isinstance(second, SynapseError) and second.code == 400


def test_a_body_synapse_would_refuse_as_text_is_left_to_synapse() -> None:
    # a lone surrogate: the codec carries it (its JSON text is surrogatepass UTF-8),
    # Synapse's parse refuses the text; so it still does
    value = {"body": "\ud800"}
    body = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    resource = _Parse()
    _put(resource, _request(value, body))
    refused = resource.got[0]
    assert isinstance(refused, SynapseError) and refused.code == 400


def test_a_request_without_a_value_is_parsed_by_synapse() -> None:
    resource = _Parse()
    request = HttpRequest("PUT", b"/p", (("content-type", "application/json"),), b'{"a": 1.0}')
    assert _put(resource, request).status == 200
    assert _same(resource.got[0], {"a": 1.0})


def test_any_other_requests_body_is_parsed_by_synapse() -> None:
    request = Request(DummyChannel())
    request.content = io.BytesIO(b'{"x": [1]}')
    assert take_json_value(request) is NO_VALUE
    assert synapse_servlet.parse_json_object_from_request(request) == {"x": [1]}


def test_installing_again_keeps_synapses_parser_underneath() -> None:
    first = synapse_servlet.parse_json_value_from_request
    original = first.synapse_coap_original
    try:
        assert compat.parse_json_first(take_json_value, NO_VALUE)
        again = synapse_servlet.parse_json_value_from_request
        assert again is not first
        assert again.synapse_coap_original is original
    finally:
        synapse_servlet.parse_json_value_from_request = first


def test_a_parser_with_other_arguments_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def moved(request: Any, allow_empty_body: bool, extra: Any) -> Any:
        raise AssertionError("not called")

    monkeypatch.setattr(synapse_servlet, "parse_json_value_from_request", moved)
    compat.check_static()  # an optional piece: no ConfigError
    assert not compat.parse_json_first(take_json_value, NO_VALUE)
    assert synapse_servlet.parse_json_value_from_request is moved
