"""The Noise endpoint's limits and protocol constants (:class:`NoiseLimits`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from synapse_coap.confmap import from_mapping
from synapse_coap.errors import (
    ConfigValueError,
)

#: Anti-amplification factor: bytes we may send to an unvalidated address per byte received.
AMPLIFICATION_FACTOR = 3
#: XX message 1 is padded to at least this size so that 3x its size covers XX message 2.
XX1_MIN_SIZE = 64
#: Retry cookies an initiator follows per handshake (a forged retry costs a round trip).
MAX_RETRIES = 3
#: 0-RTT messages remembered for anti-replay, per ``max_sessions``.
MAX_EARLY_SEEN_PER_SESSION = 4
#: Plaintexts queued per session while waiting for address validation.
MAX_QUEUED = 64
#: Largest number of 16-bit session ids we hand out (half the space, to keep allocation fast).
MAX_SESSIONS_CEILING = 32768

#: IK message 1 is sent this many times before falling back to XX.
IK_ATTEMPTS_BEFORE_XX = 3
#: After a re-handshake, suspect_lost is ignored for this many handshake retransmission
#: intervals (RTOs), doubled for each re-handshake in a row that proved unneeded.
REHANDSHAKE_HOLDOFF_RTOS = 4
#: On a link of known bit rate an IK responder may hold message 2 for the first reply up
#: to this fraction of a bare IK2's serialization time (a datagram of its own costs far
#: more there than the wait), but never longer than REPLY_WAIT_CEILING seconds.
REPLY_WAIT_FRACTION = 0.15
REPLY_WAIT_CEILING = 1.0
#: IP and UDP headers of one datagram (IPv4), for serialization times
UDP_IP_HEADERS = 28

CTRL_PING = 0x01
CTRL_PATH_CHALLENGE = 0x02
CTRL_PATH_RESPONSE = 0x03
CHALLENGE_LEN = 8


def _positive_int(name: str, lo: int, hi: int) -> Callable[[Any, Any, int], None]:
    def check(_inst: Any, _attr: Any, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigValueError(name, f"must be an integer from {lo} to {hi}, got {value!r}")

    return check


def _positive_float(name: str) -> Callable[[Any, Any, float], None]:
    def check(_inst: Any, _attr: Any, value: float) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < float("inf")
        ):
            raise ConfigValueError(name, f"must be a positive number, got {value!r}")

    return check


RETRY_MODES = ("auto", "always", "never")


def _retry_mode(_inst: Any, _attr: Any, value: str) -> None:
    if value not in RETRY_MODES:
        raise ConfigValueError("retry", f"must be one of {', '.join(RETRY_MODES)}, got {value!r}")


def _non_negative_float(name: str) -> Callable[[Any, Any, float], None]:
    def check(_inst: Any, _attr: Any, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
            raise ConfigValueError(name, f"must be a number >= 0, got {value!r}")

    return check


@attrs.frozen
class NoiseLimits:
    """Limits of one endpoint. Every field is configurable; the defaults are safe.

    - ``max_sessions``: sessions held at once (established, pending and
      retired). The default, 10,000, is sized from ``bench/sessions.py``: about
      4 KB of listener memory per session (40 MB in all) and no slower requests
      for the sessions that are active (docs/benchmarks.md, "Sessions"). New handshakes are refused beyond it; established sessions
      are never evicted to make room. At most a quarter (>= 8) may be
      half-open (responder side of an XX handshake waiting for XX3); past
      that the oldest half-open one is evicted.
    - ``max_half_open_per_prefix``: half-open handshakes per source prefix
      (IPv4 /24, IPv6 /48); past it that prefix's oldest is evicted.
    - ``retry``: when a first handshake message is answered with a stateless
      retry cookie (docs/security.md) instead of a handshake: ``auto`` while
      half-open state is under pressure (half the table, or half a prefix's
      share, in use), ``always``, or ``never`` (for peers older than the
      retry message; leaves half-open state open to spoofed floods).
    - ``handshakes_per_second`` / ``handshake_burst``: token bucket per source
      (IPv4 address, IPv6 /64) for new incoming handshakes.
    - ``max_datagram_size``: larger datagrams are dropped; larger plaintexts
      are refused by :meth:`NoiseEndpoint.send`.
    - ``idle_timeout``: a session with nothing received for this long closes.
    - ``handshake_timeout``: a handshake not completed in this long fails
      (300 s: a full XX is three ~100-byte datagrams, 8 s each at 100 bit/s,
      plus retransmissions). A failed *re*-handshake keeps the old session.
    - ``rekey_after_packets`` / ``rekey_after_seconds``: the send key is
      updated (key phase flips) before either is exceeded.
    - ``handshake_retransmit``: first retransmission interval of an
      unanswered handshake message (doubles each time) when the layer above
      gave no link hint (``connect(rto=..., bandwidth_bps=...)`` /
      :meth:`NoiseEndpoint.set_link_hint`); with a hint, the hint's RTO plus
      the serialization time of the message and its answer.
    - ``old_key_lifetime``: how long previous receive keys and retired
      sessions are kept for reordered records.
    - ``reply_wait``: how long a responder holds IK message 2 to piggyback
      the first reply (the answer to 0-RTT early data) in it. On a link whose
      bit rate the endpoint was given (``link_bandwidth_bps``) it is raised to
      0.15 of a bare IK2's serialization time, at most 1 s (0.97 s at
      100 bit/s, unchanged from 1 kbit/s up); 0 always sends IK2 at once.
    - ``early_data_window``: 0-RTT data (IK1) is accepted only if the
      initiator's clock in it is within this many seconds of ours, and only
      once (docs/security.md, "0-RTT anti-replay").
    """

    max_sessions: int = attrs.field(
        default=10_000, validator=_positive_int("max_sessions", 1, MAX_SESSIONS_CEILING)
    )
    handshakes_per_second: float = attrs.field(
        default=20.0, validator=_positive_float("handshakes_per_second")
    )
    handshake_burst: int = attrs.field(
        default=40, validator=_positive_int("handshake_burst", 1, 1_000_000)
    )
    max_datagram_size: int = attrs.field(
        default=1400, validator=_positive_int("max_datagram_size", 256, 65507)
    )
    idle_timeout: float = attrs.field(default=900.0, validator=_positive_float("idle_timeout"))
    handshake_timeout: float = attrs.field(
        default=300.0, validator=_positive_float("handshake_timeout")
    )
    rekey_after_packets: int = attrs.field(
        default=1 << 20, validator=_positive_int("rekey_after_packets", 1, 1 << 40)
    )
    rekey_after_seconds: float = attrs.field(
        default=3600.0, validator=_positive_float("rekey_after_seconds")
    )
    handshake_retransmit: float = attrs.field(
        default=2.0, validator=_positive_float("handshake_retransmit")
    )
    old_key_lifetime: float = attrs.field(
        default=120.0, validator=_positive_float("old_key_lifetime")
    )
    reply_wait: float = attrs.field(default=0.05, validator=_non_negative_float("reply_wait"))
    early_data_window: float = attrs.field(
        default=60.0, validator=_positive_float("early_data_window")
    )
    max_half_open_per_prefix: int = attrs.field(
        default=32, validator=_positive_int("max_half_open_per_prefix", 1, MAX_SESSIONS_CEILING)
    )
    retry: str = attrs.field(default="auto", validator=_retry_mode)

    @property
    def max_pending(self) -> int:
        return max(8, self.max_sessions // 4)

    @classmethod
    def from_config(cls, config: Mapping[str, object] | None, path: str) -> NoiseLimits:
        """Build from a config mapping; ConfigValueError names ``path.field``."""
        return from_mapping(cls, config, path)
