"""Push notifications sent relative to an earlier one (their *base*).

Sans-I/O. Successive ``/sync`` notifications of one Observe registration look
alike: the same room ids, the same counters and empty sections, a
``next_batch`` one component away from the previous one, a ``prev_batch``
equal to it. A notification may therefore be compressed with the CBOR of an
earlier notification of the same registration appended to the profile's
DEFLATE dictionary (body marker 0xfe, docs/wire-body.md section 6); the
earlier one is named by ``d``, the difference of the two Observe numbers
(mod 2**24), a CBOR uint after the marker. Between the profile dictionary and
the base comes the registration's *template* (:func:`template`: a typical
one-message notification made of the registration's ``since``, which both ends
read from the registration's target); ``d = 0`` names the template alone, the
base of a registration's first notification.

Exact or refused, under loss, duplication, re-sends after a park:

* The server (:class:`ServerBase`, one per observation) uses as base only the
  last notification it knows was *delivered*: acknowledged, and fully fetched
  when it was larger than one block. The client acknowledges a notification
  only after receiving it whole, and decodes it before it can ask for anything
  else, so it holds that notification's CBOR, unless its decoding failed, in
  which case it registers again (a new registration starts without a base).
* The client (:class:`ClientBases`, one per registration request, so one per
  CoAP token, never reused) keeps the CBOR of the last :data:`KEPT`
  notifications it decoded, by Observe number, plus the base it last decoded
  with: a notification re-sent (with a new Observe number) or duplicated names
  the same base and decodes the same; the server moves its base only to a
  notification the client has received, so the base named is kept (a stale
  notification, older than the newest decoded one in the sense of RFC 7641
  §3.4, is decoded if its base is still there but changes nothing kept).
* A base the client does not hold raises :class:`UnknownBase` (an undecodable
  notification: the sidecar registers again from its last position). A
  notification is never decoded against other bytes than the ones it was
  encoded with: an Observe number names one notification of one registration
  (the numbers of a registration do not repeat within 2**24 notifications,
  far more than the client keeps).
* Only notifications whose CBOR is at most :data:`BASE_MAX` bytes serve as a
  base, on both ends (larger ones are rarely followed by similar ones, and the
  client keeps less).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs

from synapse_coap.wire.strings import UnknownStringReference

#: The registration's template (:func:`template`): the JSON of a notification of one
#: new message, as Synapse writes it for a client with nio's filter, with the
#: registration's ``since`` where the tokens go. Part of the wire format: changing it
#: changes what relative notifications decode to (both ends upgrade together).
_TEMPLATE_ROOM = "!" + "A" * 43
_TEMPLATE_EVENT = "$" + "A" * 43


def template(since: str) -> dict[str, Any]:
    """The JSON value whose CBOR precedes every base (and is the base ``d = 0``)."""
    return {
        "next_batch": since,
        "device_one_time_keys_count": {"signed_curve25519": 0},
        "device_unused_fallback_key_types": [],
        "rooms": {
            "join": {
                _TEMPLATE_ROOM: {
                    "timeline": {
                        "events": [
                            {
                                "content": {"body": "", "msgtype": "m.text"},
                                "event_id": _TEMPLATE_EVENT,
                                "origin_server_ts": 1796380982722,
                                "sender": "@a:b",
                                "type": "m.room.message",
                                "unsigned": {"age": 0, "membership": "join"},
                            }
                        ],
                        "prev_batch": since,
                        "limited": False,
                    },
                    "state": {"events": []},
                    "account_data": {"events": []},
                    "ephemeral": {"events": []},
                    "unread_notifications": {"notification_count": 0, "highlight_count": 0},
                    "summary": {},
                }
            }
        },
    }


#: Observe numbers are 24-bit (RFC 7641 §4.4): a base's distance is taken mod this.
OBSERVE_MODULUS = 1 << 24
#: The CBOR of a notification serving as a base is at most this long.
BASE_MAX = 8 * 1024
_HALF = OBSERVE_MODULUS // 2
#: Notifications a client keeps as possible bases (besides the one it last decoded with).
KEPT = 4


class UnknownBase(UnknownStringReference):
    """A notification names a base this client does not hold (register again)."""


@attrs.frozen
class Base:
    """A notification's base: ``d`` Observe numbers back (0: the template alone),
    ``cbor``: what follows the profile dictionary in the preset dictionary (the
    registration's template, then the base's CBOR), and the String-Seq its string
    table references resolve against (its own option, or inherited from its own
    base; None: none)."""

    d: int
    cbor: bytes
    string_seq: int | None = None


@attrs.frozen
class Kept:
    """What both ends keep of a notification: its body's CBOR (None: no compact
    body, it cannot be a base) and its effective String-Seq."""

    cbor: bytes | None
    string_seq: int | None = None


class ServerBase:
    """The server's side, for one observation: the last delivered notification.

    ``template``: the CBOR of the registration's :func:`template` (None: the
    registration has no ``since``; then the first notification has no base)."""

    def __init__(self, template: bytes | None = None) -> None:
        self._template = template
        self._base: tuple[int, Kept] | None = None

    def for_notification(self, seq: int) -> Base | None:
        """The base of the notification to be sent with Observe number ``seq``."""
        prefix = self._template or b""
        if self._base is None:
            return None if self._template is None else Base(0, prefix)
        base_seq, kept = self._base
        d = (seq - base_seq) % OBSERVE_MODULUS
        if not d or kept.cbor is None:
            return None
        return Base(d, prefix + kept.cbor, kept.string_seq)

    def delivered(self, seq: int, kept: Kept) -> None:
        """The notification numbered ``seq`` was delivered (:meth:`WireCodec.notification_kept`)."""
        ok = kept.cbor is not None and len(kept.cbor) <= BASE_MAX
        self._base = (seq, kept) if ok else None


class ClientBases:
    """The client's side, for one registration: the CBOR of recent notifications.
    ``template``: as :class:`ServerBase`'s (the same registration's)."""

    def __init__(self, template: bytes | None = None) -> None:
        self.template = template
        self._recent: OrderedDict[int, Kept] = OrderedDict()
        self._used: tuple[int, Kept] | None = None
        self._newest: int | None = None

    def __repr__(self) -> str:
        return f"<ClientBases kept={list(self._recent)}>"

    def view(self, seq: int | None) -> NotificationBase:
        """The bases for decoding the notification numbered ``seq``."""
        return NotificationBase(self, seq)

    def _lookup(self, seq: int) -> Kept | None:
        if self._used is not None and self._used[0] == seq:
            return self._used[1]
        return self._recent.get(seq)

    def _decoded(self, seq: int, kept: Kept, used: tuple[int, Kept] | None) -> None:
        if self._newest is not None and not 0 < (seq - self._newest) % OBSERVE_MODULUS < _HALF:
            return  # a stale notification (reordered, or a late duplicate): keep what we have
        self._newest = seq
        if used is not None:
            self._used = used
        if kept.cbor is None or len(kept.cbor) > BASE_MAX:
            # cannot be a base: forget a stale entry under this number
            self._recent.pop(seq, None)
            return
        self._recent[seq] = kept
        self._recent.move_to_end(seq)
        while len(self._recent) > KEPT:
            self._recent.popitem(last=False)


class NotificationBase:
    """One notification's decoding: resolves its base (``d`` back) and, once the whole
    notification decoded, records what is kept of it (:meth:`commit`)."""

    def __init__(self, bases: ClientBases, seq: int | None) -> None:
        self._bases = bases
        self._seq = seq
        self._used: tuple[int, Kept] | None = None
        #: set by the codec once the notification decoded
        self.kept = Kept(None)

    def __call__(self, d: int) -> bytes:
        if self._seq is None or not 0 <= d < OBSERVE_MODULUS:
            raise UnknownBase("a base outside an Observe notification")
        prefix = self._bases.template
        if d == 0:
            if prefix is None:
                raise UnknownBase("a template base, and a registration without since")
            return prefix
        base_seq = (self._seq - d) % OBSERVE_MODULUS
        kept = self._bases._lookup(base_seq)
        if kept is None or kept.cbor is None:
            raise UnknownBase(f"no notification {base_seq} kept as a base")
        self._used = (base_seq, kept)
        return (prefix or b"") + kept.cbor

    @property
    def base_string_seq(self) -> int | None:
        """The effective String-Seq of the base this notification was decoded against
        (None: no base resolved yet, or the base has none)."""
        return None if self._used is None else self._used[1].string_seq

    def commit(self) -> None:
        """The notification decoded completely: keep it as a possible base."""
        if self._seq is not None:
            self._bases._decoded(self._seq, self.kept, self._used)


__all__ = [
    "BASE_MAX",
    "KEPT",
    "OBSERVE_MODULUS",
    "Base",
    "ClientBases",
    "Kept",
    "NotificationBase",
    "ServerBase",
    "UnknownBase",
    "template",
]
