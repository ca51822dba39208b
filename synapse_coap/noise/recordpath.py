"""The record path of the Noise endpoint, a part of
:class:`~synapse_coap.noise.endpoint.NoiseEndpoint` split out by responsibility:
sealing and opening explicit-nonce records, the plaintexts queued behind a
handshake, control records (keep-alive, path challenge and response) and the
migration of a channel to a new address. It works on the endpoint's session
table through ``self.ep``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from synapse_coap.errors import (
    LocalProtocolError,
)
from synapse_coap.noise import records
from synapse_coap.noise.events import (
    Address,
    Event,
    Heard,
    Received,
)
from synapse_coap.noise.handshake import (
    Input,
    State,
    transition,
)
from synapse_coap.noise.limits import (
    CHALLENGE_LEN,
    CTRL_PATH_CHALLENGE,
    CTRL_PATH_RESPONSE,
    MAX_QUEUED,
)
from synapse_coap.noise.sessions import _CONTROL_TYPES, _Channel, _Session

if TYPE_CHECKING:
    from synapse_coap.noise.endpoint import NoiseEndpoint

logger = logging.getLogger("synapse_coap.noise.endpoint")


class _RecordPath:
    """The record path of one endpoint."""

    def __init__(self, ep: NoiseEndpoint) -> None:
        self.ep = ep

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
                self.ep._stats["amplification_queue_overflow"] += 1
                s.queue.pop(0)
            s.queue.append((control, plaintext))
            self.ep._stats["amplification_limited"] += 1
            return []
        return self._seal(s, plaintext, control=control, now=now)

    def _seal(self, s: _Session, plaintext: bytes, *, control: bool, now: float) -> list[Event]:
        keys = s.send
        assert keys is not None and s.remote_sid is not None
        if (
            keys.packets_in_generation() >= self.ep.limits.rekey_after_packets
            or now - keys.generation_started >= self.ep.limits.rekey_after_seconds
        ) and s.peer_echo == keys.generation & 1:
            keys.update(now)
            self.ep._stats["rekeys"] += 1
        pn = keys.next_pn
        if pn > records.MAX_PN:  # pragma: no cover - 2^62 records
            raise LocalProtocolError("packet number space exhausted; re-handshake")
        # (below 128 one byte is exact: the peer's highest number from us is below pn,
        # so the nearest to its next expected one with these 8 bits is pn, RFC 9000 A.3)
        pn_len = 1 if pn < 128 else 3 if pn - s.pn_floor >= (1 << 14) else 2
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
        s.last_sealed = now
        if self.ep._observer is not None:
            self.ep._observer(hashlib.sha256(keys.key).digest()[:8], pn)
        sealed = keys.aead.encrypt(records.nonce(pn), plaintext, header)
        self.ep._stats["records_out"] += 1
        return self.ep._transmit(s, header + sealed)

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
        now = self.ep._clock()
        hdr = records.parse_header(data)
        if hdr is None:
            return self.ep._drop(addr, "malformed_record", len(data))
        s = self.ep._sessions.get(hdr.sid)
        if s is None:
            # (well-formed: a header and a tag at least, so the 3-byte hint is smaller)
            return self.ep._lost.on_unknown(hdr.sid, addr, len(data))
        if s.recv is None:
            return self.ep._drop(addr, "no_keys", len(data))
        pn = records.expand_pn(s.replay.highest, hdr.truncated_pn, hdr.pn_len)
        if s.replay.too_old(pn):
            return self.ep._drop(addr, "too_old", len(data))
        if not s.replay.fresh(pn):
            return self.ep._drop(addr, "replay", len(data))
        aead, generation, new_key = s.recv.select(hdr.key_phase, pn, now)
        plaintext = records.open_record(aead, pn, hdr.raw, data[len(hdr.raw) :])
        if plaintext is None:
            return self.ep._drop(addr, "auth_failed", len(data))
        if hdr.control and (not plaintext or plaintext[0] not in _CONTROL_TYPES):
            return self.ep._drop(addr, "bad_control", len(data))
        # ---- authentic and fresh: commit.
        newest = pn > s.replay.highest
        s.replay.mark(pn)
        s.recv.commit(generation, new_key, pn, now, self.ep.limits.old_key_lifetime)
        if new_key is not None:
            self.ep._dirty.add(s.local_sid)  # a previous key to expire
        s.last_recv = now
        if s.send is not None:
            s.pn_floor = s.send.next_pn
        if newest:
            s.peer_echo = hdr.echo
        self.ep._stats["records_in"] += 1
        events: list[Event] = []
        if s.state in (State.XX_SENT_3, State.IK_RECEIVED_1):
            s.state = transition(s.state, Input.RECV_RECORD)
            self.ep._unvalidated_ik.discard(s.local_sid)
            # (an IK responder kept message 2 to answer a retransmitted message 1: a
            # record from the initiator shows it has message 2, so it is let go)
            s.hs_message = None
            s.hs_next = None
            if not s.initiator and addr == s.addr:
                s.validated = True
        ch = self.ep._channels.get(s.channel) if s.channel is not None else None
        current = ch is not None and ch.session is s
        if addr != s.addr:
            if newest and current and ch is not None:
                events += self._migrate(s, ch, addr, len(data), now)
        elif not s.validated:
            s.budget_in += len(data)
        if hdr.control:
            if current and ch is not None:
                events.append(Heard(ch.id))
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
        self.ep._stats["migrations"] += 1
        s.addr = addr
        ch.addr = addr
        s.validated = False
        s.budget_in = size
        s.budget_out = 0
        s.challenge = self.ep._rng(CHALLENGE_LEN)
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
            self.ep._stats["paths_validated"] += 1
        return []

    def _seal_to(self, s: _Session, plaintext: bytes, addr: Address, now: float) -> list[Event]:
        """Answer a path challenge from an address other than the session's (small, 1:1)."""
        saved, saved_valid = s.addr, s.validated
        s.addr, s.validated = addr, True
        try:
            return self._seal(s, plaintext, control=True, now=now)
        finally:
            s.addr, s.validated = saved, saved_valid
