"""How long the listener's thread is held up: a probe timer's lateness (issue 14).

A timer fires every :data:`LOOP_LAG_INTERVAL` and reports how much later than asked
it ran. Anything that holds the thread (a long callback, a decode done inline, a native
call holding the GIL in another thread of the process) shows up as lag: a stall of
``B`` seconds gives one sample between ``B - interval`` and ``B``. The module reports
the samples as the Prometheus histogram ``synapse_coap_loop_lag_seconds``
(docs/metrics.md); bench/attack.py reads it around each attack.

The probe is a plain timer callback (``call_later``), not a task: with Synapse's
default reactor the module's asyncio loop is driven from reactor timers
(:mod:`synapse_coap.synapse.guestloop`), and a task's sleep there cost a whole loop
iteration per wake-up, some 160 us of CPU each with the caches cold, 100 times a
second, about 1.6% of a core while the listener had traffic (``bench/inbound.py``'s
stage timers on the federation ``/send``: four iterations and 647 us a transaction, in
both listeners' cells). The module gives it the reactor's ``callLater`` there (the loop
is driven by the reactor's timers, so their lateness is the loop's) and the asyncio
loop's ``call_later`` where the loop is the reactor's own or runs in a thread.

At 10 ms the probe wakes the thread 100 times a second: on an idle homeserver that was
most of its wake-ups (``bench/idle.py``: an idle Synapse 1.163 woke 13 times a second
of its own, 110 with the probe running) and 2-3 times Synapse's own idle CPU. So, given
``activity`` (a count that grows with the listener's traffic: its datagrams in and
out), the probe samples only while there is traffic: after :data:`LOOP_LAG_IDLE_AFTER`
seconds in which the count did not move it parks until ``on_traffic`` calls it back
(at the next datagram), and then samples again. A stall while the listener is idle
delays no one's CoAP traffic and is not sampled; one that a datagram arrives into is
(the datagram is read when the stall ends and wakes the probe, whose first sample then
times only its own interval: the stall itself shows in the next request's latency, not
in this histogram).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: Seconds between the probe's wake-ups: a stall is seen to within this much.
LOOP_LAG_INTERVAL = 0.01

#: Seconds without traffic after which the probe parks (with ``activity``).
LOOP_LAG_IDLE_AFTER = 30.0


class LoopLagProbe:
    """Reports ``observe(lag)`` at every timer, one each ``interval`` seconds, from
    :meth:`start` to :meth:`stop`; with ``activity`` and ``on_traffic``, only while
    ``activity()`` moved in the last ``idle_after`` seconds (see the module's docstring).

    ``call_later(delay, fn)`` arms a timer on the probed thread and returns what
    ``cancel()`` stops; ``on_traffic(resume)`` has ``resume`` called on that thread at
    the next traffic. ``clock`` is injectable (tests drive the probe without a loop).
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        call_later: Callable[[float, Callable[[], None]], Any],
        interval: float = LOOP_LAG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        activity: Callable[[], int] | None = None,
        on_traffic: Callable[[Callable[[], None]], None] | None = None,
        idle_after: float = LOOP_LAG_IDLE_AFTER,
    ) -> None:
        if (activity is None) != (on_traffic is None):
            raise ValueError("activity and on_traffic go together")
        self.observe = observe
        self.call_later = call_later
        self.interval = interval
        self.clock = clock
        self.activity = activity
        self.on_traffic = on_traffic
        self.idle_after = idle_after
        self.samples = 0
        #: how many times the probe parked for want of traffic
        self.parks = 0
        #: stop after this many samples (tests), or never
        self.count: int | None = None
        self._handle: Any = None
        self._due = 0.0
        self._seen = 0
        self._moved_at = 0.0
        self._running = False

    @property
    def parked(self) -> bool:
        """Waiting for traffic (no timer armed)."""
        return self._running and self._handle is None

    def start(self, count: int | None = None) -> None:
        """Start sampling (``count``: stop after that many samples, for tests)."""
        if self._running:
            return
        self._running = True
        self.count = count
        self._resume()

    def stop(self) -> None:
        """Stop: no timer left armed, and a later traffic callback does nothing."""
        self._running = False
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    def _resume(self) -> None:
        if not self._running or self._handle is not None:
            return
        if self.activity is not None:
            self._seen, self._moved_at = self.activity(), self.clock()
        self._arm()

    def _arm(self) -> None:
        self._due = self.clock() + self.interval
        self._handle = self.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._handle = None
        if not self._running:
            return
        self.observe(max(0.0, self.clock() - self._due))
        self.samples += 1
        if self.count is not None and self.samples >= self.count:
            self._running = False
            return
        activity, on_traffic = self.activity, self.on_traffic
        if activity is not None and on_traffic is not None:
            now_seen = activity()
            if now_seen != self._seen:
                self._seen, self._moved_at = now_seen, self.clock()
            elif self.clock() - self._moved_at >= self.idle_after:
                self.parks += 1
                on_traffic(self._resume)
                return
        self._arm()
