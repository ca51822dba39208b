"""Transport metrics: what the transport reports, and a do-nothing default.

The module and the proxies implement :class:`TransportMetrics` with Prometheus
(or anything else); the transport calls it synchronously from the event loop,
so implementations must be cheap and must not raise.

Datagram ``kind`` values: ``"handshake"`` (Noise handshake messages),
``"record"`` (Noise data records), ``"plain"`` (unencrypted CoAP),
``"hint"`` (3-byte unknown-session and path hints, NAT pings), ``"control"`` (any other
Noise record kind the session layer reports).
Directions: ``"in"`` / ``"out"``. Handshake outcomes: ``"ok"``, ``"failed"``,
``"refused"`` (trust), ``"timeout"``, ``"retry"`` (a stateless retry cookie sent).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class TransportMetrics(Protocol):
    def datagram(self, direction: str, kind: str, size: int) -> None: ...
    def handshake(self, outcome: str) -> None: ...
    def retransmission(self) -> None: ...
    def sessions(self, count: int) -> None: ...
    def request(self, route: str, status: int, seconds: float) -> None: ...
    def dropped(self, reason: str) -> None: ...


class NullMetrics:
    """Discards everything."""

    def datagram(self, direction: str, kind: str, size: int) -> None:
        pass

    def handshake(self, outcome: str) -> None:
        pass

    def retransmission(self) -> None:
        pass

    def sessions(self, count: int) -> None:
        pass

    def request(self, route: str, status: int, seconds: float) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


class CountingMetrics:
    """Keeps simple counters in memory (tests, benchmarks, debugging).

    ``datagrams[(direction, kind)]`` counts datagrams, ``bytes[(direction,
    kind)]`` their sizes, ``sizes[(direction, kind)]`` lists every size seen
    (bounded to the last 10,000).
    """

    def __init__(self) -> None:
        self.datagrams: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.sizes: dict[tuple[str, str], list[int]] = {}
        self.handshakes: Counter[str] = Counter()
        self.retransmissions = 0
        self.session_count = 0
        self.requests: list[tuple[str, int, float]] = []
        self.drops: Counter[str] = Counter()
        self.pushes: Counter[str] = Counter()
        self.push_live = 0

    def datagram(self, direction: str, kind: str, size: int) -> None:
        key = (direction, kind)
        self.datagrams[key] += 1
        self.bytes[key] += size
        sizes = self.sizes.setdefault(key, [])
        if len(sizes) < 10_000:
            sizes.append(size)

    def handshake(self, outcome: str) -> None:
        self.handshakes[outcome] += 1

    def retransmission(self) -> None:
        self.retransmissions += 1

    def sessions(self, count: int) -> None:
        self.session_count = count

    def request(self, route: str, status: int, seconds: float) -> None:
        if len(self.requests) < 10_000:
            self.requests.append((route, status, seconds))

    def dropped(self, reason: str) -> None:
        self.drops[reason] += 1

    def push(self, event: str) -> None:
        """Optional (see ``synapse_coap.transport.push.push_metric``): a /sync push event."""
        self.pushes[event] += 1

    def push_registrations(self, count: int) -> None:
        self.push_live = count

    def total(self, direction: str | None = None, kind: str | None = None) -> int:
        """Datagrams counted, optionally filtered by direction and/or kind."""
        return sum(
            n
            for (d, k), n in self.datagrams.items()
            if (direction is None or d == direction) and (kind is None or k == kind)
        )
