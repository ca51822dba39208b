"""The initiator's side of the Noise handshakes, a part of
:class:`~synapse_coap.noise.endpoint.NoiseEndpoint` split out by responsibility:
starting a handshake (IK, or XX after failed IK attempts), retransmitting it,
answering a responder's Retry cookie, taking the responder's answer, and
re-handshakes of a live channel. It works on the endpoint's session table
through ``self.ep``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from synapse_coap.errors import (
    HandshakeError,
    KeyChangedError,
    LimitExceeded,
    RemoteProtocolError,
    TrustError,
)
from synapse_coap.noise import records, retry
from synapse_coap.noise.events import (
    Address,
    ChannelClosed,
    Event,
    HandshakeFailed,
    Received,
    Transmit,
)
from synapse_coap.noise.handshake import (
    FIXED_LEN,
    Driver,
    Input,
    MsgType,
    Payload,
    State,
    transition,
)
from synapse_coap.noise.limits import (
    CTRL_PING,
    IK_ATTEMPTS_BEFORE_XX,
    MAX_RETRIES,
    XX1_MIN_SIZE,
)
from synapse_coap.noise.sessions import _Channel, _Session, _xx2_matches
from synapse_coap.noise.trust import fingerprint

if TYPE_CHECKING:
    from synapse_coap.noise.endpoint import NoiseEndpoint

logger = logging.getLogger("synapse_coap.noise.endpoint")


class _Initiator:
    """The initiator's side of the handshakes of one endpoint."""

    def __init__(self, ep: NoiseEndpoint) -> None:
        self.ep = ep

    def _start_initiator(
        self, ch: _Channel, *, replaces: int | None, force_xx: bool = False
    ) -> list[Event]:
        now = self.ep._clock()
        sid = self.ep._alloc_sid()
        if sid is None or len(self.ep._sessions) >= self.ep.limits.max_sessions:
            err = LimitExceeded("no free session slot (max_sessions reached)")
            events: list[Event] = [HandshakeFailed(ch.id, ch.addr, str(err), err)]
            if ch.session is None:
                self.ep._drop_channel(ch)
                events.append(ChannelClosed(ch.id, "handshake failed"))
            return events
        pattern = "IK" if ch.peer_static is not None and not force_xx else "XX"
        s = self.ep._new_session(sid, initiator=True, pattern=pattern, addr=ch.addr, now=now)
        s.channel = ch.id
        driver = Driver(
            pattern=pattern,
            initiator=True,
            static_private=self.ep._static,
            remote_static=ch.peer_static if pattern == "IK" else None,
            ephemeral_private=self.ep._rng(32),
        )
        if pattern == "IK":
            mtype = MsgType.IK1
            early = ch.early_data
            payload = Payload(offers=self.ep._tags, app=self.ep.app_payload, replaces=replaces)
            if early is not None:
                with_early = attrs.evolve(payload, early=early, time=int(self.ep._wall()))
                if FIXED_LEN[mtype] + len(with_early.encode()) <= self.ep.limits.max_datagram_size:
                    payload = with_early
                else:
                    ch.queue.insert(0, early)
                    ch.early_data = None
            s.state = transition(s.state, Input.SEND_IK1)
        else:
            mtype = MsgType.XX1
            payload = Payload(offers=self.ep._tags)
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
        s.hs_interval = self.ep._hs_interval(ch, len(datagram))
        s.hs_next = now + s.hs_interval
        s.hs_deadline = now + self.ep.limits.handshake_timeout
        s.replaces = replaces
        self.ep._sessions[sid] = s
        ch.pending = s
        self.ep._stats["handshakes.started"] += 1
        return self.ep._transmit(s, datagram)

    def _retransmit_handshake(self, s: _Session, now: float) -> list[Event]:
        if s.hs_message is None:
            return []
        ch = self.ep._channels.get(s.channel) if s.channel is not None else None
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
            self.ep._stats["handshakes.ik_fallback"] += 1
            deadline = s.hs_deadline
            self.ep._forget_session(s)
            events = self._start_initiator(ch, replaces=s.replaces, force_xx=True)
            if ch.pending is not None:
                ch.pending.hs_deadline = deadline
            return events
        s.hs_retransmits += 1
        s.hs_interval = min(s.hs_interval * 2, self.ep.limits.handshake_timeout)
        s.hs_next = now + s.hs_interval
        self.ep._stats["handshakes.retransmitted"] += 1
        return self.ep._transmit(s, s.hs_message)

    def _initiator_timeout(self, s: _Session, now: float) -> list[Event]:
        ch = self.ep._channels.get(s.channel) if s.channel is not None else None
        err = HandshakeError(
            f"no handshake answer from {s.addr} within {self.ep.limits.handshake_timeout:g} s"
        )
        self.ep._stats["handshakes.timeout"] += 1
        s.state = transition(s.state, Input.TIMEOUT)
        if ch is None:
            self.ep._forget_session(s)
            return []
        events: list[Event] = [HandshakeFailed(ch.id, s.addr, "timeout", err)]
        rehandshake = ch.pending is s and ch.session is not None
        self.ep._forget_session(s)
        if rehandshake and ch.session is not None:
            # Keep the old session (the channel stays open); whatever was queued goes over it.
            ch.resend = []
            ch.rehandshake_started = None
            self.ep._rehandshake_done(ch, useful=False, now=now)
            queued, ch.queue = ch.queue, []
            for pt in queued:
                events += self.ep._records._send_record(ch.session, pt, control=False, now=now)
            return events
        if ch.session is None and ch.pending is None:
            self.ep._drop_channel(ch)
            events.append(ChannelClosed(ch.id, "handshake timeout"))
        return events

    def _on_response(self, mtype: MsgType, data: bytes, addr: Address) -> list[Event]:
        now = self.ep._clock()
        dest = int.from_bytes(data[1:3], "big")
        s = self.ep._sessions.get(dest)
        if s is None or not s.initiator or s.retired_until is not None:
            return self.ep._drop(addr, "unknown_session", len(data))
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
                self.ep._stats["handshakes.duplicate"] += 1
                return self._retransmit_handshake(s, now)
            return self.ep._drop(addr, "duplicate_handshake", len(data))
        if s.driver is None:
            return self.ep._drop(addr, "unknown_session", len(data))
        try:
            driver, raw_payload = s.driver.read(data[5:])
            payload = Payload.decode(raw_payload)
        except RemoteProtocolError:
            self.ep._stats["handshakes.rejected"] += 1
            return self.ep._drop(addr, "handshake_failed", len(data))
        ch = self.ep._channels.get(s.channel) if s.channel is not None else None
        if ch is None:
            return self.ep._drop(addr, "unknown_session", len(data))
        if payload.selected is not None and payload.selected not in self.ep._tag_ids:
            return self.ep._drop(addr, "handshake_failed", len(data))
        remote = driver.peer_static_seen()
        if remote is None:
            return self.ep._drop(addr, "handshake_failed", len(data))
        try:
            self._check_responder_key(ch, remote)
        except TrustError as exc:
            s.state = transition(s.state, Input.REFUSED)
            self.ep._stats["handshakes.refused"] += 1
            logger.warning("noise: %s", exc)
            events: list[Event] = [HandshakeFailed(ch.id, addr, str(exc), exc)]
            self.ep._drop_channel(ch)
            events.append(ChannelClosed(ch.id, "peer key refused"))
            return events
        s.remote_sid = int.from_bytes(data[3:5], "big")
        s.peer_static = remote
        s.peer_name = ch.peer_name
        s.profile_id = self.ep._tag_ids.get(payload.selected, 0) if payload.selected else 0
        s.peer_app = payload.app
        s.last_recv = now
        events = []
        if mtype is MsgType.IK2:
            s.driver = None
            s.state = transition(s.state, Input.RECV_IK2)
            split = driver.split
            if split is None:  # pragma: no cover - IK2 is final by construction
                return self.ep._drop(addr, "handshake_failed", len(data))
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
                self.ep._stats["early_data.resent"] += 1
                events += self.ep._records._send_record(s, ch.early_data, control=False, now=now)
                ch.early_data = None
            events += self.ep._flush_channel_queue(ch, s, now)
            events += self._finish_rehandshake(ch, s, old_alive, now)
            if payload.confirm and not any(isinstance(e, Transmit) for e in events):
                events += self.ep._records._send_record(
                    s, bytes([CTRL_PING]), control=True, now=now
                )
            return events
        # XX2: answer with XX3 (our identity, app payload, the first request).
        s.state = transition(s.state, Input.RECV_XX2)
        early = ch.early_data
        from_queue = False
        if early is None and ch.queue:
            early = ch.queue[0]
            from_queue = True
        out = Payload(app=self.ep.app_payload, replaces=s.replaces)
        if early is not None:
            candidate = attrs.evolve(out, early=early)
            if FIXED_LEN[MsgType.XX3] + len(candidate.encode()) <= self.ep.limits.max_datagram_size:
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
            return self.ep._drop(addr, "handshake_failed", len(data))
        s.driver = driver
        s.send = records.SendKeys(split.send_key, now)
        s.recv = records.RecvKeys(split.recv_key)
        datagram = bytes([MsgType.XX3]) + s.remote_sid.to_bytes(2, "big") + message
        s.hs_message = datagram
        s.hs_interval = self.ep._hs_interval(ch, len(datagram))
        s.hs_next = now + s.hs_interval
        old_alive = self._old_session_alive(ch, s)
        events += self.ep._transmit(s, datagram)
        events += self._complete_initiator(ch, s, now)
        events += self.ep._flush_channel_queue(ch, s, now)
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
        self.ep._rehandshake_done(ch, useful=not old_alive, now=now)
        if old_alive:
            return []
        events: list[Event] = []
        for pt in resend:
            events += self.ep._records._send_record(s, pt, control=False, now=now)
        return events

    def _check_responder_key(self, ch: _Channel, remote: bytes) -> None:
        name = ch.peer_name or ""
        if ch.explicit_key:
            pinned = self.ep.trust.pinned.get(name)
            if pinned is not None and pinned != remote:
                raise KeyChangedError(name, fingerprint(pinned), fingerprint(remote))
            if ch.peer_static is not None and ch.peer_static != remote:
                raise KeyChangedError(name, fingerprint(ch.peer_static), fingerprint(remote))
            return
        self.ep.trust.check(name, remote)

    def _complete_initiator(self, ch: _Channel, s: _Session, now: float) -> list[Event]:
        ch.pending = None
        return self.ep._bind_session(ch, s, now, initiator=True)

    def _on_retry(self, data: bytes, addr: Address) -> list[Event]:
        """A responder under pressure asks for our first message again, with its cookie."""
        now = self.ep._clock()
        if len(data) != retry.RETRY_LEN:
            return self.ep._drop(addr, "malformed_handshake", len(data))
        s = self.ep._sessions.get(int.from_bytes(data[1:3], "big"))
        if (
            s is None
            or not s.initiator
            or s.state not in (State.IK_SENT_1, State.XX_SENT_1)
            or s.addr != addr
            or s.hs_message is None
            or s.retries >= MAX_RETRIES
        ):
            return self.ep._drop(addr, "unexpected_retry", len(data))
        s.retries += 1
        first = s.hs_message
        if first[0] == retry.COOKIE_ECHO:
            first = first[retry.ECHO_OVERHEAD :]
        s.hs_message = bytes([retry.COOKIE_ECHO]) + data[3:] + first
        s.hs_retransmits = 0
        s.hs_next = now + s.hs_interval
        self.ep._stats["handshakes.retry_received"] += 1
        return self.ep._transmit(s, s.hs_message)
