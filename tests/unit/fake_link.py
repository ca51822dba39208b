"""A deterministic fake network for sans-I/O session tests (no sockets, no sleeps).

- :class:`Clock`: virtual time, injected into endpoints.
- :class:`Network`: datagrams in flight on a heap; per-direction loss,
  duplication and random delay (which reorders), all from one seeded RNG.
  Nodes are found by their *current* address, so changing ``node.addr``
  models a NAT rebinding (datagrams to the old address are lost).
- :class:`Node`: a NoiseEndpoint at an address, recording every nonce it
  seals and every datagram it accepts.
- :class:`ExchangeClient` / :class:`ExchangeServer`: a minimal confirmable
  request/response layer (CoAP-like: identical bytes on retransmission,
  exponential backoff, server-side de-duplication by exchange id) that calls
  ``suspect_lost`` on a first retransmission when nothing was received since
  the request was sent, like the transport does.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from synapse_coap.noise import (
    ChannelEstablished,
    Event,
    NoiseEndpoint,
    NoiseLimits,
    Received,
    Transmit,
    TrustPolicy,
)

Address = tuple[str, int]


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class LinkProfile:
    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.05
    jitter: float = 0.0


class Node:
    def __init__(
        self,
        name: str,
        addr: Address,
        private: bytes,
        *,
        trust: TrustPolicy,
        clock: Clock,
        seed: int,
        limits: NoiseLimits = NoiseLimits(),
        app_payload: bytes = b"",
        profiles: tuple[tuple[int, bytes], ...] = ((0, b""),),
    ) -> None:
        self.name = name
        self.addr = addr
        self.private = private
        self.clock = clock
        self.nonces: Counter[tuple[bytes, int]] = Counter()
        self._rng = random.Random(seed)
        self.endpoint = self._make(trust, limits, app_payload, profiles)
        self.trust, self.limits, self.app_payload, self.profiles = (
            trust,
            limits,
            app_payload,
            profiles,
        )
        self.accepted_datagrams: set[bytes] = set()
        self.replays_accepted = 0
        self.events: list[Event] = []
        self.on_event: Callable[[Event], None] | None = None

    def _make(
        self,
        trust: TrustPolicy,
        limits: NoiseLimits,
        app_payload: bytes,
        profiles: tuple[tuple[int, bytes], ...],
    ) -> NoiseEndpoint:
        return NoiseEndpoint(
            self.private,
            trust=trust,
            limits=limits,
            profiles=profiles,
            app_payload=app_payload,
            clock=self.clock,
            rng=self._rng.randbytes,
            seal_observer=lambda key_id, pn: self.nonces.update([(key_id, pn)]),
        )

    def restart(self) -> None:
        """Lose all session state (a process restart with the same static key)."""
        self.endpoint = self._make(self.trust, self.limits, self.app_payload, self.profiles)
        self.accepted_datagrams.clear()

    def reused_nonces(self) -> list[tuple[bytes, int]]:
        return [k for k, n in self.nonces.items() if n > 1]


@dataclass(order=True)
class _InFlight:
    at: float
    seq: int
    dst: Address = field(compare=False)
    src: Address = field(compare=False)
    data: bytes = field(compare=False)


class Network:
    def __init__(self, clock: Clock, seed: int = 0, profile: LinkProfile | None = None) -> None:
        self.clock = clock
        self.rng = random.Random(seed)
        self.profile = profile or LinkProfile()
        self.nodes: list[Node] = []
        self._heap: list[_InFlight] = []
        self._seq = 0
        self.datagrams_sent = 0
        self.bytes_sent = 0

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def node_at(self, addr: Address) -> Node | None:
        for node in self.nodes:
            if node.addr == addr:
                return node
        return None

    def emit(self, src: Node, events: list[Event]) -> None:
        """Route a node's events: Transmit goes on the wire, the rest is recorded."""
        for ev in events:
            if isinstance(ev, Transmit):
                self.transmit(src.addr, ev.addr, ev.data)
            else:
                src.events.append(ev)
                if src.on_event is not None:
                    src.on_event(ev)

    def transmit(self, src: Address, dst: Address, data: bytes) -> None:
        p = self.profile
        self.datagrams_sent += 1
        self.bytes_sent += len(data)
        if self.rng.random() < p.loss:
            return
        copies = 2 if self.rng.random() < p.duplicate else 1
        for _ in range(copies):
            delay = p.delay + self.rng.random() * p.jitter
            self._seq += 1
            heapq.heappush(self._heap, _InFlight(self.clock.now + delay, self._seq, dst, src, data))

    def next_time(self) -> float | None:
        return self._heap[0].at if self._heap else None

    def deliver_due(self) -> int:
        n = 0
        while self._heap and self._heap[0].at <= self.clock.now:
            item = heapq.heappop(self._heap)
            node = self.node_at(item.dst)
            if node is None:
                continue
            n += 1
            events = node.endpoint.datagram_received(item.data, item.src)
            if any(isinstance(e, Received) for e in events):
                if item.data in node.accepted_datagrams:
                    node.replays_accepted += 1
                node.accepted_datagrams.add(item.data)
            self.emit(node, events)
        return n

    def run_timers(self) -> None:
        for node in self.nodes:
            t = node.endpoint.next_timer()
            if t is not None and t <= self.clock.now:
                self.emit(node, node.endpoint.handle_timers())

    def next_event_time(self, extra: list[float | None]) -> float | None:
        times = [self.next_time(), *extra]
        times += [n.endpoint.next_timer() for n in self.nodes]
        valid = [t for t in times if t is not None]
        return min(valid) if valid else None

    def step(self, extra: list[float | None] | None = None) -> bool:
        """Advance to the next event and process it. False when nothing is left."""
        t = self.next_event_time(extra or [])
        if t is None:
            return False
        if t > self.clock.now:
            self.clock.now = t
        self.deliver_due()
        self.run_timers()
        return True

    def settle(self, max_steps: int = 10_000, until: float | None = None) -> None:
        for _ in range(max_steps):
            t = self.next_event_time([])
            if t is None or (until is not None and t > until):
                break
            self.step()


@dataclass
class _Pending:
    xid: int
    data: bytes
    sent_at: float
    rto: float
    next_at: float
    attempts: int = 0


class ExchangeClient:
    """Confirmable requests over a channel, CoAP style (identical retransmissions)."""

    def __init__(
        self, node: Node, network: Network, channel: int, rto: float = 1.0, max_rto: float = 8.0
    ) -> None:
        self.node = node
        self.network = network
        self.channel = channel
        self.rto = rto
        self.max_rto = max_rto
        self.pending: dict[int, _Pending] = {}
        self.completed: Counter[int] = Counter()
        self.last_rx = -1.0
        self.retransmissions = 0
        self.suspicions = 0
        node.on_event = self._on_event

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, Received) and ev.channel == self.channel:
            self.last_rx = self.node.clock.now
            if ev.plaintext.startswith(b"R"):
                xid = int(ev.plaintext[1:].split(b":", 1)[0])
                if xid in self.pending:
                    del self.pending[xid]
                    self.completed[xid] += 1

    def start(self, xid: int) -> None:
        now = self.node.clock.now
        data = b"Q%d:" % xid + b"x" * (xid % 40)
        self.pending[xid] = _Pending(xid, data, now, self.rto, now + self.rto)
        self.network.emit(self.node, self.node.endpoint.send(self.channel, data))

    def next_timer(self) -> float | None:
        if not self.pending:
            return None
        return min([p.next_at for p in self.pending.values()])

    def run_timers(self) -> None:
        now = self.node.clock.now
        for p in list(self.pending.values()):
            if p.next_at > now:
                continue
            if p.attempts == 0 and self.last_rx < p.sent_at:
                self.suspicions += 1
                self.network.emit(self.node, self.node.endpoint.suspect_lost(self.channel))
            p.attempts += 1
            self.retransmissions += 1
            p.rto = min(p.rto * 2, self.max_rto)
            p.next_at = now + p.rto
            self.network.emit(self.node, self.node.endpoint.send(self.channel, p.data))


class ExchangeServer:
    """Executes each exchange id once; answers duplicates from its cache."""

    def __init__(self, node: Node, network: Network) -> None:
        self.node = node
        self.network = network
        self.executed: Counter[int] = Counter()
        node.on_event = self._on_event

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, ChannelEstablished):
            return
        if isinstance(ev, Received) and ev.plaintext.startswith(b"Q"):
            xid = int(ev.plaintext[1:].split(b":", 1)[0])
            if xid not in self.executed:
                self.executed[xid] += 1
            self.network.emit(self.node, self.node.endpoint.send(ev.channel, b"R%d:ok" % xid))
