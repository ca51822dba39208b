"""The one bridge between Synapse's Twisted reactor and the asyncio world of aiocoap.

Three modes, chosen at run time (:meth:`Bridge.create`):

``shared``
    Synapse runs Twisted's asyncio reactor (``SYNAPSE_ASYNC_IO_REACTOR=1``).
    aiocoap uses the reactor's own event loop; everything runs on one thread.

``guest``
    Synapse runs its default (epoll) reactor (the module's ``asyncio_loop:
    reactor``, the default). aiocoap gets its own event loop, driven one
    iteration at a time from the reactor's thread
    (:class:`~synapse_coap.synapse.guestloop.GuestLoop`): again one thread, and
    calls between the two sides are plain calls, as in ``shared``.

``thread``
    Synapse runs its default reactor and the module's ``asyncio_loop: thread``
    (or this Python's loop cannot be driven as a guest). aiocoap gets its own
    event loop in a daemon thread, started here and stopped and joined when
    Synapse shuts down; every call between the sides is a thread hop.

The rules kept in both modes (DESIGN.md, "Logcontexts"):

* Deferreds are created, fired and cancelled only on the reactor thread.
* Work entering Synapse from asyncio (:meth:`Bridge.call_synapse`) hops to the
  reactor thread and runs inside ``run_as_background_process``, so it gets its
  own logcontext and metrics and never leaks a context into the reactor.
* An inbound request (:meth:`Bridge.call_reactor`) enters Synapse as a request
  from Twisted's own HTTP channel does: started in the sentinel logcontext, the
  SynapseRequest then gives itself its own logcontext and request metrics. No
  background process (its per-call Prometheus label look-ups, rusage reads and
  random ids cost more than the smaller requests themselves), and with the shared
  loop no hop at all: the request starts in the caller's own loop turn.
* Asyncio work started from Synapse (:meth:`Bridge.submit`) returns a plain
  Deferred that does not follow the logcontext rules: await it through
  ``make_deferred_yieldable``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

from synapse.logging.context import (
    SENTINEL_CONTEXT,
    PreserveLoggingContext,
    set_current_context,
)
from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_coap.synapse import asyncio_compat, compat
from synapse_coap.synapse.guestloop import GuestLoop

logger = logging.getLogger(__name__)

T = TypeVar("T")

BridgeMode = Literal["shared", "guest", "thread"]

#: How long shutdown waits for the asyncio thread to finish (seconds).
JOIN_TIMEOUT = 10.0


def reactor_loop(reactor: Any) -> asyncio.AbstractEventLoop | None:
    """The asyncio loop under ``reactor`` if it is Twisted's asyncio reactor, else None."""
    try:
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    except ImportError:  # pragma: no cover - always present in supported Twisted
        return None
    if isinstance(reactor, AsyncioSelectorReactor):
        loop = compat.asyncio_loop_of(reactor)
        if isinstance(loop, asyncio.AbstractEventLoop):
            return loop
    return None


class Bridge:
    """Runs asyncio code next to a Twisted reactor and passes calls both ways.

    Create it on the reactor thread with :meth:`create`; stop it with
    :meth:`stop` (also registered as a "before shutdown" trigger by
    :meth:`install_shutdown`).
    """

    def __init__(
        self,
        reactor: Any,
        server_name: str,
        loop: asyncio.AbstractEventLoop,
        mode: BridgeMode,
        thread: threading.Thread | None,
        guest: GuestLoop | None = None,
    ) -> None:
        self.reactor = reactor
        self.server_name = server_name
        self.loop = loop
        self.mode: BridgeMode = mode
        #: both sides run on the reactor thread (``shared`` or ``guest``): no hops
        self.same_thread = mode != "thread"
        self._thread = thread
        self._guest = guest
        self._stopped = False
        self._on_stop: list[Callable[[], Coroutine[Any, Any, None]]] = []

    @classmethod
    def create(cls, reactor: Any, server_name: str, loop_mode: str = "reactor") -> Bridge:
        """Share the reactor's loop if it has one; else drive a new loop from the
        reactor's thread (``loop_mode`` ``reactor``) or run one in a daemon thread
        (``thread``, or where this Python's loop cannot be driven as a guest)."""
        loop = reactor_loop(reactor)
        if loop is not None:
            logger.info("synapse-coap: sharing the asyncio reactor's event loop")
            return cls(reactor, server_name, loop, "shared", None)
        if loop_mode == "reactor":
            reason = asyncio_compat.check()
            if reason is None:
                guest = GuestLoop(reactor)
                guest.start()
                logger.info("synapse-coap: running the asyncio event loop on the reactor thread")
                return cls(reactor, server_name, guest.loop, "guest", None, guest)
            logger.warning(
                "synapse-coap: cannot drive the asyncio event loop from the reactor (%s); "
                "running it in a thread instead",
                reason,
            )
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                try:
                    _cancel_all(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        thread = threading.Thread(target=run, name="synapse-coap-asyncio", daemon=True)
        thread.start()
        ready.wait(JOIN_TIMEOUT)
        logger.info("synapse-coap: running the asyncio event loop in thread %s", thread.name)
        return cls(reactor, server_name, loop, "thread", thread)

    # -- Twisted -> asyncio ------------------------------------------------------------

    def submit(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> defer.Deferred[T]:
        """From the reactor thread: run ``factory()`` on the asyncio loop.

        Returns a Deferred fired on the reactor thread with the coroutine's
        result (or failure). Cancelling the Deferred cancels the asyncio task.
        The Deferred does not follow the logcontext rules: await it through
        ``make_deferred_yieldable``.
        """
        if self.same_thread:
            task = self.loop.create_task(factory())
            return defer.Deferred.fromFuture(task)

        cfut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(factory(), self.loop)

        def cancel(_: defer.Deferred[T]) -> None:
            cfut.cancel()

        d: defer.Deferred[T] = defer.Deferred(cancel)

        def fire(f: concurrent.futures.Future[T]) -> None:
            if d.called:
                return
            if f.cancelled():
                d.errback(_failure(defer.CancelledError()))
                return
            exc = f.exception()
            if exc is not None:
                d.errback(_failure(exc))
            else:
                d.callback(f.result())

        cfut.add_done_callback(lambda f: self.reactor.callFromThread(fire, f))
        return d

    # -- asyncio -> Twisted ------------------------------------------------------------

    async def call_synapse(self, desc: str, fn: Callable[[], Awaitable[T]]) -> T:
        """From the asyncio loop: run ``fn()`` on the reactor thread and await its result.

        ``fn`` runs inside ``run_as_background_process(desc, ...)``. If the
        awaiting asyncio task is cancelled, the Synapse side is cancelled too
        (a ``CancelledError`` is thrown into ``fn``'s current await).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        started: list[defer.Deferred[None]] = []
        cancelled = False
        # One thread (shared or guest): no thread-safe hop (each costs a wake-up write
        # and an extra loop turn); the reactor's callLater is a plain timer.
        shared = self.same_thread
        hop = loop.call_soon if shared else loop.call_soon_threadsafe
        to_reactor = (
            (lambda fn: self.reactor.callLater(0, fn)) if shared else self.reactor.callFromThread
        )

        def deliver(ok: bool, value: Any) -> None:
            hop(settle_future, fut, ok, value)

        async def wrapper() -> None:
            try:
                result = await fn()
            except defer.CancelledError as e:
                deliver(False, asyncio.CancelledError(str(e)))
            except BaseException as e:
                deliver(False, e)
            else:
                deliver(True, result)

        def start() -> None:
            if cancelled:
                return
            with PreserveLoggingContext():
                d = compat.run_as_background_process(
                    desc,
                    self.server_name,
                    wrapper,
                    bg_start_span=False,
                )
            started.append(d)

        def cancel() -> None:
            for d in started:
                with PreserveLoggingContext():
                    d.cancel()

        to_reactor(start)
        try:
            return await fut
        except asyncio.CancelledError:
            cancelled = True
            to_reactor(cancel)
            raise

    async def call_reactor(
        self, start: Callable[[], tuple[defer.Deferred[T], Callable[[], None]]]
    ) -> T:
        """From the asyncio loop: call ``start()`` on the reactor thread and await the
        Deferred it returns.

        ``start`` runs in the sentinel logcontext (as Twisted's HTTP channel calls
        ``requestReceived``) and returns the Deferred of its result, fired on the
        reactor thread (possibly inside Synapse's own call: the result only crosses
        to the asyncio side, no Synapse code runs in that callback), and an
        ``abandon`` function, called on the reactor thread if the awaiting asyncio
        task is cancelled before the result arrives.

        With one thread (shared or guest), ``start`` runs at once, in the caller's loop
        turn; otherwise it hops to the reactor thread and the result hops back.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        shared = self.same_thread
        begun: list[Callable[[], None]] = []
        cancelled = False

        def settle(result: Any) -> None:
            ok = not isinstance(result, Failure)
            value = result if ok else _as_asyncio_error(result.value)
            if shared:
                settle_future(fut, ok, value)  # schedules the awaiting task; runs nothing now
            else:
                loop.call_soon_threadsafe(settle_future, fut, ok, value)

        def begin() -> None:
            if cancelled:
                return
            try:
                d, abandon = _in_sentinel(start)
            except BaseException as e:  # delivered to the awaiting task
                settle(_failure(e))
                return
            begun.append(abandon)
            d.addBoth(settle)

        def cancel() -> None:
            if begun:
                _guarded_in_sentinel(begun[0], "abandoning a request")

        if shared:
            begin()
        else:
            self.reactor.callFromThread(begin)
        try:
            return await fut
        except asyncio.CancelledError:
            cancelled = True
            if shared:
                cancel()
            else:
                self.reactor.callFromThread(cancel)
            raise

    # -- lifecycle ---------------------------------------------------------------------

    def on_stop(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``fn()`` on the asyncio loop when the bridge stops (e.g. close a server)."""
        self._on_stop.append(fn)

    def install_shutdown(self, reactor: Any | None = None) -> None:
        """Stop the bridge in the reactor's "before shutdown" phase.

        The trigger is added to the reactor directly (not through Synapse's
        clock, whose wrapper drops the returned Deferred): the reactor then
        waits for the CoAP server to close and the loop thread to end.
        """
        (reactor or self.reactor).addSystemEventTrigger("before", "shutdown", self.stop)

    def stop(self) -> defer.Deferred[None]:
        """Run the on-stop hooks, then stop and join the loop thread (thread mode).

        Returns a Deferred (fired on the reactor thread) so that a "before
        shutdown" trigger makes the reactor wait for it.
        """
        if self._stopped:
            return defer.succeed(None)
        self._stopped = True
        hooks = list(self._on_stop)

        async def run_hooks() -> None:
            for hook in hooks:
                try:
                    await asyncio.wait_for(hook(), JOIN_TIMEOUT)
                except Exception:
                    logger.exception("synapse-coap: error while stopping")

        d = self.submit(run_hooks)

        def finish(result: object) -> defer.Deferred[None] | None:
            if isinstance(result, Failure):
                logger.warning("synapse-coap: stop hooks failed: %s", result.value)
            guest = self._guest
            if guest is not None:
                # (this runs inside one of the loop's iterations: close it after)
                closed: defer.Deferred[None] = defer.Deferred()

                def close() -> None:
                    try:
                        guest.close(_cancel_all)
                        logger.info("synapse-coap: stopped; asyncio loop closed")
                    except Exception:
                        logger.exception("synapse-coap: closing the asyncio loop failed")
                    closed.callback(None)

                self.reactor.callLater(0, close)
                return closed
            if self.mode == "thread" and self._thread is not None:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(JOIN_TIMEOUT)
                if self._thread.is_alive():
                    logger.warning("synapse-coap: asyncio thread did not stop in time")
                else:
                    logger.info("synapse-coap: stopped; asyncio thread joined")
            else:
                logger.info("synapse-coap: stopped")
            return None

        d.addBoth(finish)
        return d


def _in_sentinel(fn: Callable[[], T]) -> T:
    """``fn()`` in the sentinel logcontext (as Twisted's HTTP channel calls Synapse)."""
    previous = set_current_context(SENTINEL_CONTEXT)
    try:
        return fn()
    finally:
        set_current_context(previous)


def _guarded_in_sentinel(fn: Callable[[], object], what: str) -> None:
    """``fn()`` in the sentinel logcontext; an exception is logged there, not raised."""
    previous = set_current_context(SENTINEL_CONTEXT)
    try:
        fn()
    except Exception:
        logger.exception("synapse-coap: %s failed", what)
    finally:
        set_current_context(previous)


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


def settle_future(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Give ``fut`` its result (``ok``) or exception, unless it is already done
    (its awaiting task was cancelled)."""
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _as_asyncio_error(exc: BaseException) -> BaseException:
    """A Twisted cancellation reads as asyncio's on the asyncio side."""
    if isinstance(exc, defer.CancelledError):
        return asyncio.CancelledError(str(exc))
    return exc


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
