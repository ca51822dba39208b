"""Small unauthenticated datagrams: the *unknown session* hint, the NAT ping and the path hint.

A responder that restarted (or expired a session) drops every record for a
session id it does not hold. Its peer would only find out when one of its
requests went unanswered long enough, and a client that is idle on push sends
no request at all: only keep-alives, which are one-way. So a well-formed
record for an unknown session id is answered with a hint::

    UNKNOWN_SESSION  0x88  sid(2)                                  (3 bytes)

``sid`` is the session id of the record's header (the receiver-chosen id the
peer addressed). The hint is unauthenticated: the responder holds no key for
that session any more. It is therefore only a *suggestion* to check:

* it is sent only for a record at least as long as the smallest record (a
  header and a tag), so a reply is at most 3/20 of what provoked it, and at
  most :data:`HINT_RATE` per second (burst :data:`HINT_BURST`) per endpoint;
* it is acted on only by the initiator of an established session whose peer
  session id is ``sid`` and whose peer address is the hint's source; at most
  :data:`HINT_RATE` hints a second are looked at; a responder ignores it (its initiator will
  re-handshake itself);
* acting on it is :meth:`NoiseEndpoint.suspect_lost`: a fresh IK handshake
  while the old session keeps working, moved to only when it completes, with
  the re-handshake holdoff that doubles each time a re-handshake proves
  useless. A forged hint costs the victim at most one handshake per holdoff
  and never breaks its session.

**NAT pings.** A NAT mapping only needs *some* datagram from the initiator
now and then, not a sealed one, so most keep-alives are a 3-byte ping::

    NAT_PING         0x89  sid(2)                                  (3 bytes)
    PATH_HINT        0x8a  sid(2)                                  (3 bytes)

``sid`` is the responder's id of the session (as in a record's header). The
initiator sends a sealed keep-alive record instead when it has sealed
nothing for :data:`PING_AUTH_EVERY` keep-alive intervals (capped at two thirds
of its ``idle_timeout``): that record is what keeps the responder's session
from expiring. A responder that gets a ping

* for a session it holds, from that session's address: does nothing but
  report the channel as heard from (``pings.in``; a parked push notification
  may go again: transport/push.py);
* for a session id it does not hold: answers the unknown-session hint, as for
  a record (so a restarted server is found by the next ping);
* for a session it holds, from another address (a NAT rebinding): answers
  ``PATH_HINT``; the initiator of the established session with that peer id,
  hearing it from the peer's address, sends a sealed keep-alive at once, which
  moves the responder's session to the new address (path validation as for
  any record from a new address).

Both answers are as long as the ping (3 bytes) and share the hint budget
(:data:`HINT_RATE` a second); a forged path hint costs the victim one sealed
keep-alive (at most :data:`HINT_RATE` a second are looked at). A ping is never
authentic: it keeps no session alive and moves no path by itself.

See docs/security.md ("Unknown-session hint", "NAT pings").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from synapse_coap.noise.events import Address, Event, Heard, Transmit
from synapse_coap.noise.limits import CTRL_PING
from synapse_coap.noise.ratelimit import TokenBucket

if TYPE_CHECKING:
    from synapse_coap.noise.endpoint import NoiseEndpoint
    from synapse_coap.noise.sessions import _Channel

logger = logging.getLogger("synapse_coap.noise.endpoint")

UNKNOWN_SESSION = 0x88
NAT_PING = 0x89
PATH_HINT = 0x8A
#: the first bytes handled here
SMALL_TYPES = frozenset((UNKNOWN_SESSION, NAT_PING, PATH_HINT))
HINT_LEN = 3
#: a keep-alive is a sealed record (not a ping) when nothing was sealed for this many
#: keep-alive intervals (capped at 2/3 of the idle timeout)
PING_AUTH_EVERY = 3
#: hints sent, and hints acted on, per second per endpoint (token bucket)
HINT_RATE = 10.0
HINT_BURST = 20.0


def hint(sid: int, kind: int = UNKNOWN_SESSION) -> bytes:
    """The hint (or ping: ``kind``) for session id ``sid``."""
    return bytes([kind]) + (sid & 0xFFFF).to_bytes(2, "big")


class _LostHints:
    """Sends and acts on the hints and NAT pings of one endpoint (see the module docstring)."""

    def __init__(self, ep: NoiseEndpoint) -> None:
        self.ep = ep
        self._send = TokenBucket(HINT_RATE, HINT_BURST)
        self._act = TokenBucket(HINT_RATE, HINT_BURST)

    def on_small(self, data: bytes, addr: Address) -> list[Event]:
        """A datagram whose first byte is in :data:`SMALL_TYPES`."""
        if data[0] == UNKNOWN_SESSION:
            return self.on_hint(data, addr)
        if len(data) != HINT_LEN:
            return self.ep._drop(addr, "malformed_handshake", len(data))
        if data[0] == NAT_PING:
            return self.on_ping(data, addr)
        return self.on_path_hint(data, addr)

    def on_unknown(
        self, sid: int, addr: Address, size: int, *, kind: int = UNKNOWN_SESSION
    ) -> list[Event]:
        """A well-formed record of ``size`` bytes (or a ping) for the unknown session
        ``sid``; with ``kind=PATH_HINT``, a ping from a new address."""
        ep = self.ep
        name = "lost_hints" if kind == UNKNOWN_SESSION else "path_hints"
        events = ep._drop(
            addr, "unknown_session" if kind == UNKNOWN_SESSION else "ping_moved", size
        )
        if not self._send.take(ep._clock()):
            ep._stats[f"{name}.suppressed"] += 1
            return events
        data = hint(sid, kind)
        ep._stats[f"{name}.sent"] += 1
        ep._stats["datagrams_out"] += 1
        ep._stats["bytes_out"] += len(data)
        events.append(Transmit(addr, data))
        return events

    def on_ping(self, data: bytes, addr: Address) -> list[Event]:
        """A NAT ping (responder side; see the module docstring)."""
        ep = self.ep
        sid = int.from_bytes(data[1:3], "big")
        s = ep._sessions.get(sid)
        if s is None or s.recv is None or s.initiator:
            return self.on_unknown(sid, addr, len(data))
        if s.addr != addr:
            return self.on_unknown(sid, addr, len(data), kind=PATH_HINT)
        ep._stats["pings.in"] += 1
        # (the peer may be back after an outage: a parked notification may go again;
        # a forger who knows the address, both ports and the id can wake at most what
        # the park timer would send anyway, to the session's own address)
        ch = ep._channels.get(s.channel) if s.channel is not None else None
        return [Heard(ch.id)] if ch is not None and ch.session is s else []

    def _initiated(
        self, data: bytes, addr: Address, limited: str, unexpected: str
    ) -> _Channel | list[Event]:
        """The channel a hint from ``addr`` is about (we initiated it, its current
        session's peer id is the hint's), or the drop events."""
        ep = self.ep
        if len(data) != HINT_LEN:
            return ep._drop(addr, "malformed_handshake", len(data))
        # (the budget is taken before the search, a pass over the channels: a flood
        # of forged hints costs at most HINT_RATE passes a second; it can delay a
        # real hint, which the next keep-alive brings again)
        if not self._act.take(ep._clock()):
            return ep._drop(addr, limited, len(data))
        sid = int.from_bytes(data[1:3], "big")
        for ch in ep._channels.values():
            s = ch.session
            if (
                ch.initiator
                and s is not None
                and s.send is not None
                and s.remote_sid == sid
                and s.addr == addr
            ):
                return ch
        return ep._drop(addr, unexpected, len(data))

    def on_path_hint(self, data: bytes, addr: Address) -> list[Event]:
        """The peer heard our ping from another address: prove the new one."""
        ep = self.ep
        target = self._initiated(data, addr, "path_hint_limited", "unexpected_path_hint")
        if isinstance(target, list):
            return target
        s = target.session
        assert s is not None
        ep._stats["path_hints.received"] += 1
        logger.info("noise: %s heard us from a new address (channel %d)", addr, target.id)
        ep._stats["keepalives"] += 1
        events: list[Event] = ep._records._send_record(
            s, bytes([CTRL_PING]), control=True, now=ep._clock()
        )
        return events

    def on_hint(self, data: bytes, addr: Address) -> list[Event]:
        ep = self.ep
        target = self._initiated(data, addr, "lost_hint_limited", "unexpected_lost_hint")
        if isinstance(target, list):
            return target
        ep._stats["lost_hints.received"] += 1
        logger.info(
            "noise: %s no longer knows our session (channel %d): re-handshaking",
            addr,
            target.id,
        )
        return ep.suspect_lost(target.id)
