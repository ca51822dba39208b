"""The loop-lag probe parks while the listener is idle (transport/looplag.py) and the
module's metrics wake it at the next datagram (synapse/metrics.py). Driven by a fake
clock: the probe's sleep advances it, nothing waits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from synapse_coap.synapse.metrics import SynapseCoapMetrics
from synapse_coap.transport.looplag import LoopLagProbe


class Driven:
    """A fake clock, a traffic count and the probe's parks."""

    def __init__(self) -> None:
        self.now = 0.0
        self.traffic = 0
        self.parked_at: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def wait_active(self) -> None:
        # idle for 100 s, then a datagram
        self.parked_at.append(self.now)
        self.now += 100.0
        self.traffic += 1

    def probe(
        self,
        observe: Callable[[float], None],
        sleep: Callable[[float], Awaitable[None]] | None = None,
        idle_after: float = 1.0,
    ) -> LoopLagProbe:
        return LoopLagProbe(
            observe,
            interval=0.25,
            clock=lambda: self.now,
            sleep=sleep or self.sleep,
            activity=lambda: self.traffic,
            wait_active=self.wait_active,
            idle_after=idle_after,
        )


def test_without_traffic_it_parks_and_the_idle_time_is_not_reported_as_lag() -> None:
    d = Driven()
    seen: list[float] = []
    probe = d.probe(seen.append)
    asyncio.run(probe.run(count=6))
    # four samples (0.25 .. 1.0 s), parked at 1.0 s, woken by traffic at 101 s, two more
    assert d.parked_at == [1.0]
    assert probe.parks == 1
    assert seen == [0.0] * 6
    assert d.now == 101.5


def test_traffic_keeps_it_sampling() -> None:
    d = Driven()
    seen: list[float] = []

    def observe(lag: float) -> None:
        seen.append(lag)
        d.traffic += 1  # a datagram in every interval

    probe = d.probe(observe)
    asyncio.run(probe.run(count=40))
    assert probe.parks == 0 and d.parked_at == []
    assert d.now == 10.0


def test_a_stall_while_active_is_still_reported() -> None:
    d = Driven()
    seen: list[float] = []
    stalls = iter([0.0, 0.5, 0.0])

    async def sleep(seconds: float) -> None:
        d.now += seconds + next(stalls)

    probe = d.probe(seen.append, sleep=sleep, idle_after=5.0)
    asyncio.run(probe.run(count=3))
    assert seen == [0.0, 0.5, 0.0]


def test_activity_and_wait_active_go_together() -> None:
    with pytest.raises(ValueError):
        LoopLagProbe(lambda lag: None, activity=lambda: 0)
    with pytest.raises(ValueError):
        LoopLagProbe(lambda lag: None, wait_active=asyncio.sleep)


def _metrics() -> SynapseCoapMetrics:
    return SynapseCoapMetrics(f"lag-{uuid.uuid4().hex}.test")


def test_the_metrics_wake_a_waiter_at_the_next_datagram_in_or_out() -> None:
    m = _metrics()

    async def main() -> None:
        for direction in ("in", "out"):
            waiter = m.wait_for_traffic()
            await asyncio.sleep(0)
            assert not waiter.done()
            before = m.traffic
            m.datagram(direction, "record", 40)
            assert m.traffic == before + 1
            await asyncio.wait_for(waiter, 5)  # (resolved on the loop's next turn)
        m.datagram("in", "record", 40)  # nobody waiting: nothing to do

    asyncio.run(main())


def test_a_waiter_given_up_or_on_a_closed_loop_is_left_alone() -> None:
    m = _metrics()

    async def cancelled() -> None:
        waiter = m.wait_for_traffic()
        waiter.cancel()
        m.datagram("in", "record", 1)
        await asyncio.sleep(0)
        assert waiter.cancelled()

    asyncio.run(cancelled())

    async def left() -> None:
        m.wait_for_traffic()

    asyncio.run(left())  # its loop is closed now
    m.datagram("in", "record", 1)  # no RuntimeError from the closed loop
    assert m.traffic == 2


def test_the_real_probe_parks_and_the_metrics_wake_it() -> None:
    """The module's wiring: the probe on a real loop with the metrics' traffic count."""
    m = _metrics()
    seen: list[float] = []

    async def main() -> None:
        probe = LoopLagProbe(
            seen.append,
            interval=0.0,
            activity=lambda: m.traffic,
            wait_active=m.wait_for_traffic,
            idle_after=0.0,  # parks at once
        )
        task = asyncio.ensure_future(probe.run(count=1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert probe.parks == 1 and seen == []
        m.datagram("in", "record", 1)
        await asyncio.wait_for(task, 5)
        assert len(seen) == 1

    asyncio.run(main())
