"""The one place that reads asyncio's private event loop internals (for the guest loop).

:class:`~synapse_coap.synapse.guestloop.GuestLoop` drives an asyncio loop from
Twisted's reactor and needs to know what the loop holds between iterations, which
asyncio has no public API for: its ready queue (``_ready``), its timer heap
(``_scheduled``) and its selector's file descriptor (``_selector``); and to make it the
thread's running loop while the reactor reads a socket for it
(``asyncio.events._set_running_loop``). They have been
there since Python 3.4 (the running-loop pair since 3.7); :func:`check` tells at
start-up whether this Python still has them, naming its version, and the module falls
back to running the loop in a thread if not.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

#: the event loop's private attributes read here
_LOOP_NAMES = ("_ready", "_scheduled", "_selector")
#: ``asyncio.events``'s private functions used here (None below where this Python has
#: not got one: :func:`check` says so)
_EVENTS_NAMES = ("_get_running_loop", "_set_running_loop")
#: asyncio's private attributes read here (tests/unit/test_private_access.py)
PRIVATE_NAMES = frozenset(_LOOP_NAMES + _EVENTS_NAMES)

_get_running_loop: Callable[[], asyncio.AbstractEventLoop | None] | None = getattr(
    asyncio.events, "_get_running_loop", None
)
_set_running_loop: Callable[[asyncio.AbstractEventLoop | None], None] | None = getattr(
    asyncio.events, "_set_running_loop", None
)


def pending(loop: asyncio.AbstractEventLoop) -> float | None:
    """Seconds until ``loop`` has something to run: 0.0 if callbacks are ready, the
    delay of its earliest timer, or None if it only waits for its file descriptors."""
    if loop._ready:  # type: ignore[attr-defined]
        return 0.0
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    if scheduled:
        # (a cancelled timer at the top costs one early iteration, in which asyncio
        # drops it from the heap)
        return max(0.0, float(scheduled[0].when()) - loop.time())
    return None


def selector_fileno(loop: asyncio.AbstractEventLoop) -> int:
    """The file descriptor of ``loop``'s selector (an epoll object on Linux): readable
    when any descriptor the loop waits for is."""
    return int(loop._selector.fileno())  # type: ignore[attr-defined]


def call_as_running(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """``fn()`` with ``loop`` as the thread's running loop (``get_running_loop``, a
    future or task made without a loop find it), though the loop runs no iteration:
    asyncio's low-level hook for loops driven from outside (``_set_running_loop``,
    listed in ``asyncio.events.__all__``); the previous one is put back after."""
    get, set_ = _get_running_loop, _set_running_loop
    if get is None or set_ is None:  # (check() refused this Python: never driven)
        raise RuntimeError("this Python's asyncio cannot set the running loop")
    previous = get()
    set_(loop)
    try:
        fn()
    finally:
        set_(previous)


def check() -> str | None:
    """None if this Python's event loop can be driven as a guest, else why not."""
    version = sys.version.split()[0]
    probe = asyncio.new_event_loop()
    try:
        missing = [name for name in _LOOP_NAMES if not hasattr(probe, name)] + [
            f"asyncio.events.{name}" for name in _EVENTS_NAMES if not hasattr(asyncio.events, name)
        ]
        if missing:
            return (
                f"Python {version}'s asyncio event loop has no {', '.join(missing)} "
                "(synapse_coap/synapse/asyncio_compat.py)"
            )
        pending(probe)
        selector_fileno(probe)
        call_as_running(probe, lambda: None)
    except Exception as e:  # pragma: no cover - a Python whose loop changed
        return f"Python {version}: {e!r} (synapse_coap/synapse/asyncio_compat.py)"
    finally:
        probe.close()
    return None
