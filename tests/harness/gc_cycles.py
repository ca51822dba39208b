"""A fixture and a Twisted site for the tests that a finished request leaves no reference
cycle behind, and the in-process dispatcher's direct path into such a site
(:func:`dispatch_at_once`) for the tests of what Synapse's functions see of a CoAP
request."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.web.server import Request, Site


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """As in Synapse (which collects from a timer): during the test only reference
    counting frees objects, so what a request leaves in cycles stays to be counted."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


#: weak references to every request and channel a :class:`TrackedSite` made (the newest
#: last): a test clears it, runs a request, and checks that both are gone
MADE: list[weakref.ref[Any]] = []


class TrackedRequest(Request):
    """A plain Twisted request taking the keyword arguments Synapse's takes, its channel
    and itself recorded in :data:`MADE`."""

    def __init__(self, channel: Any, site: Any, **_: Any) -> None:
        super().__init__(channel)
        self.site = site
        MADE.append(weakref.ref(channel))
        MADE.append(weakref.ref(self))

    def get_redacted_uri(self) -> str:  # (SynapseRequest's)
        return self.uri.decode("ascii")


class TrackedSite(Site):
    request_class = TrackedRequest


class FakeHomeserver:
    """What the in-process dispatcher asks of a HomeServer in these tests."""

    hostname = "test.example"

    def get_reactor(self) -> Any:
        return reactor


class SameThread:
    """A bridge whose loop runs on the reactor thread (the direct path)."""

    same_thread = True


def dispatch_at_once(resource: Any, request: Any) -> Any:
    """``request`` (an ``HttpRequest``) through the in-process dispatcher's direct path
    into a site serving ``resource``: the ``HttpResponse``, which must have come before
    ``dispatch_now`` returned."""
    from synapse_coap.mapping.dispatch import PeerInfo
    from synapse_coap.mapping.messages import HttpResponse
    from synapse_coap.synapse.dispatch import InProcessDispatcher

    dispatcher = InProcessDispatcher(
        FakeHomeserver(),
        bridge=SameThread(),  # type: ignore[arg-type]
        max_request_body_size=10_000,
    )
    dispatcher._site = TrackedSite(resource)  # type: ignore[assignment]
    got: list[Any] = []
    dispatcher.dispatch_now(request, PeerInfo("192.0.2.7", 5683), got.append)
    assert len(got) == 1, "answered before dispatch_now returned"
    assert isinstance(got[0], HttpResponse)
    return got[0]
