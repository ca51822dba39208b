"""The reactor a CoAP request's SynapseRequest sees (synapse_coap/synapse/dispatch.py).

Synapse encodes a JSON answer with ``defer_to_thread(request.reactor, ...)``; for a
CoAP request that runs at once on the calling thread and the result is delivered
there, while everything else is the real reactor's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import threads
from twisted.python.failure import Failure

from synapse_coap.synapse.dispatch import _RequestReactor


class FakeReactor:
    def __init__(self) -> None:
        self.from_thread: list[Any] = []
        self.seconds_called = 0

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.from_thread.append((f, args, kw))

    def seconds(self) -> float:
        self.seconds_called += 1
        return 42.0


def test_defer_to_thread_runs_inline_and_fires_at_once() -> None:
    real = FakeReactor()
    reactor = _RequestReactor(real)
    ran: list[int] = []
    d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), lambda: ran.append(1) or 7)
    assert ran == [1]
    results: list[Any] = []
    d.addCallback(results.append)
    assert results == [7]
    assert real.from_thread == []  # no hop through the real reactor


def test_an_exception_is_delivered_as_a_failure() -> None:
    reactor = _RequestReactor(FakeReactor())

    def boom() -> None:
        raise ValueError("no")

    d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), boom)
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1 and isinstance(failures[0].value, ValueError)


def test_call_from_thread_outside_a_delivery_is_the_real_reactors() -> None:
    real = FakeReactor()
    reactor = _RequestReactor(real)
    calls: list[int] = []
    reactor.callFromThread(calls.append, 1)
    assert calls == []  # not run here: queued on the real reactor
    assert len(real.from_thread) == 1
    assert reactor.inline_delivery is False


def test_everything_else_is_the_real_reactor() -> None:
    real = FakeReactor()
    reactor = _RequestReactor(real)
    assert reactor.seconds() == 42.0
    assert real.seconds_called == 1
