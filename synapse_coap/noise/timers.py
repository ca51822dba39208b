"""The timers of the Noise endpoint, a part of
:class:`~synapse_coap.noise.endpoint.NoiseEndpoint` split out by responsibility:
handshake retransmissions and timeouts, reply waits, idle expiry and
keep-alives, kept in a heap with one entry per session deadline (stale entries
are dropped or pushed back when they come up), so that no timer question scans
all sessions. It works on the endpoint's session table through ``self.ep``.
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING

from synapse_coap.noise.events import (
    Event,
)
from synapse_coap.noise.handshake import (
    State,
)
from synapse_coap.noise.limits import (
    CTRL_PING,
)
from synapse_coap.noise.lost import NAT_PING, PING_AUTH_EVERY, hint
from synapse_coap.noise.sessions import _Session

if TYPE_CHECKING:
    from synapse_coap.noise.endpoint import NoiseEndpoint

logger = logging.getLogger("synapse_coap.noise.endpoint")


class _Timers:
    """The timers of one endpoint."""

    def __init__(self, ep: NoiseEndpoint) -> None:
        self.ep = ep
        #: sessions whose deadline was computed, ever (tests: the heap looks at few)
        self.deadlines_computed = 0

    def next_timer(self) -> float | None:
        """When :meth:`handle_timers` should next be called (None: no timer)."""
        self._flush_dirty()
        heap = self.ep._timers
        while heap:
            at, serial, sid = heap[0]
            s = self.ep._sessions.get(sid)
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

    def _session_deadline(self, s: _Session) -> float | None:
        """The earliest time :meth:`_session_timers` has something to do for ``s``."""
        self.deadlines_computed += 1
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
            idle = self._idle_since(s) + self.ep.limits.idle_timeout
            if best is None or idle < best:
                best = idle
            if self._keeps_alive(s):
                assert self.ep.keepalive_interval is not None
                ping = s.last_sent + self.ep.keepalive_interval
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
        if not self.ep._dirty:
            return
        for sid in self.ep._dirty:
            s = self.ep._sessions.get(sid)
            if s is None:
                continue
            due = self._session_deadline(s)
            if due is not None:
                heapq.heappush(self.ep._timers, (due, s.serial, sid))
        self.ep._dirty.clear()

    def _keeps_alive(self, s: _Session) -> bool:
        """True if ``s`` is the established current session of a channel we initiated
        and keep-alives are on."""
        if self.ep.keepalive_interval is None or not s.initiator or s.send is None:
            return False
        if s.state is not State.ESTABLISHED or s.channel is None:
            return False
        ch = self.ep._channels.get(s.channel)
        return ch is not None and ch.session is s

    def _idle_since(self, s: _Session) -> float:
        if self._keeps_alive(s):
            return max(s.last_recv, s.last_sent)
        return s.last_recv

    def handle_timers(self) -> list[Event]:
        now = self.ep._clock()
        events: list[Event] = []
        self._flush_dirty()
        heap = self.ep._timers
        due: dict[int, _Session] = {}
        while heap and heap[0][0] <= now:
            _at, serial, sid = heapq.heappop(heap)
            s = self.ep._sessions.get(sid)
            if s is not None and s.serial == serial:
                due[serial] = s
        # in creation order, as a scan of all sessions would visit them
        for serial in sorted(due):
            s = due[serial]
            if self.ep._sessions.get(s.local_sid) is not s:
                continue
            events += self._session_timers(s, now)
            if self.ep._sessions.get(s.local_sid) is s:
                self.ep._dirty.add(s.local_sid)  # its next deadline goes back on the heap
        while self.ep._recent:
            key, (_sid, expiry) = next(iter(self.ep._recent.items()))
            if expiry > now:
                break
            del self.ep._recent[key]
        return events

    def _session_timers(self, s: _Session, now: float) -> list[Event]:
        events: list[Event] = []
        if s.retired_until is not None:
            if now >= s.retired_until:
                self.ep._forget_session(s)
            return events
        if s.recv is not None:
            s.recv.expire(now)
        if s.state in (State.IK_SENT_1, State.XX_SENT_1, State.XX_SENT_3):
            if now >= s.hs_deadline:
                events += self.ep._initiator._initiator_timeout(s, now)
                return events
            if s.hs_next is not None and now >= s.hs_next:
                events += self.ep._initiator._retransmit_handshake(s, now)
        elif s.state is State.IK_RECEIVED_1:
            if s.reply_due is not None and now >= s.reply_due:
                events += self.ep._responder._flush_ik_reply(s, now)
        elif s.state is State.XX_RECEIVED_1 and now >= s.hs_deadline:
            self.ep._stats["handshakes.expired"] += 1
            events += self.ep._expire_session(s, "handshake not confirmed")
            return events
        if s.send is not None and now >= self._idle_since(s) + self.ep.limits.idle_timeout:
            events += self.ep._expire_session(s, "idle")
            return events
        if self._keeps_alive(s):
            assert self.ep.keepalive_interval is not None
            interval = self.ep.keepalive_interval
            if now >= s.last_sent + interval:  # as in _session_deadline
                sealed_within = min(PING_AUTH_EVERY * interval, self.ep.limits.idle_timeout * 2 / 3)
                if (
                    self.ep.keepalive_ping
                    and s.remote_sid is not None
                    and now < s.last_sealed + sealed_within
                ):
                    # (a NAT needs only a datagram: see noise/lost.py "NAT pings")
                    self.ep._stats["pings.out"] += 1
                    events += self.ep._transmit(s, hint(s.remote_sid, NAT_PING))
                else:
                    self.ep._stats["keepalives"] += 1
                    events += self.ep._records._send_record(
                        s, bytes([CTRL_PING]), control=True, now=now
                    )
        return events
