"""A fixture and a Twisted site for the tests that a finished request leaves no reference
cycle behind."""

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
