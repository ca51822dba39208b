"""The loop-lag probe parks while the listener is idle (transport/looplag.py) and the
module's metrics wake it at the next datagram (synapse/metrics.py). Driven by a fake
clock and timer queue: firing a timer advances the clock, nothing waits."""

from __future__ import annotations

import asyncio
import heapq
import uuid
from collections.abc import Callable

import pytest

from synapse_coap.synapse.metrics import SynapseCoapMetrics
from synapse_coap.transport.looplag import LoopLagProbe


class _Timer:
    def __init__(self, queue: Driven, entry: list[object]) -> None:
        self._queue, self._entry = queue, entry

    def cancel(self) -> None:
        self._entry[2] = None
        self._queue.cancelled += 1


class Driven:
    """A fake clock and timer queue, a traffic count and the probe's parks: with
    nothing armed and the probe parked, 100 s pass idle, then a datagram."""

    def __init__(self, stalls: list[float] | None = None) -> None:
        self.now = 0.0
        self.traffic = 0
        self.parked_at: list[float] = []
        self.cancelled = 0
        self._timers: list[list[object]] = []
        self._serial = 0
        self._resume: Callable[[], None] | None = None
        self._stalls = list(stalls or [])

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        self._serial += 1
        entry: list[object] = [self.now + delay, self._serial, fn]
        heapq.heappush(self._timers, entry)
        return _Timer(self, entry)

    def on_traffic(self, resume: Callable[[], None]) -> None:
        self.parked_at.append(self.now)
        self._resume = resume

    def run(self, probe: LoopLagProbe, samples: int) -> None:
        probe.start(count=samples)
        while probe.samples < samples:
            if self._timers:
                at, _serial, fn = heapq.heappop(self._timers)
                if fn is None:
                    continue
                stall = self._stalls.pop(0) if self._stalls else 0.0
                self.now = float(at) + stall  # type: ignore[arg-type]
                fn()  # type: ignore[operator]
            else:
                assert probe.parked and self._resume is not None, "nothing armed, not parked"
                self.now += 100.0
                self.traffic += 1
                resume, self._resume = self._resume, None
                resume()

    def probe(self, observe: Callable[[float], None], idle_after: float = 1.0) -> LoopLagProbe:
        return LoopLagProbe(
            observe,
            call_later=self.call_later,
            interval=0.25,
            clock=lambda: self.now,
            activity=lambda: self.traffic,
            on_traffic=self.on_traffic,
            idle_after=idle_after,
        )


def test_without_traffic_it_parks_and_the_idle_time_is_not_reported_as_lag() -> None:
    d = Driven()
    seen: list[float] = []
    probe = d.probe(seen.append)
    d.run(probe, 6)
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
    d.run(probe, 40)
    assert probe.parks == 0 and d.parked_at == []
    assert d.now == 10.0


def test_a_stall_while_active_is_still_reported() -> None:
    d = Driven(stalls=[0.0, 0.5, 0.0])
    seen: list[float] = []
    probe = d.probe(seen.append, idle_after=5.0)
    d.run(probe, 3)
    assert seen == [0.0, 0.5, 0.0]


def test_stop_cancels_its_timer_and_a_late_wake_up_does_nothing() -> None:
    d = Driven()
    seen: list[float] = []
    probe = d.probe(seen.append)
    probe.start()
    probe.stop()
    assert d.cancelled == 1 and not probe.parked
    probe._resume()  # (a traffic callback after the stop)
    assert d._timers[0][2] is None and len(d._timers) == 1, "nothing new armed"
    assert seen == []


def test_a_parked_probe_stopped_stays_stopped() -> None:
    d = Driven()
    probe = d.probe(lambda lag: None, idle_after=0.0)
    probe.start()
    at, _serial, fn = heapq.heappop(d._timers)
    d.now = float(at)  # type: ignore[arg-type]
    fn()  # type: ignore[operator]
    assert probe.parked and d._resume is not None
    probe.stop()
    d._resume()
    assert d._timers == [] and not probe.parked


def test_activity_and_on_traffic_go_together() -> None:
    with pytest.raises(ValueError):
        LoopLagProbe(lambda lag: None, call_later=Driven().call_later, activity=lambda: 0)
    with pytest.raises(ValueError):
        LoopLagProbe(
            lambda lag: None, call_later=Driven().call_later, on_traffic=lambda resume: None
        )


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
    """The module's wiring: the probe on a real loop's timers with the metrics' traffic
    count, woken through ``wait_for_traffic`` on that loop."""
    m = _metrics()
    seen: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_traffic(resume: Callable[[], None]) -> None:
            m.wait_for_traffic(loop).add_done_callback(lambda _: resume())

        probe = LoopLagProbe(
            seen.append,
            call_later=loop.call_later,
            interval=0.0,
            activity=lambda: m.traffic,
            on_traffic=on_traffic,
            idle_after=0.0,  # parks after its first sample
        )
        probe.start()
        for _ in range(5):
            await asyncio.sleep(0)
        assert probe.parks == 1 and probe.parked and len(seen) == 1
        m.datagram("in", "record", 1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert probe.parks == 2 and len(seen) == 2
        probe.stop()

    asyncio.run(main())


def test_wait_for_traffic_takes_a_loop_that_is_not_running() -> None:
    """The probe parks from a reactor timer with the default reactor, outside the
    guest loop's iterations: its waiter is made on that loop, not the running one."""
    m = _metrics()
    loop = asyncio.new_event_loop()
    try:
        waiter = m.wait_for_traffic(loop)
        assert waiter.get_loop() is loop and not waiter.done()
        m.datagram("out", "record", 1)
        loop.run_until_complete(asyncio.wait_for(waiter, 5))
    finally:
        loop.close()
