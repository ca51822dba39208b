"""An asyncio event loop driven from Twisted's own reactor thread ("guest" mode).

With Synapse's default (epoll) reactor there is no asyncio loop to share, and the
module used to run aiocoap's loop in a second thread. Every CoAP request then
crossed threads twice (``callFromThread`` into Synapse, ``call_soon_threadsafe``
back), each crossing a wake-up write and a hand-over of the GIL between two busy
threads: py-spy put ``_write_to_self`` alone at 9 % of the Synapse process's
samples while it served small CoAP requests (``bench/inbound.py --profile-out``).

:class:`GuestLoop` runs the loop on the reactor thread instead, one iteration at a
time, when the reactor says the loop has something to do:

* the loop's selector (an epoll object, itself a file descriptor) is registered
  with the reactor as a reader: a datagram, or a ``call_soon_threadsafe`` from
  another thread (it writes the loop's self-pipe), makes it readable;
* after each iteration a reactor timer is armed for what the loop holds: at once
  if callbacks are ready, else at its earliest timer;
* a ``call_soon``/``call_at`` made from the reactor thread between iterations
  (Synapse code settling a future, starting a task) arms that timer too
  (:class:`_Loop` overrides the two public methods).

One iteration is the documented ``loop.stop(); loop.run_forever()`` (poll the
selector with a zero timeout, run what is ready, return); a wake-up runs up to
:data:`TURNS_PER_WAKE` of them while callbacks stay ready. The loop's ready queue,
timer heap and selector are read in :mod:`~synapse_coap.synapse.asyncio_compat`, the
one place that touches asyncio's private attributes; its ``check`` tells at start-up
whether this Python has them (the module falls back to the thread otherwise, with a
warning naming the version).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zope.interface import implementer  # type: ignore[import-untyped]

from synapse_coap.synapse.asyncio_compat import pending, selector_fileno

try:
    from twisted.internet.interfaces import IReadDescriptor

    _READER: tuple[Any, ...] = (IReadDescriptor,)
except ImportError:  # pragma: no cover
    _READER = ()

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from typing import TypeVarTuple, Unpack

    _Ts = TypeVarTuple("_Ts")


#: iterations run per wake-up while callbacks stay ready (a task's next step, a future's
#: callbacks): each further one costs a zero-timeout poll instead of a reactor timer
#: and a reactor turn; the reactor gets its turn after this many
TURNS_PER_WAKE = 8


class _Loop(asyncio.SelectorEventLoop):
    """An event loop that tells its driver when the reactor thread schedules work on it
    between iterations."""

    _guest_wake: Callable[[], None] | None = None

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = super().call_soon(callback, *args, context=context)
        if self._guest_wake is not None and not self.is_running():
            self._guest_wake()
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        handle = super().call_at(when, callback, *args, context=context)
        if self._guest_wake is not None and not self.is_running():
            self._guest_wake()
        return handle


@implementer(*_READER)
class GuestLoop:
    """Drives a new asyncio event loop from ``reactor``'s thread (see the module
    docstring). :meth:`start` it on the reactor thread; :meth:`close` it there."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.loop = _Loop()
        self._timer: Any = None
        self._timer_at: float | None = None
        self._closed = False
        self._started = False
        #: iterations run (for tests and debugging)
        self.iterations = 0

    # -- IReadDescriptor ---------------------------------------------------------------

    def fileno(self) -> int:
        return selector_fileno(self.loop)

    def doRead(self) -> None:
        self.run_once()

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "synapse-coap-asyncio"

    # -- driving -----------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self.loop._guest_wake = self.wake
        self._reactor.addReader(self)
        self.wake()

    def wake(self) -> None:
        """Something was scheduled on the loop from the reactor thread: re-arm."""
        if not self._closed and self._started:
            self._arm()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.run_once()

    def run_once(self) -> None:
        """Iterations of the loop, up to :data:`TURNS_PER_WAKE` while callbacks stay
        ready, then re-arm (nothing if the loop is already running: never re-entered)."""
        loop = self.loop
        if self._closed or loop.is_running() or loop.is_closed():
            return
        for _ in range(TURNS_PER_WAKE):
            self.iterations += 1
            loop.stop()
            loop.run_forever()
            if pending(loop) != 0.0:
                break
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def _arm(self) -> None:
        delay = pending(self.loop)
        if delay is None:
            self._cancel_timer()
            return
        at = self._reactor.seconds() + delay
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= at:
                return  # the armed wake-up comes first (if early, it re-arms then)
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._reactor.callLater(delay, self._on_timer)

    def close(self, cancel_tasks: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        """Stop driving: cancel the loop's tasks (run to their end here), close it."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._reactor.removeReader(self)
        self._cancel_timer()
        self.loop._guest_wake = None
        loop = self.loop
        try:
            cancel_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
