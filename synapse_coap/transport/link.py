"""Link tuning: the one documented class of transport parameters, and the RTT estimator.

Everything here is sans-I/O (the clock is injected) so it can be tested
deterministically; :mod:`synapse_coap.transport.manager` applies it to aiocoap.

Retransmission follows RFC 7252 until the first round-trip-time sample, then a
CoCoA-like scheme (draft-ietf-core-cocoa, RFC 6298 estimator):

* the first transmission of a confirmable message waits
  ``rto * uniform(1, ack_random_factor)`` (+ the serialization time of the
  message when ``bandwidth_bps`` is known);
* each retransmission doubles the wait, bounded by ``max_rto``;
* samples come only from exchanges that were never retransmitted (Karn's
  rule); a retransmission doubles the RTO *kept for the next exchange* (RFC
  6298 §5.5), so a link much slower than the initial 2 s guess converges
  after one exchange instead of retransmitting forever.

NSTART (confirmable exchanges outstanding per peer) is adaptive but
conservative, see :meth:`RttEstimator.allowed_outstanding`: ``nstart`` (RFC
7252: 1) until the link has been measured, more (up to ``max_nstart``) only
where the extra queueing that more outstanding messages can cause provably fits
inside the retransmission timer's margin, and back to ``nstart`` at once on any
retransmission.

See ``docs/link-tuning.md`` for what to set on 100 bit/s, satellite and lossy
links.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs

from synapse_coap.confmap import from_mapping
from synapse_coap.errors import ConfigValueError


def _positive(path: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigValueError(
                f"{path}.{attribute.name}", f"must be a number > 0, got {value!r}"
            )

    return check


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigValueError(f"link.{attribute.name}", f"must be a number >= 0, got {value!r}")


def _int_range(lo: int, hi: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigValueError(
                f"link.{attribute.name}", f"must be an integer in {lo}..{hi}, got {value!r}"
            )

    return check


def _optional_positive(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigValueError(
            f"link.{attribute.name}", f"must be a number > 0 or null, got {value!r}"
        )


def _optional_non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    _non_negative(_inst, attribute, value)


def _fraction(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigValueError(f"link.{attribute.name}", f"must be in (0, 1], got {value!r}")


_pos = _positive("link")


@attrs.frozen
class LinkParameters:
    """Every timer and window of the CoAP message layer, in one place.

    Defaults suit a LAN or the Internet and stay correct (if slow to converge)
    on a 100 bit/s radio; ``docs/link-tuning.md`` gives settings for slow,
    long-delay and lossy links.

    Attributes:
        ack_timeout: RFC 7252 ACK_TIMEOUT (s): the RTO used until the first RTT
            sample of a peer. 2 s per the RFC. When ``bandwidth_bps`` is set,
            the first RTO is at least 1.5 times the serialization time of a
            small exchange (two 150-byte datagrams), see :attr:`initial_rto`,
            so a slow link needs no hand-set ``ack_timeout``.
        ack_random_factor: RFC 7252 ACK_RANDOM_FACTOR: the first wait of a
            confirmable message is ``rto * uniform(1, ack_random_factor)`` so
            that peers do not synchronise. 1.5 per the RFC.
        max_retransmit: RFC 7252 MAX_RETRANSMIT: retransmissions of one
            confirmable message before the peer is declared unreachable
            (:class:`~synapse_coap.errors.LinkDown`). 4 per the RFC.
        nstart: RFC 7252 NSTART, here the *floor* of the per-peer limit of
            confirmable messages outstanding (not yet acknowledged). 1 per the
            RFC; a separate response ends the interaction at the empty ACK,
            which the server sends as soon as it knows the request will wait
            (a long-poll), so long-polls hold the peer for one round trip, not
            for the server's think time. The limit only rises above it as
            :meth:`RttEstimator.allowed_outstanding` describes.
        max_nstart: the ceiling of the per-peer limit (4, or ``nstart`` when that
            is set higher). Equal to ``nstart`` disables growth (fixed NSTART);
            must not be below ``nstart``.
        nstart_samples: RTT samples of a peer needed before its limit may rise
            above ``nstart`` (4).
        nstart_clean_exchanges: after a retransmission the limit is ``nstart``
            until this many exchanges in a row were acknowledged without
            retransmission (16).
        min_rto: lower bound of the measured RTO (s). 1 s as in RFC 6298:
            avoids spurious retransmissions from delayed ACKs on fast links.
        max_rto: upper bound of the RTO and of every backed-off wait (s). Must
            exceed the longest round trip: 100-byte datagrams on a 100 bit/s
            link take 8 s each way, so the default is 120 s.
        rtt_alpha, rtt_beta, rto_k: the RFC 6298 gains (1/8, 1/4) and variance
            multiplier (4).
        rto_floor_factor: the RTO is never below ``srtt * rto_floor_factor``:
            with a perfectly steady RTT, RFC 6298's variance term decays to
            zero and the RTO would equal the RTT (spurious retransmissions on
            slow links). 1.5 gives a 50% margin.
        bandwidth_bps: the link's bit rate if known (None = fast link). Each
            message's first wait then adds its own serialization time
            (``8 * size / bandwidth_bps``), and RTT samples have it removed, so
            a 1 KiB block and a 60-byte ACK share one estimator.
        empty_ack_delay: fixed time (s) after which a server sends an empty ACK
            and later a separate response; None (default) derives it per peer:
            ``piggyback_fraction * (rto - srtt)``, i.e. well before the
            peer's retransmission timer would fire, and
            ``piggyback_fraction * min(ack_timeout, min_rto)`` before any
            sample.
        piggyback_fraction: see ``empty_ack_delay``. 0.5.
        request_timeout: default per-request deadline on the client (s),
            from the first transmission to the complete response (blockwise
            included). 300 s leaves room for long-poll /sync on a slow link.
        max_latency: RFC 7252 MAX_LATENCY (s), used for EXCHANGE_LIFETIME
            (how long duplicate detection remembers a message). 100 s.
        block_size_exp: RFC 7959 SZX for blockwise transfers (block =
            2**(exp+4) bytes): 6 = 1024 bytes. Smaller blocks lose less per
            lost datagram on very lossy links.
    """

    ack_timeout: float = attrs.field(default=2.0, validator=_pos)
    ack_random_factor: float = attrs.field(default=1.5)
    max_retransmit: int = attrs.field(default=4, validator=_int_range(0, 20))
    nstart: int = attrs.field(default=1, validator=_int_range(1, 64))
    max_nstart: int = attrs.field(
        default=attrs.Factory(lambda self: max(4, self.nstart), takes_self=True),
        validator=_int_range(1, 64),
    )
    nstart_samples: int = attrs.field(default=4, validator=_int_range(1, 1000))
    nstart_clean_exchanges: int = attrs.field(default=16, validator=_int_range(0, 10000))
    min_rto: float = attrs.field(default=1.0, validator=_pos)
    max_rto: float = attrs.field(default=120.0, validator=_pos)
    rtt_alpha: float = attrs.field(default=0.125, validator=_fraction)
    rtt_beta: float = attrs.field(default=0.25, validator=_fraction)
    rto_k: float = attrs.field(default=4.0, validator=_pos)
    rto_floor_factor: float = attrs.field(default=1.5)
    bandwidth_bps: float | None = attrs.field(default=None, validator=_optional_positive)
    empty_ack_delay: float | None = attrs.field(default=None, validator=_optional_non_negative)
    piggyback_fraction: float = attrs.field(default=0.5, validator=_fraction)
    request_timeout: float = attrs.field(default=300.0, validator=_pos)
    max_latency: float = attrs.field(default=100.0, validator=_pos)
    block_size_exp: int = attrs.field(default=6, validator=_int_range(0, 6))

    @ack_random_factor.validator
    def _check_arf(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
            raise ConfigValueError(
                "link.ack_random_factor", f"must be a number >= 1, got {value!r}"
            )

    @rto_floor_factor.validator
    def _check_floor(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
            raise ConfigValueError("link.rto_floor_factor", f"must be a number >= 1, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.min_rto > self.max_rto:
            raise ConfigValueError(
                "link.min_rto", f"must not exceed max_rto ({self.min_rto} > {self.max_rto})"
            )
        if self.ack_timeout > self.max_rto:
            raise ConfigValueError(
                "link.ack_timeout",
                f"must not exceed max_rto ({self.ack_timeout} > {self.max_rto})",
            )
        if self.max_nstart < self.nstart:
            raise ConfigValueError(
                "link.max_nstart",
                f"must be an integer in {self.nstart}..64 (not below nstart), "
                f"got {self.max_nstart!r}",
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, path: str = "link") -> LinkParameters:
        """Build from a config mapping; unknown keys and bad values raise ConfigValueError."""
        return from_mapping(cls, config, path)

    # -- derived values -------------------------------------------------------

    def serialization_time(self, size: int) -> float:
        """Seconds to put ``size`` bytes on the link (0 when the bit rate is unknown)."""
        if self.bandwidth_bps is None or size <= 0:
            return 0.0
        return 8.0 * size / self.bandwidth_bps

    #: bytes of a small request + its response (IP/UDP headers included), for :attr:`initial_rto`
    SMALL_EXCHANGE_BYTES = 300

    #: bytes a datagram adds to its block (CoAP header, token and options, the Noise
    #: record, UDP and IPv6 headers), for :attr:`max_datagram_bytes`
    DATAGRAM_OVERHEAD = 128

    @property
    def max_datagram_bytes(self) -> int:
        """The largest datagram a message of this link can take: one block plus overhead."""
        return (1 << (self.block_size_exp + 4)) + self.DATAGRAM_OVERHEAD

    @property
    def initial_rto(self) -> float:
        """The RTO before the first sample: ``ack_timeout``, or on a link of known bit
        rate at least ``1.5 * serialization_time(300)`` (36 s at 100 bit/s, the RFC's
        2 s from 1.8 kbit/s up), at most ``max_rto``."""
        floor = 1.5 * self.serialization_time(self.SMALL_EXCHANGE_BYTES)
        return min(max(self.ack_timeout, floor), self.max_rto)

    @property
    def max_transmit_span(self) -> float:
        """RFC 7252 MAX_TRANSMIT_SPAN, with the bounded backoff and the initial RTO."""
        total = 0.0
        t = self.initial_rto * self.ack_random_factor
        for _ in range(self.max_retransmit):
            total += t
            t = min(t * 2, self.max_rto)
        return total

    @functools.cached_property
    def exchange_lifetime(self) -> float:
        """RFC 7252 EXCHANGE_LIFETIME: MAX_TRANSMIT_SPAN + 2 * MAX_LATENCY + PROCESSING_DELAY.

        (Computed once per instance: the message layer reads it for every request.)"""
        return max(self.max_transmit_span, self.max_rto) + 2 * self.max_latency + self.ack_timeout


#: IP bytes of one keep-alive datagram (a 22-byte Noise control record + UDP/IPv4 headers).
KEEPALIVE_IP_BYTES = 50
#: Largest share of a link of known bit rate that keep-alives may take by default.
KEEPALIVE_MAX_SHARE = 0.005


def keepalive_interval(requested: float, bandwidth_bps: float | None) -> float:
    """The keep-alive interval to use: ``requested``, raised on a link of known bit rate so
    that keep-alives take at most :data:`KEEPALIVE_MAX_SHARE` of it (0.5 %: 800 s at
    100 bit/s, unchanged from 728 bit/s up with the 110 s default). A slow radio link
    rarely sits behind a NAT; one that does needs an explicit, shorter interval."""
    if bandwidth_bps is None or not bandwidth_bps > 0:
        return requested
    return max(requested, 8.0 * KEEPALIVE_IP_BYTES / (KEEPALIVE_MAX_SHARE * bandwidth_bps))


class RttEstimator:
    """Per-peer retransmission timer state (sans-I/O; clock injected).

    Exchanges are identified by any hashable key (the transport uses
    ``(remote, message id)``). Call :meth:`started` when a confirmable message
    is first sent, :meth:`retransmitted` on each retransmission, and
    :meth:`acknowledged` when its ACK/RST arrives; :meth:`first_timeout` and
    :meth:`next_timeout` give the waits, :meth:`allowed_outstanding` the
    peer's current NSTART.
    """

    MAX_TRACKED = 1024
    #: Share of the RTO's margin over the SRTT (``base_rto - srtt``) that queueing
    #: behind our own outstanding messages may use: the peer's piggyback window
    #: takes up to half of it (``piggyback_fraction`` 0.5), a quarter stays spare.
    QUEUE_SHARE = 0.25
    #: RTTs below this (s) count as this, so a zero-time sample cannot divide by zero.
    MIN_RATE_RTT = 1e-6

    def __init__(
        self,
        params: LinkParameters = LinkParameters(),
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.params = params
        self._clock = clock
        self._rand = rand
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self._rto = params.initial_rto
        self.samples = 0
        self.backoffs = 0
        #: retransmitted exchanges whose ACK came soon after the last transmission
        #: (a loss, not a slow link): the backed-off RTO was dropped
        self.loss_recoveries = 0
        #: exchanges acknowledged with no sample taken (``acknowledged(measure=False)``)
        self.unmeasured = 0
        # key -> (first send time, size, retransmitted?, last transmission time)
        self._pending: dict[Hashable, tuple[float, int, bool, float]] = {}
        #: smoothed bytes per sampled exchange (request + reply), for the delivery rate
        #: and the bandwidth-delay product
        self.mean_exchange_bytes: float | None = None
        # smoothed RTT of the samples as measured (serialization time not removed)
        self._raw_srtt: float | None = None
        # exchanges acknowledged without retransmission since the last retransmission
        # or give-up; None while the peer is not held at the floor for a loss
        self._clean_run: int | None = None

    @property
    def rto(self) -> float:
        """The current retransmission timeout (s), backoff included."""
        return self._rto

    @property
    def base_rto(self) -> float:
        """The RTO the samples alone give (no backoff): ``initial_rto`` before any."""
        if self.srtt is None or self.rttvar is None:
            return self.params.initial_rto
        return self._computed_rto(self.srtt, self.rttvar)

    def _computed_rto(self, srtt: float, rttvar: float) -> float:
        p = self.params
        rto = srtt + max(0.001, p.rto_k * rttvar)
        rto = max(rto, srtt * p.rto_floor_factor, p.min_rto)
        return min(rto, p.max_rto)

    def sample(self, rtt: float, size: int = 0, reply_size: int = 0) -> None:
        """Feed one RTT measurement of a never-retransmitted exchange (RFC 6298 §2).

        ``size`` is the request's size (its serialization time is removed from the
        sample when ``bandwidth_bps`` is known), ``reply_size`` that of the ACK or
        piggybacked response; both count towards :attr:`delivery_rate_bps`.
        """
        p = self.params
        raw = max(0.0, rtt)
        exchanged = float(max(0, size) + max(0, reply_size))
        if self.mean_exchange_bytes is None or self._raw_srtt is None:
            self.mean_exchange_bytes = exchanged
            self._raw_srtt = raw
        else:
            a = p.rtt_alpha
            self.mean_exchange_bytes = (1 - a) * self.mean_exchange_bytes + a * exchanged
            self._raw_srtt = (1 - a) * self._raw_srtt + a * raw
        r = max(0.0, rtt - p.serialization_time(size))
        if self.srtt is None or self.rttvar is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = (1 - p.rtt_beta) * self.rttvar + p.rtt_beta * abs(self.srtt - r)
            self.srtt = (1 - p.rtt_alpha) * self.srtt + p.rtt_alpha * r
        self.samples += 1
        self._rto = self._computed_rto(self.srtt, self.rttvar)

    def backoff(self) -> None:
        """A retransmission timer fired: double the RTO kept for later exchanges (RFC 6298 §5.5)."""
        self._rto = min(self._rto * 2, self.params.max_rto)
        self.backoffs += 1

    # -- timers -----------------------------------------------------------------

    def first_timeout(self, size: int = 0) -> float:
        """Wait before the first retransmission of a new confirmable message of ``size`` bytes."""
        p = self.params
        dither = 1.0 + (p.ack_random_factor - 1.0) * self._rand()
        return min(self._rto * dither, p.max_rto) + p.serialization_time(size)

    def next_timeout(self, previous: float) -> float:
        """Bounded exponential backoff: the wait after a retransmission."""
        return max(previous, min(previous * 2, self.params.max_rto))

    def empty_ack_delay(self) -> float:
        """How long a server may hold a request's ACK hoping to piggyback the response."""
        p = self.params
        if p.empty_ack_delay is not None:
            return p.empty_ack_delay
        if self.srtt is None:
            return p.piggyback_fraction * min(p.ack_timeout, p.min_rto)
        return max(0.0, p.piggyback_fraction * (self._rto - self.srtt))

    # -- exchange bookkeeping (Karn's rule) ----------------------------------------

    def started(self, key: Hashable, size: int = 0) -> None:
        if len(self._pending) >= self.MAX_TRACKED:
            self._pending.pop(next(iter(self._pending)))
        now = self._clock()
        self._pending[key] = (now, size, False, now)

    def retransmitted(self, key: Hashable) -> bool:
        """Record a retransmission; returns True if it was the first one of this exchange.

        Also drops :meth:`allowed_outstanding` to ``nstart`` (a loss or a link slower
        than measured) until ``nstart_clean_exchanges`` clean exchanges in a row.
        """
        entry = self._pending.get(key)
        first = entry is not None and not entry[2]
        if entry is not None:
            self._pending[key] = (entry[0], entry[1], True, self._clock())
        self.backoff()
        self._hold_at_floor()
        return first

    def acknowledged(
        self, key: Hashable, reply_size: int = 0, *, measure: bool = True
    ) -> float | None:
        """The exchange got its ACK/RST (of ``reply_size`` bytes); returns the RTT sample
        taken, if any (Karn's rule).

        ``measure=False``: the ACK's timing was the peer's choice, not the link's (an
        empty ACK the server may have held, RFC 7252 §5.2.2, hoping to piggyback a
        response): the exchange ends and counts as clean, but gives no sample, so a
        server's think time never inflates the SRTT or lowers the measured rate.
        """
        entry = self._pending.pop(key, None)
        if entry is None:
            return None
        sent, size, retransmitted, last = entry
        if retransmitted:
            # Karn: no sample. But once the RTT has been measured, an ACK within
            # the un-backed-off RTO of the last transmission suggests a lost
            # datagram rather than a slower link: keep at most one doubling for
            # the next exchange (at 30 % loss the kept backoff would otherwise
            # grow with every unlucky exchange). Before any sample the whole
            # backoff is kept, so a link slower than the first guess converges.
            base = self.base_rto
            if self.samples and self._clock() - last <= base and self._rto > 2 * base:
                self._rto = min(2 * base, self.params.max_rto)
                self.loss_recoveries += 1
            return None
        if self._clean_run is not None:
            self._clean_run += 1
            if self._clean_run >= self.params.nstart_clean_exchanges:
                self._clean_run = None
        if not measure:
            self.unmeasured += 1
            return None
        rtt = max(0.0, self._clock() - sent)
        self.sample(rtt, size, reply_size)
        return rtt

    def restamp(self) -> None:
        """Exchanges queued behind a handshake leave only now: measure from here."""
        now = self._clock()
        for key, (_sent, size, retransmitted, _last) in list(self._pending.items()):
            self._pending[key] = (now, size, retransmitted, now)

    def forget(self, key: Hashable) -> None:
        """The exchange ended without an ACK (cancelled, session error)."""
        self._pending.pop(key, None)

    def gave_up(self, key: Hashable) -> None:
        """The exchange was never acknowledged (retransmissions exhausted): like
        :meth:`forget`, and the peer's NSTART drops to the floor as after a retransmission."""
        self._pending.pop(key, None)
        self._hold_at_floor()

    def _hold_at_floor(self) -> None:
        self._clean_run = 0 if self.params.nstart_clean_exchanges > 0 else None

    # -- adaptive NSTART ----------------------------------------------------------------

    @property
    def delivery_rate_bps(self) -> float | None:
        """Measured delivery rate (bit/s): ``8 * mean exchange bytes / smoothed RTT``.

        With one exchange outstanding the link is mostly idle, so this is a
        *lower bound* of the link's bit rate (an application-limited sample in
        BBR's terms): small messages or a slow server make it lower, never higher.
        None before any sample.
        """
        if self.mean_exchange_bytes is None or self._raw_srtt is None:
            return None
        return 8.0 * self.mean_exchange_bytes / max(self._raw_srtt, self.MIN_RATE_RTT)

    def allowed_outstanding(self) -> int:
        """How many confirmable exchanges may be outstanding to this peer now (NSTART).

        ``nstart`` (RFC 7252: 1) until ``nstart_samples`` RTT samples have been
        taken, and from any retransmission until ``nstart_clean_exchanges``
        exchanges in a row were acknowledged without one. Otherwise the largest
        ``k <= max_nstart`` for which both hold:

        * **Queueing fits in the timer's margin.** With ``k`` messages sent at
          once, the last one can wait behind ``k - 1`` others, each at most
          ``max_datagram_bytes`` (one block), at the link's bit rate: at most
          ``(k - 1) * 8 * max_datagram_bytes / rate``. That must stay within
          ``QUEUE_SHARE`` (a quarter) of ``base_rto - srtt``, so growing can
          never cause a spurious retransmission. ``rate`` is ``bandwidth_bps``
          when configured, else :attr:`delivery_rate_bps`, a lower bound of the
          real rate (so the real queueing is at most the computed one).
        * **Bandwidth-delay product** (only when ``bandwidth_bps`` is set):
          ``k <= bandwidth_bps * srtt / (8 * mean exchange bytes)``; beyond it
          more outstanding messages only build a queue.

        On a 100 bit/s or 9.6 kbit/s radio, or a 10 s RTT, one full block takes
        longer than the margin: the limit stays ``nstart``. On loopback or a LAN
        (RTT of milliseconds, RTO at ``min_rto``) it reaches ``max_nstart``.
        """
        p = self.params
        if p.max_nstart <= p.nstart or self.srtt is None or self.samples < p.nstart_samples:
            return p.nstart
        if self._clean_run is not None:
            return p.nstart
        rate = p.bandwidth_bps if p.bandwidth_bps is not None else self.delivery_rate_bps
        if rate is None or not rate > 0:
            return p.nstart
        budget = self.QUEUE_SHARE * max(0.0, self.base_rto - self.srtt)
        per_message = 8.0 * p.max_datagram_bytes / rate
        k = p.max_nstart if per_message <= 0 else 1 + math.floor(budget / per_message)
        if p.bandwidth_bps is not None:
            mean = max(self.mean_exchange_bytes or 0.0, 1.0)
            k = min(k, math.floor(p.bandwidth_bps * self.srtt / (8.0 * mean)))
        return max(p.nstart, min(p.max_nstart, k))

    def sent_at(self, key: Hashable) -> float | None:
        entry = self._pending.get(key)
        return None if entry is None else entry[0]
