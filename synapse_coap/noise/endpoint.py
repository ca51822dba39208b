"""The sans-I/O secure session endpoint: Noise handshakes + explicit-nonce records.

One :class:`NoiseEndpoint` serves one UDP socket. It never does I/O: feed it
datagrams (:meth:`datagram_received`), plaintexts (:meth:`send`) and timer
ticks (:meth:`handle_timers` at :meth:`next_timer`); it returns events
(:mod:`synapse_coap.noise.events`). The clock and the random source are
injected.

Vocabulary:

- a *channel* is what the layer above sees: a stable integer id for one peer
  conversation. It survives re-handshakes (lost state, restarted peers) and
  address changes (NAT rebinding).
- a *session* is one handshake's keys and record state, under a
  receiver-chosen 16-bit session id. A channel has a current session, maybe a
  pending one (handshake in progress) and maybe retired ones (kept briefly so
  reordered records still open).

See docs/security.md for the wire format and the security argument.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from synapse_coap.confmap import from_mapping
from synapse_coap.errors import (
    ConfigValueError,
    HandshakeError,
    KeyChangedError,
    LimitExceeded,
    LocalProtocolError,
    RemoteProtocolError,
    TrustError,
)
from synapse_coap.noise import records, retry
from synapse_coap.noise.badinput import BadInputLog
from synapse_coap.noise.events import (
    Address,
    ChannelClosed,
    ChannelEstablished,
    ChannelInfo,
    Dropped,
    Event,
    HandshakeFailed,
    Received,
    Transmit,
)
from synapse_coap.noise.handshake import (
    FIXED_LEN,
    HEADER_LEN,
    Driver,
    Input,
    MsgType,
    Payload,
    State,
    negotiate,
    profile_tag,
    transition,
)
from synapse_coap.noise.keys import public_key
from synapse_coap.noise.ratelimit import HandshakeRateLimiter
from synapse_coap.noise.trust import TrustPolicy, fingerprint

logger = logging.getLogger(__name__)

__all__ = [
    "Address",
    "ChannelClosed",
    "ChannelEstablished",
    "ChannelInfo",
    "Dropped",
    "Event",
    "HandshakeFailed",
    "NoiseEndpoint",
    "NoiseLimits",
    "Received",
    "Transmit",
]

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


class _Session:
    """Keys, record state and handshake progress of one session id.

    Slotted (a listener holds thousands). Setting a field that can bring the
    session's next timer earlier (``state``, ``send``, ``hs_next``,
    ``hs_deadline``, ``reply_due``, ``retired_until``) puts its id in the
    endpoint's ``dirty`` set, so the endpoint's timer heap needs no full scan.
    """

    __slots__ = (
        "_dirty",
        "_hs_deadline",
        "_hs_next",
        "_reply_due",
        "_retired_until",
        "_send",
        "_state",
        "addr",
        "budget_in",
        "budget_out",
        "challenge",
        "channel",
        "created",
        "driver",
        "ephemeral_id",
        "hs_interval",
        "hs_message",
        "hs_retransmits",
        "initiator",
        "last_recv",
        "last_sent",
        "local_sid",
        "pattern",
        "peer_app",
        "peer_echo",
        "peer_name",
        "peer_static",
        "pn_floor",
        "profile_id",
        "queue",
        "recv",
        "remote_sid",
        "replaces",
        "replay",
        "reply_payload",
        "retries",
        "serial",
        "validated",
    )

    def __init__(
        self,
        *,
        local_sid: int,
        initiator: bool,
        pattern: str,
        addr: Address,
        now: float,
        dirty: set[int] | None = None,
        serial: int = 0,
    ):
        self.local_sid = local_sid
        self._dirty: set[int] = set() if dirty is None else dirty
        self.serial = serial
        self.remote_sid: int | None = None
        self.initiator = initiator
        self.pattern = pattern
        self.state = State.START
        self.driver: Driver | None = None
        self.addr = addr
        self.channel: int | None = None
        self.created = now
        # handshake retransmission / caching
        self.hs_message: bytes | None = None
        self.hs_next: float | None = None
        self.hs_interval = 0.0
        self.hs_deadline = now
        self.ephemeral_id: bytes | None = None  # responder: the initiator's e
        self.reply_due: float | None = None  # responder IK: IK2 held for piggyback
        self.reply_payload: Payload | None = None
        # keys
        self.send: records.SendKeys | None = None
        self.recv: records.RecvKeys | None = None
        self.replay = records.ReplayWindow()
        self.last_recv = now
        self.last_sent = now
        self.pn_floor = 0
        self.peer_echo = 0
        # path validation / anti-amplification
        self.validated = initiator
        self.budget_in = 0
        self.budget_out = 0
        self.challenge: bytes | None = None
        # (a list, not a deque: it is nearly always empty, and an empty deque is 600 bytes)
        self.queue: list[tuple[bool, bytes]] = []
        # outcome
        self.peer_static: bytes | None = None
        self.peer_name: str | None = None
        self.profile_id = 0
        self.peer_app = b""
        self.retired_until: float | None = None
        self.replaces: int | None = None  # initiator: the responder sid this session replaces
        self.hs_retransmits = 0
        self.retries = 0  # initiator: retry cookies received for this handshake

    # -- fields that move the session's next timer: setting one marks it dirty

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        self._state = value
        self._dirty.add(self.local_sid)

    @property
    def send(self) -> records.SendKeys | None:
        return self._send

    @send.setter
    def send(self, value: records.SendKeys | None) -> None:
        self._send = value
        self._dirty.add(self.local_sid)

    @property
    def hs_next(self) -> float | None:
        return self._hs_next

    @hs_next.setter
    def hs_next(self, value: float | None) -> None:
        self._hs_next = value
        self._dirty.add(self.local_sid)

    @property
    def hs_deadline(self) -> float:
        return self._hs_deadline

    @hs_deadline.setter
    def hs_deadline(self, value: float) -> None:
        self._hs_deadline = value
        self._dirty.add(self.local_sid)

    @property
    def reply_due(self) -> float | None:
        return self._reply_due

    @reply_due.setter
    def reply_due(self, value: float | None) -> None:
        self._reply_due = value
        self._dirty.add(self.local_sid)

    @property
    def retired_until(self) -> float | None:
        return self._retired_until

    @retired_until.setter
    def retired_until(self, value: float | None) -> None:
        self._retired_until = value
        self._dirty.add(self.local_sid)

    def budget_left(self) -> int:
        if self.validated:
            return 1 << 62
        return AMPLIFICATION_FACTOR * self.budget_in - self.budget_out

    def snapshot(self) -> tuple[object, ...]:
        return (
            self.local_sid,
            self.remote_sid,
            self.state,
            self.addr,
            self.channel,
            self.hs_message,
            self.hs_next,
            self.hs_deadline,
            self.reply_due,
            None if self.send is None else (self.send.key, self.send.generation, self.send.next_pn),
            None if self.recv is None else (self.recv.key, self.recv.snapshot()),
            self.replay.snapshot(),
            self.last_recv,
            self.pn_floor,
            self.peer_echo,
            self.validated,
            self.budget_in,
            self.budget_out,
            self.challenge,
            tuple(self.queue),
            self.peer_static,
            self.retired_until,
        )


class _Channel:
    __slots__ = (
        "addr",
        "bandwidth_hint",
        "early_data",
        "established",
        "explicit_key",
        "id",
        "initiator",
        "peer_app",
        "peer_name",
        "peer_static",
        "pending",
        "profile_id",
        "queue",
        "rehandshake_after",
        "rehandshake_started",
        "resend",
        "retired",
        "rto_hint",
        "session",
        "useless_rehandshakes",
    )

    def __init__(
        self,
        *,
        cid: int,
        initiator: bool,
        addr: Address,
        peer_name: str | None,
        peer_static: bytes | None,
        explicit_key: bool,
    ) -> None:
        self.id = cid
        self.initiator = initiator
        self.addr = addr
        self.peer_name = peer_name
        self.peer_static = peer_static
        self.explicit_key = explicit_key
        self.session: _Session | None = None
        self.pending: _Session | None = None
        self.retired: list[_Session] = []
        self.queue: list[bytes] = []
        self.early_data: bytes | None = None
        # plaintexts sent on the old session while a re-handshake was pending: sent again
        # on the new session if the old one turns out dead (nothing heard on it meanwhile)
        self.resend: list[bytes] = []
        # re-handshake rate limiting (suspect_lost): not before this time; each
        # re-handshake that proves useless (the old session was alive) doubles the holdoff
        self.rehandshake_after = float("-inf")
        self.useless_rehandshakes = 0
        self.rehandshake_started: float | None = None
        # link hint from the layer above: RTO (s) and bit rate (None = unknown)
        self.rto_hint: float | None = None
        self.bandwidth_hint: float | None = None
        self.established = False
        self.profile_id = 0
        self.peer_app = b""

    def snapshot(self) -> tuple[object, ...]:
        return (
            self.id,
            self.addr,
            self.peer_static,
            None if self.session is None else self.session.local_sid,
            None if self.pending is None else self.pending.local_sid,
            tuple(s.local_sid for s in self.retired),
            tuple(self.queue),
            self.early_data,
            self.established,
            self.profile_id,
        )


class NoiseEndpoint:
    """See the module docstring and /tmp interfaces: the sans-I/O session layer."""

    def __init__(
        self,
        static_private: bytes,
        *,
        trust: TrustPolicy,
        limits: NoiseLimits = NoiseLimits(),
        profiles: Sequence[tuple[int, bytes]] = ((0, b""),),
        app_payload: bytes = b"",
        clock: Callable[[], float],
        rng: Callable[[int], bytes] = os.urandom,
        seal_observer: Callable[[bytes, int], None] | None = None,
        link_bandwidth_bps: float | None = None,
        wall_clock: Callable[[], float] = time.time,
        early_data_not_before: float = 0.0,
        keepalive_interval: float | None = None,
    ) -> None:
        """``seal_observer(key_id, packet_number)`` is called for every record
        sealed (key_id is a hash of the key, never the key): tests use it to
        prove that no nonce is ever reused. ``link_bandwidth_bps`` is the bit
        rate of the endpoint's link, if known (see ``NoiseLimits.reply_wait``).
        ``wall_clock`` (seconds since the epoch) dates 0-RTT data;
        ``early_data_not_before``: 0-RTT data dated at or before this wall time is
        refused (a previous run of this responder may have accepted it: see
        :meth:`replay_watermark`).

        ``keepalive_interval`` (seconds, None = off): on every channel this
        endpoint initiated, a session that has sent nothing for that long sends a
        keep-alive (a control record, one-way, 22 bytes + UDP/IP). It keeps the
        NAT mapping toward the peer open, refreshes the peer's idle timer, and
        after a NAT rebinding it is what tells the peer the new address (the peer
        validates it as for any record from a new address). While keep-alives run,
        such a session is not closed for idleness on this side (the peer may be
        silent because there is nothing to push)."""
        self._static = bytes(static_private)
        self.static_public = public_key(self._static)
        self.trust = trust
        self.limits = limits
        self._clock = clock
        self._rng = rng
        self._observer = seal_observer
        self.link_bandwidth_bps = (
            float(link_bandwidth_bps)
            if link_bandwidth_bps is not None and 0 < link_bandwidth_bps < float("inf")
            else None
        )
        if keepalive_interval is not None and not 0 < keepalive_interval < float("inf"):
            raise ConfigValueError(
                "keepalive_interval", f"must be a number > 0 or null, got {keepalive_interval!r}"
            )
        self.keepalive_interval = keepalive_interval
        self.app_payload = bytes(app_payload)
        tags: list[bytes] = []
        self._tag_ids: dict[bytes, int] = {}
        for pid, chash in profiles:
            if not 0 <= pid <= 255:
                raise ConfigValueError("profiles", f"profile id must be 0..255, got {pid}")
            if pid == 0:
                continue
            tag = profile_tag(pid, chash)
            tags.append(tag)
            self._tag_ids[tag] = pid
        self._tags = tuple(sorted(tags, reverse=True))[:16]
        self._sessions: dict[int, _Session] = {}
        self._channels: dict[int, _Channel] = {}
        self._next_channel = 1
        self._recent: collections.OrderedDict[bytes, tuple[int, float]] = collections.OrderedDict()
        self._limiter = HandshakeRateLimiter(limits.handshakes_per_second, limits.handshake_burst)
        # half-open XX responder sessions, oldest first: sid -> source prefix
        self._half_open: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._half_open_prefix: collections.Counter[str] = collections.Counter()
        # IK responder sessions from an unvalidated address, not yet confirmed (never
        # evicted: they may carry a 0-RTT exchange; they count towards retry pressure)
        self._unvalidated_ik: set[int] = set()
        self._retry_secret = os.urandom(32)
        self._bad_input = BadInputLog(logger, clock=clock)
        self._wall = wall_clock
        self._early_not_before = float(early_data_not_before)
        # 0-RTT anti-replay: initiator ephemeral -> wall time after which its date is stale
        self._early_seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._stats: collections.Counter[str] = collections.Counter()
        # timers: a heap of (time, session serial, sid), each at or before that session's
        # next deadline (stale entries are dropped or pushed back when they come up); the
        # sids whose deadline may have moved earlier since (see _Session) are re-pushed
        # first. No timer question scans all sessions.
        self._timers: list[tuple[float, int, int]] = []
        self._dirty: set[int] = set()
        self._serial = 0

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> dict[str, int]:
        """Counters by name (a copy): datagrams/records in and out, ``dropped.<reason>``,
        ``handshakes.<outcome>``, ``rekeys``, ``migrations`` ..."""
        return dict(self._stats)

    def max_plaintext(self) -> int:
        """The largest plaintext :meth:`send` accepts."""
        return self.limits.max_datagram_size - records.MAX_OVERHEAD

    def replay_watermark(self, horizon: float = 0.0) -> float:
        """The latest wall time a 0-RTT message this endpoint may have accepted (or may
        accept within ``horizon`` seconds) can be dated. A restarted responder passes
        it as ``early_data_not_before``, so nothing it accepted before is accepted again."""
        return self._wall() + horizon + self.limits.early_data_window

    def half_open(self) -> int:
        """Half-open handshakes held (XX responder sessions waiting for XX3)."""
        return len(self._half_open)

    def active_channels(self) -> int:
        return sum(
            1 for ch in self._channels.values() if ch.session is not None and ch.session.send
        )

    def channel_info(self, channel: int) -> ChannelInfo:
        ch = self._channel(channel)
        return ChannelInfo(
            addr=ch.addr,
            peer_static=ch.peer_static,
            peer_name=ch.peer_name,
            profile_id=ch.profile_id,
            established=ch.established,
            initiator=ch.initiator,
        )

    def state_snapshot(self) -> tuple[object, ...]:
        """Everything that defines the sessions (for tests): keys, windows, queues,
        channels. Counters and rate-limit buckets are accounting, not state."""
        return (
            tuple(sorted((sid, s.snapshot()) for sid, s in self._sessions.items())),
            tuple(sorted((cid, c.snapshot()) for cid, c in self._channels.items())),
            tuple(self._recent.items()),
            self._next_channel,
        )

    def connect(
        self,
        addr: Address,
        *,
        peer_name: str,
        peer_static: bytes | None,
        early_data: bytes | None = None,
        rto: float | None = None,
        bandwidth_bps: float | None = None,
    ) -> tuple[int, list[Event]]:
        """Open a channel to ``peer_name`` at ``addr``: IK if its key is known, else XX.

        ``early_data`` (a replay-safe CoAP message) rides in IK message 1, or
        in XX message 3. Returns the channel id at once. ``rto`` / ``bandwidth_bps``:
        the link hint (see :meth:`set_link_hint`).
        """
        addr = _norm(addr)
        explicit = peer_static is not None
        key = peer_static if peer_static is not None else self.trust.known_key(peer_name)
        if key is not None and len(key) != 32:
            raise LocalProtocolError("peer_static must be 32 bytes")
        cid = self._new_channel_id()
        ch = _Channel(
            cid=cid,
            initiator=True,
            addr=addr,
            peer_name=peer_name,
            peer_static=key,
            explicit_key=explicit,
        )
        self._channels[cid] = ch
        if early_data is not None:
            ch.early_data = bytes(early_data)
        self._set_hint(ch, rto, bandwidth_bps)
        events = self._start_initiator(ch, replaces=None)
        return cid, events

    def send(self, channel: int, plaintext: bytes) -> list[Event]:
        """Encrypt ``plaintext`` (one CoAP message) to the channel's peer.

        Queued while the channel's first handshake is in progress. A plaintext
        equal to one already queued (a CoAP retransmission) is not queued twice:
        it triggers a retransmission of the pending handshake message instead.
        During a re-handshake it goes over the current session at once (and
        again over the new one if the current one turns out dead). On an IK
        responder still holding IK message 2, the first plaintext makes IK2 go
        at once, carrying it if it fits.
        """
        ch = self._channel(channel)
        plaintext = bytes(plaintext)
        if len(plaintext) > self.max_plaintext():
            raise LocalProtocolError(
                f"plaintext of {len(plaintext)} bytes exceeds the maximum of {self.max_plaintext()}"
            )
        now = self._clock()
        old = ch.session
        if (
            ch.pending is not None
            and ch.pending.send is None
            and old is not None
            and old.send is not None
        ):
            # A re-handshake is in progress: never hold traffic for it (at heavy loss the
            # old session usually still works). Remember it in case the old one is dead.
            if plaintext not in ch.resend:
                if len(ch.resend) >= MAX_QUEUED:
                    ch.resend.pop(0)
                ch.resend.append(plaintext)
            return self._send_record(old, plaintext, control=False, now=now)
        if ch.pending is not None and ch.pending.send is None:
            if plaintext == ch.early_data or plaintext in ch.queue:
                return self._retransmit_handshake(ch.pending, now)
            ch.queue.append(plaintext)
            return []
        s = ch.session
        if s is None:
            raise LocalProtocolError(f"channel {channel} has no session")
        if s.send is None:
            s.queue.append((False, plaintext))
            if s.state is State.IK_RECEIVED_1 and s.reply_due is not None:
                # The first reply (to 0-RTT data): IK message 2 carries it now, no waiting.
                return self._flush_ik_reply(s, now)
            return []
        return self._send_record(s, plaintext, control=False, now=now)

    def suspect_lost(self, channel: int) -> list[Event]:
        """The peer may have lost our session (nothing heard for a while although a
        request needed retransmitting). The initiator starts a fresh IK handshake and
        moves the channel to it when it completes; meanwhile traffic keeps flowing on
        the old session, and if the re-handshake fails the old session stays.

        Rate-limited: a no-op while a re-handshake is pending (it has its own
        retransmission timers) and during a holdoff after the previous one, which
        doubles each time a re-handshake proves useless (the old session was
        alive: loss, not lost state). The first handshake of a channel is
        retransmitted. A responder cannot re-handshake (the initiator will): no-op."""
        ch = self._channel(channel)
        now = self._clock()
        if ch.pending is not None:
            if ch.pending.send is None and ch.session is None:
                return self._retransmit_handshake(ch.pending, now)
            return []
        if not ch.initiator or ch.session is None:
            return []
        s = ch.session
        if s.state == State.XX_SENT_3:
            return self._retransmit_handshake(s, now)
        if now < ch.rehandshake_after:
            self._stats["rehandshakes.suppressed"] += 1
            return []
        self._stats["rehandshakes"] += 1
        ch.resend = []
        ch.rehandshake_started = now
        return self._start_initiator(ch, replaces=s.remote_sid)

    def set_link_hint(
        self, channel: int, rto: float | None, bandwidth_bps: float | None = None
    ) -> None:
        """What the layer above knows of the path: its retransmission timeout (s) and
        bit rate. Handshake messages of the channel are then retransmitted after
        ``rto`` plus the serialization time of the message and its answer, instead
        of the fixed ``handshake_retransmit``. Unknown channels are ignored."""
        ch = self._channels.get(channel)
        if ch is not None:
            self._set_hint(ch, rto, bandwidth_bps)

    def channel_open(self, channel: int) -> bool:
        """True while the channel exists (a failed re-handshake leaves it open)."""
        return channel in self._channels

    def close(self, channel: int) -> list[Event]:
        ch = self._channels.get(channel)
        if ch is None:
            return []
        self._drop_channel(ch)
        return [ChannelClosed(channel, "closed")]

    def next_timer(self) -> float | None:
        """When :meth:`handle_timers` should next be called (None: no timer)."""
        self._flush_dirty()
        heap = self._timers
        while heap:
            at, serial, sid = heap[0]
            s = self._sessions.get(sid)
            if s is None or s.serial != serial:
                heapq.heappop(heap)
                continue
            due = self._session_deadline(s)
            if due == at:
                return at
            # the session's deadline moved (or went away): fix the entry
            if due is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (due, serial, sid))
        return None

    def _new_session(
        self, sid: int, *, initiator: bool, pattern: str, addr: Address, now: float
    ) -> _Session:
        self._serial += 1
        return _Session(
            local_sid=sid,
            initiator=initiator,
            pattern=pattern,
            addr=addr,
            now=now,
            dirty=self._dirty,
            serial=self._serial,
        )

    def _session_deadline(self, s: _Session) -> float | None:
        """The earliest time :meth:`_session_timers` has something to do for ``s``."""
        if s.retired_until is not None:
            return s.retired_until
        best: float | None = None
        if s.state in (State.IK_SENT_1, State.XX_SENT_1, State.XX_SENT_3):
            best = s.hs_deadline
            if s.hs_next is not None and s.hs_next < best:
                best = s.hs_next
        elif s.state is State.IK_RECEIVED_1:
            best = s.reply_due
        elif s.state is State.XX_RECEIVED_1:
            best = s.hs_deadline
        if s.send is not None:
            idle = self._idle_since(s) + self.limits.idle_timeout
            if best is None or idle < best:
                best = idle
            if self._keeps_alive(s):
                assert self.keepalive_interval is not None
                ping = s.last_sent + self.keepalive_interval
                if ping < best:
                    best = ping
        recv = s.recv
        if (
            recv is not None
            and recv.previous is not None
            and (best is None or recv.previous_expires < best)
        ):
            best = recv.previous_expires
        return best

    def _flush_dirty(self) -> None:
        if not self._dirty:
            return
        for sid in self._dirty:
            s = self._sessions.get(sid)
            if s is None:
                continue
            due = self._session_deadline(s)
            if due is not None:
                heapq.heappush(self._timers, (due, s.serial, sid))
        self._dirty.clear()

    def _keeps_alive(self, s: _Session) -> bool:
        """True if ``s`` is the established current session of a channel we initiated
        and keep-alives are on."""
        if self.keepalive_interval is None or not s.initiator or s.send is None:
            return False
        if s.state is not State.ESTABLISHED or s.channel is None:
            return False
        ch = self._channels.get(s.channel)
        return ch is not None and ch.session is s

    def _idle_since(self, s: _Session) -> float:
        if self._keeps_alive(s):
            return max(s.last_recv, s.last_sent)
        return s.last_recv

    def handle_timers(self) -> list[Event]:
        now = self._clock()
        events: list[Event] = []
        self._flush_dirty()
        heap = self._timers
        due: dict[int, _Session] = {}
        while heap and heap[0][0] <= now:
            _at, serial, sid = heapq.heappop(heap)
            s = self._sessions.get(sid)
            if s is not None and s.serial == serial:
                due[serial] = s
        # in creation order, as a scan of all sessions would visit them
        for serial in sorted(due):
            s = due[serial]
            if self._sessions.get(s.local_sid) is not s:
                continue
            events += self._session_timers(s, now)
            if self._sessions.get(s.local_sid) is s:
                self._dirty.add(s.local_sid)  # its next deadline goes back on the heap
        while self._recent:
            key, (_sid, expiry) = next(iter(self._recent.items()))
            if expiry > now:
                break
            del self._recent[key]
        return events

    def _session_timers(self, s: _Session, now: float) -> list[Event]:
        events: list[Event] = []
        if s.retired_until is not None:
            if now >= s.retired_until:
                self._forget_session(s)
            return events
        if s.recv is not None:
            s.recv.expire(now)
        if s.state in (State.IK_SENT_1, State.XX_SENT_1, State.XX_SENT_3):
            if now >= s.hs_deadline:
                events += self._initiator_timeout(s, now)
                return events
            if s.hs_next is not None and now >= s.hs_next:
                events += self._retransmit_handshake(s, now)
        elif s.state is State.IK_RECEIVED_1:
            if s.reply_due is not None and now >= s.reply_due:
                events += self._flush_ik_reply(s, now)
        elif s.state is State.XX_RECEIVED_1 and now >= s.hs_deadline:
            self._stats["handshakes.expired"] += 1
            events += self._expire_session(s, "handshake not confirmed")
            return events
        if s.send is not None and now >= self._idle_since(s) + self.limits.idle_timeout:
            events += self._expire_session(s, "idle")
            return events
        if self._keeps_alive(s):
            assert self.keepalive_interval is not None
            if now >= s.last_sent + self.keepalive_interval:  # as in _session_deadline
                self._stats["keepalives"] += 1
                events += self._send_record(s, bytes([CTRL_PING]), control=True, now=now)
        return events

    def datagram_received(self, data: bytes, addr: Address) -> list[Event]:
        """Process one datagram. Never raises on bad input: emits Dropped and counts."""
        addr = _norm(addr)
        data = bytes(data)
        self._stats["datagrams_in"] += 1
        self._stats["bytes_in"] += len(data)
        try:
            if not data:
                return self._drop(addr, "empty", 0)
            if len(data) > self.limits.max_datagram_size + (
                retry.ECHO_OVERHEAD if data[0] == retry.COOKIE_ECHO else 0
            ):
                return self._drop(addr, "too_large", len(data))
            kind = records.classify(data[0])
            if kind is records.Kind.RECORD:
                return self._on_record(data, addr)
            if kind is records.Kind.HANDSHAKE:
                return self._on_handshake(data, addr)
            if kind is records.Kind.PLAIN_COAP:
                return self._drop(addr, "plain_coap", len(data))
            return self._drop(addr, "unknown_type", len(data))
        except Exception as e:  # the safety net: a bug must not take the listener down
            self._bad_input.report(addr[0], "internal_error", e)
            return self._drop(addr, "internal_error", len(data))

    # ------------------------------------------------------------------ helpers

    def _channel(self, channel: int) -> _Channel:
        ch = self._channels.get(channel)
        if ch is None:
            raise LocalProtocolError(f"channel {channel} is closed or unknown")
        return ch

    def _new_channel_id(self) -> int:
        cid = self._next_channel
        self._next_channel += 1
        return cid

    def _drop(self, addr: Address, reason: str, size: int) -> list[Event]:
        self._stats["dropped"] += 1
        self._stats[f"dropped.{reason}"] += 1
        logger.debug("noise: dropped %d bytes from %s: %s", size, addr, reason)
        return [Dropped(addr, reason, size)]

    def _alloc_sid(self) -> int | None:
        for _ in range(32):
            sid = int.from_bytes(self._rng(2), "big")
            if sid != 0 and sid not in self._sessions:
                return sid
        for sid in range(1, 1 << 16):  # pathological rng or nearly full table
            if sid not in self._sessions:
                return sid
        return None

    def _transmit(self, s: _Session, data: bytes, *, to: Address | None = None) -> list[Event]:
        """Account and emit one datagram (callers checked the budget)."""
        if not s.validated:
            s.budget_out += len(data)
        s.last_sent = self._clock()
        self._stats["datagrams_out"] += 1
        self._stats["bytes_out"] += len(data)
        return [Transmit(to if to is not None else s.addr, data)]

    def _not_half_open(self, s: _Session) -> None:
        prefix = self._half_open.pop(s.local_sid, None)
        if prefix is not None:
            self._half_open_prefix[prefix] -= 1
            if self._half_open_prefix[prefix] <= 0:
                del self._half_open_prefix[prefix]
        self._unvalidated_ik.discard(s.local_sid)

    def _forget_session(self, s: _Session) -> None:
        if self._sessions.get(s.local_sid) is s:
            del self._sessions[s.local_sid]
            self._not_half_open(s)
        if s.channel is not None:
            ch = self._channels.get(s.channel)
            if ch is not None:
                if ch.session is s:
                    ch.session = None
                if ch.pending is s:
                    ch.pending = None
                if s in ch.retired:
                    ch.retired.remove(s)

    def _drop_channel(self, ch: _Channel) -> None:
        for s in [ch.session, ch.pending, *ch.retired]:
            if s is not None and self._sessions.get(s.local_sid) is s:
                del self._sessions[s.local_sid]
                self._not_half_open(s)
        self._channels.pop(ch.id, None)

    def _expire_session(self, s: _Session, reason: str) -> list[Event]:
        ch = self._channels.get(s.channel) if s.channel is not None else None
        self._forget_session(s)
        if ch is not None and ch.session is None and ch.pending is None:
            self._drop_channel(ch)
            return [ChannelClosed(ch.id, reason)]
        return []

    # ------------------------------------------------------------------ initiator

    @staticmethod
    def _set_hint(ch: _Channel, rto: float | None, bandwidth_bps: float | None) -> None:
        if rto is not None and 0 < rto < float("inf"):
            ch.rto_hint = float(rto)
        if bandwidth_bps is not None and 0 < bandwidth_bps < float("inf"):
            ch.bandwidth_hint = float(bandwidth_bps)

    def _hs_interval(self, ch: _Channel | None, size: int) -> float:
        """First retransmission interval of a handshake message of ``size`` bytes."""
        if ch is None or ch.rto_hint is None:
            base = self.limits.handshake_retransmit
        else:
            base = ch.rto_hint
        if ch is not None and ch.bandwidth_hint is not None:
            # our message and an answer of about the same size (+ UDP/IP headers)
            base += 2 * 8.0 * (size + 28) / ch.bandwidth_hint
        return min(base, self.limits.handshake_timeout)

    def _rehandshake_done(self, ch: _Channel, *, useful: bool, now: float) -> None:
        """Holdoff before the next re-handshake of ``ch``."""
        if useful:
            ch.useless_rehandshakes = 0
        else:
            ch.useless_rehandshakes = min(ch.useless_rehandshakes + 1, 16)
        base = REHANDSHAKE_HOLDOFF_RTOS * self._hs_interval(ch, 0)
        holdoff = min(base * (2**ch.useless_rehandshakes), self.limits.handshake_timeout)
        ch.rehandshake_after = now + holdoff

    def _start_initiator(
        self, ch: _Channel, *, replaces: int | None, force_xx: bool = False
    ) -> list[Event]:
        now = self._clock()
        sid = self._alloc_sid()
        if sid is None or len(self._sessions) >= self.limits.max_sessions:
            err = LimitExceeded("no free session slot (max_sessions reached)")
            events: list[Event] = [HandshakeFailed(ch.id, ch.addr, str(err), err)]
            if ch.session is None:
                self._drop_channel(ch)
                events.append(ChannelClosed(ch.id, "handshake failed"))
            return events
        pattern = "IK" if ch.peer_static is not None and not force_xx else "XX"
        s = self._new_session(sid, initiator=True, pattern=pattern, addr=ch.addr, now=now)
        s.channel = ch.id
        driver = Driver(
            pattern=pattern,
            initiator=True,
            static_private=self._static,
            remote_static=ch.peer_static if pattern == "IK" else None,
            ephemeral_private=self._rng(32),
        )
        if pattern == "IK":
            mtype = MsgType.IK1
            early = ch.early_data
            payload = Payload(offers=self._tags, app=self.app_payload, replaces=replaces)
            if early is not None:
                with_early = attrs.evolve(payload, early=early, time=int(self._wall()))
                if FIXED_LEN[mtype] + len(with_early.encode()) <= self.limits.max_datagram_size:
                    payload = with_early
                else:
                    ch.queue.insert(0, early)
                    ch.early_data = None
            s.state = transition(s.state, Input.SEND_IK1)
        else:
            mtype = MsgType.XX1
            payload = Payload(offers=self._tags)
            s.state = transition(s.state, Input.SEND_XX1)
        body = payload.encode()
        if pattern == "XX":
            short = XX1_MIN_SIZE - FIXED_LEN[mtype] - len(body)
            if short > 0:
                body += bytes([0x7F, max(0, short - 2)]) + b"\x00" * max(0, short - 2)
        driver, message = driver.write(body)
        s.driver = driver
        datagram = bytes([mtype]) + sid.to_bytes(2, "big") + message
        s.hs_message = datagram
        s.hs_interval = self._hs_interval(ch, len(datagram))
        s.hs_next = now + s.hs_interval
        s.hs_deadline = now + self.limits.handshake_timeout
        s.replaces = replaces
        self._sessions[sid] = s
        ch.pending = s
        self._stats["handshakes.started"] += 1
        return self._transmit(s, datagram)

    def _retransmit_handshake(self, s: _Session, now: float) -> list[Event]:
        if s.hs_message is None:
            return []
        ch = self._channels.get(s.channel) if s.channel is not None else None
        if (
            s.state is State.IK_SENT_1
            and s.hs_retransmits >= IK_ATTEMPTS_BEFORE_XX - 1
            and ch is not None
            and ch.pending is s
            and not self._old_session_alive(ch, s)
        ):
            # IK1 unanswered: maybe the peer's key changed (IK1 is then undecryptable).
            # Fall back to XX, which reveals the key and lets the trust policy say so.
            # (Not while the old session still hears the peer: its key is unchanged.)
            self._stats["handshakes.ik_fallback"] += 1
            deadline = s.hs_deadline
            self._forget_session(s)
            events = self._start_initiator(ch, replaces=s.replaces, force_xx=True)
            if ch.pending is not None:
                ch.pending.hs_deadline = deadline
            return events
        s.hs_retransmits += 1
        s.hs_interval = min(s.hs_interval * 2, self.limits.handshake_timeout)
        s.hs_next = now + s.hs_interval
        self._stats["handshakes.retransmitted"] += 1
        return self._transmit(s, s.hs_message)

    def _initiator_timeout(self, s: _Session, now: float) -> list[Event]:
        ch = self._channels.get(s.channel) if s.channel is not None else None
        err = HandshakeError(
            f"no handshake answer from {s.addr} within {self.limits.handshake_timeout:g} s"
        )
        self._stats["handshakes.timeout"] += 1
        s.state = transition(s.state, Input.TIMEOUT)
        if ch is None:
            self._forget_session(s)
            return []
        events: list[Event] = [HandshakeFailed(ch.id, s.addr, "timeout", err)]
        rehandshake = ch.pending is s and ch.session is not None
        self._forget_session(s)
        if rehandshake and ch.session is not None:
            # Keep the old session (the channel stays open); whatever was queued goes over it.
            ch.resend = []
            ch.rehandshake_started = None
            self._rehandshake_done(ch, useful=False, now=now)
            queued, ch.queue = ch.queue, []
            for pt in queued:
                events += self._send_record(ch.session, pt, control=False, now=now)
            return events
        if ch.session is None and ch.pending is None:
            self._drop_channel(ch)
            events.append(ChannelClosed(ch.id, "handshake timeout"))
        return events

    def _on_response(self, mtype: MsgType, data: bytes, addr: Address) -> list[Event]:
        now = self._clock()
        dest = int.from_bytes(data[1:3], "big")
        s = self._sessions.get(dest)
        if s is None or not s.initiator or s.retired_until is not None:
            return self._drop(addr, "unknown_session", len(data))
        expected = State.IK_SENT_1 if mtype is MsgType.IK2 else State.XX_SENT_1
        if s.state is not expected:
            # Our XX3 was lost: the responder retransmitted XX2. Answer only the
            # very XX2 already in our transcript.
            if (
                mtype is MsgType.XX2
                and s.state is State.XX_SENT_3
                and s.driver is not None
                and _xx2_matches(s.driver, data[5:])
            ):
                self._stats["handshakes.duplicate"] += 1
                return self._retransmit_handshake(s, now)
            return self._drop(addr, "duplicate_handshake", len(data))
        if s.driver is None:
            return self._drop(addr, "unknown_session", len(data))
        try:
            driver, raw_payload = s.driver.read(data[5:])
            payload = Payload.decode(raw_payload)
        except RemoteProtocolError:
            self._stats["handshakes.rejected"] += 1
            return self._drop(addr, "handshake_failed", len(data))
        ch = self._channels.get(s.channel) if s.channel is not None else None
        if ch is None:
            return self._drop(addr, "unknown_session", len(data))
        if payload.selected is not None and payload.selected not in self._tag_ids:
            return self._drop(addr, "handshake_failed", len(data))
        remote = driver.peer_static_seen()
        if remote is None:
            return self._drop(addr, "handshake_failed", len(data))
        try:
            self._check_responder_key(ch, remote)
        except TrustError as exc:
            s.state = transition(s.state, Input.REFUSED)
            self._stats["handshakes.refused"] += 1
            logger.warning("noise: %s", exc)
            events: list[Event] = [HandshakeFailed(ch.id, addr, str(exc), exc)]
            self._drop_channel(ch)
            events.append(ChannelClosed(ch.id, "peer key refused"))
            return events
        s.remote_sid = int.from_bytes(data[3:5], "big")
        s.peer_static = remote
        s.peer_name = ch.peer_name
        s.profile_id = self._tag_ids.get(payload.selected, 0) if payload.selected else 0
        s.peer_app = payload.app
        s.last_recv = now
        events = []
        if mtype is MsgType.IK2:
            s.driver = None
            s.state = transition(s.state, Input.RECV_IK2)
            split = driver.split
            if split is None:  # pragma: no cover - IK2 is final by construction
                return self._drop(addr, "handshake_failed", len(data))
            s.send = records.SendKeys(split.send_key, now)
            s.recv = records.RecvKeys(split.recv_key)
            s.hs_message = None
            s.hs_next = None
            # a reply in IK2 of a re-handshake answers what went over the old session
            old_alive = (
                self._old_session_alive(ch, s)
                or payload.early is not None
                or (payload.replaces is not None and payload.replaces == s.replaces)
            )
            events += self._complete_initiator(ch, s, now)
            if payload.early is not None:
                events.append(Received(ch.id, s.addr, payload.early))
            if payload.early_refused and ch.early_data is not None:
                # the responder did not take our 0-RTT request: it goes again, in a record
                self._stats["early_data.resent"] += 1
                events += self._send_record(s, ch.early_data, control=False, now=now)
                ch.early_data = None
            events += self._flush_channel_queue(ch, s, now)
            events += self._finish_rehandshake(ch, s, old_alive, now)
            if payload.confirm and not any(isinstance(e, Transmit) for e in events):
                events += self._send_record(s, bytes([CTRL_PING]), control=True, now=now)
            return events
        # XX2: answer with XX3 (our identity, app payload, the first request).
        s.state = transition(s.state, Input.RECV_XX2)
        early = ch.early_data
        from_queue = False
        if early is None and ch.queue:
            early = ch.queue[0]
            from_queue = True
        out = Payload(app=self.app_payload, replaces=s.replaces)
        if early is not None:
            candidate = attrs.evolve(out, early=early)
            if FIXED_LEN[MsgType.XX3] + len(candidate.encode()) <= self.limits.max_datagram_size:
                out = candidate
                if from_queue:
                    ch.queue.pop(0)
                ch.early_data = None
            elif not from_queue:
                ch.queue.insert(0, early)
                ch.early_data = None
        driver, message = driver.write(out.encode())
        split = driver.split
        if split is None:  # pragma: no cover
            return self._drop(addr, "handshake_failed", len(data))
        s.driver = driver
        s.send = records.SendKeys(split.send_key, now)
        s.recv = records.RecvKeys(split.recv_key)
        datagram = bytes([MsgType.XX3]) + s.remote_sid.to_bytes(2, "big") + message
        s.hs_message = datagram
        s.hs_interval = self._hs_interval(ch, len(datagram))
        s.hs_next = now + s.hs_interval
        old_alive = self._old_session_alive(ch, s)
        events += self._transmit(s, datagram)
        events += self._complete_initiator(ch, s, now)
        events += self._flush_channel_queue(ch, s, now)
        events += self._finish_rehandshake(ch, s, old_alive, now)
        return events

    @staticmethod
    def _old_session_alive(ch: _Channel, s: _Session) -> bool:
        """Has the session that ``s`` replaces heard anything since the re-handshake began?"""
        old = ch.session
        if old is None or old is s or ch.rehandshake_started is None:
            return False
        return old.last_recv > ch.rehandshake_started

    def _finish_rehandshake(
        self, ch: _Channel, s: _Session, old_alive: bool, now: float
    ) -> list[Event]:
        """A re-handshake completed: if the old session was dead, what went over it
        meanwhile goes again over the new one (recovery within one retransmission)."""
        if ch.rehandshake_started is None:
            return []
        ch.rehandshake_started = None
        resend, ch.resend = ch.resend, []
        self._rehandshake_done(ch, useful=not old_alive, now=now)
        if old_alive:
            return []
        events: list[Event] = []
        for pt in resend:
            events += self._send_record(s, pt, control=False, now=now)
        return events

    def _check_responder_key(self, ch: _Channel, remote: bytes) -> None:
        name = ch.peer_name or ""
        if ch.explicit_key:
            pinned = self.trust.pinned.get(name)
            if pinned is not None and pinned != remote:
                raise KeyChangedError(name, fingerprint(pinned), fingerprint(remote))
            if ch.peer_static is not None and ch.peer_static != remote:
                raise KeyChangedError(name, fingerprint(ch.peer_static), fingerprint(remote))
            return
        self.trust.check(name, remote)

    def _complete_initiator(self, ch: _Channel, s: _Session, now: float) -> list[Event]:
        ch.pending = None
        return self._bind_session(ch, s, now, initiator=True)

    def _bind_session(
        self, ch: _Channel, s: _Session, now: float, *, initiator: bool
    ) -> list[Event]:
        """Move ``ch`` onto the just-completed session ``s`` (retiring the old one)."""
        old = ch.session
        if old is not None and old is not s:
            old.retired_until = now + self.limits.old_key_lifetime
            ch.retired.append(old)
        ch.session = s
        ch.addr = s.addr
        if not initiator:
            ch.peer_name = s.peer_name
            s.channel = ch.id
        ch.peer_static = s.peer_static
        ch.profile_id = s.profile_id
        ch.peer_app = s.peer_app
        ch.established = True
        self._stats["handshakes.completed"] += 1
        if s.peer_static is None:  # pragma: no cover - a completed handshake has it
            raise LocalProtocolError("completed handshake without a peer static key")
        return [
            ChannelEstablished(
                channel=ch.id,
                addr=s.addr,
                peer_static=s.peer_static,
                peer_name=ch.peer_name,
                profile_id=s.profile_id,
                peer_app_payload=s.peer_app,
                initiator=initiator,
            )
        ]

    def _flush_channel_queue(self, ch: _Channel, s: _Session, now: float) -> list[Event]:
        events: list[Event] = []
        queued, ch.queue = ch.queue, []
        if ch.early_data is not None:
            ch.early_data = None
        for pt in queued:
            events += self._send_record(s, pt, control=False, now=now)
        return events

    # ------------------------------------------------------------------ responder

    def _on_handshake(self, data: bytes, addr: Address) -> list[Event]:
        cookie: bytes | None = None
        if data[0] == retry.RETRY:
            return self._on_retry(data, addr)
        if data[0] == retry.COOKIE_ECHO:
            cookie = data[1 : 1 + retry.COOKIE_LEN]
            data = data[retry.ECHO_OVERHEAD :]
            if not data or data[0] not in (MsgType.IK1, MsgType.XX1):
                return self._drop(addr, "malformed_handshake", len(data))
        try:
            mtype = MsgType(data[0])
        except ValueError:
            return self._drop(addr, "unknown_type", len(data))
        if len(data) < FIXED_LEN[mtype]:
            return self._drop(addr, "malformed_handshake", len(data))
        if mtype in (MsgType.IK1, MsgType.XX1):
            return self._on_initiation(mtype, data, addr, cookie)
        if mtype in (MsgType.IK2, MsgType.XX2):
            return self._on_response(mtype, data, addr)
        return self._on_final(data, addr)

    def _on_retry(self, data: bytes, addr: Address) -> list[Event]:
        """A responder under pressure asks for our first message again, with its cookie."""
        now = self._clock()
        if len(data) != retry.RETRY_LEN:
            return self._drop(addr, "malformed_handshake", len(data))
        s = self._sessions.get(int.from_bytes(data[1:3], "big"))
        if (
            s is None
            or not s.initiator
            or s.state not in (State.IK_SENT_1, State.XX_SENT_1)
            or s.addr != addr
            or s.hs_message is None
            or s.retries >= MAX_RETRIES
        ):
            return self._drop(addr, "unexpected_retry", len(data))
        s.retries += 1
        first = s.hs_message
        if first[0] == retry.COOKIE_ECHO:
            first = first[retry.ECHO_OVERHEAD :]
        s.hs_message = bytes([retry.COOKIE_ECHO]) + data[3:] + first
        s.hs_retransmits = 0
        s.hs_next = now + s.hs_interval
        self._stats["handshakes.retry_received"] += 1
        return self._transmit(s, s.hs_message)

    def _under_pressure(self, prefix: str) -> bool:
        mode = self.limits.retry
        if mode != "auto":
            return mode == "always"
        held = len(self._half_open) + len(self._unvalidated_ik)
        return (
            2 * held >= self.limits.max_pending
            or 2 * self._half_open_prefix.get(prefix, 0) >= self.limits.max_half_open_per_prefix
        )

    def _on_initiation(
        self, mtype: MsgType, data: bytes, addr: Address, cookie: bytes | None = None
    ) -> list[Event]:
        now = self._clock()
        eph = bytes(data[3:35])
        recent = self._recent.get(eph)
        if recent is not None and mtype is MsgType.XX1 and self._sessions.get(recent[0]) is None:
            # its half-open session was evicted: a retransmission starts again (XX1
            # carries no early data, so this replays nothing)
            del self._recent[eph]
            recent = None
        if recent is not None:
            s = self._sessions.get(recent[0])
            if s is None or s.ephemeral_id != eph or s.retired_until is not None:
                return self._drop(addr, "replayed_handshake", len(data))
            # A retransmitted message 1: resend our cached answer, never re-deliver.
            self._stats["handshakes.duplicate"] += 1
            if addr == s.addr and not s.validated:
                s.budget_in += len(data)
            if s.state in (State.IK_RECEIVED_1, State.XX_RECEIVED_1) and s.reply_due is None:
                events = self._drop(addr, "duplicate_handshake", len(data))
                if s.hs_message is not None and addr == s.addr:
                    if len(s.hs_message) <= s.budget_left():
                        events += self._transmit(s, s.hs_message)
                    events += self._flush_session_queue(s, now)
                return events
            return self._drop(addr, "duplicate_handshake", len(data))
        prefix = retry.prefix_key(addr[0])
        validated = False
        if cookie is not None:
            if not retry.verify(self._retry_secret, now, cookie, addr[0], addr[1], eph):
                return self._drop(addr, "bad_cookie", len(data))
            validated = True
            self._stats["handshakes.retry_validated"] += 1
        elif self._under_pressure(prefix):
            # Stateless: no session, no rate-limit bucket, no DH; 21 bytes (< the 35+ received).
            self._stats["handshakes.retry_sent"] += 1
            cookie = retry.mint(self._retry_secret, now, addr[0], addr[1], eph)
            out = retry.retry_datagram(bytes(data[1:3]), cookie)
            self._stats["datagrams_out"] += 1
            self._stats["bytes_out"] += len(out)
            return [Transmit(addr, out)]
        if not self._limiter.allow(addr[0], now):
            return self._drop(addr, "rate_limited", len(data))
        if not self._make_room(prefix, half_open=mtype is MsgType.XX1):
            return self._drop(addr, "max_sessions", len(data))
        pattern = "IK" if mtype is MsgType.IK1 else "XX"
        driver = Driver(
            pattern=pattern,
            initiator=False,
            static_private=self._static,
            remote_static=None,
            ephemeral_private=self._rng(32),
        )
        try:
            driver, raw_payload = driver.read(data[HEADER_LEN[mtype] :])
            payload = Payload.decode(raw_payload)
        except RemoteProtocolError:
            self._stats["handshakes.rejected"] += 1
            return self._drop(addr, "handshake_failed", len(data))
        remote_sid = int.from_bytes(data[1:3], "big")
        peer_name: str | None = None
        if pattern == "IK":
            remote = driver.peer_static_seen()
            if remote is None:  # pragma: no cover
                return self._drop(addr, "handshake_failed", len(data))
            refused = self._check_initiator(remote, addr)
            if refused is not None:
                return refused
            peer_name = self.trust.name_for_key(remote)
        sid = self._alloc_sid()
        if sid is None:
            return self._drop(addr, "max_sessions", len(data))
        s = self._new_session(sid, initiator=False, pattern=pattern, addr=addr, now=now)
        s.remote_sid = remote_sid
        s.ephemeral_id = eph
        s.budget_in = len(data)
        s.validated = validated
        s.hs_deadline = now + self.limits.handshake_timeout
        selected = negotiate(payload.offers, self._tags)
        s.profile_id = self._tag_ids[selected] if selected is not None else 0
        s.reply_payload = Payload(selected=selected, app=self.app_payload)
        s.driver = driver
        self._sessions[sid] = s
        self._remember(eph, sid, now)
        self._stats["handshakes.accepted"] += 1
        if pattern == "XX":
            self._half_open[sid] = prefix
            self._half_open_prefix[prefix] += 1
        elif not validated:
            self._unvalidated_ik.add(sid)
        if pattern == "XX":
            s.state = transition(s.state, Input.RECV_XX1)
            driver, message = driver.write(s.reply_payload.encode())
            s.driver = driver
            datagram = (
                bytes([MsgType.XX2])
                + remote_sid.to_bytes(2, "big")
                + sid.to_bytes(2, "big")
                + message
            )
            s.hs_message = datagram
            if len(datagram) <= s.budget_left():
                return self._transmit(s, datagram)
            self._stats["amplification_limited"] += 1
            return []
        # IK: keys are ready once we write IK2; the initiator is authenticated now.
        s.state = transition(s.state, Input.RECV_IK1)
        s.peer_static = driver.peer_static_seen()
        s.peer_name = peer_name
        s.peer_app = payload.app
        if payload.replaces is not None and self._still_have(payload.replaces, s):
            # Tell the initiator its old session was alive here (the re-handshake was
            # not needed): it backs off its next ones. Older initiators ignore it.
            s.reply_payload = attrs.evolve(s.reply_payload, replaces=payload.replaces)
        early = payload.early
        if early is not None and not self._accept_early(payload.time, eph):
            early = None
            s.reply_payload = attrs.evolve(s.reply_payload, early_refused=True)
        events = self._attach_responder_channel(s, payload.replaces, now)
        if early is not None:
            events.append(Received(s.channel or 0, s.addr, early, validated=s.validated))
        wait = self.reply_wait() if early is not None or payload.early is None else 0.0
        s.reply_due = now + wait
        if wait <= 0:
            events += self._flush_ik_reply(s, now)
        return events

    def _accept_early(self, dated: int | None, eph: bytes) -> bool:
        """0-RTT anti-replay: the date must be recent, after ``early_data_not_before``,
        and the message never seen; refused (not evicted) when the cache is full."""
        reason = None
        now = self._wall()
        window = self.limits.early_data_window
        while self._early_seen:
            first, expiry = next(iter(self._early_seen.items()))
            if expiry > now:
                break
            del self._early_seen[first]
        if dated is None:
            reason = "undated"
        else:
            delta = ((dated - int(now) + (1 << 31)) % (1 << 32)) - (1 << 31)
            when = int(now) + delta
            if abs(delta) > window:
                reason = "stale"
            elif when <= self._early_not_before:
                reason = "before_restart"
            elif eph in self._early_seen:
                reason = "replay"
            elif len(self._early_seen) >= MAX_EARLY_SEEN_PER_SESSION * self.limits.max_sessions:
                reason = "replay_cache_full"
            else:
                self._early_seen[eph] = when + window
                return True
        self._stats["early_data.refused"] += 1
        self._stats[f"early_data.refused.{reason}"] += 1
        return False

    def reply_wait(self) -> float:
        """How long an IK responder holds message 2 for the first reply (seconds)."""
        wait = self.limits.reply_wait
        bw = self.link_bandwidth_bps
        if wait > 0 and bw is not None:
            bare_ik2 = FIXED_LEN[MsgType.IK2] + UDP_IP_HEADERS
            wait = max(wait, min(REPLY_WAIT_CEILING, REPLY_WAIT_FRACTION * 8.0 * bare_ik2 / bw))
        return wait

    def _still_have(self, sid: int, s: _Session) -> bool:
        old = self._sessions.get(sid)
        return (
            old is not None
            and not old.initiator
            and old.retired_until is None
            and old.send is not None
            and old.peer_static == s.peer_static
        )

    def _make_room(self, prefix: str, *, half_open: bool) -> bool:
        """Room for one more responder session (``half_open``: an XX one, from ``prefix``)?

        Only half-open XX sessions are ever evicted, oldest first (those from an
        address not validated by a retry cookie before the others): that prefix's
        when the prefix holds its share, else any. Confirmed
        sessions and IK sessions (their initiator is authenticated; they may hold a
        0-RTT exchange) are never evicted for a new one."""
        limits = self.limits
        if half_open and self._half_open_prefix.get(prefix, 0) >= limits.max_half_open_per_prefix:
            self._evict_half_open(prefix)
        while self._half_open and (
            len(self._sessions) >= limits.max_sessions
            or (half_open and len(self._half_open) >= limits.max_pending)
        ):
            self._evict_half_open(None)
        return len(self._sessions) < limits.max_sessions and (
            not half_open or len(self._half_open) < limits.max_pending
        )

    def _evict_half_open(self, prefix: str | None) -> None:
        # Unvalidated ones first (a spoofed flood never evicts a cookie-validated handshake).
        mine = [k for k, p in self._half_open.items() if prefix is None or p == prefix]
        sid = next((k for k in mine if not self._sessions[k].validated), None)
        if sid is None:
            sid = mine[0] if mine else None
        if sid is None:  # pragma: no cover - the caller saw one
            return
        victim = self._sessions.get(sid)
        self._stats["handshakes.evicted"] += 1
        if victim is None:  # pragma: no cover - kept in step with _sessions
            self._half_open.pop(sid)
            return
        self._forget_session(victim)

    def _check_initiator(self, remote: bytes, addr: Address) -> list[Event] | None:
        if self.trust.accept_any_initiator:
            return None
        if self.trust.name_for_key(remote) is not None:
            return None
        err = TrustError(f"initiator key {fingerprint(remote)} from {addr} is not pinned")
        self._stats["handshakes.refused"] += 1
        logger.warning("noise: %s", err)
        return [HandshakeFailed(None, addr, str(err), err)]

    def _remember(self, eph: bytes, sid: int, now: float) -> None:
        self._recent[eph] = (
            sid,
            now + max(self.limits.idle_timeout, self.limits.handshake_timeout),
        )
        while len(self._recent) > 4 * self.limits.max_sessions:
            self._recent.popitem(last=False)

    def _attach_responder_channel(
        self, s: _Session, replaces: int | None, now: float
    ) -> list[Event]:
        ch: _Channel | None = None
        if replaces is not None:
            old = self._sessions.get(replaces)
            if (
                old is not None
                and not old.initiator
                and old.peer_static == s.peer_static
                and old.channel is not None
            ):
                ch = self._channels.get(old.channel)
        if ch is None:
            for cand in self._channels.values():
                cur = cand.session
                if (
                    not cand.initiator
                    and cand.addr == s.addr
                    and cur is not None
                    and cur.peer_static == s.peer_static
                ):
                    ch = cand
                    break
        if ch is None:
            ch = _Channel(
                cid=self._new_channel_id(),
                initiator=False,
                addr=s.addr,
                peer_name=s.peer_name,
                peer_static=s.peer_static,
                explicit_key=False,
            )
            self._channels[ch.id] = ch
        return self._bind_session(ch, s, now, initiator=False)

    def _flush_ik_reply(self, s: _Session, now: float) -> list[Event]:
        """Write IK message 2, carrying the first queued reply if it fits."""
        if s.reply_due is None or s.driver is None or s.reply_payload is None:
            return []
        s.reply_due = None
        base = s.reply_payload
        s.reply_payload = None  # (IK2 is written once; its datagram is kept for repeats)
        fixed = FIXED_LEN[MsgType.IK2]
        payload = base
        if s.queue and not s.queue[0][0]:
            candidate = attrs.evolve(base, early=s.queue[0][1])
            size = fixed + len(candidate.encode())
            if size <= self.limits.max_datagram_size and size <= s.budget_left():
                payload = candidate
                s.queue.pop(0)
        size = fixed + len(payload.encode())
        rest = sum(len(pt) + records.DATA_OVERHEAD for _, pt in s.queue)
        if s.queue and size + rest > s.budget_left():
            payload = attrs.evolve(payload, confirm=True)
        driver, message = s.driver.write(payload.encode())
        split = driver.split
        if split is None:  # pragma: no cover
            return []
        s.driver = None
        assert s.remote_sid is not None
        s.send = records.SendKeys(split.send_key, now)
        s.recv = records.RecvKeys(split.recv_key)
        datagram = (
            bytes([MsgType.IK2])
            + s.remote_sid.to_bytes(2, "big")
            + s.local_sid.to_bytes(2, "big")
            + message
        )
        s.hs_message = datagram
        events: list[Event] = []
        if len(datagram) <= s.budget_left():
            events += self._transmit(s, datagram)
            events += self._flush_session_queue(s, now)
        else:
            self._stats["amplification_limited"] += 1
        return events

    def _on_final(self, data: bytes, addr: Address) -> list[Event]:
        now = self._clock()
        dest = int.from_bytes(data[1:3], "big")
        s = self._sessions.get(dest)
        if s is None or s.initiator or s.pattern != "XX" or s.retired_until is not None:
            return self._drop(addr, "unknown_session", len(data))
        if s.state is not State.XX_RECEIVED_1:
            if (
                s.state is State.ESTABLISHED
                and s.send is not None
                and s.hs_message == data
                and addr == s.addr
            ):
                # The initiator did not see our confirmation: confirm again.
                self._stats["handshakes.duplicate"] += 1
                events = self._drop(addr, "duplicate_handshake", len(data))
                return events + self._send_record(s, bytes([CTRL_PING]), control=True, now=now)
            return self._drop(addr, "duplicate_handshake", len(data))
        if s.driver is None:  # pragma: no cover
            return self._drop(addr, "unknown_session", len(data))
        try:
            driver, raw_payload = s.driver.read(data[3:])
            payload = Payload.decode(raw_payload)
        except RemoteProtocolError:
            self._stats["handshakes.rejected"] += 1
            return self._drop(addr, "handshake_failed", len(data))
        split = driver.split
        if split is None:  # pragma: no cover
            return self._drop(addr, "handshake_failed", len(data))
        refused = self._check_initiator(split.remote_static, addr)
        if refused is not None:
            s.state = transition(s.state, Input.REFUSED)
            self._forget_session(s)
            return refused
        s.state = transition(s.state, Input.RECV_XX3)
        self._not_half_open(s)
        s.driver = None
        s.hs_message = bytes(data)  # to recognise a retransmitted XX3
        s.send = records.SendKeys(split.send_key, now)
        s.recv = records.RecvKeys(split.recv_key)
        s.peer_static = split.remote_static
        s.peer_name = self.trust.name_for_key(split.remote_static)
        s.peer_app = payload.app
        s.last_recv = now
        if addr == s.addr:
            s.validated = True
        else:
            s.addr = addr
            s.budget_in = len(data)
            s.budget_out = 0
        events = self._attach_responder_channel(s, payload.replaces, now)
        if payload.early is not None:
            events.append(Received(s.channel or 0, s.addr, payload.early, validated=s.validated))
        else:
            events += self._send_record(s, bytes([CTRL_PING]), control=True, now=now)
        events += self._flush_session_queue(s, now)
        return events

    # ------------------------------------------------------------------ records

    def _send_record(
        self, s: _Session, plaintext: bytes, *, control: bool, now: float
    ) -> list[Event]:
        keys = s.send
        if keys is None:
            s.queue.append((control, plaintext))
            return []
        size = records.DATA_OVERHEAD + len(plaintext)
        if not s.validated and (s.queue or size > s.budget_left()):
            if len(s.queue) >= MAX_QUEUED:
                self._stats["amplification_queue_overflow"] += 1
                s.queue.pop(0)
            s.queue.append((control, plaintext))
            self._stats["amplification_limited"] += 1
            return []
        return self._seal(s, plaintext, control=control, now=now)

    def _seal(self, s: _Session, plaintext: bytes, *, control: bool, now: float) -> list[Event]:
        keys = s.send
        assert keys is not None and s.remote_sid is not None
        if (
            keys.packets_in_generation() >= self.limits.rekey_after_packets
            or now - keys.generation_started >= self.limits.rekey_after_seconds
        ) and s.peer_echo == keys.generation & 1:
            keys.update(now)
            self._stats["rekeys"] += 1
        pn = keys.next_pn
        if pn > records.MAX_PN:  # pragma: no cover - 2^62 records
            raise LocalProtocolError("packet number space exhausted; re-handshake")
        pn_len = 3 if pn - s.pn_floor >= (1 << 14) else 2
        echo = s.recv.generation & 1 if s.recv is not None else 0
        header = records.build_header(
            key_phase=keys.generation & 1,
            control=control,
            sid=s.remote_sid,
            pn=pn,
            pn_len=pn_len,
            echo=echo,
        )
        keys.next_pn = pn + 1
        if self._observer is not None:
            self._observer(hashlib.sha256(keys.key).digest()[:8], pn)
        sealed = keys.aead.encrypt(records.nonce(pn), plaintext, header)
        self._stats["records_out"] += 1
        return self._transmit(s, header + sealed)

    def _flush_session_queue(self, s: _Session, now: float) -> list[Event]:
        events: list[Event] = []
        while s.queue and s.send is not None:
            control, pt = s.queue[0]
            if not s.validated and records.DATA_OVERHEAD + len(pt) > s.budget_left():
                break
            s.queue.pop(0)
            events += self._seal(s, pt, control=control, now=now)
        return events

    def _on_record(self, data: bytes, addr: Address) -> list[Event]:
        now = self._clock()
        hdr = records.parse_header(data)
        if hdr is None:
            return self._drop(addr, "malformed_record", len(data))
        s = self._sessions.get(hdr.sid)
        if s is None:
            return self._drop(addr, "unknown_session", len(data))
        if s.recv is None:
            return self._drop(addr, "no_keys", len(data))
        pn = records.expand_pn(s.replay.highest, hdr.truncated_pn, hdr.pn_len)
        if s.replay.too_old(pn):
            return self._drop(addr, "too_old", len(data))
        if not s.replay.fresh(pn):
            return self._drop(addr, "replay", len(data))
        aead, generation, new_key = s.recv.select(hdr.key_phase, pn, now)
        plaintext = records.open_record(aead, pn, hdr.raw, data[len(hdr.raw) :])
        if plaintext is None:
            return self._drop(addr, "auth_failed", len(data))
        if hdr.control and (not plaintext or plaintext[0] not in _CONTROL_TYPES):
            return self._drop(addr, "bad_control", len(data))
        # ---- authentic and fresh: commit.
        newest = pn > s.replay.highest
        s.replay.mark(pn)
        s.recv.commit(generation, new_key, pn, now, self.limits.old_key_lifetime)
        if new_key is not None:
            self._dirty.add(s.local_sid)  # a previous key to expire
        s.last_recv = now
        if s.send is not None:
            s.pn_floor = s.send.next_pn
        if newest:
            s.peer_echo = hdr.echo
        self._stats["records_in"] += 1
        events: list[Event] = []
        if s.state in (State.XX_SENT_3, State.IK_RECEIVED_1):
            s.state = transition(s.state, Input.RECV_RECORD)
            self._unvalidated_ik.discard(s.local_sid)
            s.hs_message = None if s.initiator else s.hs_message
            s.hs_next = None
            if not s.initiator and addr == s.addr:
                s.validated = True
        ch = self._channels.get(s.channel) if s.channel is not None else None
        current = ch is not None and ch.session is s
        if addr != s.addr:
            if newest and current and ch is not None:
                events += self._migrate(s, ch, addr, len(data), now)
        elif not s.validated:
            s.budget_in += len(data)
        if hdr.control:
            events += self._on_control(s, plaintext, addr, now)
        elif ch is not None:
            events.append(
                Received(
                    ch.id,
                    s.addr if current else addr,
                    plaintext,
                    validated=s.validated and addr == s.addr,
                )
            )
        events += self._flush_session_queue(s, now)
        return events

    def _migrate(
        self, s: _Session, ch: _Channel, addr: Address, size: int, now: float
    ) -> list[Event]:
        logger.info("noise: channel %d moved from %s to %s", ch.id, s.addr, addr)
        self._stats["migrations"] += 1
        s.addr = addr
        ch.addr = addr
        s.validated = False
        s.budget_in = size
        s.budget_out = 0
        s.challenge = self._rng(CHALLENGE_LEN)
        return self._send_record(
            s, bytes([CTRL_PATH_CHALLENGE]) + s.challenge, control=True, now=now
        )

    def _on_control(self, s: _Session, plaintext: bytes, addr: Address, now: float) -> list[Event]:
        kind = plaintext[0]
        body = plaintext[1:]
        if kind == CTRL_PATH_CHALLENGE and len(body) == CHALLENGE_LEN:
            response = bytes([CTRL_PATH_RESPONSE]) + body
            if addr == s.addr:
                return self._send_record(s, response, control=True, now=now)
            return self._seal_to(s, response, addr, now)
        if (
            kind == CTRL_PATH_RESPONSE
            and s.challenge is not None
            and body == s.challenge
            and addr == s.addr
        ):
            s.validated = True
            s.challenge = None
            self._stats["paths_validated"] += 1
        return []

    def _seal_to(self, s: _Session, plaintext: bytes, addr: Address, now: float) -> list[Event]:
        """Answer a path challenge from an address other than the session's (small, 1:1)."""
        saved, saved_valid = s.addr, s.validated
        s.addr, s.validated = addr, True
        try:
            return self._seal(s, plaintext, control=True, now=now)
        finally:
            s.addr, s.validated = saved, saved_valid


_CONTROL_TYPES = frozenset({CTRL_PING, CTRL_PATH_CHALLENGE, CTRL_PATH_RESPONSE})


def _norm(addr: Address) -> Address:
    return (str(addr[0]), int(addr[1]))


def _xx2_matches(driver: Driver, message: bytes) -> bool:
    """True if ``message`` is the XX2 already in ``driver``'s transcript."""
    for op, data in driver.transcript:
        if op == "r":
            return data == message
    return False
