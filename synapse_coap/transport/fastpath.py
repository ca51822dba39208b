"""The CoAP server's fast path: the common exchange without aiocoap's per-message pipeline.

Most requests a homeserver serves are one datagram each way: a Confirmable (or
Non-confirmable) request with no Observe, no block options, nothing but the
options the codec reads, answered at once on the ACK. For such a request aiocoap
builds a Message (and re-encodes its options), a transport tuning, a token-layer
pipe, a driving task, an error-to-message pipe and the Block2 lookup, then
encodes the answer through its option objects; together that cost more CPU per
request than the Noise record path (``bench/inbound.py --cprofile-out``).

:class:`FastPath` is offered every decrypted message of a Noise listener first
(``NoiseMessageInterface.fast_request``). It takes a request only when all of
this holds:

* a well-formed request (:func:`~synapse_coap.mapping.coap.decode_coap`), CON or NON;
* not a duplicate (RFC 7252 4.5): duplicates go to aiocoap, which answers a CON
  from the same duplicate store (the datagram this path stored) or ignores it;
* only the options of :data:`FAST_OPTIONS` (Uri-Path and Uri-Query in UTF-8,
  minimal Content-Format and Accept, the mapping's request options): Observe,
  Block1/Block2/Size, No-Response, Abandon, Uri-Host, any unknown option (an
  unknown critical one is answered 4.02, or a Reset for a NON, by aiocoap's
  path) go the old way, as does ``/.well-known/core``;
* its token is not that of a request aiocoap's token layer still serves (aiocoap
  cancels that one), and the session is under its in-flight request limit (else
  aiocoap's path answers 5.03).

A request taken is recorded in the message manager's duplicate store and, for a
CON, its ACK is held for a piggybacked answer exactly as aiocoap holds it
(:class:`~synapse_coap.transport.aiocoap_compat.FastExchanges`: an empty ACK goes
out when the peer's ``EMPTY_ACK_DELAY`` passes, or at once for a long-poll). It is
answered by :meth:`CoapServer.respond <synapse_coap.transport.server.CoapServer.respond>`
(the same code as aiocoap's path) and the answer datagram is built directly
(:func:`~synapse_coap.mapping.coap.encode_coap`, byte-identical to aiocoap's for
the options of :data:`_DIRECT_ANSWER_OPTIONS`), stored for duplicates and sent:
on the ACK for a CON, as a NON for a NON. An answer larger than one block, one
whose empty ACK already went out (a separate CON with retransmissions), or one
with other options is handed to aiocoap's message layer as before.

A request taken needs no asyncio task of its own where the dispatcher can start it
at once (``dispatch_now``, :class:`~synapse_coap.mapping.dispatch.EagerDispatcher`:
the module's in-process dispatcher, whose Synapse runs on the loop's thread):
:meth:`CoapServer.respond_now <synapse_coap.transport.server.CoapServer.respond_now>`
decodes it, starts it in Synapse and answers it from the callback that brings the
response, in the same loop turn when Synapse answers at once. Otherwise (the gateway's
HTTP dispatcher, a request for another worker, a body decoded off the loop, another
request of the session still decoding) the exchange runs in a task as before.

A request's token reused by a new request, or an Abandon on it, cancels its
dispatch (or abandons it in Synapse), as does the end of its session
(:meth:`FastPath.remote_failed`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from synapse_coap.errors import RemoteProtocolError, SynapseCoapError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.messages import CoapMessage
from synapse_coap.transport.aiocoap_compat import FastExchanges
from synapse_coap.transport.convert import RejectNon, carried
from synapse_coap.transport.datagram import MessageFormatError, decode_message

if TYPE_CHECKING:
    from synapse_coap.transport.manager import LinkMessageManager
    from synapse_coap.transport.noise_udp import NoiseMessageInterface, NoiseRemote
    from synapse_coap.transport.server import CoapServer

logger = logging.getLogger(__name__)

_URI_PATH = 11
_CONTENT_FORMAT = 12
_URI_QUERY = 15
_ACCEPT = 17
_MAX_AGE = 14
_ETAG = 4

#: The request options the fast path takes: the ones the mapping's codec reads.
FAST_OPTIONS = frozenset(
    {
        _URI_PATH,
        _CONTENT_FORMAT,
        _URI_QUERY,
        _ACCEPT,
        n.OPT_CONTENT_TYPE,
        n.OPT_HEADER,
        n.OPT_TARGET,
        n.OPT_HTTP_METHOD,
        n.OPT_AUTHORIZATION,
        n.OPT_TOKEN_BIND,
        n.OPT_TOKEN_REF,
        n.OPT_NO_AUTH,
        n.OPT_STRING_SEQ,
    }
)
#: uint options: aiocoap re-encodes them minimally (the fast path takes only minimal ones)
_UINT_OPTIONS = frozenset({_CONTENT_FORMAT, _ACCEPT, _MAX_AGE})
#: Answer options aiocoap carries byte for byte (opaque, or minimal uints): an answer
#: with only these is encoded here; any other goes through aiocoap's Message.
_DIRECT_ANSWER_OPTIONS = frozenset({_ETAG, _CONTENT_FORMAT, _MAX_AGE})
_PRIVATE_FIRST = 65000  # the mapping's private options: unknown to aiocoap, opaque

_CON, _NON, _ACK = 0, 1, 2


def _takes(cm: CoapMessage) -> bool:
    """True if the request ``cm`` needs nothing of aiocoap's pipeline."""
    path: list[bytes] = []
    for opt in cm.options:
        number = opt.number
        if number not in FAST_OPTIONS:
            return False
        value = opt.value
        if number in (_URI_PATH, _URI_QUERY):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return False  # a message format error: aiocoap's path rejects it
            if number == _URI_PATH:
                path.append(value)
        elif number in _UINT_OPTIONS and value[:1] == b"\x00":
            return False
    return path[:2] != [b".well-known", b"core"]


def _direct(answer: CoapMessage) -> bool:
    """True if ``encode_coap`` gives aiocoap's bytes for ``answer``."""
    for opt in answer.options:
        number = opt.number
        if number >= _PRIVATE_FIRST:
            continue
        if number not in _DIRECT_ANSWER_OPTIONS:
            return False
        if number in _UINT_OPTIONS and (opt.value[:1] == b"\x00" or len(opt.value) > 4):
            return False
    return 64 <= answer.code <= 191


class FastPath:
    """The fast path of one Noise listener (see the module docstring)."""

    def __init__(
        self, server: CoapServer, mman: LinkMessageManager, iface: NoiseMessageInterface
    ) -> None:
        self._server = server
        self._mman = mman
        self._iface = iface
        self._exchanges = FastExchanges(mman)
        self._loop = iface.loop
        #: (remote, token) -> the dispatch task of a request in flight
        self._tasks: dict[tuple[Any, bytes], asyncio.Task[None] | _Eager] = {}
        #: requests taken, answers sent directly (the rest went to aiocoap's layer)
        self.taken = 0
        self.answered = 0

    def __call__(self, remote: NoiseRemote, data: bytes) -> bool:
        """Take the message ``data`` from ``remote`` if it is a fast request."""
        if len(data) < 4 or not 1 <= data[1] <= 31:
            return False  # not a request (an ACK, a response, a ping, ...)
        try:
            mtype, mid, token, cm = decode_coap(data)
        except RemoteProtocolError:
            return False  # aiocoap's path rejects it (4.2, 4.3)
        if mtype > _NON:
            return False
        exchanges = self._exchanges
        if exchanges.is_duplicate(remote, mid):
            return False
        key = (remote, token)
        previous = self._tasks.pop(key, None)
        if previous is not None:
            # the token is reused (or abandoned): the old request's answer is not wanted
            previous.cancel()
        if not _takes(cm) or exchanges.token_in_use(remote, token):
            return False
        root = self._server.root
        session = remote.blockwise_key
        if not root.enter(session):
            return False  # aiocoap's path answers 5.03
        empty_ack_delay, lifetime = self._mman.answer_delays(remote)
        exchanges.accept(remote, mid, token, mtype == _CON, empty_ack_delay, lifetime)
        self.taken += 1
        now = _Eager(self, remote, data, mtype, token, session)
        try:
            cancel = self._server.respond_now(remote, token, cm, mtype == _NON, now.done)
        except Exception as e:
            now.done(e)
            return True
        if now.over:
            return True  # answered already
        if cancel is not None:
            now.abandon = cancel
            self._tasks[key] = now
            return True
        task = self._loop.create_task(
            self._exchange(remote, data, mtype, token, cm, session), name="synapse-coap fast"
        )
        self._tasks[key] = task
        return True

    async def _exchange(
        self,
        remote: NoiseRemote,
        data: bytes,
        mtype: int,
        token: bytes,
        cm: CoapMessage,
        session: Any,
    ) -> None:
        """A request the server could not answer at once (see
        :meth:`CoapServer.respond_now`), in a task."""
        key = (remote, token)
        try:
            result: CoapMessage | Exception
            try:
                result = await self._server.respond(remote, token, cm, mtype == _NON)
            except Exception as e:
                result = e
            rest = self._deliver(remote, data, mtype, token, result)
            if rest is not None:
                await rest
        finally:
            self._server.root.leave(session)
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]

    def _deliver(
        self,
        remote: NoiseRemote,
        data: bytes,
        mtype: int,
        token: bytes,
        result: CoapMessage | BaseException,
    ) -> Coroutine[Any, Any, None] | None:
        """Answer the request ``data`` with ``result`` (an error: a Reset for
        :class:`RejectNon`, else 5.00); the coroutine that still has to run when the
        answer needs aiocoap's message layer."""
        if isinstance(result, RejectNon):
            self._server.reject_non(remote, int.from_bytes(data[2:4], "big"), str(result))
            return None
        if isinstance(result, BaseException):
            logger.error("rendering a request from %s failed", remote.hostinfo, exc_info=result)
            result = CoapMessage(160)  # 5.00, as aiocoap answers a raising resource
        if self._answer(remote, mtype, token, result):
            return None
        return self._answer_by_aiocoap(remote, data, result)

    def _answer(self, remote: NoiseRemote, mtype: int, token: bytes, answer: CoapMessage) -> bool:
        """Send ``answer`` directly; False if it needs aiocoap's message layer."""
        exchanges = self._exchanges
        if len(answer.payload) > remote.maximum_payload_size or not _direct(answer):
            return False
        if mtype == _CON:
            mid = exchanges.take_piggyback(remote, token)
            reply = _ACK
        else:
            mid, reply = exchanges.next_message_id(), _NON
        if mid is None:
            return False  # its empty ACK went out: a separate response
        try:
            datagram = encode_coap(answer, mtype=reply, mid=mid, token=token)
        except SynapseCoapError:
            datagram = encode_coap(CoapMessage(160), mtype=reply, mid=mid, token=token)
        exchanges.sent(remote, mid, mtype == _CON, datagram)
        self._iface.send_datagram(remote, datagram)
        self.answered += 1
        return True

    async def _answer_by_aiocoap(
        self, remote: NoiseRemote, data: bytes, answer: CoapMessage
    ) -> None:
        """aiocoap's message layer: blocks, a separate CON response, other options."""
        try:
            request = decode_message(data, remote)
        except MessageFormatError:  # pragma: no cover - decode_coap parsed it
            return
        block2 = self._server.root.block2

        async def build() -> Any:
            return carried(answer, "request")

        message = await block2.extract_or_insert(request, build)
        message.token = request.token
        message.remote = remote
        message.request = request
        self._mman.send_message(message, lambda: None)

    def remote_failed(self, remote: Any) -> None:
        """The session of ``remote`` ended: its requests' dispatches are cancelled."""
        for key in [k for k in self._tasks if k[0] is remote]:
            self._tasks.pop(key).cancel()

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._exchanges.close()


class _Eager:
    """A request taken by :meth:`FastPath.__call__` and answered by
    :meth:`CoapServer.respond_now <synapse_coap.transport.server.CoapServer.respond_now>`
    (no task): ``done`` once, or ``cancel``."""

    __slots__ = ("abandon", "data", "fast", "mtype", "over", "remote", "session", "token")

    def __init__(
        self,
        fast: FastPath,
        remote: NoiseRemote,
        data: bytes,
        mtype: int,
        token: bytes,
        session: Any,
    ) -> None:
        self.fast = fast
        self.remote = remote
        self.data = data
        self.mtype = mtype
        self.token = token
        self.session = session
        self.over = False
        self.abandon: Callable[[], None] | None = None

    def _end(self) -> None:
        self.over = True
        self.abandon = None  # (the server's exchange refers to this one's ``done``)
        fast = self.fast
        fast._server.root.leave(self.session)
        key = (self.remote, self.token)
        if fast._tasks.get(key) is self:
            del fast._tasks[key]

    def done(self, result: CoapMessage | BaseException) -> None:
        if self.over:
            return
        self._end()
        if isinstance(result, asyncio.CancelledError):
            return  # the dispatcher gave the request up: no answer (as a cancelled task)
        fast = self.fast
        try:
            rest = fast._deliver(self.remote, self.data, self.mtype, self.token, result)
        except Exception:
            logger.exception("answering a request from %s failed", self.remote.hostinfo)
            return
        if rest is not None:
            fast._loop.create_task(rest, name="synapse-coap answer")

    def cancel(self) -> None:
        if self.over:
            return
        abandon = self.abandon
        self._end()
        if abandon is not None:
            abandon()
