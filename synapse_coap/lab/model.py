"""Sans-I/O model of a constrained link, one direction at a time.

The relay (:mod:`synapse_coap.lab.relay`) is a thin asyncio shell around the
classes here; everything that decides *what happens to a datagram* lives in
this module, with the clock passed in, so tests are exact and need no sleeps.

The model of one direction (:class:`ImpairmentModel`), for a datagram of ``N``
payload bytes offered at time ``now``:

1. It is counted as offered (``N`` bytes, ``N + overhead`` IP bytes; the
   overhead is the IP + UDP header: 28 bytes for IPv4, 48 for IPv6).
2. **Queue** (tail drop): the backlog is every admitted datagram whose
   serialization has not finished by ``now`` (including the one on the wire).
   If admitting this one would take the backlog over ``queue_packets``
   datagrams or ``queue_bytes`` IP bytes, it is dropped (cause ``queue``).
3. **Serialization**: the link sends one datagram at a time; this one starts
   when the link is free (``max(now, busy_until)``) and occupies it for
   ``8 * (N + overhead) / rate`` seconds.
4. **Loss**: with probability ``loss`` it is lost (cause ``loss``). A lost
   datagram has still used the link (it was sent, it just never arrived).
5. **Propagation**: it arrives ``latency + U(-jitter, +jitter)`` seconds (never
   negative) after its serialization finished. Arrivals stay in FIFO order: a
   datagram never arrives before the one offered before it.
6. **Reordering**: with probability ``reorder`` a datagram skips the
   propagation delay and the FIFO rule (like netem's "sent immediately"): it
   arrives as soon as it is serialized, overtaking datagrams still in flight.
   With zero latency there is nothing to overtake.
7. **Duplication**: with probability ``duplicate`` a delivered datagram arrives
   twice; the copy is made beyond the bottleneck (it does not use the link
   again), gets its own jitter draw and arrives after the original.

Every offered datagram consumes exactly five draws from the direction's own
``random.Random`` (loss, duplicate, reorder, jitter, duplicate's jitter),
whatever the settings, so a given seed gives the same fate to the ``k``-th
datagram at every loss rate: sweeps over loss or rate are comparable.
"""

from __future__ import annotations

import collections
import math
import random
import socket
from collections.abc import Mapping
from typing import Any

import attrs

from synapse_coap.errors import ConfigValueError

__all__ = [
    "IPV4_UDP_OVERHEAD",
    "IPV6_UDP_OVERHEAD",
    "PROFILES",
    "Delivery",
    "DirectionStats",
    "Impairment",
    "ImpairmentModel",
    "LinkModel",
    "LinkProfile",
    "LinkStats",
    "RebindSchedule",
    "TraceRecord",
    "get_profile",
    "header_overhead",
]

#: IPv4 header (20) + UDP header (8).
IPV4_UDP_OVERHEAD = 28
#: IPv6 header (40) + UDP header (8).
IPV6_UDP_OVERHEAD = 48

#: Number of random draws taken per offered datagram (see the module docstring).
DRAWS_PER_DATAGRAM = 5


def header_overhead(family: int) -> int:
    """IP + UDP header bytes per datagram for an address family."""
    if family == socket.AF_INET6:
        return IPV6_UDP_OVERHEAD
    return IPV4_UDP_OVERHEAD


def _check_probability(path: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigValueError(path, f"must be a probability between 0 and 1, got {value!r}")


def _check_nonnegative(path: str, value: float) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigValueError(path, f"must be a finite number >= 0, got {value!r}")


def _check_positive_or_none(path: str, value: float | None, *, integer: bool = False) -> None:
    if value is None:
        return
    kind = int if integer else (int, float)
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        what = "an integer" if integer else "a number"
        raise ConfigValueError(path, f"must be {what} > 0 or null (unlimited), got {value!r}")


@attrs.frozen
class Impairment:
    """The impairments of one direction of a link.

    - ``rate``: bit/s at the IP level, or ``None`` for no rate limit.
    - ``latency``: one-way propagation delay, seconds.
    - ``jitter``: absolute jitter, seconds; ``jitter_fraction``: jitter as a
      fraction of ``latency``. Both add up; the delay is drawn uniformly in
      ``latency ± jitter_seconds`` and clamped at 0.
    - ``loss``, ``duplicate``, ``reorder``: probabilities per datagram.
    - ``queue_packets`` / ``queue_bytes``: tail-drop limits of the queue in
      front of the link (datagrams / IP bytes), ``None`` for unlimited. The
      default 1000 datagrams is netem's default ``limit``.
    """

    rate: float | None = None
    latency: float = 0.0
    jitter: float = 0.0
    jitter_fraction: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    queue_packets: int | None = 1000
    queue_bytes: int | None = None

    def __attrs_post_init__(self) -> None:
        self.validate("impairment")

    def validate(self, path: str) -> None:
        """Raise :class:`ConfigValueError` naming ``path.field`` for a bad value."""
        _check_positive_or_none(f"{path}.rate", self.rate)
        _check_nonnegative(f"{path}.latency", self.latency)
        _check_nonnegative(f"{path}.jitter", self.jitter)
        _check_nonnegative(f"{path}.jitter_fraction", self.jitter_fraction)
        _check_probability(f"{path}.loss", self.loss)
        _check_probability(f"{path}.duplicate", self.duplicate)
        _check_probability(f"{path}.reorder", self.reorder)
        _check_positive_or_none(f"{path}.queue_packets", self.queue_packets, integer=True)
        _check_positive_or_none(f"{path}.queue_bytes", self.queue_bytes, integer=True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], path: str) -> Impairment:
        """Build from a mapping (e.g. YAML); unknown keys and bad values raise."""
        if not isinstance(config, Mapping):
            raise ConfigValueError(path, "must be a mapping")
        allowed = {f.name for f in attrs.fields(cls)}
        for key in config:
            if key not in allowed:
                raise ConfigValueError(
                    f"{path}.{key}", f"unknown setting; allowed: {', '.join(sorted(allowed))}"
                )
        try:
            return cls(**config)
        except ConfigValueError as exc:
            field = exc.path.partition(".")[2]
            message = str(exc).partition(": ")[2]
            raise ConfigValueError(f"{path}.{field}", message) from None

    @property
    def jitter_seconds(self) -> float:
        """The effective jitter amplitude: ``jitter + jitter_fraction * latency``."""
        return self.jitter + self.jitter_fraction * self.latency

    def serialization_time(self, ip_bytes: int) -> float:
        """Seconds the link is busy sending ``ip_bytes`` (0 without a rate limit)."""
        if self.rate is None:
            return 0.0
        return 8.0 * ip_bytes / self.rate

    def describe(self) -> str:
        """A short human description, e.g. ``100 bit/s, 1 s ± 0.4 s, loss 30%``."""
        parts: list[str] = []
        parts.append("unlimited rate" if self.rate is None else f"{_fmt_rate(self.rate)}")
        if self.jitter_seconds:
            parts.append(f"{self.latency:g} s ± {self.jitter_seconds:g} s")
        elif self.latency:
            parts.append(f"{self.latency:g} s")
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name} {value:.0%}")
        if self.queue_packets is not None:
            parts.append(f"queue {self.queue_packets} dgrams")
        if self.queue_bytes is not None:
            parts.append(f"queue {self.queue_bytes} B")
        return ", ".join(parts)


def _fmt_rate(rate: float) -> str:
    if rate >= 1_000_000:
        return f"{rate / 1_000_000:g} Mbit/s"
    if rate >= 1000:
        return f"{rate / 1000:g} kbit/s"
    return f"{rate:g} bit/s"


@attrs.frozen
class RebindSchedule:
    """When the relay's source port toward the upstream changes (NAT rebinding).

    ``times``: seconds after the link started; ``every``: also every that many
    seconds. Both may be combined; an empty schedule never rebinds.
    """

    times: tuple[float, ...] = ()
    every: float | None = None

    def __attrs_post_init__(self) -> None:
        for i, t in enumerate(self.times):
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
                raise ConfigValueError(f"rebind.times[{i}]", f"must be a number, got {t!r}")
            if t <= 0:
                raise ConfigValueError(f"rebind.times[{i}]", f"must be > 0 seconds, got {t!r}")
        if list(self.times) != sorted(self.times):
            raise ConfigValueError("rebind.times", "must be in increasing order")
        _check_positive_or_none("rebind.every", self.every)

    @property
    def enabled(self) -> bool:
        return bool(self.times) or self.every is not None

    def count_until(self, elapsed: float) -> int:
        """How many rebinds have happened at or before ``elapsed`` seconds."""
        count = sum(1 for t in self.times if t <= elapsed)
        if self.every is not None and elapsed >= self.every:
            count += int(elapsed // self.every)
        return count

    def next_after(self, elapsed: float) -> float | None:
        """The first rebind time strictly after ``elapsed``, or ``None``."""
        candidates = [t for t in self.times if t > elapsed]
        if self.every is not None:
            candidates.append((math.floor(elapsed / self.every) + 1) * self.every)
        return min(candidates) if candidates else None


@attrs.frozen
class LinkProfile:
    """A named link: the impairments of each direction and the rebind schedule.

    ``uplink`` is client -> upstream (toward the server), ``downlink`` the
    way back.
    """

    name: str
    description: str
    uplink: Impairment
    downlink: Impairment
    rebind: RebindSchedule = RebindSchedule()

    @classmethod
    def symmetric(
        cls,
        name: str,
        description: str,
        impairment: Impairment,
        rebind: RebindSchedule = RebindSchedule(),
    ) -> LinkProfile:
        return cls(name, description, impairment, impairment, rebind)

    def with_changes(self, **changes: Any) -> LinkProfile:
        """The same profile with ``Impairment`` fields changed in both directions."""
        if not changes:
            return self
        up = attrs.evolve(self.uplink, **changes)
        down = attrs.evolve(self.downlink, **changes)
        return attrs.evolve(self, name=f"{self.name}*", uplink=up, downlink=down)

    def with_rebind(self, rebind: RebindSchedule) -> LinkProfile:
        return attrs.evolve(self, rebind=rebind)

    def describe(self) -> str:
        if self.uplink == self.downlink:
            text = self.uplink.describe()
        else:
            text = f"up: {self.uplink.describe()}; down: {self.downlink.describe()}"
        if self.rebind.enabled:
            text += f"; rebind at {list(self.rebind.times)} every {self.rebind.every}"
        return text


#: The named link profiles (both directions alike). See docs/lab.md.
PROFILES: Mapping[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile.symmetric("lan", "no impairment", Impairment()),
        LinkProfile.symmetric(
            "100bps",
            "100 bit/s, 1 s one-way latency, 40% jitter, no loss (HF radio / mesh)",
            Impairment(rate=100.0, latency=1.0, jitter_fraction=0.4),
        ),
        LinkProfile.symmetric(
            "lossy",
            "9.6 kbit/s, 300 ms one-way latency, 30% loss",
            Impairment(rate=9600.0, latency=0.3, loss=0.3),
        ),
        LinkProfile.symmetric(
            "satellite",
            "64 kbit/s, 600 ms one-way latency",
            Impairment(rate=64000.0, latency=0.6),
        ),
    )
}


def get_profile(name: str) -> LinkProfile:
    """The named profile, or :class:`ConfigValueError` listing the names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigValueError(
            "profile", f"unknown link profile {name!r}; allowed: {', '.join(PROFILES)}"
        ) from None


@attrs.frozen
class Delivery:
    """A decision: ``datagram`` is to be handed to the receiver at ``deliver_at``."""

    deliver_at: float
    datagram: bytes
    duplicate: bool = False
    reordered: bool = False


@attrs.frozen
class TraceRecord:
    """What happened to one offered datagram (kept when tracing is on)."""

    offered_at: float
    size: int
    outcome: str  # "delivered", "loss" or "queue"
    deliver_at: tuple[float, ...]


@attrs.define
class _Counters:
    """The counters of one direction as the model updates them.

    Their fields are :class:`DirectionStats`'s (written once, here); a
    snapshot is ``DirectionStats(**attrs.asdict(counters))``.
    """

    offered_datagrams: int = 0
    offered_bytes: int = 0
    offered_ip_bytes: int = 0
    delivered_datagrams: int = 0
    delivered_bytes: int = 0
    delivered_ip_bytes: int = 0
    lost_datagrams: int = 0
    lost_bytes: int = 0
    queue_dropped_datagrams: int = 0
    queue_dropped_bytes: int = 0
    duplicated_datagrams: int = 0
    reordered_datagrams: int = 0
    transmitted_ip_bytes: int = 0
    busy_seconds: float = 0.0


@attrs.frozen
class DirectionStats(_Counters):
    """Exact counters of one direction (a frozen snapshot).

    ``*_bytes`` are UDP payload bytes; ``*_ip_bytes`` add the IP + UDP header
    overhead per datagram. ``delivered_*`` include duplicates (they are what
    the receiver gets); ``transmitted_ip_bytes`` is what crossed the
    bottleneck (delivered originals and lost datagrams, not duplicates, not
    queue drops). Invariant::

        offered == delivered - duplicated + lost + queue_dropped
    """

    @property
    def dropped_datagrams(self) -> int:
        return self.lost_datagrams + self.queue_dropped_datagrams

    def as_dict(self) -> dict[str, int | float]:
        return attrs.asdict(self)

    def __str__(self) -> str:
        return (
            f"offered {self.offered_datagrams} dgrams {self.offered_bytes} B "
            f"({self.offered_ip_bytes} B IP), delivered {self.delivered_datagrams} dgrams "
            f"{self.delivered_bytes} B ({self.delivered_ip_bytes} B IP), "
            f"dropped loss {self.lost_datagrams} queue {self.queue_dropped_datagrams}, "
            f"duplicated {self.duplicated_datagrams}, reordered {self.reordered_datagrams}"
        )


@attrs.frozen
class LinkStats:
    uplink: DirectionStats
    downlink: DirectionStats

    def __str__(self) -> str:
        return f"up: {self.uplink} | down: {self.downlink}"


class ImpairmentModel:
    """One direction of a link; see the module docstring for the model.

    ``offer(now, datagram)`` returns the deliveries (none if dropped). Times
    are whatever clock the caller uses (``loop.time()`` in the relay, plain
    numbers in tests); ``now`` must not go backwards.
    """

    def __init__(
        self,
        impairment: Impairment,
        *,
        seed: int | str | bytes = 0,
        overhead: int = IPV4_UDP_OVERHEAD,
        trace: bool = False,
    ) -> None:
        if not isinstance(overhead, int) or isinstance(overhead, bool) or overhead < 0:
            raise ConfigValueError("overhead", f"must be an integer >= 0, got {overhead!r}")
        self.impairment = impairment
        self.overhead = overhead
        self._rng = random.Random(seed)
        self._busy_until = -math.inf
        self._last_fifo = -math.inf
        self._last_now = -math.inf
        # (finish time, ip bytes) of admitted datagrams, in order.
        self._backlog: collections.deque[tuple[float, int]] = collections.deque()
        self._backlog_bytes = 0
        self._c = _Counters()
        self.trace: list[TraceRecord] | None = [] if trace else None

    @property
    def busy_until(self) -> float:
        """When the link finishes sending what it has admitted so far."""
        return self._busy_until

    def backlog(self, now: float) -> tuple[int, int]:
        """(datagrams, IP bytes) admitted and not yet serialized at ``now``."""
        self._purge(now)
        return len(self._backlog), self._backlog_bytes

    def _purge(self, now: float) -> None:
        while self._backlog and self._backlog[0][0] <= now:
            _, size = self._backlog.popleft()
            self._backlog_bytes -= size

    def set_impairment(self, impairment: Impairment) -> None:
        """Change the impairments from now on (counters and random stream go on)."""
        self.impairment = impairment

    def offer(self, now: float, datagram: bytes) -> list[Delivery]:
        imp = self.impairment
        now = max(now, self._last_now)
        self._last_now = now
        size = len(datagram)
        ip = size + self.overhead
        rnd = self._rng.random
        u_loss, u_dup, u_reorder, u_jitter, u_jitter_dup = (rnd() for _ in range(5))
        c = self._c
        c.offered_datagrams += 1
        c.offered_bytes += size
        c.offered_ip_bytes += ip

        self._purge(now)
        if (imp.queue_packets is not None and len(self._backlog) + 1 > imp.queue_packets) or (
            imp.queue_bytes is not None and self._backlog_bytes + ip > imp.queue_bytes
        ):
            c.queue_dropped_datagrams += 1
            c.queue_dropped_bytes += size
            self._record(now, size, "queue", ())
            return []

        tx = imp.serialization_time(ip)
        finish = max(now, self._busy_until) + tx
        self._busy_until = finish
        if finish > now:
            self._backlog.append((finish, ip))
            self._backlog_bytes += ip
        c.transmitted_ip_bytes += ip
        c.busy_seconds += tx

        if u_loss < imp.loss:
            c.lost_datagrams += 1
            c.lost_bytes += size
            self._record(now, size, "loss", ())
            return []

        jitter = imp.jitter_seconds
        reordered = u_reorder < imp.reorder
        if reordered:
            c.reordered_datagrams += 1
            at = finish
        else:
            delay = max(0.0, imp.latency + (2.0 * u_jitter - 1.0) * jitter)
            at = max(finish + delay, self._last_fifo)
            self._last_fifo = at
        out = [Delivery(at, datagram, False, reordered)]
        if u_dup < imp.duplicate:
            c.duplicated_datagrams += 1
            if reordered:
                dup_at = at
            else:
                delay = max(0.0, imp.latency + (2.0 * u_jitter_dup - 1.0) * jitter)
                dup_at = max(finish + delay, self._last_fifo)
                self._last_fifo = dup_at
            out.append(Delivery(dup_at, datagram, True, reordered))
        c.delivered_datagrams += len(out)
        c.delivered_bytes += size * len(out)
        c.delivered_ip_bytes += ip * len(out)
        self._record(now, size, "delivered", tuple(d.deliver_at for d in out))
        return out

    def _record(self, now: float, size: int, outcome: str, at: tuple[float, ...]) -> None:
        if self.trace is not None:
            self.trace.append(TraceRecord(now, size, outcome, at))

    @property
    def stats(self) -> DirectionStats:
        return DirectionStats(**attrs.asdict(self._c))


class LinkModel:
    """Both directions of a link plus its NAT rebinding schedule.

    Each direction draws from its own ``random.Random`` seeded from ``seed``
    and the direction's name, so the uplink's fate does not depend on the
    downlink's traffic.
    """

    def __init__(
        self,
        profile: LinkProfile,
        *,
        seed: int = 0,
        start: float = 0.0,
        uplink_overhead: int = IPV4_UDP_OVERHEAD,
        downlink_overhead: int = IPV4_UDP_OVERHEAD,
        trace: bool = False,
    ) -> None:
        self.profile = profile
        self.seed = seed
        self.start = start
        self.uplink = ImpairmentModel(
            profile.uplink, seed=f"{seed}/uplink", overhead=uplink_overhead, trace=trace
        )
        self.downlink = ImpairmentModel(
            profile.downlink, seed=f"{seed}/downlink", overhead=downlink_overhead, trace=trace
        )

    def set_profile(self, profile: LinkProfile) -> None:
        """Switch impairments (and rebind schedule) without resetting counters."""
        self.profile = profile
        self.uplink.set_impairment(profile.uplink)
        self.downlink.set_impairment(profile.downlink)

    def epoch_at(self, now: float) -> int:
        """How many NAT rebinds have happened by ``now`` (0 at the start)."""
        return self.profile.rebind.count_until(now - self.start)

    def next_rebind_at(self, now: float) -> float | None:
        nxt = self.profile.rebind.next_after(now - self.start)
        return None if nxt is None else self.start + nxt

    @property
    def stats(self) -> LinkStats:
        return LinkStats(self.uplink.stats, self.downlink.stats)
