"""Every private piece of aiocoap that synapse-coap reaches, in one place.

aiocoap's public API has no way to plug in a message layer with other timers
(CoCoA-like RTO, adaptive NSTART), to attach a custom transport under its
token and message managers, or to cut a Block2 response into blocks. Those are
private in aiocoap, so they are reached **only here**
(``tests/unit/test_private_access.py`` keeps the rest of the package off
them), each listed in :data:`PIECES` with the release range it was checked
on. :func:`check` runs at start (module, sidecar, gateway) and raises
:class:`~synapse_coap.errors.LibraryVersionError` naming the aiocoap version
and the missing piece, instead of an AttributeError in the middle of an
exchange.

Everything else in :mod:`synapse_coap.transport` uses aiocoap's public names
(Context, Message, the numbers, ``interfaces.MessageInterface``).

Size: about 670 lines, because every private piece of aiocoap the package reaches is
here by design (one module to check against a new aiocoap release); split by subject
(the message manager, the fast path's exchanges, the transports) it would be several.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import inspect
from collections.abc import Callable
from typing import Any

import aiocoap
import aiocoap.blockwise
import aiocoap.meta
import aiocoap.pipe
import aiocoap.protocol
import attrs
from aiocoap.blockwise import _extract_block_key
from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.codes import EMPTY
from aiocoap.numbers.types import ACK, CON, NON, RST
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.udp6 import MessageInterfaceUDP6

from synapse_coap.errors import LibraryVersionError

#: The running aiocoap's version.
AIOCOAP_VERSION: str = str(getattr(aiocoap.meta, "version", "unknown"))
#: The releases every entry of :data:`PIECES` was checked on (pyproject pins >=0.4.17,<0.5).
CHECKED_RANGE = "0.4.17"


@attrs.frozen
class Piece:
    name: str
    why: str
    probe: Callable[[], bool]
    checked: str = CHECKED_RANGE


def _method(cls: type, name: str, *params: str) -> Callable[[], bool]:
    def probe() -> bool:
        fn = getattr(cls, name, None)
        if not callable(fn):
            return False
        return set(params) <= set(inspect.signature(fn).parameters)

    return probe


def _init_sets(cls: type, *names: str) -> Callable[[], bool]:
    # instance attributes set in __init__: checked in its source (no instance at start)
    def probe() -> bool:
        try:
            source = inspect.getsource(vars(cls)["__init__"])
        except (OSError, TypeError):
            return False
        return all(f"self.{n}" in source for n in names)

    return probe


_MM = MessageManager

#: Everything private of aiocoap that the package uses. ``check`` probes each one.
PIECES: tuple[Piece, ...] = (
    Piece(
        "aiocoap.messagemanager.MessageManager._add_exchange(message, messageerror_monitor)",
        "the first retransmission timeout from the peer's RTT estimate",
        _method(_MM, "_add_exchange", "message", "messageerror_monitor"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._schedule_retransmit"
        "(message, timeout, retransmission_counter)",
        "bounded exponential backoff",
        _method(_MM, "_schedule_retransmit", "message", "timeout", "retransmission_counter"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._retransmit"
        "(message, timeout, retransmission_counter)",
        "RTT samples (Karn's rule) and the retransmission hooks",
        _method(_MM, "_retransmit", "message", "timeout", "retransmission_counter"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._remove_exchange(message)",
        "RTT samples from acknowledgements",
        _method(_MM, "_remove_exchange", "message"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._continue_backlog(remote)",
        "adaptive NSTART per peer",
        _method(_MM, "_continue_backlog", "remote"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._send_initially(message, messageerror_monitor)",
        "sending from the per-peer backlog",
        _method(_MM, "_send_initially", "message", "messageerror_monitor"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._active_exchanges / _backlogs",
        "outstanding exchanges per peer, and the backlog that holds the rest",
        _init_sets(_MM, "_active_exchanges", "_backlogs"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._deduplicate_message(message)",
        "one expiry heap for the duplicate-detection entries instead of a timer each",
        _method(_MM, "_deduplicate_message", "message"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._store_response_for_duplicates(message) / "
        "_recent_messages",
        "keeping only the datagram a duplicate's answer needs (memory per session)",
        lambda: (
            _init_sets(_MM, "_recent_messages")()
            and _method(_MM, "_store_response_for_duplicates", "message")()
        ),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._send_via_transport(message)",
        "sending the datagram already encoded for the duplicate store (one encoding)",
        _method(_MM, "_send_via_transport", "message"),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._piggyback_opportunities / "
        "_send_empty_ack(remote, mid, reason)",
        "acknowledging a long-poll at once instead of holding its ACK",
        lambda: (
            _init_sets(_MM, "_piggyback_opportunities")()
            and _method(_MM, "_send_empty_ack", "remote", "mid", "reason")()
        ),
    ),
    Piece(
        "aiocoap.tokenmanager.TokenManager(context) and Context.request_interfaces "
        "(as Context._append_tokenmanaged_messagemanaged_transport uses them)",
        "attaching the Noise transport under a LinkMessageManager",
        lambda: (
            _method(TokenManager, "__init__", "context")()
            and hasattr(aiocoap.Context, "_append_tokenmanaged_messagemanaged_transport")
        ),
    ),
    Piece(
        "aiocoap.transports.udp6.MessageInterfaceUDP6._ctx / datagram_msg_received",
        "datagram metrics of plain CoAP",
        lambda: (
            _init_sets(MessageInterfaceUDP6, "_ctx")()
            and _method(MessageInterfaceUDP6, "datagram_msg_received", "data", "address")()
        ),
    ),
    Piece(
        "aiocoap.messagemanager.MessageManager._next_message_id() and "
        "aiocoap.tokenmanager.TokenManager.incoming_requests",
        "the server's fast path: the Message ID of a NON answer, and leaving a token that "
        "aiocoap's token layer still serves to aiocoap",
        lambda: (
            _method(_MM, "_next_message_id")() and _init_sets(TokenManager, "incoming_requests")()
        ),
    ),
    Piece(
        "aiocoap.pipe.Pipe._event_callbacks and the free variable ``stop`` of the "
        "``on_event`` closure that aiocoap.tokenmanager.TokenManager.process_request "
        "registers",
        "untying the reference cycle that closure leaves behind every request",
        lambda: (
            _init_sets(aiocoap.pipe.Pipe, "_event_callbacks")()
            and "stop" in inspect.getsource(TokenManager.process_request)
        ),
    ),
    Piece(
        "aiocoap.protocol.Request._stop_interest",
        "untying the reference cycle a client request leaves behind once answered",
        _init_sets(aiocoap.protocol.Request, "_stop_interest"),
    ),
    Piece(
        "aiocoap.blockwise._extract_block_key(message)",
        "the key of a Block2 transfer kept for the blocks after block 0",
        lambda: callable(getattr(aiocoap.blockwise, "_extract_block_key", None)),
    ),
    Piece(
        "aiocoap.message.Message._extract_block(number, size_exp, max_bert_size)",
        "cutting one block of a large response",
        _method(Message, "_extract_block", "number", "size_exp", "max_bert_size"),
    ),
)

#: The private names above: the rest of the package never uses them.
PRIVATE_NAMES = frozenset(
    {
        "_add_exchange",
        "_schedule_retransmit",
        "_retransmit",
        "_remove_exchange",
        "_continue_backlog",
        "_send_initially",
        "_store_response_for_duplicates",
        "_send_via_transport",
        "_deduplicate_message",
        "_recent_messages",
        "_piggyback_opportunities",
        "_send_empty_ack",
        "_next_message_id",
        "_active_exchanges",
        "_backlogs",
        "_append_tokenmanaged_messagemanaged_transport",
        "_ctx",
        "_extract_block_key",
        "_extract_block",
        "_event_callbacks",
        "_stop_interest",
    }
)


def check() -> None:
    """Raise LibraryVersionError naming aiocoap's version and the first missing piece."""
    for piece in PIECES:
        try:
            ok = bool(piece.probe())
        except Exception:
            ok = False
        if not ok:
            raise LibraryVersionError(
                f"synapse-coap cannot run on aiocoap {AIOCOAP_VERSION}: it lacks {piece.name} "
                f"(used for {piece.why}; checked on aiocoap {piece.checked}). Install "
                "aiocoap>=0.4.17,<0.5 as synapse-coap's requirements say."
            )


def untie_when_done(pipe: Any) -> None:
    """Break, once ``pipe`` has ended, the reference cycle aiocoap's token layer leaves
    for every request it serves.

    ``TokenManager.process_request`` registers an ``on_event`` closure on the request's
    pipe whose free variable ``stop`` is ``pipe.on_event``'s return value: a partial
    holding ``on_event`` itself (and the pipe). Closure, partial and pipe, the request
    and response Messages with their options and remotes (about 17 objects) stay alive
    until the cycle collector finds them, which in Synapse runs from a timer and costs
    in proportion. After the pipe's last event ``on_event`` is never called again, so
    its ``stop`` is cleared then (the partial itself, which the message layer may still
    hold, is untouched); reference counting frees the rest.
    """
    callbacks = pipe._event_callbacks
    if not callbacks:
        return
    cells = []
    for callback, _interest in callbacks:
        code = getattr(callback, "__code__", None)
        closure = getattr(callback, "__closure__", None)
        if code is not None and closure is not None and "stop" in code.co_freevars:
            cells.append(closure[code.co_freevars.index("stop")])
    if not cells:
        return

    def untie() -> None:
        for cell in cells:
            cell.cell_contents = None

    pipe.on_interest_end(untie)


def untie_request(request: Any) -> None:
    """Break the reference cycle of an answered client request (``Context.request``'s
    result): the request holds ``_stop_interest``, a partial over its ``process``
    closure, which holds the request; with the answer in, neither is used again (a
    cancelled request's handler still calls it: left alone then)."""
    response = request.response
    if response.done() and not response.cancelled():
        request._stop_interest = None


# --------------------------------------------------------------------------- message layer


class StoredResponse:
    """What is kept of a response (an ACK or RST answering a request) to answer a
    duplicate of that request for EXCHANGE_LIFETIME (247 s by default): its encoded
    datagram, its remote and the two fields aiocoap's resend path reads. About 200
    bytes instead of the response and request Messages (over 1 KB with their options
    and transport tuning): with thousands of sessions, most of a session's memory."""

    __slots__ = ("_data", "mid", "mtype", "remote")

    def __init__(self, message: Any, data: bytes | None = None) -> None:
        self._data: bytes = message.encode() if data is None else data
        self.mid = message.mid
        self.mtype = message.mtype
        self.remote = message.remote

    def encode(self) -> bytes:
        return self._data

    def __repr__(self) -> str:
        return f"<StoredResponse mid={self.mid} {len(self._data)} bytes>"


class _EarliestTimer:
    """One loop timer for the earliest of many deadlines kept in a heap (the duplicate
    store's expiries, the fast path's held ACKs): :meth:`want` arms it unless an earlier
    wake-up is armed already; ``fire`` runs at that time and re-arms for what is left."""

    __slots__ = ("_at", "_fire", "_handle", "_loop")

    def __init__(self, loop: Any, fire: Callable[[], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def want(self, at: float) -> None:
        if self._handle is None or at < self._at:
            self.arm(at)

    def arm(self, at: float) -> None:
        self.cancel()
        self._at = at
        self._handle = self._loop.call_later(max(0.0, at - self._loop.time()), self._run)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self._handle = None
        self._fire()


class HookedMessageManager(MessageManager):  # type: ignore[misc]
    """aiocoap's MessageManager with its private timer and backlog steps as public hooks.

    Each private step calls the hook of the same name without the underscore;
    the hooks' defaults are aiocoap's own steps. A subclass overrides the hooks
    (see :class:`synapse_coap.transport.manager.LinkMessageManager`).
    """

    #: duplicate-detection expiry (see _deduplicate_message), oldest first
    _dedup_queue: collections.deque[tuple[float, Any]]
    _dedup_timer: _EarliestTimer
    #: the response just encoded for the duplicate store and its datagram: aiocoap
    #: sends it right after storing it (``_send_initially``), so the transport takes
    #: these bytes instead of encoding the message a second time
    _just_stored: tuple[Any, bytes] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dedup_queue = collections.deque()
        self._dedup_timer = _EarliestTimer(self.loop, self._expire_duplicates)

    # -- aiocoap's private steps, forwarded to the hooks -------------------------------

    def _add_exchange(self, message: Any, messageerror_monitor: Callable[[], None]) -> None:
        self.add_exchange(message, messageerror_monitor)

    def _schedule_retransmit(
        self, message: Any, timeout: float, retransmission_counter: int
    ) -> Any:
        return self.schedule_retransmit(message, timeout, retransmission_counter)

    def _retransmit(self, message: Any, timeout: float, retransmission_counter: int) -> None:
        self.retransmit(message, timeout, retransmission_counter)

    def _remove_exchange(self, message: Any) -> None:
        self.remove_exchange(message)

    def _continue_backlog(self, remote: Any) -> None:
        self.continue_backlog(remote)

    def _deduplicate_message(self, message: Any) -> bool:
        # RFC 7252 4.5, as aiocoap does it (a duplicate CON gets the stored answer
        # again, or nothing yet), but the entries expire from one heap and one timer,
        # not a timer (and a partial) per received request: thousands of sessions
        key = (message.remote, message.mid)
        recent = self._recent_messages
        if key in recent:
            stored = recent[key]
            if message.mtype is CON and stored is not None:
                self.log.debug("duplicate CON: sending the stored answer again")
                self._send_initially(stored)
            return True
        self.remember(message.remote, message.mid, message.transport_tuning.EXCHANGE_LIFETIME)
        return False

    def remember(self, remote: Any, mid: int, lifetime: float) -> None:
        """Record the new message ``mid`` from ``remote`` for duplicate detection.

        The entries wait in arrival order: one append here, and the ones whose time is
        up leave from the front, here (so a busy listener pays for its own expiries as
        it goes, not in a timer that runs later among other work) or in the timer when
        traffic stops. A link's EXCHANGE_LIFETIME can differ from another's, so an entry
        may wait behind an older one that expires later: it leaves late (kept a little
        longer), never early."""
        key = (remote, mid)
        now = self.loop.time()
        self._drop_expired(now)
        self._recent_messages[key] = None
        expiry = now + lifetime
        self._dedup_queue.append((expiry, key))
        self._dedup_timer.want(expiry)

    def _drop_expired(self, now: float) -> None:
        """Forget the entries at the front of the queue whose time is up at ``now``."""
        queue = self._dedup_queue
        recent = self._recent_messages
        while queue and queue[0][0] <= now:
            recent.pop(queue.popleft()[1], None)

    def _expire_duplicates(self) -> None:
        self._drop_expired(self.loop.time())
        queue = self._dedup_queue
        if queue:
            self._dedup_timer.arm(queue[0][0])

    def _store_response_for_duplicates(self, message: Any) -> None:
        # aiocoap keeps the whole response (and through it the request) for
        # EXCHANGE_LIFETIME to answer duplicates; the datagram is all that needs
        key = (message.remote, message.mid)
        recent = self._recent_messages
        if key in recent:
            if isinstance(message, StoredResponse):
                recent[key] = message
            else:
                stored = recent[key] = StoredResponse(message)
                self._just_stored = (message, stored.encode())

    def _send_via_transport(self, message: Any) -> None:
        just, self._just_stored = self._just_stored, None
        interface = self.message_interface
        if just is not None and just[0] is message and getattr(interface, "sends_encoded", False):
            interface.send(message, just[1])
        else:
            interface.send(message)

    # -- the hooks (defaults: aiocoap's behaviour) ---------------------------------------

    def add_exchange(self, message: Any, messageerror_monitor: Callable[[], None]) -> None:
        super()._add_exchange(message, messageerror_monitor)

    def schedule_retransmit(self, message: Any, timeout: float, retransmission_counter: int) -> Any:
        return super()._schedule_retransmit(message, timeout, retransmission_counter)

    def retransmit(self, message: Any, timeout: float, retransmission_counter: int) -> None:
        super()._retransmit(message, timeout, retransmission_counter)

    def remove_exchange(self, message: Any) -> None:
        super()._remove_exchange(message)

    def continue_backlog(self, remote: Any) -> None:
        super()._continue_backlog(remote)

    # -- state -------------------------------------------------------------------------------

    @property
    def active_exchanges(self) -> dict[Any, Any] | None:
        """``{(remote, mid): (messageerror_monitor, retransmission handle)}``; None once closed."""
        return self._active_exchanges  # type: ignore[no-any-return]

    @property
    def backlogs(self) -> dict[Any, Any]:
        """``{remote: [(message, messageerror_monitor), ...]}``, aiocoap's per-peer backlog."""
        return self._backlogs  # type: ignore[no-any-return]

    @backlogs.setter
    def backlogs(self, value: dict[Any, Any]) -> None:
        self._backlogs = value

    def end_exchange_quietly(self, message: Any) -> None:
        """End the exchange of the confirmable ``message`` whose retransmissions ran out,
        without aiocoap's ``ConRetransmitsExceeded`` to every request of the peer: the
        caller dealt with the outcome. The peer's backlog goes on."""
        entry = self._active_exchanges.pop((message.remote, message.mid), None)
        if entry is not None:
            entry[1].cancel()
        self._continue_backlog(message.remote)

    def send_initially(self, message: Any, messageerror_monitor: Any) -> None:
        self._send_initially(message, messageerror_monitor)

    def reset_now(self, remote: Any, mid: int, reason: str) -> None:
        """Reject the message ``mid`` from ``remote`` with a Reset (RFC 7252 4.3), as
        aiocoap answers a CoAP ping: straight to the wire, no exchange kept."""
        self.log.debug("Sending Reset: %s", reason)
        rst = Message(_mtype=RST, _mid=mid, code=EMPTY, payload=b"")
        rst.remote = remote.as_response_address()
        self._send_initially(rst)

    def send_empty_ack_now(self, remote: Any, token: bytes, reason: str) -> bool:
        """Send the empty ACK aiocoap is holding for request ``(remote, token)`` now.

        False if it holds none (NON request, already acknowledged or answered).
        """
        found = self._piggyback_opportunities.pop((remote, token), None)
        if found is None:
            return False
        mid, handle = found
        handle.cancel()
        self._send_empty_ack(remote, mid, reason)
        return True


class _Sent:
    """The fields of an answer the fast path sent as a datagram (for :class:`StoredResponse`)."""

    __slots__ = ("mid", "mtype", "remote")

    def __init__(self, mid: int, mtype: Any, remote: Any) -> None:
        self.mid, self.mtype, self.remote = mid, mtype, remote


class _HeldAck:
    """A held ACK of :class:`FastExchanges`: what aiocoap's ``_piggyback_opportunities``
    keeps beside the Message ID (aiocoap calls ``cancel()`` on it when it answers)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FastExchanges:
    """The message layer of the server's fast path (:mod:`synapse_coap.transport.fastpath`):
    the same duplicate store, piggyback window and Message IDs as aiocoap's
    ``_deduplicate_message``, ``_process_request`` and ``send_message``, for a request
    that does not go through aiocoap's Message, token layer and pipe."""

    def __init__(self, mman: HookedMessageManager) -> None:
        self._mman = mman
        # held ACKs by deadline: (at, serial, (remote, token), mid, held); one loop timer
        # for the earliest live one, not one per request (most are answered, so taken
        # and cancelled, long before their deadline; those are dropped when they surface)
        self._held: list[tuple[float, int, tuple[Any, bytes], int, _HeldAck]] = []
        self._held_serial = 0
        self._held_timer = _EarliestTimer(mman.loop, self._send_held)

    def is_duplicate(self, remote: Any, mid: int) -> bool:
        """The message ``mid`` from ``remote`` was seen within EXCHANGE_LIFETIME."""
        return (remote, mid) in self._mman._recent_messages

    def token_in_use(self, remote: Any, token: bytes) -> bool:
        """aiocoap's token layer serves a request of ``remote`` on ``token``."""
        return (token, remote) in self._mman.token_manager.incoming_requests

    def accept(
        self,
        remote: Any,
        mid: int,
        token: bytes,
        confirmable: bool,
        empty_ack_delay: float,
        lifetime: float,
    ) -> None:
        """Record a new request for duplicate detection over ``lifetime`` (RFC 7252
        4.5) and, for a CON, hold its ACK for a piggybacked answer for
        ``empty_ack_delay`` (then an empty ACK goes out, as aiocoap's
        ``_process_request`` does)."""
        mman = self._mman
        mman.remember(remote, mid, lifetime)
        if not confirmable:
            return
        key = (remote, token)
        opportunities = mman._piggyback_opportunities
        old = opportunities.pop(key, None)
        if old is not None:
            old[1].cancel()
        held = _HeldAck()
        opportunities[key] = (mid, held)
        at = mman.loop.time() + empty_ack_delay
        self._held_serial += 1
        heapq.heappush(self._held, (at, self._held_serial, key, mid, held))
        self._held_timer.want(at)

    def _send_held(self) -> None:
        """The empty ACK of every held request whose deadline passed unanswered (as
        aiocoap's ``_process_request`` timer sends it); re-arm for the next live one."""
        mman = self._mman
        opportunities = mman._piggyback_opportunities
        heap = self._held
        now = mman.loop.time()
        while heap and (heap[0][0] <= now or heap[0][4].cancelled):
            _at, _serial, key, mid, held = heapq.heappop(heap)
            if held.cancelled:
                continue
            found = opportunities.get(key)
            if found is not None and found[1] is held:
                del opportunities[key]
                mman._send_empty_ack(key[0], mid, "Response took too long to prepare")
        if heap:
            self._held_timer.arm(heap[0][0])

    def take_piggyback(self, remote: Any, token: bytes) -> int | None:
        """The Message ID of the held ACK of ``(remote, token)`` (its timer stopped), or
        None if the empty ACK went out already (the answer is then a separate CON)."""
        found = self._mman._piggyback_opportunities.pop((remote, token), None)
        if found is None:
            return None
        mid, handle = found
        handle.cancel()
        # drop the answered ones at the top now (most answers come in order, so this one
        # usually): the heap stays as small as the requests in progress, and a busy
        # listener pays for it as it goes, not in the timer that runs later among other work
        heap = self._held
        while heap and heap[0][4].cancelled:
            heapq.heappop(heap)
        return int(mid)

    def next_message_id(self) -> int:
        return int(self._mman._next_message_id())

    def close(self) -> None:
        """Stop the held-ACK timer (the listener closes)."""
        self._held_timer.cancel()
        self._held.clear()

    def sent(self, remote: Any, mid: int, confirmable_request: bool, data: bytes) -> None:
        """Keep the answer datagram ``data`` for duplicates of its request, as aiocoap's
        ``_store_response_for_duplicates`` does (an ACK is kept; a NON answer only where
        its Message ID happens to be in the store, as in aiocoap)."""
        recent = self._mman._recent_messages
        key = (remote, mid)
        if key in recent:
            recent[key] = StoredResponse(
                _Sent(mid, ACK if confirmable_request else NON, remote), data
            )


async def attach_message_interface(
    context: Any,
    make_manager: Callable[[TokenManager], HookedMessageManager],
    constructor: Callable[[Any], Any],
) -> tuple[Any, Any]:
    """Add a message interface to ``context`` under a manager built by ``make_manager``.

    Mirrors ``Context._append_tokenmanaged_messagemanaged_transport`` (aiocoap
    0.4.17), which hard-codes aiocoap's own MessageManager.
    """
    tman = TokenManager(context)
    mman = make_manager(tman)
    transport = await constructor(mman)
    mman.message_interface = transport
    tman.token_interface = mman
    context.request_interfaces.append(tman)
    return mman, transport


# --------------------------------------------------------------------------- transports, caches


class PlainUDPBase(MessageInterfaceUDP6):  # type: ignore[misc]
    """aiocoap's udp6 transport, with its context (for metrics) and receive step exposed."""

    def context_attribute(self, name: str) -> Any:
        """An attribute of the context this transport delivers to (None if absent)."""
        return getattr(getattr(self, "_ctx", None), name, None)


def block_key(request: Any) -> Any:
    """aiocoap's key of a blockwise transfer (the request with its block options left out)."""
    return _extract_block_key(request)


def extract_block(message: Any, number: int, size_exponent: int, limit: int) -> Any:
    """Block ``number`` (of size 2**(size_exponent+4)) of ``message``, as aiocoap cuts it."""
    return message._extract_block(number, size_exponent, limit)
