"""``Bridge.start_now``: a request started in Synapse with no asyncio task awaiting it
(synapse_coap/synapse/bridge.py; the fast path's eager exchange).

The Deferreds are plain Twisted ones fired by the test, so every case is exact and
needs no reactor: the result now or later, an error, a cancellation from upstream,
the exchange abandoned (``done`` never called after it), and thread mode declining.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from synapse.logging.context import SENTINEL_CONTEXT, LoggingContext, current_context
from twisted.internet import defer

from synapse_coap.synapse.bridge import Bridge

_LOOPS: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(autouse=True)
def _close_loops() -> Iterator[None]:
    yield
    while _LOOPS:
        _LOOPS.pop().close()


def bridge(mode: str = "guest") -> Bridge:
    _LOOPS.append(asyncio.new_event_loop())
    return Bridge(object(), "hs.test", _LOOPS[-1], mode, None)  # type: ignore[arg-type]


class Upstream:
    """What ``start`` returns: a Deferred the test fires, and a recorded abandon."""

    def __init__(self) -> None:
        self.d: defer.Deferred[str] = defer.Deferred()
        self.abandoned = 0
        self.contexts: list[Any] = []

    def start(self) -> tuple[defer.Deferred[str], Callable[[], None]]:
        self.contexts.append(current_context())
        return self.d, self.abandon

    def abandon(self) -> None:
        self.contexts.append(current_context())
        self.abandoned += 1


def test_a_result_there_at_once_is_delivered_before_start_now_returns() -> None:
    up = Upstream()
    up.d.callback("answer")
    got: list[Any] = []
    cancel = bridge().start_now(up.start, got.append)
    assert got == ["answer"] and cancel is not None
    cancel()  # after the answer: nothing to abandon
    assert up.abandoned == 0


def test_a_later_result_is_delivered_once_in_the_sentinel_context() -> None:
    up = Upstream()
    got: list[Any] = []
    contexts: list[Any] = []

    def done(value: Any) -> None:
        got.append(value)
        contexts.append(current_context())

    with LoggingContext(name="caller", server_name="hs.test"):
        cancel = bridge("shared").start_now(up.start, done)
        assert got == []
        with LoggingContext(name="synapse-request", server_name="hs.test"):
            up.d.callback("later")  # Synapse fires it inside its own request context
    assert got == ["later"]
    assert contexts == [SENTINEL_CONTEXT] and up.contexts == [SENTINEL_CONTEXT]
    assert cancel is not None


def test_an_error_is_delivered_and_twisted_cancellation_reads_as_asyncio() -> None:
    up = Upstream()
    got: list[Any] = []
    bridge().start_now(up.start, got.append)
    up.d.errback(ValueError("servlet failed"))
    assert isinstance(got[0], ValueError)

    up = Upstream()
    got.clear()
    bridge().start_now(up.start, got.append)
    up.d.cancel()
    assert len(got) == 1 and isinstance(got[0], asyncio.CancelledError)


def test_start_raising_is_delivered_as_the_error() -> None:
    def start() -> tuple[defer.Deferred[str], Callable[[], None]]:
        raise RuntimeError("no site")

    got: list[Any] = []
    cancel = bridge().start_now(start, got.append)
    assert isinstance(got[0], RuntimeError) and cancel is not None


def test_an_abandoned_request_is_dropped_upstream_and_never_answered() -> None:
    up = Upstream()
    got: list[Any] = []
    cancel = bridge().start_now(up.start, got.append)
    assert cancel is not None
    cancel()
    cancel()  # once only
    assert up.abandoned == 1 and up.contexts[-1] is SENTINEL_CONTEXT
    up.d.callback("too late")
    assert got == []


def test_a_failing_done_is_logged_not_left_in_the_deferred(
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = Upstream()

    def done(_: Any) -> None:
        raise RuntimeError("encoding failed")

    bridge().start_now(up.start, done)
    up.d.callback("x")
    assert "answering a request failed" in caplog.text
    results: list[Any] = []
    up.d.addBoth(results.append)
    assert results == [None]  # no unhandled failure left behind


def test_thread_mode_declines_having_done_nothing() -> None:
    up = Upstream()
    got: list[Any] = []
    assert bridge("thread").start_now(up.start, got.append) is None
    assert up.contexts == [] and got == []
