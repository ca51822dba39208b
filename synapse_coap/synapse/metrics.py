"""Prometheus metrics for the module, in Synapse's registry (so on its metrics listener).

Every metric carries the ``server_name`` label, as Synapse's own metrics do
(several homeservers may share one process and one registry). The list,
with meanings, is in docs/metrics.md.

:class:`SynapseCoapMetrics` implements the transport's ``TransportMetrics``
protocol. Its methods may be called from the asyncio thread: prometheus_client
metrics are thread-safe.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from synapse_coap.synapse.bridge import settle_future
from synapse_coap.synapse.compat import server_name_label

#: Synapse's own label for the homeserver name (``synapse.metrics.SERVER_NAME_LABEL``).
SERVER_NAME_LABEL = server_name_label()


class DatagramCounters:
    """``synapse_coap_datagrams_total`` and ``synapse_coap_bytes_total``: plain integers
    per (direction, kind, server name), read by Prometheus through :meth:`collect`.

    Every datagram in and out counts in both, so they are the listener's hottest
    metrics: two labelled prometheus_client counters cost a lock and a few calls per
    increment each, an entry here one dictionary lookup. Updated on the listener's
    loop thread only (one thread per homeserver); a scrape reads a snapshot."""

    def __init__(self) -> None:
        #: (direction, kind, server name) -> [datagrams, bytes]
        self.values: dict[tuple[str, str, str], list[int]] = {}

    def describe(self) -> list[Metric]:
        return list(self._families(()))

    def collect(self) -> list[Metric]:
        return list(self._families(list(self.values.items())))

    def _families(self, items: Any) -> tuple[Metric, Metric]:
        labels = ["direction", "kind", SERVER_NAME_LABEL]
        datagrams = CounterMetricFamily(
            "synapse_coap_datagrams",
            "UDP datagrams sent (direction=out) and received (direction=in) by the CoAP "
            "listener, by kind",
            labels=labels,
        )
        sizes = CounterMetricFamily(
            "synapse_coap_bytes",
            "UDP payload bytes sent and received by the CoAP listener, by kind",
            labels=labels,
        )
        for key, (count, size) in items:
            datagrams.add_metric(list(key), count)
            sizes.add_metric(list(key), size)
        return datagrams, sizes


DATAGRAM_COUNTERS = DatagramCounters()
REGISTRY.register(DATAGRAM_COUNTERS)
HANDSHAKES = Counter(
    "synapse_coap_handshakes_total",
    "Noise handshakes by outcome",
    labelnames=["outcome", SERVER_NAME_LABEL],
)
RETRANSMISSIONS = Counter(
    "synapse_coap_retransmissions_total",
    "Confirmable CoAP messages retransmitted",
    labelnames=[SERVER_NAME_LABEL],
)
DROPPED = Counter(
    "synapse_coap_dropped_total",
    "Datagrams dropped, by reason (malformed, replay, unknown session, rate limit, ...)",
    labelnames=["reason", SERVER_NAME_LABEL],
)
SESSIONS = Gauge(
    "synapse_coap_sessions",
    "Live Noise sessions",
    labelnames=[SERVER_NAME_LABEL],
)
#: upper bounds of ``synapse_coap_request_seconds``'s buckets (then +Inf)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RequestCounters:
    """``synapse_coap_requests_total`` (by route and status) and the histogram
    ``synapse_coap_request_seconds`` (by route): plain integers and floats, read by
    Prometheus through :meth:`collect`, as :class:`DatagramCounters`.

    Every request counts in both: a labelled prometheus_client counter and histogram
    cost a lock, a bucket walk and several calls per request, in the hand-over that
    the inbound bench weighs against HTTP's. Updated on the listener's loop thread only
    (one thread per homeserver); a scrape reads a snapshot."""

    def __init__(self) -> None:
        #: (route, status, server name) -> requests
        self.counts: dict[tuple[str, str, str], list[int]] = {}
        #: (route, server name) -> [count per bucket (the last: +Inf), sum of seconds]
        self.seconds: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def child(self, route: str, status: str, server_name: str) -> tuple[list[int], Any]:
        """The (count, histogram) cells of one route and status."""
        count = self.counts.setdefault((route, status, server_name), [0])
        cells = self.seconds.get((route, server_name))
        if cells is None:
            cells = self.seconds[(route, server_name)] = ([0] * (len(REQUEST_BUCKETS) + 1), [0.0])
        return count, cells

    def describe(self) -> list[Metric]:
        return list(self._families((), ()))

    def collect(self) -> list[Metric]:
        return list(self._families(list(self.counts.items()), list(self.seconds.items())))

    @staticmethod
    def _families(counts: Any, seconds: Any) -> tuple[Metric, Metric]:
        requests = CounterMetricFamily(
            "synapse_coap_requests",
            "Requests served over CoAP, by route and HTTP status",
            labels=["route", "status", SERVER_NAME_LABEL],
        )
        for key, (value,) in counts:
            requests.add_metric(list(key), value)
        histogram = HistogramMetricFamily(
            "synapse_coap_request_seconds",
            "Time from a complete CoAP request to its response being handed to the transport",
            labels=["route", SERVER_NAME_LABEL],
        )
        bounds = [floatToGoString(b) for b in REQUEST_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
        for key, (buckets, (total,)) in seconds:
            cumulative, running = [], 0
            for bound, n in zip(bounds, list(buckets), strict=True):
                running += n
                cumulative.append((bound, running))
            histogram.add_metric(list(key), cumulative, total)
        return requests, histogram


REQUEST_COUNTERS = RequestCounters()
REGISTRY.register(REQUEST_COUNTERS)
PUSH = Counter(
    "synapse_coap_push_total",
    "/sync push (Observe) events: registered, replaced, refused_session, refused_source, "
    "notification, parked, unparked, dropped, ended",
    labelnames=["event", SERVER_NAME_LABEL],
)
PUSH_REGISTRATIONS = Gauge(
    "synapse_coap_push_registrations",
    "Live /sync push (Observe) registrations",
    labelnames=[SERVER_NAME_LABEL],
)
LOOP_LAG = Histogram(
    "synapse_coap_loop_lag_seconds",
    "How late a 10 ms probe timer of the listener's loop fired, while the listener has "
    "traffic (it parks after 30 s without): a stall of the loop of B seconds gives one "
    "sample between B - 0.01 and B",
    labelnames=[SERVER_NAME_LABEL],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def _resolve_soon(waiter: asyncio.Future[None]) -> None:
    """Resolve ``waiter`` on its loop (from any thread; nothing if it is over or its
    loop is closed)."""
    if waiter.done():
        return
    try:
        waiter.get_loop().call_soon_threadsafe(settle_future, waiter, True, None)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


class SynapseCoapMetrics:
    """``TransportMetrics`` backed by the Prometheus metrics above.

    The labelled children are looked up once and kept (``labels()`` costs several
    microseconds, and every datagram and request touches two or three of them).
    """

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        self._labels = {SERVER_NAME_LABEL: server_name}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._datagram_counts = DATAGRAM_COUNTERS.values
        self._request_children: dict[tuple[str, int], tuple[list[int], Any]] = {}
        #: datagrams in and out so far (the loop-lag probe samples while it moves)
        self.traffic = 0
        self._traffic_waiter: asyncio.Future[None] | None = None

    def _child(self, metric: Any, *values: str, **labels: str) -> Any:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**labels, **self._labels)
        return child

    def datagram(self, direction: str, kind: str, size: int) -> None:
        key = (direction, kind, self.server_name)
        counts = self._datagram_counts.get(key)
        if counts is None:
            counts = self._datagram_counts.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += size
        self.traffic += 1
        waiter = self._traffic_waiter
        if waiter is not None:
            self._traffic_waiter = None
            _resolve_soon(waiter)

    def wait_for_traffic(
        self, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[None]:
        """Done at the next datagram in or out (the parked loop-lag probe waits on it);
        on ``loop`` (the running loop if None: the probe parks from a reactor timer with
        the default reactor, outside the loop's iterations)."""
        waiter: asyncio.Future[None] = (loop or asyncio.get_running_loop()).create_future()
        self._traffic_waiter = waiter
        return waiter

    def handshake(self, outcome: str) -> None:
        self._child(HANDSHAKES, outcome, outcome=outcome).inc()

    def retransmission(self) -> None:
        self._child(RETRANSMISSIONS).inc()

    def sessions(self, count: int) -> None:
        self._child(SESSIONS).set(count)

    def request(self, route: str, status: int, seconds: float) -> None:
        pair = self._request_children.get((route, status))
        if pair is None:
            pair = self._request_children[(route, status)] = REQUEST_COUNTERS.child(
                route, str(status), self.server_name
            )
        count, (buckets, total) = pair
        count[0] += 1
        buckets[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        total[0] += seconds

    def dropped(self, reason: str) -> None:
        self._child(DROPPED, reason, reason=reason).inc()

    def push(self, event: str) -> None:
        self._child(PUSH, event, event=event).inc()

    def push_registrations(self, count: int) -> None:
        self._child(PUSH_REGISTRATIONS).set(count)

    def loop_lag(self, seconds: float) -> None:
        self._child(LOOP_LAG).observe(seconds)
