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

A socket whose reading can skip the loop's iteration (the listener's UDP socket:
:meth:`_Loop.add_direct_reader`) is registered with the reactor itself instead: the
reactor calls its reader straight from its own poll, with this loop set as the
thread's running loop for the call, and no asyncio iteration (a selector poll, a
handle, the loop's set-up and tear-down) runs for it. What the reader schedules on
the loop (a task, a timer) arms the reactor timer as above. With Synapse's default
reactor the iterations cost a CoAP request about as much as the rest of its reading
(``bench/inbound.py --stages-out``: 16 us a ``client versions`` request on the Xeon,
at 0.27 iterations a request).

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

from synapse_coap.synapse.asyncio_compat import call_as_running, pending, selector_fileno

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
    _guest_reader: Callable[[int, Callable[[], None]], Callable[[], None]] | None = None

    def add_direct_reader(
        self, fd: int, on_readable: Callable[[], None]
    ) -> Callable[[], None] | None:
        """Have the driving reactor call ``on_readable`` when ``fd`` is readable, from
        its own poll and not in an iteration of this loop (which is the thread's running
        loop during the call); the caller must not also have the loop read ``fd``.
        Returns the function that stops it (call it before closing ``fd``), or None
        when the loop is not driven by a reactor (read ``fd`` through the loop)."""
        attach = self._guest_reader
        return None if attach is None else attach(fd, on_readable)

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
class _DirectReader:
    """A descriptor the reactor reads for :meth:`_Loop.add_direct_reader`."""

    def __init__(self, guest: GuestLoop, fd: int, on_readable: Callable[[], None]) -> None:
        self._guest = guest
        self._fd = fd
        self._on_readable = on_readable

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        guest = self._guest
        if guest._closed:
            return
        try:
            call_as_running(guest.loop, self._on_readable)
        except Exception:  # a bug: the reactor's poll goes on, so does the listener
            logger.exception("reading %d for the asyncio loop failed (bug)", self._fd)

    def connectionLost(self, reason: Any) -> None:
        self._guest._direct.discard(self)

    def logPrefix(self) -> str:
        return "synapse-coap-udp"

    def remove(self) -> None:
        guest = self._guest
        if self in guest._direct:
            guest._direct.discard(self)
            guest._reactor.removeReader(self)


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
        #: the descriptors the reactor reads for the loop (:meth:`_Loop.add_direct_reader`)
        self._direct: set[_DirectReader] = set()
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
        self.loop._guest_reader = self._add_direct_reader
        self._reactor.addReader(self)
        self.wake()

    def _add_direct_reader(self, fd: int, on_readable: Callable[[], None]) -> Callable[[], None]:
        reader = _DirectReader(self, fd, on_readable)
        self._direct.add(reader)
        self._reactor.addReader(reader)
        return reader.remove

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
        for reader in list(self._direct):
            reader.remove()
        self._cancel_timer()
        self.loop._guest_wake = None
        self.loop._guest_reader = None
        loop = self.loop
        try:
            cancel_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
