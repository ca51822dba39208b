"""The CoAP server: Noise (and optionally plain) UDP listeners feeding a Dispatcher.

Each request is decoded with the session's :class:`WireCodec` (the profile the
handshake negotiated; a plain listener uses the base profile; a large body on a
worker thread, :mod:`~synapse_coap.transport.offload`), handed to
``dispatcher.dispatch(HttpRequest, PeerInfo)`` in the exchange's own asyncio
task (or, on the fast path, started at once with ``dispatch_now`` where the
dispatcher has it: :meth:`CoapServer.respond_now`), and the HttpResponse is encoded
back. aiocoap does the message layer,
tuned by :class:`LinkMessageManager`: a response ready before the peer's
retransmission timer would fire rides on the ACK; a slow one gets an empty
ACK, then a separate confirmable response. A long-poll (``GET /sync?timeout=``,
:attr:`HttpRequest.is_long_poll`) is acknowledged as soon as it is decoded:
holding its ACK would hold the peer's next request (NSTART) and skew its RTT.

* Block1 request bodies are reassembled here, in linear time and capped at
  ``ServerConfig.max_body_size`` (aiocoap's own reassembly is uncapped and
  quadratic); Block2 responses come from a per-exchange cache.
* An exchange the peer abandons (its session closes, or it reuses the
  request's token, or sends the private Abandon option) cancels the dispatch
  task.
* ``/.well-known/core`` lists what the listener serves (RFC 6690).

The server's parts live beside it: its configuration (``server_config``), the
one aiocoap resource every request passes (``root``), blockwise transfer state
(``blocks``), the link-format document (``linkformat``) and the 0-RTT
watermark file (``replay_state``).

Size: about 1,000 lines, nearly all of them :class:`CoapServer`, whose listener
start-up and shutdown, per-session codecs, request rendering and push
registrations share one state (sessions, message managers, the dispatcher);
split further it would pass that state between modules instead of holding it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type

from synapse_coap.errors import (
    LimitExceeded,
    RemoteProtocolError,
    SynapseCoapError,
)
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap_rules import accepted_format
from synapse_coap.mapping.codec import request_seq
from synapse_coap.mapping.dispatch import Dispatcher, PeerInfo
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.mapping.push import (
    VERSIONS_PATH,
    SyncQuery,
    advertise_observe,
)
from synapse_coap.mapping.redact import redact_target
from synapse_coap.mapping.tokens import ReceiverTokens, UnknownTokenReference
from synapse_coap.transport.batch import BatchHold
from synapse_coap.transport.blocks import (
    Block1Assembler,
    Block2Responses,
)
from synapse_coap.transport.convert import (
    ABANDON_OPTION,
    BLOCKWISE_OPTIONS,
    NO_RESPONSE_ALL,
    NOT_ENCODABLE,
    Codec,
    CodecFactory,
    RejectNon,
    carried,
    default_codec_factory,
    from_aiocoap,
    parse_server_name,
    session_context,
    to_aiocoap,
)
from synapse_coap.transport.fastpath import FastPath
from synapse_coap.transport.linkformat import (
    OBSERVABLE_SYNC,
    _link_format,
)
from synapse_coap.transport.manager import LinkMessageManager, attach_transport
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics
from synapse_coap.transport.noise_udp import (
    NoiseMessageInterface,
    NoiseRemote,
    SessionEndpoint,
    normalize_address,
)
from synapse_coap.transport.offload import INLINE_ENCODE_MAX, DecodePool
from synapse_coap.transport.plain import PlainUDP
from synapse_coap.transport.push import Observation, Registration, Registrations
from synapse_coap.transport.replay_state import (
    REPLAY_STATE_INTERVAL,
    write_replay_state,
)
from synapse_coap.transport.root import (
    RootContext,
    _Root,
)
from synapse_coap.transport.server_config import (
    DEFAULT_RESOURCES,
    ServerConfig,
    _default_endpoint,
)
from synapse_coap.transport.transfers import TransferStore
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.strings import ReceiverStrings, UnknownStringReference

logger = logging.getLogger(__name__)

#: Options that belong to the transfer, not to the request the codec sees.
_TRANSFER_OPTIONS = BLOCKWISE_OPTIONS | {int(OptionNumber.NO_RESPONSE), ABANDON_OPTION}

#: Accept values a request may carry (RFC 7252 5.10.4): the compact body, plain JSON
#: (a standard tool; the body the HTTP API gives), and the formats a Matrix resource
#: may answer in (media). Any other value is answered 4.06 before dispatch; a 2.xx
#: response in another format than the one accepted becomes 4.06 too.
_ACCEPTABLE = frozenset({n.CF_COMPACT, n.CF_JSON, *n.CF_TO_MEDIA_TYPE})


# -- Block1 reassembly (linear, capped) ----------------------------------------------


# -- sessions ----------------------------------------------------------------------


@attrs.define
class _ServerSession:
    codec: Codec
    tokens: Any
    peer: PeerInfo
    #: held by one request decode at a time: decoding updates ``tokens`` (bindings,
    #: the string table), and a large body is decoded on a worker thread
    decode_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    #: decodes holding or waiting for ``decode_lock`` (0: a request may decode at once)
    decodes: int = 0


def _receiver_tokens(*, strings: bool = False) -> Any:
    """Per-session token bindings; with ``strings`` also the session string table."""
    return ReceiverTokens(strings=ReceiverStrings() if strings else None)


def _encode_answer(
    codec: Codec,
    route: str,
    response: HttpResponse,
    want_json: bool,
    method: int,
    tokens: ReceiverTokens | None,
    seq: int | None,
) -> CoapMessage:
    """The CoAP answer with ``response`` (5.00 if it cannot be encoded)."""
    strings = tokens.strings if tokens is not None else None
    try:
        return codec.encode_response(
            response, want_json=want_json, method=method, strings=strings, seq=seq
        )
    except SynapseCoapError as e:
        logger.error("cannot encode the response to %s: %s", route, e)
        return NOT_ENCODABLE


_URI_PATH = int(OptionNumber.URI_PATH)
_CONTENT_FORMAT = int(OptionNumber.CONTENT_FORMAT)
_WELL_KNOWN_CORE = [b".well-known", b"core"]


def _content_format(msg: CoapMessage) -> int | None:
    value = msg.first(_CONTENT_FORMAT)
    return None if value is None else int.from_bytes(value, "big")


def _json_error(status: int, errcode: str, error: str) -> HttpResponse:
    body = json.dumps({"errcode": errcode, "error": error}).encode()
    return HttpResponse(status, (("content-type", "application/json"),), body)


class _Exchange:
    """One request between :meth:`CoapServer._open` and its answer."""

    __slots__ = (
        "accept",
        "cm",
        "codec",
        "method",
        "nonconfirmable",
        "remote",
        "route",
        "session",
        "started",
        "token",
        "want_json",
    )

    def __init__(
        self,
        remote: Any,
        token: bytes,
        cm: CoapMessage,
        nonconfirmable: bool,
        started: float,
        accept: int | None,
        session: _ServerSession,
        route: str,
    ) -> None:
        self.remote = remote
        self.token = token
        self.cm = cm
        self.nonconfirmable = nonconfirmable
        self.started = started
        self.accept = accept
        self.session = session
        self.codec: Codec = session.codec
        self.route = route
        self.want_json = accept == n.CF_JSON
        self.method = cm.code


def _nothing() -> None:
    pass


def _log_abandoned(ex: _Exchange) -> None:
    logger.info("exchange %s from %s abandoned; dispatch cancelled", ex.route, ex.session.peer.host)


def _dropped(_: CoapMessage | BaseException) -> None:
    pass


class _Now:
    """An exchange of :meth:`CoapServer.respond_now`: answered once, or abandoned."""

    __slots__ = (
        "_dispatch_now",
        "_done",
        "abandon",
        "ex",
        "http_req",
        "loop",
        "over",
        "server",
        "starting",
        "task",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        done: Callable[[CoapMessage | BaseException], None],
        ex: _Exchange,
        server: CoapServer,
        http_req: HttpRequest,
        dispatch_now: Callable[
            [HttpRequest, PeerInfo, Callable[[HttpResponse | BaseException], None]],
            Callable[[], None] | None,
        ],
    ) -> None:
        self.loop = loop
        self._done = done
        self.ex = ex
        self.server = server
        self.http_req = http_req
        self._dispatch_now = dispatch_now
        self.over = False
        #: while the dispatcher starts the request (an answer then comes at once)
        self.starting = False
        self.abandon: Callable[[], None] | None = None
        self.task: asyncio.Task[CoapMessage] | None = None
        server.now_live += 1

    def start(self) -> None:
        """Hand the request to the dispatcher (now, or when its batch is read:
        :class:`~synapse_coap.transport.batch.BatchHold`); nothing if it was abandoned
        meanwhile."""
        if self.over:
            return
        ex, http_req = self.ex, self.http_req
        self.starting = True
        try:
            abandon = self._dispatch_now(http_req, ex.session.peer, self.complete)
        except Exception as e:  # (a dispatcher bug) the error answers it, held or not
            self.starting = False
            self.finish(e)
            return
        self.starting = False
        if abandon is None:
            self.follow(self.server._serve(ex, http_req))
        elif not self.over:
            self.abandon = abandon

    def complete(self, result: HttpResponse | BaseException) -> None:
        """The dispatcher's result (``dispatch_now``'s ``done``): the answer, now or (a
        large body) from a task; for a request of a batch that the homeserver answered
        as it started, once the batch's other requests are started too
        (:meth:`BatchHold.later <synapse_coap.transport.batch.BatchHold.later>`); for
        one answered after its start, through the dispatcher's ``answer_later`` where
        it has one (with the other answers of the same reactor turn), unless it is the
        only exchange in progress: then no other answer can join it, and it goes at
        once (without a timed call and a pass of the reactor's queue for it)."""
        if self.over:
            return
        server = self.server
        if self.starting:
            if server.batch.later(functools.partial(self._answer, result)):
                return
        else:
            later = server.answer_later
            if (
                later is not None
                and server.now_live > 1
                and later(functools.partial(self._answer, result))
            ):
                return
        self._answer(result)

    def _answer(self, result: HttpResponse | BaseException) -> None:
        if self.over:  # (abandoned while its answer waited for the batch)
            return
        ex, server = self.ex, self.server
        if isinstance(result, asyncio.CancelledError):
            _log_abandoned(ex)
            self.finish(result)
            return
        if isinstance(result, BaseException):
            result = server._failed_dispatch(ex, result)
        out = server._conclude(ex, self.http_req, result)
        if isinstance(out, CoapMessage):
            self.finish(out)
        else:
            self.follow(out)

    def finish(self, result: CoapMessage | BaseException) -> None:
        if not self.over:
            done = self._done
            self._release()
            done(result)

    def _release(self) -> None:
        """Over: drop the callbacks (the caller's ``done`` refers back to this exchange's
        ``cancel``: kept, the two would wait for the cycle collector, holding the
        dispatcher's request)."""
        self.over = True
        self.server.now_live -= 1
        self._done = _dropped
        self.abandon = None
        self.task = None

    def follow(self, coro: Coroutine[Any, Any, CoapMessage]) -> None:
        """The rest of the exchange in a task (the off-loop encoding; a dispatcher that
        could not start the request at once). Called from the dispatcher's callback,
        which with Synapse's default reactor runs outside the loop's iteration."""
        self.task = task = self.loop.create_task(coro, name="synapse-coap exchange")
        task.add_done_callback(self._followed)

    def _followed(self, task: asyncio.Task[CoapMessage]) -> None:
        if task.cancelled():
            self.finish(asyncio.CancelledError())
            return
        error = task.exception()
        self.finish(error if error is not None else task.result())

    def cancel(self) -> None:
        if self.over:
            return
        ex, abandon, task = self.ex, self.abandon, self.task
        self._release()
        if abandon is not None:
            abandon()
        if task is not None:
            task.cancel()
        elif abandon is not None:
            _log_abandoned(ex)


class CoapServer:
    """A running CoAP server. Create with :meth:`start`; stop with :meth:`close`."""

    def __init__(
        self,
        config: ServerConfig,
        dispatcher: Dispatcher,
        metrics: TransportMetrics,
        codec_factory: CodecFactory,
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.metrics = metrics
        self._codec_factory = codec_factory
        self._context: Any = None
        self._noise: list[NoiseMessageInterface] = []
        #: the requests of a batch of records, started once the batch is read
        self.batch = BatchHold()
        #: the dispatcher's ``answer_later`` (an answer that came after its request's
        #: start, to run with the others that come in the same turn), or None
        self.answer_later: Callable[[Callable[[], None]], bool] | None = getattr(
            dispatcher, "answer_later", None
        )
        #: exchanges of :meth:`respond_now` not yet over (``_Now``): an answer that comes
        #: after its start waits for the others of its reactor turn only where one of
        #: these may bring one (see ``_Now.complete``)
        self.now_live = 0
        self._plain: list[Any] = []
        self._mmans: list[LinkMessageManager] = []
        self._fast: list[FastPath] = []
        self._plain_sessions: OrderedDict[Any, _ServerSession] = OrderedDict()
        self._secure_addresses: list[tuple[str, int]] = []
        self._plain_addresses: list[tuple[str, int]] = []
        self._closed = False
        self._replay_timer: asyncio.TimerHandle | None = None
        self._root: _Root | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._evictions_counted: dict[str, int] = {}
        self._replay_write_failed = False
        self.registrations = Registrations(config.push, self.metrics)
        self._decoder = DecodePool()
        #: the loop the server was started on (None before :meth:`start`)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def start(
        cls,
        config: ServerConfig,
        dispatcher: Dispatcher,
        *,
        metrics: TransportMetrics | None = None,
        codec_factory: CodecFactory | None = None,
        endpoint_factory: Callable[[ServerConfig, Callable[[], float]], SessionEndpoint]
        | None = None,
    ) -> CoapServer:
        """Bind every configured socket and start serving."""
        self = cls(
            config, dispatcher, metrics or NullMetrics(), codec_factory or default_codec_factory
        )
        self._loop = loop = asyncio.get_running_loop()
        self._root = _Root(self)
        self._context = RootContext(loop=loop, serversite=self._root, loggername=__name__ + ".coap")
        self._schedule_expiry()
        make_endpoint = endpoint_factory or _default_endpoint
        try:
            for bind in config.listen:
                endpoint = make_endpoint(config, loop.time)

                async def make_noise(
                    mman: LinkMessageManager, endpoint: SessionEndpoint = endpoint, bind: Any = bind
                ) -> NoiseMessageInterface:
                    return await NoiseMessageInterface.create(
                        mman,
                        endpoint,
                        bind=bind,
                        metrics=self.metrics,
                        block_size_exp=config.link.block_size_exp,
                        on_established=self._on_established,
                    )

                mman, iface = await attach_transport(
                    self._context, config.link, self.metrics, make_noise
                )
                self._mmans.append(mman)
                self._noise.append(iface)
                if config.fast_path:
                    fast = FastPath(self, mman, iface)
                    iface.fast_request = fast
                    iface.hold_batches(self.batch)
                    mman.on_remote_error = fast.remote_failed
                    self._fast.append(fast)
                self._secure_addresses.append(iface.local_address)
            for bind in config.plain_listen:

                async def make_plain(mman: LinkMessageManager, bind: Any = bind) -> Any:
                    return await PlainUDP.create_server_transport_endpoint(
                        mman, log=self._context.log, loop=loop, bind=bind, multicast=[]
                    )

                mman, iface = await attach_transport(
                    self._context, config.link, self.metrics, make_plain
                )
                self._mmans.append(mman)
                self._plain.append(iface)
                sockname = iface.transport.get_extra_info("socket").getsockname()
                self._plain_addresses.append(normalize_address(sockname))
        except BaseException:
            await self.close()
            raise
        if config.replay_state_path is not None and self._noise:
            self._save_replay_state()
        logger.info(
            "CoAP server listening: noise %s, plain %s",
            self._secure_addresses,
            self._plain_addresses,
        )
        return self

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound addresses, secure ones first, then plain ones (actual ports when 0 was asked)."""
        return self._secure_addresses + self._plain_addresses

    @property
    def secure_addresses(self) -> list[tuple[str, int]]:
        return list(self._secure_addresses)

    @property
    def plain_addresses(self) -> list[tuple[str, int]]:
        return list(self._plain_addresses)

    @property
    def noise_interfaces(self) -> list[NoiseMessageInterface]:
        return list(self._noise)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self._replay_timer is not None:
            self._replay_timer.cancel()
            self._replay_timer = None
            self._save_replay_state(horizon=0.0, again=False)
        for fast in self._fast:
            fast.close()
        if self._context is not None:
            await self._context.shutdown()
        self._decoder.close()
        self._plain_sessions.clear()

    @property
    def fast_paths(self) -> list[FastPath]:
        """The fast path of each Noise listener (empty with ``config.fast_path`` off)."""
        return list(self._fast)

    @property
    def root(self) -> _Root:
        """The one aiocoap resource (request limits, blockwise state)."""
        assert self._root is not None
        return self._root

    @property
    def transfers(self) -> TransferStore:
        """Blockwise transfer state (partial uploads, cached responses) and its budget."""
        assert self._root is not None
        return self._root.transfers

    def _schedule_expiry(self) -> None:
        if self._closed or self._root is None:
            return
        if self._expiry_timer is not None:
            self._root.expire()
        interval = max(0.05, self._root.transfers.timeout / 4)
        self._expiry_timer = asyncio.get_running_loop().call_later(interval, self._schedule_expiry)

    def _count_evictions(self) -> None:
        """Count transfer state given up (metrics ``dropped``: ``transfer_<reason>``)."""
        if self._root is None:
            return
        for reason, total in self._root.transfers.evictions.items():
            for _ in range(total - self._evictions_counted.get(reason, 0)):
                self.metrics.dropped(f"transfer_{reason}")
            self._evictions_counted[reason] = total

    def _save_replay_state(
        self, horizon: float = REPLAY_STATE_INTERVAL, again: bool = True
    ) -> None:
        """Write the 0-RTT watermark: valid until the next write (``horizon`` s) or a crash."""
        path = self.config.replay_state_path
        if path is None:
            return
        marks = [
            mark(horizon)
            for iface in self._noise
            if callable(mark := getattr(iface.endpoint, "replay_watermark", None))
        ]
        if marks:
            try:
                write_replay_state(path, max(marks))
                self._replay_write_failed = False
            except OSError as e:
                if not self._replay_write_failed:
                    logger.warning("cannot write the 0-RTT replay state %s: %s", path, e)
                self._replay_write_failed = True
        if again:
            loop = asyncio.get_running_loop()
            self._replay_timer = loop.call_later(REPLAY_STATE_INTERVAL, self._save_replay_state)

    # -- sessions ------------------------------------------------------------------

    def _on_established(self, remote: NoiseRemote) -> None:
        peer_name = parse_server_name(remote.peer_app_payload)
        context = session_context(self.config.server_name, peer_name)
        host, port = remote.addr
        remote.app_state = _ServerSession(
            codec=self._codec_factory(remote.profile_id, context),
            tokens=_receiver_tokens(strings=True),
            peer=PeerInfo(host=host, port=port, static_key=remote.peer_static, secure=True),
        )

    def _session(self, remote: Any) -> _ServerSession:
        if isinstance(remote, NoiseRemote):
            if remote.app_state is None:
                self._on_established(remote)
            session: _ServerSession = remote.app_state
            host, port = remote.addr
            validated = remote.address_validated
            peer = session.peer
            if (peer.host, peer.port, peer.address_validated) != (host, port, validated):
                session.peer = attrs.evolve(peer, host=host, port=port, address_validated=validated)
            return session
        found = self._plain_sessions.get(remote)
        if found is None:
            host, port = normalize_address(remote.sockaddr)
            found = _ServerSession(
                # plain CoAP has no handshake: no shared server names
                codec=self._codec_factory(0, WireContext()),
                tokens=_receiver_tokens(),
                peer=PeerInfo(host=host, port=port, static_key=None, secure=False),
            )
            self._plain_sessions[remote] = found
            while len(self._plain_sessions) > 4096:
                self._plain_sessions.popitem(last=False)
        else:
            self._plain_sessions.move_to_end(remote)
        return found

    # -- rendering -------------------------------------------------------------------

    async def _decode_request(self, session: _ServerSession, cm: CoapMessage) -> HttpRequest:
        """``codec.decode_request(cm, tokens=session.tokens)``, off the loop when large.

        One decode per session at a time, in arrival order (the lock is FIFO); a
        decode on a worker thread keeps the lock until the thread is done with the
        session's tables, even when the request is abandoned meanwhile.
        """
        lock = session.decode_lock
        session.decodes += 1
        try:
            await lock.acquire()
        except BaseException:
            session.decodes -= 1
            raise
        if self._decoder.inline(len(cm.payload)):
            try:
                return session.codec.decode_request(cm, tokens=session.tokens)
            finally:
                session.decodes -= 1
                lock.release()
        try:
            fut = self._decoder.submit(session.codec.decode_request, cm, tokens=session.tokens)
        except BaseException:
            session.decodes -= 1
            lock.release()
            raise

        def done(f: asyncio.Future[HttpRequest]) -> None:
            session.decodes -= 1
            lock.release()
            if not f.cancelled():
                f.exception()  # retrieved: an abandoned request's error is not logged again

        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    def reject_non(self, remote: Any, mid: int, reason: str) -> None:
        """Reject the Non-confirmable request ``mid`` of ``remote`` (RFC 7252 4.3): a
        Reset with its Message ID goes out now, and no response."""
        self.metrics.dropped("non_bad_option")
        for mman in self._mmans:
            if mman.message_interface is getattr(remote, "interface", None):
                mman.reset_now(remote, mid, reason)
                break

    def _acknowledge_now(self, remote: Any, token: bytes) -> None:
        for mman in self._mmans:
            if mman.acknowledge_now(remote, token):
                return

    async def _render(self, req: Message) -> Message:
        cm = from_aiocoap(req)
        cm = CoapMessage(
            cm.code,
            tuple(o for o in cm.options if o.number not in _TRANSFER_OPTIONS),
            cm.payload,
        )
        try:
            answer = await self.respond(req.remote, bytes(req.token), cm, req.mtype == Type.NON)
        except RejectNon as e:
            self.reject_non(req.remote, req.mid, str(e))
            out = Message(code=Code.BAD_OPTION)
            out.opt.no_response = NO_RESPONSE_ALL  # suppressed: the Reset answers
            return out
        return carried(answer, "request")

    async def respond(
        self, remote: Any, token: bytes, cm: CoapMessage, nonconfirmable: bool
    ) -> CoapMessage:
        """The answer to the request ``cm`` (transfer options taken out) from ``remote``
        on ``token``; :class:`RejectNon` for a NON request rejected with a Reset."""
        ex = self._open(remote, token, cm, nonconfirmable)
        if isinstance(ex, CoapMessage):
            return ex
        try:
            http_req = await self._decode_request(ex.session, cm)
        except RemoteProtocolError as e:
            return self._undecodable(ex, e)
        self._decoded(ex, http_req)
        return await self._serve(ex, http_req)

    def respond_now(
        self,
        remote: Any,
        token: bytes,
        cm: CoapMessage,
        nonconfirmable: bool,
        done: Callable[[CoapMessage | BaseException], None],
    ) -> Callable[[], None] | None:
        """:meth:`respond` without a task of its own, where it can be: ``done`` gets the
        answer (or :class:`RejectNon`, or ``asyncio.CancelledError`` when the dispatcher
        gave the request up), possibly before this returns; the function returned
        abandons the exchange (``done`` is not called after it).

        None, having done nothing, when the dispatcher cannot start a request at once
        (no ``dispatch_now``), or when the request would wait to be decoded (another of
        its session is being decoded, or its body is decoded off the loop): then
        :meth:`respond` in a task. Called on the loop's thread; ``done`` is called on it.
        """
        dispatch_now = getattr(self.dispatcher, "dispatch_now", None)
        if dispatch_now is None:
            return None
        ex = self._open(remote, token, cm, nonconfirmable)
        if isinstance(ex, CoapMessage):
            done(ex)
            return _nothing
        session = ex.session
        if session.decodes or not self._decoder.inline(len(cm.payload)):
            return None
        try:
            http_req = session.codec.decode_request(cm, tokens=session.tokens)
        except RemoteProtocolError as e:
            try:
                done(self._undecodable(ex, e))
            except RejectNon as reject:
                done(reject)
            return _nothing
        self._decoded(ex, http_req)
        # (the loop kept at start: on Python 3.11 get_running_loop is a getpid system call)
        now = _Now(self._loop or asyncio.get_running_loop(), done, ex, self, http_req, dispatch_now)
        if not self.batch.hold(now):
            now.start()
        return now.cancel

    def _open(
        self, remote: Any, token: bytes, cm: CoapMessage, nonconfirmable: bool
    ) -> CoapMessage | _Exchange:
        """What is known of a request before it is decoded, or its answer already
        (``/.well-known/core``, a bad or unacceptable Accept)."""
        started = time.monotonic()
        try:
            accept = accepted_format(cm)
        except RemoteProtocolError:
            return CoapMessage(int(Code.BAD_REQUEST), (), b"bad Accept option")
        index = cm.options_index()
        if index.get(_URI_PATH) == _WELL_KNOWN_CORE and n.OPT_TARGET not in index:
            if cm.code != int(Code.GET):
                return CoapMessage(int(Code.METHOD_NOT_ALLOWED))
            if accept not in (None, n.CF_LINK_FORMAT):
                return CoapMessage(int(Code.NOT_ACCEPTABLE))
            queries = [
                o.value.decode("utf-8", "replace")
                for o in cm.options
                if o.number == int(OptionNumber.URI_QUERY)
            ]
            observable = (OBSERVABLE_SYNC,) if self.config.push.enabled else ()
            return CoapMessage(
                int(Code.CONTENT),
                (CoapOption(int(OptionNumber.CONTENT_FORMAT), bytes([n.CF_LINK_FORMAT])),),
                _link_format(self.config.resources, queries, observable),
            )
        if accept is not None and accept not in _ACCEPTABLE:
            return CoapMessage(int(Code.NOT_ACCEPTABLE))
        session = self._session(remote)
        try:
            route = session.codec.route_name(cm)
        except Exception:
            route = "unknown"
        return _Exchange(remote, token, cm, nonconfirmable, started, accept, session, route)

    def _undecodable(self, ex: _Exchange, e: RemoteProtocolError) -> CoapMessage:
        """The answer to a request that did not decode (:class:`RejectNon` for a NON
        with an unknown critical option)."""
        codec, route, started, want_json, method = (
            ex.codec,
            ex.route,
            ex.started,
            ex.want_json,
            ex.method,
        )
        if isinstance(e, LimitExceeded):
            logger.info("request from %s over a limit: %s", ex.session.peer.host, e)
            return self._finish(
                codec, route, started, _json_error(413, "M_TOO_LARGE", str(e)), want_json, method
            )
        if isinstance(e, (UnknownTokenReference, UnknownStringReference)):
            return self._unknown_token(codec, route, started, e, want_json, method)
        logger.info("undecodable request from %s: %s", ex.session.peer.host, e)
        coap_code: int | None = getattr(e, "coap_code", None)
        if coap_code == n.BAD_OPTION and ex.nonconfirmable:
            # RFC 7252 5.4.1: an unrecognized critical option in a NON rejects the
            # message (4.3): no response, a matching Reset
            raise RejectNon(str(e)) from None
        if coap_code is None:
            return self._finish(
                codec, route, started, _json_error(400, "M_BAD_JSON", str(e)), want_json, method
            )
        # 4.02 (critical option), 4.05 (method), 5.05 (proxy): the code says it,
        # and each reads back as the status given here (400, 405, 502)
        status = n.code_to_status(coap_code, method)
        out = self._finish(
            codec,
            route,
            started,
            _json_error(status, "M_UNRECOGNIZED", str(e)),
            want_json,
            method,
        )
        return attrs.evolve(out, code=coap_code)

    def _decoded(self, ex: _Exchange, http_req: HttpRequest) -> None:
        if http_req.is_long_poll:
            # it will wait: acknowledge now, so the peer's next request is not held
            # behind this one's ACK (its NSTART slot) and its RTT sample stays honest
            self._acknowledge_now(ex.remote, ex.token)
        if self.config.payload_dump:
            logger.debug(
                "request %s %s from %s: %r",
                http_req.method,
                redact_target(http_req.target),
                ex.session.peer,
                http_req.body[:4096],
            )

    async def _serve(self, ex: _Exchange, http_req: HttpRequest) -> CoapMessage:
        """Dispatch a decoded request and encode its answer."""
        try:
            response = await self.dispatcher.dispatch(http_req, ex.session.peer)
        except asyncio.CancelledError:
            _log_abandoned(ex)
            raise
        except Exception as e:
            response = self._failed_dispatch(ex, e)
        out = self._conclude(ex, http_req, response)
        return out if isinstance(out, CoapMessage) else await out

    @staticmethod
    def _failed_dispatch(ex: _Exchange, e: BaseException) -> HttpResponse:
        if isinstance(e, SynapseCoapError):
            logger.warning("dispatch of %s failed: %s", ex.route, e)
            return _json_error(502, "M_UNKNOWN", "upstream failed")
        logger.error("dispatcher raised on %s", ex.route, exc_info=e)
        return _json_error(500, "M_UNKNOWN", "internal server error")

    def _conclude(
        self, ex: _Exchange, http_req: HttpRequest, response: HttpResponse
    ) -> CoapMessage | Coroutine[Any, Any, CoapMessage]:
        """The answer with ``response`` (``/versions`` advertising push sync when it is
        on), or, for a body too large to encode on the loop, the coroutine encoding it
        off the loop."""
        target = http_req.target
        if (
            target.startswith(VERSIONS_PATH)
            and response.status == 200
            and self.config.push.enabled
            and target.partition(b"?")[0] == VERSIONS_PATH
        ):
            advertised = advertise_observe(response.body)
            if advertised is not None:
                # (its headers as they are: no converter pass, as attrs.evolve makes)
                response = HttpResponse(response.status, response.headers, advertised)
        size = len(response.body)
        if size > INLINE_ENCODE_MAX and not self._decoder.inline(size):
            return self._answer_off_loop(ex, response)
        out = self._finish(
            ex.codec,
            ex.route,
            ex.started,
            response,
            ex.want_json,
            ex.method,
            ex.session.tokens,
            request_seq(ex.cm),
        )
        return self._checked(ex, out)

    async def _answer_off_loop(self, ex: _Exchange, response: HttpResponse) -> CoapMessage:
        """:meth:`_finish` for a large body: the encoding runs on the decode pool,
        so the loop (Synapse's reactor, with the asyncio reactor) is not held for it."""
        self.metrics.request(ex.route, response.status, time.monotonic() - ex.started)
        out = await self._decoder.submit(
            _encode_answer,
            ex.codec,
            ex.route,
            response,
            ex.want_json,
            ex.method,
            ex.session.tokens,
            request_seq(ex.cm),
        )
        return self._checked(ex, out)

    @staticmethod
    def _checked(ex: _Exchange, out: CoapMessage) -> CoapMessage:
        accept = ex.accept
        if (
            accept is not None
            and 64 <= out.code < 96
            and out.payload
            and _content_format(out) != accept
        ):
            # RFC 7252 5.10.4: the resource answered in another format than the one asked
            return CoapMessage(int(Code.NOT_ACCEPTABLE))
        return out

    async def _observe(self, req: Message, pipe: Any, block2: Block2Responses) -> bool:
        """Serve an Observe registration of ``/sync``; False if ``req`` is not one (normal path)."""
        cm = from_aiocoap(req)
        cm = CoapMessage(
            cm.code,
            tuple(o for o in cm.options if o.number not in _TRANSFER_OPTIONS),
            cm.payload,
        )
        session = self._session(req.remote)
        codec = session.codec
        try:
            want_json = codec.wants_json(cm)
            http_req = await self._decode_request(session, cm)
        except Exception:
            return False  # the normal path answers (and logs) it
        query = SyncQuery.parse(http_req.target) if http_req.method == "GET" else None
        auth = http_req.header("authorization")
        if query is None or auth is None:
            return False
        reg = Registration(
            # keyed by the peer (a Noise channel outlives re-handshakes, which renew the
            # per-session codec state): a registration made again replaces the old one
            session=req.remote,
            source=session.peer.host,
            auth=auth,
            token=bytes(req.token),
            observed=query.observed,
            pipe=pipe,
        )
        refused = self.registrations.admit(reg)
        try:
            route = codec.route_name(cm)
        except Exception:
            route = "unknown"
        if refused is not None:
            limit = (
                self.config.push.max_per_session
                if refused == "session"
                else self.config.push.max_per_source
            )
            logger.info(
                "push registration from %s refused: over the per-%s limit of %d",
                session.peer.host,
                refused,
                limit,
            )
            error = _json_error(
                429,
                "M_LIMIT_EXCEEDED",
                f"too many /sync push registrations for this {refused} (limit {limit})",
            )
            pipe.add_response(
                carried(
                    self._finish(codec, route, time.monotonic(), error, want_json, int(cm.code)),
                    route,
                ),
                is_last=True,
            )
            return True
        # a registration waits for news like a long-poll: acknowledge it at once
        self._acknowledge_now(req.remote, bytes(req.token))
        link = self.config.link
        exp = min(link.block_size_exp, int(getattr(req.remote, "maximum_block_size_exp", 6)))
        observation = Observation(
            reg,
            request=http_req,
            query=query,
            peer=session.peer,
            codec=codec,
            want_json=want_json,
            dispatcher=self.dispatcher,
            config=self.config.push,
            link=link,
            metrics=self.metrics,
            block_size_exp=exp,
            store_blocks=lambda full, on_last: block2.put_pushed(req, full, on_last),
            heard=req.remote.next_heard if isinstance(req.remote, NoiseRemote) else None,
            strings=session.tokens.strings if session.tokens is not None else None,
        )
        logger.info(
            "push registration from %s (%d live)", session.peer.host, len(self.registrations)
        )
        try:
            await observation.run()
        finally:
            self.registrations.release(reg)
        return True

    def _finish(
        self,
        codec: Codec,
        route: str,
        started: float,
        response: HttpResponse,
        want_json: bool,
        method: int,
        tokens: ReceiverTokens | None = None,
        seq: int | None = None,
    ) -> CoapMessage:
        """``tokens``/``seq``: the session and the String-Seq of a decoded request (its
        2xx answer's identifiers are recorded in the session string table)."""
        self.metrics.request(route, response.status, time.monotonic() - started)
        return _encode_answer(codec, route, response, want_json, method, tokens, seq)

    def _unknown_token(
        self,
        codec: Codec,
        route: str,
        started: float,
        error: Exception,
        want_json: bool,
        method: int,
    ) -> CoapMessage:
        """4.01 + Token-Reset (or 4.00 + String-Reset): the client resets and resends."""
        logger.info("unknown session reference on %s: asking the client to reset: %s", route, error)
        builder = getattr(codec, "unknown_token_response", None)
        if callable(builder):
            try:
                cm: CoapMessage = builder(error)
                status = 400 if isinstance(error, UnknownStringReference) else 401
                self.metrics.request(route, status, time.monotonic() - started)
                to_aiocoap(cm)  # raises if it cannot be carried (then the JSON error)
                return cm
            except Exception:
                logger.exception("building the unknown-token response failed")
        return self._finish(
            codec,
            route,
            started,
            _json_error(401, "M_UNKNOWN_TOKEN", "unknown access token reference; resend"),
            want_json,
            method,
        )


__all__ = ["DEFAULT_RESOURCES", "Block1Assembler", "CoapServer", "ServerConfig"]
