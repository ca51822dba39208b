"""How long the event loop is held up: a probe task's lateness (issue 14).

A task sleeps :data:`LOOP_LAG_INTERVAL` at a time and reports how much later
than asked it woke up. Anything that holds the loop (a long callback, a decode
done inline, a native call holding the GIL in another thread of the process)
shows up as lag: a stall of ``B`` seconds gives one sample between
``B - interval`` and ``B``. The module reports the samples as the Prometheus
histogram ``synapse_coap_loop_lag_seconds`` (docs/metrics.md); bench/attack.py
reads it around each attack.

At 10 ms the probe wakes the loop (with the default reactor, Synapse's reactor) 100
times a second: on an idle homeserver that was most of its wake-ups (``bench/idle.py``:
an idle Synapse 1.163 woke 13 times a second of its own, 110 with the probe running)
and 2-3 times Synapse's own idle CPU. So, given ``activity`` (a count that grows with the
listener's traffic: its datagrams in and out), the probe samples only while there
is traffic: after :data:`LOOP_LAG_IDLE_AFTER` seconds in which the count did not
move it parks until ``wait_active()`` returns (the next datagram), and then samples
again at once. A stall while the listener is idle delays no one's CoAP traffic and
is not sampled; one that a datagram arrives into is (the datagram is read when the
stall ends and wakes the probe, whose first sample then times only its own sleep:
the stall itself shows in the next request's latency, not in this histogram).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: Seconds between the probe's wake-ups: a stall is seen to within this much.
LOOP_LAG_INTERVAL = 0.01

#: Seconds without traffic after which the probe parks (with ``activity``).
LOOP_LAG_IDLE_AFTER = 30.0


class LoopLagProbe:
    """Reports ``observe(lag)`` after every sleep of ``interval`` seconds; with
    ``activity`` and ``wait_active``, only while ``activity()`` moved in the last
    ``idle_after`` seconds (see the module's docstring).

    ``clock`` and ``sleep`` are injectable (tests drive the probe without a loop).
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        interval: float = LOOP_LAG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        activity: Callable[[], int] | None = None,
        wait_active: Callable[[], Awaitable[None]] | None = None,
        idle_after: float = LOOP_LAG_IDLE_AFTER,
    ) -> None:
        if (activity is None) != (wait_active is None):
            raise ValueError("activity and wait_active go together")
        self.observe = observe
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.activity = activity
        self.wait_active = wait_active
        self.idle_after = idle_after
        self.samples = 0
        #: how many times the probe parked for want of traffic
        self.parks = 0

    async def run(self, count: int | None = None) -> None:
        """Probe until cancelled (or ``count`` samples, for tests)."""
        activity, wait_active = self.activity, self.wait_active
        seen = activity() if activity is not None else 0
        moved_at = self.clock()
        while count is None or self.samples < count:
            if activity is not None and wait_active is not None:
                now_seen = activity()
                if now_seen != seen:
                    seen, moved_at = now_seen, self.clock()
                elif self.clock() - moved_at >= self.idle_after:
                    self.parks += 1
                    await wait_active()
                    seen, moved_at = activity(), self.clock()
            due = self.clock() + self.interval
            await self.sleep(self.interval)
            self.observe(max(0.0, self.clock() - due))
            self.samples += 1
