"""How long the event loop is held up: a probe task's lateness (issue 14).

A task sleeps :data:`LOOP_LAG_INTERVAL` at a time and reports how much later
than asked it woke up. Anything that holds the loop (a long callback, a decode
done inline, a native call holding the GIL in another thread of the process)
shows up as lag: a stall of ``B`` seconds gives one sample between
``B - interval`` and ``B``. The module reports the samples as the Prometheus
histogram ``synapse_coap_loop_lag_seconds`` (docs/metrics.md); bench/attack.py
reads it around each attack.

At 10 ms the probe wakes 100 times a second, a few microseconds each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: Seconds between the probe's wake-ups: a stall is seen to within this much.
LOOP_LAG_INTERVAL = 0.01


class LoopLagProbe:
    """Reports ``observe(lag)`` after every sleep of ``interval`` seconds.

    ``clock`` and ``sleep`` are injectable (tests drive the probe without a loop).
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        interval: float = LOOP_LAG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.observe = observe
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.samples = 0

    async def run(self, count: int | None = None) -> None:
        """Probe until cancelled (or ``count`` samples, for tests)."""
        while count is None or self.samples < count:
            due = self.clock() + self.interval
            await self.sleep(self.interval)
            self.observe(max(0.0, self.clock() - due))
            self.samples += 1
