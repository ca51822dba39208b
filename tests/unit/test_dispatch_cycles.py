"""A finished CoAP request leaves no reference cycle behind (synapse_coap/synapse/dispatch.py).

Synapse turns Python's automatic garbage collection off and collects from a timer
(``synapse.metrics._gc``); a collection costs in proportion to the objects it
finds. A request whose channel, request, headers and Deferreds hang in a cycle is
freed only by that collection: measured with ``bench/inbound.py`` before this was
fixed, every CoAP request left about 42 such objects behind (HTTP requests 4) and
the collections took 11 % of the Synapse process's samples while it served CoAP
requests (2 % for HTTP). Freed by reference counting alone, they cost nothing there.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse.dispatch import CoapChannel, InProcessDispatcher, _address
from tests.harness.gc_cycles import (  # noqa: F401 (no_automatic_gc: a fixture)
    MADE,
    FakeHomeserver,
    SameThread,
    TrackedSite,
    no_automatic_gc,
)


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"hello":"world"}'

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        assert request.content is not None
        return b'{"echo":' + request.content.read() + b"}"


def _dispatcher() -> InProcessDispatcher:
    dispatcher = InProcessDispatcher(FakeHomeserver(), bridge=None, max_request_body_size=1000)  # type: ignore[arg-type]
    dispatcher._site = TrackedSite(_Hello())  # type: ignore[assignment]
    return dispatcher


def _run(dispatcher: InProcessDispatcher, request: HttpRequest) -> HttpResponse:
    """Dispatch ``request`` and return its response (everything else is dropped)."""
    d, abandon = dispatcher.start_in_reactor(request, PeerInfo("192.0.2.7", 5683))
    results: list[HttpResponse] = []
    d.addCallback(results.append)
    assert len(results) == 1, "the resource answers synchronously"
    abandon()  # (after the answer: does nothing, and keeps nothing)
    return results[0]


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize(
    "request_",
    [HttpRequest("GET", b"/hello"), HttpRequest("POST", b"/hello?x=1", (), b'{"a":[1,2]}')],
    ids=["get", "post-with-body"],
)
def test_a_finished_request_is_freed_by_reference_counting(request_: HttpRequest) -> None:
    MADE.clear()
    response = _run(_dispatcher(), request_)
    assert response.status == 200
    if request_.method == "GET":
        assert response.body == b'{"hello":"world"}'
    else:
        assert response.body == b'{"echo":{"a":[1,2]}}'
    assert len(MADE) == 2  # its channel and its request: both gone already
    assert [ref() for ref in MADE] == [None, None], "kept alive by a reference cycle"


def test_the_channel_is_its_own_transport_without_a_stored_reference() -> None:
    channel = CoapChannel(
        TrackedSite(_Hello()),  # type: ignore[arg-type]
        reactor,
        PeerInfo("192.0.2.7", 5683),
        _address("::", 0),
    )
    assert channel.transport is channel
    assert channel not in gc.get_referents(channel.__dict__)


class _Headers(Resource):
    """An answer with the headers Synapse writes, and a few the wire does not carry."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        request.setHeader(b"X-Unknown", b"dropped")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"ETAG", b'"v1"')
        request.setHeader(b"Content-Disposition", b"inline; filename=caf\xe9.txt")
        return b"{}"


def test_the_response_keeps_only_the_headers_the_wire_carries() -> None:
    """One pass over Synapse's headers: the carried ones, named in lower case, values
    decoded as Latin-1 (as before); the others (Server, Date, CORS, ...) dropped
    here already, as the codec would drop them."""
    from synapse_coap.mapping.codec import significant_headers

    dispatcher = _dispatcher()
    dispatcher._site = TrackedSite(_Headers())  # type: ignore[assignment]
    for _ in range(2):  # the second time from the name cache
        response = _run(dispatcher, HttpRequest("GET", b"/h"))
        assert dict(response.headers) == {
            "cache-control": "no-cache, no-store, must-revalidate",
            "content-type": "application/json",
            "etag": '"v1"',
            "content-disposition": "inline; filename=caf\xe9.txt",
        }
        # nothing left for the codec to drop
        assert sorted(significant_headers(response.headers)) == sorted(response.headers)


# -- the direct path (dispatch_now: no Deferred between Synapse and the transport) ------


def _direct() -> InProcessDispatcher:
    dispatcher = InProcessDispatcher(
        FakeHomeserver(),
        bridge=SameThread(),  # type: ignore[arg-type]
        max_request_body_size=1000,
    )
    dispatcher._site = TrackedSite(_Hello())  # type: ignore[assignment]
    return dispatcher


class _Later(Resource):
    """Answers when ``finish_all`` is called (an asynchronous servlet)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []
        self.lost: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        from twisted.web.server import NOT_DONE_YET

        self.waiting.append(request)
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        return NOT_DONE_YET

    def finish_all(self) -> None:
        for request in self.waiting:
            if not request.finished and not request._disconnected:
                request.setHeader(b"Content-Type", b"application/json")
                request.write(b'{"late":true}')
                request.finish()


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize(
    "request_",
    [HttpRequest("GET", b"/hello"), HttpRequest("POST", b"/hello?x=1", (), b'{"a":[1,2]}')],
    ids=["get", "post-with-body"],
)
def test_direct_an_answer_there_at_once_is_delivered_before_dispatch_now_returns(
    request_: HttpRequest,
) -> None:
    from synapse.logging.context import SENTINEL_CONTEXT, current_context

    MADE.clear()
    got: list[Any] = []

    def done(result: Any) -> None:
        got.append((result, current_context() is SENTINEL_CONTEXT))

    abandon = _direct().dispatch_now(request_, PeerInfo("192.0.2.7", 5683), done)
    assert abandon is not None
    assert len(got) == 1
    response, in_sentinel = got[0]
    assert in_sentinel
    assert isinstance(response, HttpResponse) and response.status == 200
    assert response.body == (
        b'{"hello":"world"}' if request_.method == "GET" else b'{"echo":{"a":[1,2]}}'
    )
    abandon()  # (after the answer: does nothing)
    assert len(got) == 1
    got.clear()
    del abandon, response
    assert len(MADE) == 2
    assert [ref() for ref in MADE] == [None, None], "kept alive by a reference cycle"


def _logging_context(name: str) -> Any:
    """A Synapse LoggingContext (its constructor's arguments differ between releases)."""
    from synapse.logging.context import LoggingContext

    try:
        return LoggingContext(name=name, server_name="test.example")  # type: ignore[call-arg]
    except TypeError:  # (a release before ``server_name``)
        return LoggingContext(name=name)


def test_direct_the_answer_is_delivered_in_the_context_synapse_finishes_in() -> None:
    """``done`` runs in the logcontext Synapse's ``finish`` runs in (a request's, as
    SynapseRequest's own), with no switch to the sentinel and back (each a ``getrusage``
    system call with Synapse 1.163); the caller's context is back once it returns."""
    from synapse.logging.context import SENTINEL_CONTEXT, current_context
    from twisted.web.server import NOT_DONE_YET

    contexts: list[Any] = []

    class _InContext(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> Any:
            with _logging_context("a request") as ctx:
                contexts.append(ctx)
                request.setHeader(b"Content-Type", b"application/json")
                request.write(b"{}")
                request.finish()
            return NOT_DONE_YET

    dispatcher = _direct()
    dispatcher._site = TrackedSite(_InContext())  # type: ignore[assignment]
    got: list[Any] = []

    def done(result: Any) -> None:
        got.append((result, current_context()))

    dispatcher.dispatch_now(HttpRequest("GET", b"/x"), PeerInfo("::1", 1), done)
    assert len(got) == 1 and got[0][0].status == 200 and got[0][0].body == b"{}"
    assert got[0][1] is contexts[0] and contexts[0] is not SENTINEL_CONTEXT
    assert current_context() is SENTINEL_CONTEXT


def _start_later() -> tuple[_Later, list[Any], Any]:
    """A request to a :class:`_Later` resource on the direct path: (the resource, what
    ``done`` got, the abandon function)."""
    later = _Later()
    dispatcher = _direct()
    dispatcher._site = TrackedSite(later)  # type: ignore[assignment]
    got: list[Any] = []
    abandon = dispatcher.dispatch_now(HttpRequest("GET", b"/x"), PeerInfo("::1", 1), got.append)
    assert abandon is not None and got == [] and len(later.waiting) == 1
    return later, got, abandon


def test_direct_a_later_answer_comes_from_synapse_s_finish() -> None:
    later, got, abandon = _start_later()
    later.finish_all()
    assert len(got) == 1 and got[0].status == 200 and got[0].body == b'{"late":true}'
    abandon()
    assert later.lost == [] and len(got) == 1


def test_direct_an_abandoned_request_is_dropped_in_synapse_and_never_answered() -> None:
    later, got, abandon = _start_later()
    abandon()
    assert later.lost == later.waiting  # the request saw its connection lost
    later.finish_all()  # (nothing: it is disconnected)
    abandon()  # (twice: nothing more)
    assert got == []


def test_direct_a_request_that_cannot_start_gets_its_error() -> None:
    dispatcher = _direct()

    class _Broken(Exception):
        pass

    def broken(*_: Any, **__: Any) -> Any:
        raise _Broken("no request")

    dispatcher._begin = broken  # type: ignore[method-assign]
    got: list[Any] = []
    abandon = dispatcher.dispatch_now(HttpRequest("GET", b"/x"), PeerInfo("::1", 1), got.append)
    assert abandon is not None
    assert len(got) == 1 and isinstance(got[0], _Broken)
    abandon()
    assert len(got) == 1


def test_direct_not_in_thread_mode() -> None:
    class _Thread:
        same_thread = False

    dispatcher = InProcessDispatcher(
        FakeHomeserver(),
        bridge=_Thread(),  # type: ignore[arg-type]
        max_request_body_size=1000,
    )
    assert dispatcher.dispatch_now(HttpRequest("GET", b"/x"), PeerInfo("::1", 1), print) is None


def test_a_peer_s_address_is_made_once_and_bounded() -> None:
    from twisted.internet.address import IPv4Address, IPv6Address

    from synapse_coap.synapse import channel

    first = _address("192.0.2.7", 5683)
    assert first == IPv4Address("UDP", "192.0.2.7", 5683)
    assert _address("192.0.2.7", 5683) is first  # shared by the peer's requests
    assert _address("2001:db8::1", 5683) == IPv6Address("UDP", "2001:db8::1", 5683)
    assert _address("192.0.2.7", 5684) != first
    for port in range(channel._ADDRESSES_MAX + 10):
        _address("198.51.100.1", port)
    assert len(channel._ADDRESSES) <= channel._ADDRESSES_MAX


class _Bridge:
    def __init__(self, same_thread: bool) -> None:
        self.same_thread = same_thread


def test_answers_that_come_after_their_start_are_kept_for_the_reactors_timed_calls() -> None:
    """(dispatch.py ``answer_later``) answers whose responses came from reactor callbacks
    (not inside the request's start) run together, in order, from one timed call of
    delay 0 (which Twisted runs after the thread calls of the same reactor turn); one
    that fails is logged and the rest still run; with the loop in a thread of its own
    the caller answers at once."""
    from twisted.internet.task import Clock

    clock = Clock()

    class _ClockHs(FakeHomeserver):
        def get_reactor(self) -> Any:
            return clock

    log: list[str] = []

    def answer(name: str) -> Any:
        def run() -> None:
            log.append(name)
            if name == "bug":
                raise RuntimeError("a bug in one answer")

        return run

    dispatcher = InProcessDispatcher(_ClockHs(), bridge=_Bridge(True), max_request_body_size=1)  # type: ignore[arg-type]
    assert dispatcher.answer_later(answer("a"))
    assert dispatcher.answer_later(answer("bug"))
    assert dispatcher.answer_later(answer("b"))
    assert log == [] and len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == clock.seconds()  # (delay 0)
    clock.advance(0)
    assert log == ["a", "bug", "b"] and clock.getDelayedCalls() == []
    assert dispatcher.answer_later(answer("c"))  # a new group, a new timed call
    clock.advance(0)
    assert log == ["a", "bug", "b", "c"]
    threaded = InProcessDispatcher(_ClockHs(), bridge=_Bridge(False), max_request_body_size=1)  # type: ignore[arg-type]
    assert not threaded.answer_later(answer("d"))
    assert clock.getDelayedCalls() == []
