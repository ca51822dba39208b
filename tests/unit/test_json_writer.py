"""A CoAP request's JSON answer is written to its channel at once (synapse_coap/synapse/channel.py
``write_json_at_once``, installed by ``compat.write_json_first``).

Synapse's ``respond_with_json`` encodes the value in its thread pool (for a CoAP
request :class:`~synapse_coap.synapse.dispatch._InlinePool` runs it on the reactor
thread) and writes the bytes through a producer: a Deferred, a coroutine, the
logcontext switches around them and the producer's calls, for an answer the channel
only buffers. For a CoAP request the same bytes are now written at once; any other
request (an HTTP listener's) still goes through Synapse's writer.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import synapse.http.server as synapse_server
from canonicaljson import encode_canonical_json
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel

from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse import compat
from synapse_coap.synapse.channel import write_json_at_once
from tests.harness.gc_cycles import (  # noqa: F401 (no_automatic_gc: a fixture)
    MADE,
    dispatch_at_once,
    no_automatic_gc,
)

#: a value whose canonical JSON differs from json.dumps' (key order, separators, UTF-8)
VALUE = {"b": [1, 2, {"z": None, "a": True}], "a": "caf\u00e9 \u2603", "c": -7}
CANONICAL = encode_canonical_json(VALUE)


@pytest.fixture(autouse=True)
def _installed() -> Any:
    """The writer installed as the module's dispatcher installs it; Synapse's put back."""
    before = synapse_server._async_write_json_to_request_in_thread
    assert compat.write_json_first(write_json_at_once)
    yield
    synapse_server._async_write_json_to_request_in_thread = before


class _Json(Resource):
    """Answers with Synapse's own ``respond_with_json`` (as its servlets do)."""

    isLeaf = True

    def __init__(self, canonical: bool = True) -> None:
        super().__init__()
        self.canonical = canonical

    def render_GET(self, request: Request) -> Any:
        return synapse_server.respond_with_json(
            request, 200, VALUE, send_cors=True, canonical_json=self.canonical
        )


def _answer(resource: Resource) -> HttpResponse:
    # (answered before dispatch_now returned: no pool hop, no producer)
    result: HttpResponse = dispatch_at_once(resource, HttpRequest("GET", b"/j"))
    return result


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize("canonical", [True, False], ids=["canonical", "plain"])
def test_a_coap_requests_json_answer_is_synapses_bytes_written_at_once(
    canonical: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = synapse_server._async_write_json_to_request_in_thread.synapse_coap_original
    used: list[Any] = []

    def spy(*args: Any) -> Any:
        used.append(args)
        return original(*args)

    monkeypatch.setattr(
        synapse_server._async_write_json_to_request_in_thread, "synapse_coap_original", spy
    )
    MADE.clear()
    response = _answer(_Json(canonical))
    assert used == [], "Synapse's own writer was not used"
    assert response.status == 200
    assert response.body == (CANONICAL if canonical else synapse_server._encode_json_bytes(VALUE))
    assert dict(response.headers) == {
        "content-type": "application/json",
        "cache-control": "no-cache, no-store, must-revalidate",
    }
    assert len(MADE) == 2
    assert [ref() for ref in MADE] == [None, None], "kept alive by a reference cycle"


def test_any_other_requests_answer_goes_through_synapses_writer() -> None:
    writer = synapse_server._async_write_json_to_request_in_thread
    assert writer.synapse_coap_original is not writer
    request = Request(DummyChannel())
    out = writer(request, encode_canonical_json, VALUE)
    try:
        assert inspect.iscoroutine(out), "Synapse's coroutine, for run_in_background"
        assert out.cr_code is writer.synapse_coap_original.__code__
    finally:
        out.close()
    assert not request.finished


def test_an_http_request_through_respond_with_json_still_gets_its_answer() -> None:
    """Synapse's writer end to end on a plain Twisted channel: its pool hop (the real
    reactor's pool is not running here, so the encoding is driven by hand) and producer."""
    channel = DummyChannel()
    request = Request(channel)
    request.method = b"GET"
    request.uri = request.path = b"/j"
    request.clientproto = b"HTTP/1.0"
    pending: list[Any] = []

    class _Pool:
        def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **k: Any) -> None:
            pending.append((on_result, f, a, k))

    class _Reactor:
        def getThreadPool(self) -> _Pool:
            return _Pool()

        def callFromThread(self, f: Any, *a: Any, **k: Any) -> None:
            f(*a, **k)

    request.reactor = _Reactor()  # type: ignore[attr-defined]
    assert synapse_server.respond_with_json(request, 200, VALUE) is NOT_DONE_YET
    assert len(pending) == 1 and not request.finished, "encoding waits for the pool"
    on_result, f, a, k = pending.pop()
    on_result(True, f(*a, **k))
    assert request.finished
    assert channel.transport.written.getvalue().endswith(CANONICAL)


def test_installing_again_keeps_synapses_writer_underneath() -> None:
    first = synapse_server._async_write_json_to_request_in_thread
    original = first.synapse_coap_original
    try:
        assert compat.write_json_first(write_json_at_once)
        again = synapse_server._async_write_json_to_request_in_thread
        assert again is not first
        assert again.synapse_coap_original is original
    finally:
        synapse_server._async_write_json_to_request_in_thread = first


def test_a_synapse_without_the_writer_starts_and_keeps_its_own_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(synapse_server, "_async_write_json_to_request_in_thread")
    compat.check_static()  # an optional piece: no ConfigError
    assert not compat.write_json_first(write_json_at_once)
    assert not hasattr(synapse_server, "_async_write_json_to_request_in_thread")


def test_a_writer_with_other_arguments_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    async def moved(request: Any, encoder: Any, value: Any, extra: Any) -> None:
        raise AssertionError("not called")

    monkeypatch.setattr(synapse_server, "_async_write_json_to_request_in_thread", moved)
    assert not compat.write_json_first(write_json_at_once)
    assert synapse_server._async_write_json_to_request_in_thread is moved
