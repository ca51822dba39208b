"""The *unknown session* hint: telling a peer, cheaply, that its session is gone here.

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

See docs/security.md ("Unknown-session hint").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from synapse_coap.noise.events import Address, Event, Transmit
from synapse_coap.noise.ratelimit import TokenBucket

if TYPE_CHECKING:
    from synapse_coap.noise.endpoint import NoiseEndpoint

logger = logging.getLogger("synapse_coap.noise.endpoint")

UNKNOWN_SESSION = 0x88
HINT_LEN = 3
#: hints sent, and hints acted on, per second per endpoint (token bucket)
HINT_RATE = 10.0
HINT_BURST = 20.0


def hint(sid: int) -> bytes:
    """The hint for a record addressed to session id ``sid``."""
    return bytes([UNKNOWN_SESSION]) + (sid & 0xFFFF).to_bytes(2, "big")


class _LostHints:
    """Sends and acts on unknown-session hints for one endpoint (see the module docstring)."""

    def __init__(self, ep: NoiseEndpoint) -> None:
        self.ep = ep
        self._send = TokenBucket(HINT_RATE, HINT_BURST)
        self._act = TokenBucket(HINT_RATE, HINT_BURST)

    def on_unknown(self, sid: int, addr: Address, size: int) -> list[Event]:
        """A well-formed record of ``size`` bytes for the unknown session ``sid``."""
        ep = self.ep
        events = ep._drop(addr, "unknown_session", size)
        if not self._send.take(ep._clock()):
            ep._stats["lost_hints.suppressed"] += 1
            return events
        data = hint(sid)
        ep._stats["lost_hints.sent"] += 1
        ep._stats["datagrams_out"] += 1
        ep._stats["bytes_out"] += len(data)
        events.append(Transmit(addr, data))
        return events

    def on_hint(self, data: bytes, addr: Address) -> list[Event]:
        ep = self.ep
        if len(data) != HINT_LEN:
            return ep._drop(addr, "malformed_handshake", len(data))
        # (the budget is taken before the search, a pass over the channels: a flood
        # of forged hints costs at most HINT_RATE passes a second; it can delay a
        # real hint, which the next keep-alive brings again)
        if not self._act.take(ep._clock()):
            return ep._drop(addr, "lost_hint_limited", len(data))
        sid = int.from_bytes(data[1:3], "big")
        target = None
        for ch in ep._channels.values():
            s = ch.session
            if (
                ch.initiator
                and s is not None
                and s.send is not None
                and s.remote_sid == sid
                and s.addr == addr
            ):
                target = ch
                break
        if target is None:
            return ep._drop(addr, "unexpected_lost_hint", len(data))
        ep._stats["lost_hints.received"] += 1
        logger.info(
            "noise: %s no longer knows our session (channel %d): re-handshaking",
            addr,
            target.id,
        )
        return ep.suspect_lost(target.id)
