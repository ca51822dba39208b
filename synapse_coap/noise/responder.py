"""The responder's side of the Noise handshakes, a part of
:class:`~synapse_coap.noise.endpoint.NoiseEndpoint` split out by responsibility:
first messages (IK1, XX1), the stateless Retry cookie under pressure, 0-RTT
anti-replay, half-open state bounded per source prefix and evicted oldest
first, and the initiator's final message. It works on the endpoint's session
table through ``self.ep``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from synapse_coap.errors import (
    RemoteProtocolError,
    TrustError,
)
from synapse_coap.noise import records, retry
from synapse_coap.noise.events import (
    Address,
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
    transition,
)
from synapse_coap.noise.limits import (
    CTRL_PING,
    MAX_EARLY_SEEN_PER_SESSION,
)
from synapse_coap.noise.sessions import _Channel, _Session
from synapse_coap.noise.trust import fingerprint

if TYPE_CHECKING:
    from synapse_coap.noise.endpoint import NoiseEndpoint

logger = logging.getLogger("synapse_coap.noise.endpoint")


class _Responder:
    """The responder's side of the handshakes of one endpoint."""

    def __init__(self, ep: NoiseEndpoint) -> None:
        self.ep = ep

    def _under_pressure(self, prefix: str) -> bool:
        mode = self.ep.limits.retry
        if mode != "auto":
            return mode == "always"
        held = len(self.ep._half_open) + len(self.ep._unvalidated_ik)
        return (
            2 * held >= self.ep.limits.max_pending
            or 2 * self.ep._half_open_prefix.get(prefix, 0)
            >= self.ep.limits.max_half_open_per_prefix
        )

    def _on_initiation(
        self, mtype: MsgType, data: bytes, addr: Address, cookie: bytes | None = None
    ) -> list[Event]:
        now = self.ep._clock()
        eph = bytes(data[3:35])
        recent = self.ep._recent.get(eph)
        if recent is not None and mtype is MsgType.XX1 and self.ep._sessions.get(recent[0]) is None:
            # its half-open session was evicted: a retransmission starts again (XX1
            # carries no early data, so this replays nothing)
            del self.ep._recent[eph]
            recent = None
        if recent is not None:
            s = self.ep._sessions.get(recent[0])
            if s is None or s.ephemeral_id != eph or s.retired_until is not None:
                return self.ep._drop(addr, "replayed_handshake", len(data))
            # A retransmitted message 1: resend our cached answer, never re-deliver.
            self.ep._stats["handshakes.duplicate"] += 1
            if addr == s.addr and not s.validated:
                s.budget_in += len(data)
            if s.state in (State.IK_RECEIVED_1, State.XX_RECEIVED_1) and s.reply_due is None:
                events = self.ep._drop(addr, "duplicate_handshake", len(data))
                if s.hs_message is not None and addr == s.addr:
                    if len(s.hs_message) <= s.budget_left():
                        events += self.ep._transmit(s, s.hs_message)
                    events += self.ep._records._flush_session_queue(s, now)
                return events
            return self.ep._drop(addr, "duplicate_handshake", len(data))
        prefix = retry.prefix_key(addr[0])
        validated = False
        if cookie is not None:
            if not retry.verify(self.ep._retry_secret, now, cookie, addr[0], addr[1], eph):
                return self.ep._drop(addr, "bad_cookie", len(data))
            validated = True
            self.ep._stats["handshakes.retry_validated"] += 1
        elif self._under_pressure(prefix):
            # Stateless: no session, no rate-limit bucket, no DH; 21 bytes (< the 35+ received).
            self.ep._stats["handshakes.retry_sent"] += 1
            cookie = retry.mint(self.ep._retry_secret, now, addr[0], addr[1], eph)
            out = retry.retry_datagram(bytes(data[1:3]), cookie)
            self.ep._stats["datagrams_out"] += 1
            self.ep._stats["bytes_out"] += len(out)
            return [Transmit(addr, out)]
        if not self.ep._limiter.allow(addr[0], now):
            return self.ep._drop(addr, "rate_limited", len(data))
        if not self._make_room(prefix, half_open=mtype is MsgType.XX1):
            return self.ep._drop(addr, "max_sessions", len(data))
        pattern = "IK" if mtype is MsgType.IK1 else "XX"
        driver = Driver(
            pattern=pattern,
            initiator=False,
            static_private=self.ep._static,
            remote_static=None,
            ephemeral_private=self.ep._rng(32),
        )
        try:
            driver, raw_payload = driver.read(data[HEADER_LEN[mtype] :])
            payload = Payload.decode(raw_payload)
        except RemoteProtocolError:
            self.ep._stats["handshakes.rejected"] += 1
            return self.ep._drop(addr, "handshake_failed", len(data))
        remote_sid = int.from_bytes(data[1:3], "big")
        peer_name: str | None = None
        if pattern == "IK":
            remote = driver.peer_static_seen()
            if remote is None:  # pragma: no cover
                return self.ep._drop(addr, "handshake_failed", len(data))
            refused = self._check_initiator(remote, addr)
            if refused is not None:
                return refused
            peer_name = self.ep.trust.name_for_key(remote)
        sid = self.ep._alloc_sid()
        if sid is None:
            return self.ep._drop(addr, "max_sessions", len(data))
        s = self.ep._new_session(sid, initiator=False, pattern=pattern, addr=addr, now=now)
        s.remote_sid = remote_sid
        s.ephemeral_id = eph
        s.budget_in = len(data)
        s.validated = validated
        s.hs_deadline = now + self.ep.limits.handshake_timeout
        selected = negotiate(payload.offers, self.ep._tags)
        s.profile_id = self.ep._tag_ids[selected] if selected is not None else 0
        s.reply_payload = Payload(selected=selected, app=self.ep.app_payload)
        s.driver = driver
        self.ep._sessions[sid] = s
        self._remember(eph, sid, now)
        self.ep._stats["handshakes.accepted"] += 1
        if pattern == "XX":
            self.ep._half_open[sid] = prefix
            self.ep._half_open_prefix[prefix] += 1
        elif not validated:
            self.ep._unvalidated_ik.add(sid)
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
                return self.ep._transmit(s, datagram)
            self.ep._stats["amplification_limited"] += 1
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
        wait = self.ep.reply_wait() if early is not None or payload.early is None else 0.0
        s.reply_due = now + wait
        if wait <= 0:
            events += self._flush_ik_reply(s, now)
        return events

    def _accept_early(self, dated: int | None, eph: bytes) -> bool:
        """0-RTT anti-replay: the date must be recent, after ``early_data_not_before``,
        and the message never seen; refused (not evicted) when the cache is full."""
        reason = None
        now = self.ep._wall()
        window = self.ep.limits.early_data_window
        while self.ep._early_seen:
            first, expiry = next(iter(self.ep._early_seen.items()))
            if expiry > now:
                break
            del self.ep._early_seen[first]
        if dated is None:
            reason = "undated"
        else:
            delta = ((dated - int(now) + (1 << 31)) % (1 << 32)) - (1 << 31)
            when = int(now) + delta
            if abs(delta) > window:
                reason = "stale"
            elif when <= self.ep._early_not_before:
                reason = "before_restart"
            elif eph in self.ep._early_seen:
                reason = "replay"
            elif (
                len(self.ep._early_seen) >= MAX_EARLY_SEEN_PER_SESSION * self.ep.limits.max_sessions
            ):
                reason = "replay_cache_full"
            else:
                self.ep._early_seen[eph] = when + window
                return True
        self.ep._stats["early_data.refused"] += 1
        self.ep._stats[f"early_data.refused.{reason}"] += 1
        return False

    def _still_have(self, sid: int, s: _Session) -> bool:
        old = self.ep._sessions.get(sid)
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
        limits = self.ep.limits
        if (
            half_open
            and self.ep._half_open_prefix.get(prefix, 0) >= limits.max_half_open_per_prefix
        ):
            self._evict_half_open(prefix)
        while self.ep._half_open and (
            len(self.ep._sessions) >= limits.max_sessions
            or (half_open and len(self.ep._half_open) >= limits.max_pending)
        ):
            self._evict_half_open(None)
        return len(self.ep._sessions) < limits.max_sessions and (
            not half_open or len(self.ep._half_open) < limits.max_pending
        )

    def _evict_half_open(self, prefix: str | None) -> None:
        # Unvalidated ones first (a spoofed flood never evicts a cookie-validated handshake).
        mine = [k for k, p in self.ep._half_open.items() if prefix is None or p == prefix]
        sid = next((k for k in mine if not self.ep._sessions[k].validated), None)
        if sid is None:
            sid = mine[0] if mine else None
        if sid is None:  # pragma: no cover - the caller saw one
            return
        victim = self.ep._sessions.get(sid)
        self.ep._stats["handshakes.evicted"] += 1
        if victim is None:  # pragma: no cover - kept in step with _sessions
            self.ep._half_open.pop(sid)
            return
        self.ep._forget_session(victim)

    def _check_initiator(self, remote: bytes, addr: Address) -> list[Event] | None:
        if self.ep.trust.accept_any_initiator:
            return None
        if self.ep.trust.name_for_key(remote) is not None:
            return None
        err = TrustError(f"initiator key {fingerprint(remote)} from {addr} is not pinned")
        self.ep._stats["handshakes.refused"] += 1
        logger.warning("noise: %s", err)
        return [HandshakeFailed(None, addr, str(err), err)]

    def _remember(self, eph: bytes, sid: int, now: float) -> None:
        self.ep._recent[eph] = (
            sid,
            now + max(self.ep.limits.idle_timeout, self.ep.limits.handshake_timeout),
        )
        while len(self.ep._recent) > 4 * self.ep.limits.max_sessions:
            self.ep._recent.popitem(last=False)

    def _attach_responder_channel(
        self, s: _Session, replaces: int | None, now: float
    ) -> list[Event]:
        ch: _Channel | None = None
        if replaces is not None:
            old = self.ep._sessions.get(replaces)
            if (
                old is not None
                and not old.initiator
                and old.peer_static == s.peer_static
                and old.channel is not None
            ):
                ch = self.ep._channels.get(old.channel)
        if ch is None:
            for cand in self.ep._channels.values():
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
                cid=self.ep._new_channel_id(),
                initiator=False,
                addr=s.addr,
                peer_name=s.peer_name,
                peer_static=s.peer_static,
                explicit_key=False,
            )
            self.ep._channels[ch.id] = ch
        return self.ep._bind_session(ch, s, now, initiator=False)

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
            if size <= self.ep.limits.max_datagram_size and size <= s.budget_left():
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
            events += self.ep._transmit(s, datagram)
            events += self.ep._records._flush_session_queue(s, now)
        else:
            self.ep._stats["amplification_limited"] += 1
        return events

    def _on_final(self, data: bytes, addr: Address) -> list[Event]:
        now = self.ep._clock()
        dest = int.from_bytes(data[1:3], "big")
        s = self.ep._sessions.get(dest)
        if s is None or s.initiator or s.pattern != "XX" or s.retired_until is not None:
            return self.ep._drop(addr, "unknown_session", len(data))
        if s.state is not State.XX_RECEIVED_1:
            if (
                s.state is State.ESTABLISHED
                and s.send is not None
                and s.hs_message == data
                and addr == s.addr
            ):
                # The initiator did not see our confirmation: confirm again.
                self.ep._stats["handshakes.duplicate"] += 1
                events = self.ep._drop(addr, "duplicate_handshake", len(data))
                return events + self.ep._records._send_record(
                    s, bytes([CTRL_PING]), control=True, now=now
                )
            return self.ep._drop(addr, "duplicate_handshake", len(data))
        if s.driver is None:  # pragma: no cover
            return self.ep._drop(addr, "unknown_session", len(data))
        try:
            driver, raw_payload = s.driver.read(data[3:])
            payload = Payload.decode(raw_payload)
        except RemoteProtocolError:
            self.ep._stats["handshakes.rejected"] += 1
            return self.ep._drop(addr, "handshake_failed", len(data))
        split = driver.split
        if split is None:  # pragma: no cover
            return self.ep._drop(addr, "handshake_failed", len(data))
        refused = self._check_initiator(split.remote_static, addr)
        if refused is not None:
            s.state = transition(s.state, Input.REFUSED)
            self.ep._forget_session(s)
            return refused
        s.state = transition(s.state, Input.RECV_XX3)
        self.ep._not_half_open(s)
        s.driver = None
        s.hs_message = bytes(data)  # to recognise a retransmitted XX3
        s.send = records.SendKeys(split.send_key, now)
        s.recv = records.RecvKeys(split.recv_key)
        s.peer_static = split.remote_static
        s.peer_name = self.ep.trust.name_for_key(split.remote_static)
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
            events += self.ep._records._send_record(s, bytes([CTRL_PING]), control=True, now=now)
        events += self.ep._records._flush_session_queue(s, now)
        return events
