"""The order in which a batch of received datagrams is processed (issue 14).

When datagrams arrive faster than the listener handles them (a flood of
handshake messages, each validated one costing Diffie-Hellman work), the
kernel's socket buffer fills and drops whatever arrives next, an established
client's request as readily as the flood. So the listener reads what is
waiting (up to :data:`DRAIN_MAX` datagrams per wake-up, a few microseconds
each, while it holds fewer than :data:`HELD_MAX`) and orders what it holds:

* records of established sessions (and plain CoAP) go first, except from a
  source that also has a handshake message held, whose datagrams keep their
  order behind it;
* handshake messages then go round robin over source prefixes (IPv4 /24, IPv6
  /48), so one prefix's flood does not crowd out a new client elsewhere;
* at most :data:`HELD_HANDSHAKES` handshake messages are held (about 40 ms of
  handshake work): a burst (clients reconnecting after a restart) is absorbed,
  a sustained flood is shed; the rest are dropped (counted as
  ``handshake_overload``), and their senders retransmit as after any loss.

The native build reads a wake-up's datagrams in one ``recvmmsg`` call
(``transport/_crecv.c``): the same datagrams and addresses as ``recvfrom``, without
the drain's last read, which fails on an empty socket and raised BlockingIOError (in
a loop a wake-up with one datagram waiting 1.7 us against 2.5, with 64 waiting 40
against 71 us: ``bench/results/cold_codec-50dac75.csv``).

A quiet listener reads one datagram per wake-up and nothing changes. Of a
batch, the records of established sessions are handled at once, in the order
they came, as Twisted's UDP port and its HTTP channels handle what one poll
returned (a loop iteration per record cost each request a selector poll, and
with Synapse's default reactor a reactor turn: ``bench/inbound.py``); the
handshake messages (and what waits behind them) are handled one per loop
iteration, so that a burst of Diffie-Hellman work never holds up the loop's
other callbacks for long. :func:`split_batch` and :func:`order_batch` only
order (sans-I/O); :class:`BatchReader` reads and schedules.

While a batch's records are handled, a :class:`BatchHold` keeps the requests they
bring (the server's in-process exchanges) and starts them, in order, once the last
record is read: the listener's decoding runs for all of them, then the homeserver's
handling for each, instead of the two alternating per request, which left each's
code and data out of the CPU's caches for the other. The answers the homeserver gives
as the requests start (a request it answers at once, from its caches) are kept the same
way and encoded, sealed and sent, in order, once the batch's last request has started,
so that the answers' encoding (its DEFLATE state alone is some 140 KiB) does not come
between the homeserver's handling of one request and the next. Measured side by side
with settled CPU readings (``bench/inbound.py --turn 300``, default reactor, two
alternating pairs of three rounds): without the hold ``client versions`` 1.07x and
server keys 1.05-1.06x against 1.03-1.04x and 0.99-1.00x with it; keeping the answers
too took server keys from 0.99-1.00x to 0.96x. (An answer that comes later, from a
reactor callback, as ``client versions``' from Synapse's Rust runtime, is kept by the
module's dispatcher instead: ``InProcessDispatcher.answer_later``.)
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from synapse_coap.noise.retry import prefix_key

logger = logging.getLogger("synapse_coap.transport.noise_udp")

try:  # one recvmmsg call per wake-up (transport/_crecv.c: the same datagrams and addresses)
    _CRECV: Any = importlib.import_module("synapse_coap.transport._crecv")
except ImportError:  # no native build, or SYNAPSE_COAP_PURE=1: socket.recvfrom
    _CRECV = None


def recvfrom_batch(sock: socket.socket, count: int) -> list[tuple[bytes, Any]]:
    """Up to ``count`` datagrams waiting on the non-blocking ``sock``, one ``recvfrom``
    each, until it says none is left; [] when none is. An error of the first read is
    raised (an ICMP error reported on the socket); one after it ends the batch."""
    batch: list[tuple[bytes, Any]] = []
    while len(batch) < count:
        try:
            batch.append(sock.recvfrom(MAX_DATAGRAM))
        except BlockingIOError:
            break
        except OSError:
            if batch:
                break
            raise
    return batch


def recvmmsg_batch(sock: socket.socket, count: int) -> list[tuple[bytes, Any]]:
    """:func:`recvfrom_batch` in one ``recvmmsg`` call, nothing raised when the socket
    is empty (``transport/_crecv.c``, the native build; at most 64 a call)."""
    batch: list[tuple[bytes, Any]] = _CRECV.recv_batch(sock.fileno(), count)
    return batch


#: how a wake-up reads its batch
read_batch = recvmmsg_batch if _CRECV is not None else recvfrom_batch

#: datagrams read per wake-up at most (the one asyncio read, then the socket drained)
DRAIN_MAX = 64
#: datagrams held at most (read, not yet handled): past it the socket is not drained
HELD_MAX = 256
#: handshake messages held at most (about 0.3 ms each when validated)
HELD_HANDSHAKES = 128
#: the largest UDP payload: what one read takes
MAX_DATAGRAM = 65535


def is_handshake(data: bytes) -> bool:
    """A Noise handshake message (the first two bits of the first byte are 10)."""
    return bool(data) and data[0] >> 6 == 0b10


def order_batch(
    batch: Sequence[tuple[bytes, Any]],
    host_of: Callable[[Any], str],
    *,
    handshakes: int = HELD_HANDSHAKES,
) -> tuple[list[tuple[bytes, Any]], int]:
    """(the datagrams to handle, in order; how many handshake messages were dropped)."""
    first, later, dropped = split_batch(batch, host_of, handshakes=handshakes)
    return first + later, dropped


def split_batch(
    batch: Sequence[tuple[bytes, Any]],
    host_of: Callable[[Any], str],
    *,
    handshakes: int = HELD_HANDSHAKES,
) -> tuple[list[tuple[bytes, Any]], list[tuple[bytes, Any]], int]:
    """(the records of established sessions, in arrival order: to handle at once; the
    handshake messages and what waits behind them, in :func:`order_batch`'s order: one
    per loop iteration; how many handshake messages were dropped)."""
    if len(batch) == 1:
        if is_handshake(batch[0][0]):
            return [], list(batch), 0
        return list(batch), [], 0
    first: list[tuple[bytes, Any]] = []
    held: dict[str, list[tuple[bytes, Any]]] = {}  # by prefix, in arrival order
    held_sources: set[Any] = set()
    for item in batch:
        data, source = item
        if is_handshake(data) or source in held_sources:
            held_sources.add(source)
            held.setdefault(prefix_key(host_of(source)), []).append(item)
        else:
            first.append(item)
    queues = list(held.values())
    later: list[tuple[bytes, Any]] = []
    taken = dropped = 0
    while queues:
        rest = []
        for q in queues:
            data, source = q.pop(0)
            if is_handshake(data):
                if taken >= handshakes:
                    dropped += 1
                else:
                    taken += 1
                    later.append((data, source))
            else:
                later.append((data, source))
            if q:
                rest.append(q)
        queues = rest
    return first, later, dropped


class Startable(Protocol):
    def start(self) -> None: ...


class BatchHold:
    """The requests of a batch of records, started once the batch is read, and their
    answers, finished once every one of them is started (see the module's docstring).
    :meth:`begin` and :meth:`release` bracket a batch (they may nest: several sockets'
    readers share one hold); :meth:`hold` keeps an item while a batch is open (False
    outside one: the caller starts it itself); :meth:`later` keeps an answer while the
    batch's requests are being started (False otherwise: the caller finishes it now)."""

    __slots__ = ("_answers", "_depth", "_held", "_starting")

    def __init__(self) -> None:
        self._depth = 0
        self._held: list[Startable] = []
        self._starting = False
        self._answers: list[Callable[[], None]] = []

    def begin(self) -> None:
        self._depth += 1

    def hold(self, item: Startable) -> bool:
        if self._depth == 0:
            return False
        self._held.append(item)
        return True

    def later(self, answer: Callable[[], None]) -> bool:
        """While the held requests of a batch are being started (those the homeserver
        answers at once answer inside their start): keep ``answer`` (what encodes, seals
        and sends one of them) to run once every one of them is started, and True;
        False at any other time (the caller runs it now)."""
        if not self._starting:
            return False
        self._answers.append(answer)
        return True

    def release(self) -> None:
        """Close a batch: the outermost one starts what it held, in order, then runs the
        answers kept meanwhile (:meth:`later`), in order (one that fails is logged; the
        rest still run)."""
        self._depth -= 1
        if self._depth > 0:
            return
        self._depth = 0
        held, self._held = self._held, []
        self._starting = True
        try:
            for item in held:
                try:
                    item.start()
                except Exception:  # a bug: the batch's other requests still start
                    logger.exception("starting a request of a batch failed (bug)")
        finally:
            self._starting = False
        answers, self._answers = self._answers, []
        for answer in answers:
            try:
                answer()
            except Exception:  # a bug: the batch's other answers still go
                logger.exception("answering a request of a batch failed (bug)")


class BatchReader(asyncio.DatagramProtocol):
    """The socket's protocol. Fed the datagram asyncio read; reads what else is waiting on
    ``sock`` (see the module's docstring) and hands the datagrams to ``handle`` in
    :func:`order_batch`'s order: the records of established sessions at once, the
    handshake messages (and what waits behind them) one per loop iteration.
    ``dropped(reason)`` counts the handshake messages over the budget."""

    def __init__(
        self,
        handle: Callable[[bytes, Any], None],
        loop: asyncio.AbstractEventLoop,
        dropped: Callable[[str], None],
    ) -> None:
        self.handle = handle
        self.loop = loop
        self.dropped = dropped
        self.sock: socket.socket | None = None
        self._pending: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._flush_scheduled = False
        #: keeps the requests of a batch's records until the batch is read
        self.hold: BatchHold | None = None
        #: reads what waits on a socket (:func:`recvmmsg_batch` in the native build)
        self.read_batch: Callable[[socket.socket, int], list[tuple[bytes, Any]]] = read_batch

    def datagram_received(self, data: bytes, addr: Any) -> None:
        batch = [(data, addr)]
        sock = self.sock
        room = self._room()
        if sock is not None and room > 1:
            try:
                batch += self.read_batch(sock, room - 1)
            except OSError:  # an ICMP error: nothing more read now
                pass
        self._handle_batch(batch)

    def _room(self) -> int:
        """How many datagrams a wake-up reads at most now (fewer as more are held)."""
        return min(DRAIN_MAX, HELD_MAX - len(self._pending))

    def _handle_batch(self, batch: list[tuple[bytes, Any]]) -> None:
        """Handle what one wake-up read (at least one datagram)."""
        if len(batch) == 1 and not self._pending:
            data, addr = batch[0]
            self.handle(data, addr)
            return
        now, later, dropped = split_batch([*self._pending, *batch], lambda a: str(a[0]))
        for _ in range(dropped):
            self.dropped("handshake_overload")
        self._pending = collections.deque(later)
        if later and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._next)
        hold = self.hold if len(now) > 1 else None
        if hold is not None:
            hold.begin()
        try:
            for data, addr in now:
                if self.sock is None:
                    break
                try:
                    self.handle(data, addr)
                except Exception:  # a bug: the rest of the batch is still handled
                    logger.exception("handling a datagram failed (bug)")
        finally:
            if hold is not None:
                hold.release()

    def readable(self, sock: socket.socket) -> None:
        """``sock`` (this protocol's, or the one before a rebind) is readable: read what
        waits on it (one :attr:`read_batch`) and handle it as :meth:`datagram_received`
        does (for a reader the loop's driver calls directly: see
        ``synapse_coap.synapse.guestloop``)."""
        try:
            batch = self.read_batch(sock, max(1, self._room()))
        except OSError as exc:  # an ICMP error, as asyncio's transport reports it
            self.error_received(exc)
            return
        if batch:
            self._handle_batch(batch)

    def _next(self) -> None:
        if not self._pending or self.sock is None:
            self._pending.clear()
            self._flush_scheduled = False
            return
        data, addr = self._pending.popleft()
        try:
            self.handle(data, addr)
        finally:
            if self._pending:
                self.loop.call_soon(self._next)
            else:
                self._flush_scheduled = False

    def error_received(self, exc: Exception) -> None:
        logger.info("UDP socket error (ignored; loss is handled by retransmission): %s", exc)

    def close(self) -> None:
        """Stop: what is held is dropped, nothing more is read."""
        self.sock = None
        self._pending.clear()
