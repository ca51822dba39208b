"""The sans-I/O secure session endpoint: Noise handshakes + explicit-nonce records.

One :class:`NoiseEndpoint` serves one UDP socket. It never does I/O: feed it datagrams
(:meth:`datagram_received`), plaintexts (:meth:`send`) and timer ticks
(:meth:`handle_timers` at :meth:`next_timer`); it returns events
(:mod:`synapse_coap.noise.events`). The clock and the random source are injected.

Vocabulary:

- a *channel* is what the layer above sees: a stable integer id for one peer
  conversation. It survives re-handshakes (lost state, restarted peers) and
  address changes (NAT rebinding).
- a *session* is one handshake's keys and record state, under a
  receiver-chosen 16-bit session id. A channel has a current session, maybe a
  pending one (handshake in progress) and maybe retired ones (kept briefly so
  reordered records still open).

See docs/security.md for the wire format and the security argument.

The endpoint is split by responsibility: this module holds the public API, the session
table and the timers; :mod:`~synapse_coap.noise.initiator` and
:mod:`~synapse_coap.noise.responder` drive the two sides of the handshakes,
:mod:`~synapse_coap.noise.recordpath` the records, control messages and migration;
:mod:`~synapse_coap.noise.sessions` holds the per-session and per-channel state and
:mod:`~synapse_coap.noise.limits` the limits and constants.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Sequence

from synapse_coap.errors import ConfigValueError, LocalProtocolError
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
from synapse_coap.noise.handshake import FIXED_LEN, MsgType, State, profile_tag
from synapse_coap.noise.initiator import _Initiator
from synapse_coap.noise.keys import public_key
from synapse_coap.noise.limits import (
    MAX_QUEUED,
    REHANDSHAKE_HOLDOFF_RTOS,
    REPLY_WAIT_CEILING,
    REPLY_WAIT_FRACTION,
    UDP_IP_HEADERS,
    NoiseLimits,
)
from synapse_coap.noise.lost import SMALL_TYPES, _LostHints
from synapse_coap.noise.ratelimit import HandshakeRateLimiter
from synapse_coap.noise.recordpath import _RecordPath
from synapse_coap.noise.responder import _Responder
from synapse_coap.noise.sessions import _Channel, _norm, _Session
from synapse_coap.noise.timers import _Timers
from synapse_coap.noise.trust import TrustPolicy

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


class NoiseEndpoint:
    """See the module docstring: the sans-I/O session layer for one UDP socket."""

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
        keepalive_ping: bool = True,
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
        keep-alive (one-way): a 3-byte NAT ping if ``keepalive_ping`` and a record
        was sealed lately, else a sealed control record (22 bytes; noise/lost.py):
        NAT mapping kept, a new address told after a rebinding, the peer's idle
        timer refreshed (sealed only); such a session is not closed for idleness."""
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
        self.keepalive_ping = keepalive_ping
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
        # the parts split out by responsibility (each works on this session table)
        self._initiator = _Initiator(self)
        self._responder = _Responder(self)
        self._records = _RecordPath(self)
        self._deadlines = _Timers(self)
        self._lost = _LostHints(self)

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
        events = self._initiator._start_initiator(ch, replaces=None)
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
            return self._records._send_record(old, plaintext, control=False, now=now)
        if ch.pending is not None and ch.pending.send is None:
            if plaintext == ch.early_data or plaintext in ch.queue:
                return self._initiator._retransmit_handshake(ch.pending, now)
            ch.queue.append(plaintext)
            return []
        s = ch.session
        if s is None:
            raise LocalProtocolError(f"channel {channel} has no session")
        if s.send is None:
            s.queue.append((False, plaintext))
            if s.state is State.IK_RECEIVED_1 and s.reply_due is not None:
                # The first reply (to 0-RTT data): IK message 2 carries it now, no waiting.
                return self._responder._flush_ik_reply(s, now)
            return []
        return self._records._send_record(s, plaintext, control=False, now=now)

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
                return self._initiator._retransmit_handshake(ch.pending, now)
            return []
        if not ch.initiator or ch.session is None:
            return []
        s = ch.session
        if s.state == State.XX_SENT_3:
            return self._initiator._retransmit_handshake(s, now)
        if now < ch.rehandshake_after:
            self._stats["rehandshakes.suppressed"] += 1
            return []
        self._stats["rehandshakes"] += 1
        ch.resend = []
        ch.rehandshake_started = now
        return self._initiator._start_initiator(ch, replaces=s.remote_sid)

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
        return self._deadlines.next_timer()

    def timers_moved_earlier(self) -> bool:
        """False if only traffic (which only delays deadlines) came since :meth:`next_timer`."""
        return bool(self._dirty)

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

    def handle_timers(self) -> list[Event]:
        return self._deadlines.handle_timers()

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
                return self._records._on_record(data, addr)
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
        records.forget_keys(s.send, s.recv)
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
        for s in filter(None, [ch.session, ch.pending, *ch.retired]):
            records.forget_keys(s.send, s.recv)
            if self._sessions.get(s.local_sid) is s:
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
            events += self._records._send_record(s, pt, control=False, now=now)
        return events

    # ------------------------------------------------------------------ responder

    def _on_handshake(self, data: bytes, addr: Address) -> list[Event]:
        cookie: bytes | None = None
        if data[0] == retry.RETRY:
            return self._initiator._on_retry(data, addr)
        if data[0] in SMALL_TYPES:
            return self._lost.on_small(data, addr)
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
            return self._responder._on_initiation(mtype, data, addr, cookie)
        if mtype in (MsgType.IK2, MsgType.XX2):
            return self._initiator._on_response(mtype, data, addr)
        return self._responder._on_final(data, addr)

    def reply_wait(self) -> float:
        """How long an IK responder holds message 2 for the first reply (seconds)."""
        wait = self.limits.reply_wait
        bw = self.link_bandwidth_bps
        if wait > 0 and bw is not None:
            bare_ik2 = FIXED_LEN[MsgType.IK2] + UDP_IP_HEADERS
            wait = max(wait, min(REPLY_WAIT_CEILING, REPLY_WAIT_FRACTION * 8.0 * bare_ik2 / bw))
        return wait

    # ------------------------------------------------------------------ records
