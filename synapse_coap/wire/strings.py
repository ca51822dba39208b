"""The session string table: identifiers both ends have seen are sent as short references.

Sans-I/O.  One :class:`SenderStrings` per client session, one
:class:`ReceiverStrings` per server session (per Noise session: a new
handshake or a restarted server starts with an empty table).  Plain CoAP never
uses it.  Wire format and reasoning: docs/wire-body.md ("Session string table").

* The client numbers every request whose path or JSON body contains
  identifiers, and every request whose response names rooms the client will
  address next (``/sync`` without Observe, ``createRoom``, ``join``,
  ``joined_rooms``: :func:`wants_response_ids`), with a **sequence number**
  (``String-Seq`` option, a uint).  Numbers are never
  reused by a client session, not even across re-handshakes, and a client
  session starts at a random number below 2**24, so a restarted client
  process (whose old retransmissions may still arrive over a retired Noise
  session of the same channel) does not reuse its predecessor's numbers.
* The *identifiers of a request* are computed from the request alone
  (:func:`request_identifiers`): the distinct 32-byte hash identifiers (``$``
  event ids, ``!`` room ids of room version 12) of its path segments, then of
  its JSON body in document order, then the body's longer strings (a
  message's text: :func:`texts`), at most :data:`MAX_IDS`.  Both ends compute
  the same list, because the path and the body codec are exact.
* The receiver records that list under the sequence number whenever it
  decodes a request completely.  When it answers the request with a 2.xx and
  a JSON body, it appends the *identifiers of the response*
  (:func:`response_identifiers`: its room ids first, then its event ids, at
  most :data:`MAX_RESPONSE_IDS`, the list never longer than :data:`MAX_IDS`);
  the client appends the same ones when it decodes that response.  The sender references an identifier only
  from a request whose **2.xx response it has received** (so the receiver
  certainly decoded, hence recorded, it, and sent that response), as ``(d, pos)``: ``d`` = current
  sequence number minus the referenced one (1..:data:`WINDOW`), ``pos`` = the
  position in that request's list.
* Loss: an unacknowledged request is never referenced.  Duplicates and
  retransmissions carry the same content under the same number, so recording
  them again changes nothing; a request executed twice whose two responses
  name different identifiers poisons its number.  (This needs the receiver's
  table to live exactly as long as the Noise session, which it does: it is the
  session's state, and a restarted server has lost the session's keys too.)  Reordering: references name a sequence number,
  not "the n-th thing received".  If the receiver ever sees one number with
  two different lists (only possible if a peer restarted and reused numbers on
  the same table), the number is poisoned: references to it fail.
* A reference the receiver does not have (evicted, poisoned, new session)
  raises :class:`UnknownStringReference`; the server answers 4.00 with the
  ``String-Reset`` option, the client forgets its acknowledgements and resends
  once without references.  A wrong decode is impossible: a reference is
  resolved only from the exact list recorded under that number.
* References appear in the JSON body (tags 4/5) and in route arguments of the
  path (:mod:`synapse_coap.wire.routes`, form ``0x7f``): a message to a room
  the client learnt from ``/sync`` names the room in 2-3 bytes, not 38.
* **The other way, in push notifications only**: the server may reference the
  identifiers recorded under a number ``s`` (the request's own, which the
  client sent, then those of the 2.xx answer the server gave it, which the
  client appended when it decoded that answer), for ``s`` within
  :data:`WINDOW` of the highest number it recorded, ``H``.  The notification
  carries ``String-Seq: H`` (or inherits it from the notification it is
  relative to: :mod:`synapse_coap.wire.push_base`); a reference ``(d, pos)``
  names position ``pos`` of the list of request ``H - (d - 1)``.  The client keeps the lists of its
  last :data:`SENT_HISTORY` numbered requests for this (with the answer's
  identifiers once it got the answer).  A notification it cannot resolve
  (it sent more than ``SENT_HISTORY - WINDOW`` numbered requests the server
  never saw, or it never got the answer whose identifiers are referenced) is
  an undecodable notification: the sidecar registers again from its last
  position, so nothing is lost, and a reference never resolves to anything
  but what the server meant: both lists are built by one function from the
  same request and answer, and a number answered twice differently is never
  referenced.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.wire.body_encode import response_ids_fast
from synapse_coap.wire.body_tables import CBODY

#: How far back (in sequence numbers) a reference may point.
WINDOW = 16
#: Identifiers recorded per request (the first ones, in document order).
MAX_IDS = 64
#: The strings of a request body recorded besides identifiers (:func:`texts`).
MIN_TEXT = 12
MAX_TEXT = 512
MAX_TEXT_TOTAL = 2048
#: Identifiers of a response appended to its request's list (room ids first).
MAX_RESPONSE_IDS = 16
#: Numbered requests whose identifiers a client keeps for the server's references.
SENT_HISTORY = 4 * WINDOW
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


_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` under the table's lock: a table is used from the event loop and
    from the transport's decode threads (large bodies are decoded off the loop)."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper  # type: ignore[return-value]


class UnknownStringReference(RemoteProtocolError):
    """A request referenced a table entry this receiver does not have (answer String-Reset)."""


#: a hash identifier: "$" or "!" and 43 url-safe base64 characters of 32 bytes, in the
#: canonical form (the last character's two low bits are no data and zero: one of the 16
#: characters of index 0, 4, ..., 60), which a decode and encode gives back
_HASH_ID = re.compile(r"[$!][A-Za-z0-9_\-]{42}[AEIMQUYcgkosw048]")


def _is_hash_id(s: str) -> bool:
    return len(s) == _ID_LEN and _HASH_ID.fullmatch(s) is not None


def _strings(value: Any, *, keys: bool = False) -> list[str]:
    """Every string of a JSON value in document order (depth first; map keys too, each
    before its value, when ``keys``), as a list: a request's identifiers and texts are
    read from one walk, without a generator's frame per step. Iterative: any depth."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            if keys:
                for k, v in reversed(item.items()):
                    stack.append(v)
                    stack.append(k)
            else:
                stack.extend(reversed(item.values()))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return out


def identifiers(value: Any) -> tuple[str, ...]:
    """The distinct 32-byte identifiers in ``value`` (values, not keys), document order.

    Iterative (any depth), at most :data:`MAX_IDS`.
    """
    return _identifiers_of(_strings(value))


def _identifiers_of(items: list[str]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for item in items:
        if item not in found and _is_hash_id(item):
            found[item] = None
            if len(found) >= MAX_IDS:
                break
    return tuple(found)


#: Requests whose response names rooms the client addresses next (numbered even
#: without identifiers of their own, so that the response's room ids are recorded).
_RESPONSE_ID_PATH = re.compile(
    rb"^/_matrix/client/(?:v3|r0)/(?:sync|createRoom|joined_rooms|join/[^/?]+)(?:\?|$)"
)


def wants_response_ids(method: str, target: bytes) -> bool:
    """True for a request whose response's room ids are worth recording (see module doc)."""
    return method in ("GET", "POST") and _RESPONSE_ID_PATH.match(target) is not None


def path_identifiers(target: bytes) -> tuple[str, ...]:
    """The distinct hash identifiers among the percent-decoded path segments of ``target``."""
    found: dict[str, None] = {}
    for raw in target.split(b"?", 1)[0].split(b"/"):
        if not 44 <= len(raw) <= 3 * 44:
            continue
        try:
            seg = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _is_hash_id(seg):
            found[seg] = None
    return tuple(found)


def texts(value: Any) -> tuple[str, ...]:
    """The distinct texts of ``value``: string values (not keys) with a space, of
    :data:`MIN_TEXT` to :data:`MAX_TEXT` characters, document order, at most
    :data:`MAX_TEXT_TOTAL` characters in all.  (Identifiers, server names, key ids
    and base64 have no space, and shorter forms of their own.)  A message's text is one: the server's
    push of the client's own message (its echo) references it instead of repeating it."""
    return _texts_of(_strings(value))


def _texts_of(items: list[str]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    total = 0
    for item in items:
        if MIN_TEXT <= len(item) <= MAX_TEXT and " " in item and item not in found:
            total += len(item)
            if total > MAX_TEXT_TOTAL or len(found) >= MAX_IDS:
                break
            found[item] = None
    return tuple(found)


#: the native build's walk of a request's value (``wire/_cbody.c``), or None
_C_REQUEST_STRINGS: Callable[..., Any] | None = getattr(CBODY, "request_strings", None)


def request_identifiers(target: bytes, value: Any = None) -> tuple[str, ...]:
    """The identifiers of a request: its path's, then its JSON body's (``value``), then
    the body's longer strings (:func:`texts`), at most :data:`MAX_IDS`.  ``value`` None:
    no JSON body.

    The body's part in one walk in C where the native build runs (``wire/_cbody.c``:
    the same tuples; a 50-PDU transaction's 500 strings 17 us against 90 in compiled
    Python: ``bench/results/cold_codec-384798a.csv``),
    else, and for a value it does not take (a subclass of dict, list, tuple or str),
    :func:`python_request_identifiers`."""
    if value is None:
        return path_identifiers(target)
    if _C_REQUEST_STRINGS is not None:
        fast: tuple[tuple[str, ...], tuple[str, ...]] | None = _C_REQUEST_STRINGS(
            value, MAX_IDS, MIN_TEXT, MAX_TEXT, MAX_TEXT_TOTAL
        )
        if fast is not None:
            return _merge((path_identifiers(target), fast[0], fast[1]))
    return python_request_identifiers(target, value)


def python_request_identifiers(target: bytes, value: Any) -> tuple[str, ...]:
    """:func:`request_identifiers` of a JSON body by a walk in Python: the reference."""
    items = _strings(value)
    return _merge((path_identifiers(target), _identifiers_of(items), _texts_of(items)))


def response_identifiers(body: bytes) -> tuple[str, ...]:
    """The identifiers of a JSON response body: room ids first, then event ids, document
    order, at most :data:`MAX_RESPONSE_IDS` (() if ``body`` is not JSON).

    In C where the native build runs (``wire/_cenc.c``, one pass over the text: an
    answer's recording cost as much as its encoding), else, and for what that does not
    take, :func:`python_response_identifiers`."""
    if not body:
        return ()
    fast = response_ids_fast(body, MAX_RESPONSE_IDS)
    if fast is not None:
        return fast
    return python_response_identifiers(body)


def python_response_identifiers(body: bytes) -> tuple[str, ...]:
    """:func:`response_identifiers` by ``json.loads`` and a walk over every string: the
    reference (the C scan gives its tuple or leaves the body to it)."""
    if not body:
        return ()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return ()
    rooms: dict[str, None] = {}
    events: dict[str, None] = {}
    # map keys too: /sync names its rooms as keys of rooms.join
    for item in _strings(value, keys=True):
        if _is_hash_id(item):
            (rooms if item[0] == "!" else events)[item] = None
            if len(rooms) >= MAX_RESPONSE_IDS:
                break
    return _merge((rooms, events))[:MAX_RESPONSE_IDS]


def _merge(parts: Iterable[Iterable[str]]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for part in parts:
        for ident in part:
            out[ident] = None
            if len(out) >= MAX_IDS:
                return tuple(out)
    return tuple(out)


def _with_response(ids: tuple[str, ...], response_ids: Sequence[str]) -> tuple[str, ...]:
    """A request's list with its response's identifiers appended (distinct, capped)."""
    return _merge((ids, response_ids))


def encode_ref(d: int, pos: int) -> tuple[int, int]:
    """(tag, uint) for a reference ``d`` requests back, position ``pos``."""
    if pos < _NARROW:
        return TAG_REF, (d - 1) * _NARROW + pos
    return TAG_REF_WIDE, (d - 1) * MAX_IDS + pos


def decode_ref(tag: int, n: int) -> tuple[int, int]:
    """(d, pos) from a reference's tag and uint."""
    d, pos = divmod(n, _NARROW if tag == TAG_REF else MAX_IDS)
    return d + 1, pos


def path_number(tag: int, n: int) -> int:
    """The route-argument form of a body reference: ``(d - 1) * MAX_IDS + pos``."""
    d, pos = decode_ref(tag, n)
    return (d - 1) * MAX_IDS + pos


class SenderStrings:
    """Client side: which requests' identifiers the peer certainly has."""

    def __init__(self, first_seq: int | None = None) -> None:
        if first_seq is None:
            first_seq = int.from_bytes(os.urandom(3), "big") % RANDOM_START
        self._next = first_seq
        self._lock = threading.Lock()
        #: numbers sent in the last WINDOW, not yet acknowledged (their lists: ``_sent``)
        self._pending: set[int] = set()
        self._acked: dict[int, tuple[str, ...]] = {}
        #: the identifiers of every recent numbered request (``SENT_HISTORY`` > ``WINDOW``:
        #: every pending number is here; and for the server's references)
        self._sent: dict[int, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"<SenderStrings next={self._next} acked={len(self._acked)}>"

    @property
    def next_seq(self) -> int:
        return self._next

    @_locked
    def begin(
        self, ids: Sequence[str], *, wants_response: bool = False
    ) -> tuple[int, dict[str, tuple[int, int]]] | None:
        """Number a request with these identifiers; returns (seq, references) or None.

        ``references`` maps an identifier to the body codec's (tag, uint).
        None = nothing to number (no identifiers and no response worth recording),
        or the session ran out of sequence numbers: send without the table.
        """
        if not (ids or wants_response) or self._next > MAX_SEQ:
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
        self._pending.add(seq)
        self._pending.difference_update([s for s in self._pending if s <= seq - WINDOW])
        self._sent[seq] = tuple(ids)
        if len(self._sent) > SENT_HISTORY:
            for old in [s for s in self._sent if s <= seq - SENT_HISTORY]:
                del self._sent[old]
        return seq, refs

    @_locked
    def acknowledge(self, seq: int, response_ids: Sequence[str] = ()) -> None:
        """A 2.xx response to request ``seq`` arrived: the peer recorded its identifiers,
        and ``response_ids`` (:func:`response_identifiers` of that response) after them."""
        if seq not in self._pending:
            return
        self._pending.discard(seq)
        if seq <= self._next - 1 - WINDOW:
            return
        full = _with_response(self._sent[seq], response_ids)
        self._acked[seq] = full
        # the server's notifications may reference the answer's identifiers too
        self._sent[seq] = full
        horizon = self._next - WINDOW
        for old in [s for s in self._acked if s < horizon]:
            del self._acked[old]

    @_locked
    def restate(self, seq: int, ids: Sequence[str]) -> None:
        """Request ``seq`` went out with these identifiers after all (its body was
        sent as plain JSON, without body identifiers)."""
        if seq in self._sent:
            self._sent[seq] = tuple(ids)

    @_locked
    def forget(self) -> None:
        """The peer lost its table (or a new session began): reference nothing known so far.

        The sequence counter continues, so a number is never reused.
        """
        self._pending.clear()
        self._acked.clear()
        # (``_sent`` stays: it is what we sent under numbers never reused, and a server
        # that answered Token-Reset may still hold its string table and reference it)

    def own_resolver(self, base: int) -> Callable[[int, int], str]:
        """Resolves the references of a server's notification carrying ``String-Seq: base``
        against the identifiers of our own numbered requests."""
        sent = self._sent

        def resolve(tag: int, n: int) -> str:
            d, pos = decode_ref(tag, n)
            ids = sent.get(base - (d - 1))
            if ids is None or pos >= len(ids):
                raise UnknownStringReference(
                    f"no identifier {pos} of our request {base - (d - 1)} in this session"
                )
            return ids[pos]

        return resolve


class ReceiverStrings:
    """Server side: sequence number -> identifiers of recently decoded requests."""

    def __init__(self, capacity: int = RECEIVER_CAPACITY) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._entries: dict[int, tuple[str, ...] | None] = {}  # None = poisoned
        #: the request part of each entry (a repeated request must name the same ones)
        self._requests: dict[int, tuple[str, ...]] = {}
        #: numbers whose response identifiers were appended
        self._answered: set[int] = set()
        self._highest = -1

    def __repr__(self) -> str:
        return f"<ReceiverStrings entries={len(self._entries)} highest={self._highest}>"

    def __len__(self) -> int:
        return len(self._entries)

    def resolver(self, seq: int) -> Resolver:
        return Resolver(self._entries, seq)

    @_locked
    def record(self, seq: int, ids: Sequence[str]) -> None:
        """A request numbered ``seq`` was decoded completely; remember its identifiers."""
        if not 0 <= seq <= MAX_SEQ or seq <= self._highest - self._capacity:
            return
        new = tuple(ids[:MAX_IDS])
        if seq in self._entries:
            if self._requests.get(seq) != new:
                self._entries[seq] = None  # two contents under one number: never resolve it
            return
        self._entries[seq] = new
        self._requests[seq] = new
        if seq > self._highest:
            self._highest = seq
            horizon = seq - self._capacity
            for old in [s for s in self._entries if s <= horizon]:
                del self._entries[old]
                self._requests.pop(old, None)
                self._answered.discard(old)

    @_locked
    def references(self) -> tuple[int, dict[str, tuple[int, int]]]:
        """``(H, refs)`` for a notification: the identifiers recorded under the numbers
        within :data:`WINDOW` of the highest recorded one ``H`` (nearest first): each
        request's own, then those of the answer the server gave it (the event id of a
        send: what the client's own echo names)."""
        highest = self._highest
        refs: dict[str, tuple[int, int]] = {}
        for seq in range(highest, max(highest - WINDOW, -1), -1):
            entry = self._entries.get(seq)
            if entry is None:
                continue
            for pos, ident in enumerate(entry):
                if ident not in refs:
                    refs[ident] = encode_ref(highest - seq + 1, pos)
        return highest, refs

    @_locked
    def record_response(self, seq: int, response_ids: Sequence[str]) -> None:
        """The 2.xx answer to request ``seq`` names ``response_ids``: append them.

        A second, different answer to one number (the request ran twice) poisons it.
        """
        request = self._requests.get(seq)
        if request is None or self._entries.get(seq) is None:
            return
        full = _with_response(request, response_ids)
        if seq in self._answered:
            if self._entries[seq] != full:
                self._entries[seq] = None
            return
        self._answered.add(seq)
        self._entries[seq] = full


class Resolver:
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

    def path(self, number: int) -> str:
        """A route argument's reference (:func:`path_number`)."""
        return self(TAG_REF_WIDE, number)


__all__ = [
    "MAX_IDS",
    "MAX_RESPONSE_IDS",
    "SENT_HISTORY",
    "TAG_REF",
    "TAG_REF_WIDE",
    "WINDOW",
    "ReceiverStrings",
    "Resolver",
    "SenderStrings",
    "UnknownStringReference",
    "decode_ref",
    "encode_ref",
    "identifiers",
    "path_identifiers",
    "path_number",
    "request_identifiers",
    "response_identifiers",
    "texts",
    "wants_response_ids",
]
