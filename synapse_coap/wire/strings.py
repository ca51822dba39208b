"""The session string table: identifiers both ends have seen are sent as short references.

Sans-I/O.  One :class:`SenderStrings` per client session, one
:class:`ReceiverStrings` per server session (per Noise session: a new
handshake or a restarted server starts with an empty table).  Plain CoAP never
uses it.  Wire format and reasoning: docs/wire-body.md ("Session string table").

* The client numbers every request whose JSON body contains identifiers with a
  **sequence number** (``String-Seq`` option, a uint).  Numbers are never
  reused by a client session, not even across re-handshakes, and a client
  session starts at a random number below 2**24, so a restarted client
  process (whose old retransmissions may still arrive over a retired Noise
  session of the same channel) does not reuse its predecessor's numbers.
* The *identifiers of a request* are computed from the JSON value alone
  (:func:`identifiers`): the distinct 32-byte hash identifiers (``$`` event
  ids, ``!`` room ids of room version 12) in document order, at most
  :data:`MAX_IDS`.  Both ends compute the same list, because the body codec
  is exact.
* The receiver records that list under the sequence number whenever it
  decodes a request completely.  The sender references an identifier only
  from a request whose **2.xx response it has received** (so the receiver
  certainly decoded, hence recorded, it), as ``(d, pos)``: ``d`` = current
  sequence number minus the referenced one (1..:data:`WINDOW`), ``pos`` = the
  position in that request's list.
* Loss: an unacknowledged request is never referenced.  Duplicates and
  retransmissions carry the same content under the same number, so recording
  them again changes nothing.  Reordering: references name a sequence number,
  not "the n-th thing received".  If the receiver ever sees one number with
  two different lists (only possible if a peer restarted and reused numbers on
  the same table), the number is poisoned: references to it fail.
* A reference the receiver does not have (evicted, poisoned, new session)
  raises :class:`UnknownStringReference`; the server answers 4.00 with the
  ``String-Reset`` option, the client forgets its acknowledgements and resends
  once without references.  A wrong decode is impossible: a reference is
  resolved only from the exact list recorded under that number.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from synapse_coap.errors import RemoteProtocolError

#: How far back (in sequence numbers) a reference may point.
WINDOW = 16
#: Identifiers recorded per request (the first ones, in document order).
MAX_IDS = 64
#: Entries a receiver keeps (numbers older than the highest seen minus this are dropped).
RECEIVER_CAPACITY = 2 * WINDOW
#: Sequence numbers are sent as uints of at most 4 bytes; a session that would
#: go past this stops using the table.
MAX_SEQ = (1 << 32) - 1

#: A client session's first sequence number is random below this (3-byte values), so
#: a restarted client process does not reuse the numbers of its predecessor.
RANDOM_START = 1 << 24

#: CBOR tags (1-byte heads) carrying a reference (a uint) in the body codec.
TAG_REF = 4  # uint (d - 1) * 8 + pos, pos < 8
TAG_REF_WIDE = 5  # uint (d - 1) * MAX_IDS + pos
_NARROW = 8

_ID_LEN = 44
_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class UnknownStringReference(RemoteProtocolError):
    """A request referenced a table entry this receiver does not have (answer String-Reset)."""


def _is_hash_id(s: str) -> bool:
    if len(s) != _ID_LEN or s[0] not in "$!" or not set(s[1:]) <= _URLSAFE:
        return False
    try:
        raw = base64.urlsafe_b64decode(s[1:] + "=")
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == s[1:]


def identifiers(value: Any) -> tuple[str, ...]:
    """The distinct 32-byte identifiers in ``value`` (values, not keys), document order.

    Iterative (any depth), at most :data:`MAX_IDS`.
    """
    found: dict[str, None] = {}
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        if isinstance(item, str):
            if item not in found and _is_hash_id(item):
                found[item] = None
                if len(found) >= MAX_IDS:
                    break
        elif isinstance(item, dict):
            stack.append(iter(item.values()))
        elif isinstance(item, (list, tuple)):
            stack.append(iter(item))
    return tuple(found)


_END = object()


def encode_ref(d: int, pos: int) -> tuple[int, int]:
    """(tag, uint) for a reference ``d`` requests back, position ``pos``."""
    if pos < _NARROW:
        return TAG_REF, (d - 1) * _NARROW + pos
    return TAG_REF_WIDE, (d - 1) * MAX_IDS + pos


def decode_ref(tag: int, n: int) -> tuple[int, int]:
    """(d, pos) from a reference's tag and uint."""
    d, pos = divmod(n, _NARROW if tag == TAG_REF else MAX_IDS)
    return d + 1, pos


class SenderStrings:
    """Client side: which requests' identifiers the peer certainly has."""

    def __init__(self, first_seq: int | None = None) -> None:
        if first_seq is None:
            first_seq = int.from_bytes(os.urandom(3), "big") % RANDOM_START
        self._next = first_seq
        self._pending: dict[int, tuple[str, ...]] = {}
        self._acked: dict[int, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"<SenderStrings next={self._next} acked={len(self._acked)}>"

    @property
    def next_seq(self) -> int:
        return self._next

    def begin(self, ids: Sequence[str]) -> tuple[int, dict[str, tuple[int, int]]] | None:
        """Number a request with these identifiers; returns (seq, references) or None.

        ``references`` maps an identifier to the body codec's (tag, uint).
        None = the session ran out of sequence numbers: send without the table.
        """
        if not ids or self._next > MAX_SEQ:
            return None
        seq = self._next
        self._next += 1
        refs: dict[str, tuple[int, int]] = {}
        for old in sorted(self._acked, reverse=True):
            d = seq - old
            if d > WINDOW:
                break
            for pos, ident in enumerate(self._acked[old]):
                if ident not in refs:
                    refs[ident] = encode_ref(d, pos)
        self._pending[seq] = tuple(ids)
        for old in [s for s in self._pending if s <= seq - WINDOW]:
            del self._pending[old]
        return seq, refs

    def acknowledge(self, seq: int) -> None:
        """A 2.xx response to request ``seq`` arrived: the peer recorded its identifiers."""
        ids = self._pending.pop(seq, None)
        if ids is None or seq <= self._next - 1 - WINDOW:
            return
        self._acked[seq] = ids
        horizon = self._next - WINDOW
        for old in [s for s in self._acked if s < horizon]:
            del self._acked[old]

    def forget(self) -> None:
        """The peer lost its table (or a new session began): reference nothing known so far.

        The sequence counter continues, so a number is never reused.
        """
        self._pending.clear()
        self._acked.clear()


class ReceiverStrings:
    """Server side: sequence number -> identifiers of recently decoded requests."""

    def __init__(self, capacity: int = RECEIVER_CAPACITY) -> None:
        self._capacity = capacity
        self._entries: dict[int, tuple[str, ...] | None] = {}  # None = poisoned
        self._highest = -1

    def __repr__(self) -> str:
        return f"<ReceiverStrings entries={len(self._entries)} highest={self._highest}>"

    def __len__(self) -> int:
        return len(self._entries)

    def resolver(self, seq: int) -> _Resolver:
        return _Resolver(self._entries, seq)

    def record(self, seq: int, ids: Sequence[str]) -> None:
        """A request numbered ``seq`` was decoded completely; remember its identifiers."""
        if not 0 <= seq <= MAX_SEQ or seq <= self._highest - self._capacity:
            return
        new = tuple(ids[:MAX_IDS])
        if seq in self._entries:
            if self._entries[seq] != new:
                self._entries[seq] = None  # two contents under one number: never resolve it
            return
        self._entries[seq] = new
        if seq > self._highest:
            self._highest = seq
            horizon = seq - self._capacity
            for old in [s for s in self._entries if s <= horizon]:
                del self._entries[old]


class _Resolver:
    """Resolves (tag, uint) references of one request against a receiver's table."""

    def __init__(self, entries: Mapping[int, tuple[str, ...] | None], seq: int) -> None:
        self._entries = entries
        self._seq = seq

    def __call__(self, tag: int, n: int) -> str:
        d, pos = decode_ref(tag, n)
        if d > WINDOW:
            raise RemoteProtocolError(f"string reference {d} requests back is outside the window")
        ids = self._entries.get(self._seq - d)
        if ids is None or pos >= len(ids):
            raise UnknownStringReference(
                f"no identifier {pos} recorded for request {self._seq - d} in this session"
            )
        return ids[pos]


__all__ = [
    "MAX_IDS",
    "TAG_REF",
    "TAG_REF_WIDE",
    "WINDOW",
    "ReceiverStrings",
    "SenderStrings",
    "UnknownStringReference",
    "decode_ref",
    "encode_ref",
    "identifiers",
]
