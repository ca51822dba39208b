"""The CoAP client: HttpRequest in, HttpResponse out, over Noise (or plain) UDP.

* One Noise channel per :class:`Endpoint` (IK when the peer's key is known,
  else XX); a request that is safe to replay (``WireCodec.is_replay_safe``)
  may ride as 0-RTT early data in the first handshake message.
* NSTART per peer is adaptive: ``link.nstart`` (RFC 7252: 1) until the link
  is measured, up to ``link.max_nstart`` (see :mod:`synapse_coap.transport.link`);
  requests to different peers proceed concurrently.
* Blockwise transfers (RFC 7959) both ways are driven here, with the
  response body capped (aiocoap's client reassembly is uncapped).
* Retransmission timers follow the peer's measured RTT (see
  :mod:`synapse_coap.transport.manager`).
* The sticky access token: one ``SenderTokens`` per session (reset whenever
  the session is (re-)established); a response acknowledges the request's
  binding; on "unknown token reference" the bindings are reset and the
  request is retried once.  On Noise sessions it also holds the session
  string table (``wire/strings.py``), acknowledged and reset the same way.
* Errors: :class:`~synapse_coap.errors.LinkDown` when no session can be
  established or the peer stops acknowledging (the cause is chained, e.g. a
  :class:`~synapse_coap.errors.KeyChangedError`), and
  :class:`~synapse_coap.errors.RequestTimeout` when the whole request (blockwise
  included) exceeds its deadline. A request given up on (timeout or task
  cancellation) is *abandoned* at the server: its handler is cancelled.
* A response (or push notification) whose payload is over ``inline_decode_max``
  bytes is decoded on the client's own small thread pool, not on the event loop
  (:mod:`~synapse_coap.transport.offload`).

Size: about 665 lines, nearly all of them :class:`CoapClient`, one class because
its sessions, handshakes, requests, blockwise transfers and push observations
share the endpoint table, the message managers and the per-session codecs. What
it keeps per endpoint and exchange is in :mod:`~synapse_coap.transport.client_session`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiocoap import error as coap_error
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import NON
from aiocoap.optiontypes import BlockOption
from aiocoap.pipe import Pipe
from aiocoap.protocol import Context
from aiocoap.util import hostportjoin

from synapse_coap.errors import (
    LinkDown,
    LocalProtocolError,
    RemoteProtocolError,
    RequestTimeout,
    SynapseCoapError,
)
from synapse_coap.mapping.codec import request_seq
from synapse_coap.mapping.messages import CoapMessage, HttpRequest, HttpResponse
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.aiocoap_compat import untie_request
from synapse_coap.transport.client_session import (
    Endpoint,
    PushEvent,
    _ClientSession,
    _on_response,
    _safe_route,
    _sender_tokens,
    _strip_transfer,
)
from synapse_coap.transport.convert import (
    ABANDON_OPTION,
    BLOCKWISE_OPTIONS,
    NO_RESPONSE_ALL,
    CodecFactory,
    default_codec_factory,
    from_aiocoap,
    parse_server_name,
    server_name_payload,
    session_context,
    supported_profile_offers,
    to_aiocoap,
)
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.link import keepalive_interval as effective_keepalive
from synapse_coap.transport.manager import LinkMessageManager, LinkTuning, attach_transport
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics
from synapse_coap.transport.noise_udp import (
    NoiseLinkError,
    NoiseMessageInterface,
    NoiseRemote,
    SessionEndpoint,
    normalize_address,
)
from synapse_coap.transport.offload import INLINE_DECODE_MAX, DecodePool
from synapse_coap.transport.plain import PlainUDP
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.push_base import ClientBases

logger = logging.getLogger(__name__)

_TRANSFER_OPTIONS = BLOCKWISE_OPTIONS


#: Queued by the registration request's acknowledgement hook.
_ACKED = object()


class CoapClient:
    """Sends HttpRequests to CoAP endpoints. Create with :meth:`create`."""

    def __init__(
        self,
        *,
        static_key: bytes | None,
        trust: TrustPolicy,
        link: LinkParameters,
        limits: Any,
        metrics: TransportMetrics,
        bind: tuple[str, int],
        server_name: str | None,
        codec_factory: CodecFactory,
        endpoint_factory: Callable[..., SessionEndpoint] | None,
        max_body_size: int,
        keepalive_interval: float | None = None,
        inline_decode_max: int = INLINE_DECODE_MAX,
        keepalive_ping: bool = True,
    ) -> None:
        self.static_key = static_key
        self._decoder = DecodePool(inline_decode_max)
        self.keepalive_interval = keepalive_interval
        self.keepalive_ping = keepalive_ping
        self.trust = trust
        self.link = link
        self.limits = limits
        self.metrics = metrics
        self.bind = bind
        self.server_name = server_name
        self.max_body_size = max_body_size
        self._codec_factory = codec_factory
        self._endpoint_factory = endpoint_factory
        self._context: Any = None
        self._noise: NoiseMessageInterface | None = None
        self._noise_mman: LinkMessageManager | None = None
        #: called (no arguments) when a channel gets a new Noise session after its first
        #: (the peer restarted or lost our session): what the peer held for us is gone
        self.on_new_session: list[Callable[[], None]] = []
        self._plain_mman: LinkMessageManager | None = None
        self._plain_lock = asyncio.Lock()
        self._sessions: dict[Endpoint, _ClientSession] = {}
        self._by_remote: dict[int, _ClientSession] = {}
        self._closed = False
        offers = supported_profile_offers()
        self._best_profile = max(p for p, _h in offers)

    @classmethod
    async def create(
        cls,
        *,
        static_key: bytes | None,
        trust: TrustPolicy,
        link: LinkParameters = LinkParameters(),
        limits: Any = None,
        metrics: TransportMetrics | None = None,
        bind: tuple[str, int] = ("::", 0),
        server_name: str | None = None,
        codec_factory: CodecFactory | None = None,
        endpoint_factory: Callable[..., SessionEndpoint] | None = None,
        max_body_size: int = 50 * 1024 * 1024,
        keepalive_interval: float | None = None,
        inline_decode_max: int = INLINE_DECODE_MAX,
        keepalive_ping: bool = True,
    ) -> CoapClient:
        """A client bound to ``bind``. Without ``static_key`` only plain endpoints work.

        ``server_name`` (optional) is sent, encrypted, in our handshakes so the
        peer can shorten identifiers on our server; ``endpoint_factory(static_key,
        trust=, limits=, profiles=, app_payload=, clock=)`` replaces the
        NoiseEndpoint (tests). ``keepalive_interval`` (seconds, None = off): a session
        that has sent nothing for that long sends a one-way keep-alive (NAT
        mappings, the peer's idle timer, NAT rebinding): a 3-byte NAT ping while it
        sealed a record lately (``keepalive_ping``), else a sealed record; see
        ``NoiseEndpoint(keepalive_interval=, keepalive_ping=)``. On a link of known
        ``bandwidth_bps`` it is raised so keep-alives take at most 0.5 % of the link
        (:func:`~synapse_coap.transport.link.keepalive_interval`).
        ``inline_decode_max``: response payloads larger than this (bytes) are decoded
        on a worker thread, not on the event loop.
        """
        if limits is None:
            from synapse_coap.noise.endpoint import (  # type: ignore
                NoiseLimits,
            )

            limits = NoiseLimits()
        self = cls(
            static_key=static_key,
            trust=trust,
            link=link,
            limits=limits,
            metrics=metrics or NullMetrics(),
            bind=bind,
            server_name=server_name,
            codec_factory=codec_factory or default_codec_factory,
            endpoint_factory=endpoint_factory,
            max_body_size=max_body_size,
            keepalive_interval=keepalive_interval,
            inline_decode_max=inline_decode_max,
            keepalive_ping=keepalive_ping,
        )
        loop = asyncio.get_running_loop()
        self._context = Context(loop=loop, serversite=None, loggername=__name__ + ".coap")
        if static_key is not None:
            endpoint = self._make_endpoint(loop.time)

            async def make(mman: LinkMessageManager) -> NoiseMessageInterface:
                return await NoiseMessageInterface.create(
                    mman,
                    endpoint,
                    bind=bind,
                    metrics=self.metrics,
                    block_size_exp=link.block_size_exp,
                    on_established=self._on_established,
                )

            try:
                self._noise_mman, self._noise = await attach_transport(
                    self._context, link, self.metrics, make
                )
            except BaseException:
                await self._context.shutdown()
                raise
        return self

    def _make_endpoint(self, clock: Callable[[], float]) -> SessionEndpoint:
        if self.static_key is None:
            raise LocalProtocolError("a Noise endpoint needs a static key")
        factory = self._endpoint_factory
        if factory is None:
            from synapse_coap.noise.endpoint import (  # type: ignore
                NoiseEndpoint,
            )

            factory = NoiseEndpoint
        extra: dict[str, Any] = {}
        if self.keepalive_interval is not None:
            extra["keepalive_interval"] = effective_keepalive(
                self.keepalive_interval, self.link.bandwidth_bps
            )
            extra["keepalive_ping"] = self.keepalive_ping
        endpoint: SessionEndpoint = factory(
            self.static_key,
            trust=self.trust,
            limits=self.limits,
            profiles=supported_profile_offers(),
            app_payload=server_name_payload(self.server_name),
            clock=clock,
            **extra,
        )
        return endpoint

    @property
    def noise_interface(self) -> NoiseMessageInterface | None:
        """The Noise transport (tests and the lab use ``rebind()`` on it)."""
        return self._noise

    @property
    def local_address(self) -> tuple[str, int] | None:
        return None if self._noise is None else self._noise.local_address

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sessions.clear()
        self._by_remote.clear()
        self._decoder.close()
        if self._context is not None:
            await self._context.shutdown()

    async def _decode_response(
        self, session: _ClientSession, resp_cm: CoapMessage, **kw: Any
    ) -> HttpResponse:
        """``session.codec.decode_response(resp_cm, **kw)``, off the loop when large.

        Raises what the codec raises. Decoding is a pure function of the codec (its
        profile and context) and the message, so it may run on another thread;
        the caller awaits it, so responses are still delivered in order.
        """
        return await self._decoder.run(
            len(resp_cm.payload), session.codec.decode_response, resp_cm, **kw
        )

    # -- sessions ------------------------------------------------------------------------

    def _on_established(self, remote: NoiseRemote) -> None:
        session = self._by_remote.get(id(remote))
        if session is None:
            return
        peer_name = parse_server_name(remote.peer_app_payload)
        context = session_context(peer_name, self.server_name)
        session.codec = self._codec_factory(remote.profile_id, context)
        session.profile_id = remote.profile_id
        session.established_profile = remote.profile_id
        if remote.establishments > 1:
            # a new Noise session on the same channel: the peer has no bindings and an
            # empty string table (our string sequence numbers continue, never reused),
            # and nothing else it held for us (push registrations)
            renewed = getattr(session.tokens, "renewed", None)
            session.tokens = renewed() if callable(renewed) else _sender_tokens(strings=True)
            for callback in list(self.on_new_session):
                try:
                    callback()
                except Exception:
                    logger.exception("new-session callback failed")

    async def _resolve(self, host: str, port: int, family: int | None) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise LinkDown(f"cannot resolve {host!r}: {e}") from e
        if family == socket.AF_INET:
            infos = [i for i in infos if i[0] == socket.AF_INET] or infos
        if not infos:
            raise LinkDown(f"no address for {host!r}")
        return normalize_address(infos[0][4])

    async def _session(self, endpoint: Endpoint) -> _ClientSession:
        session = self._sessions.get(endpoint)
        if session is not None:
            return session
        if self._closed:
            raise LinkDown("client is closed")
        if endpoint.secure:
            if self._noise is None or self._noise_mman is None:
                raise LocalProtocolError("a secure endpoint needs a client static key")
            family = self._noise._family
            addr = await self._resolve(endpoint.host, endpoint.port, family)
            remote: Any = self._noise.client_remote(
                addr, peer_name=endpoint.peer_name, expected_static=endpoint.static_key
            )
            mman = self._noise_mman
            profile = self._best_profile
        else:
            mman = await self._plain_manager()
            probe = Message(
                code=Code.GET, uri=f"coap://{hostportjoin(endpoint.host, endpoint.port)}/"
            )
            try:
                await self._context.find_remote_and_interface(probe)
            except coap_error.Error as e:
                raise LinkDown(f"cannot reach {endpoint.host}:{endpoint.port}: {e}") from e
            remote = probe.remote
            profile = 0
        session = self._sessions.get(endpoint)
        if session is not None:
            return session
        session = _ClientSession(
            endpoint=endpoint,
            remote=remote,
            mman=mman,
            # Before the handshake has told both ends each other's server names
            # (and on plain CoAP, where there is no handshake) the only safe
            # shared context is the empty one.
            codec=self._codec_factory(profile, WireContext()),
            profile_id=profile,
            tokens=_sender_tokens(strings=endpoint.secure),
        )
        self._sessions[endpoint] = session
        self._by_remote[id(remote)] = session
        return session

    async def _plain_manager(self) -> LinkMessageManager:
        async with self._plain_lock:
            if self._plain_mman is None:
                loop = asyncio.get_running_loop()

                async def make(mman: LinkMessageManager) -> Any:
                    return await PlainUDP.create_client_transport_endpoint(
                        mman, log=self._context.log, loop=loop
                    )

                self._plain_mman, _iface = await attach_transport(
                    self._context, self.link, self.metrics, make
                )
            return self._plain_mman

    # -- requests ------------------------------------------------------------------------

    async def request(
        self, endpoint: Endpoint, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        """Send ``request`` to ``endpoint`` and return the response.

        Raises LinkDown (no session / peer unreachable), RequestTimeout (no
        complete response within ``timeout``, default ``link.request_timeout``),
        RemoteProtocolError (the response could not be decoded).
        """
        deadline = self.link.request_timeout if timeout is None else timeout
        started = time.monotonic()
        try:
            return await asyncio.wait_for(self._request(endpoint, request), deadline)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"no response from {endpoint.host}:{endpoint.port} within {deadline:g} s "
                f"({time.monotonic() - started:.1f} s elapsed)"
            ) from None

    async def _request(self, endpoint: Endpoint, request: HttpRequest) -> HttpResponse:
        session = await self._session(endpoint)
        retried = False
        while True:
            codec = session.codec
            used_profile = session.profile_id
            tokens = session.tokens
            cm = codec.encode_request(request, tokens)
            early = bool(endpoint.secure and codec.is_replay_safe(request))
            started = time.monotonic()
            resp_cm = await self._exchange(session, cm, early=early, long_poll=request.is_long_poll)
            route = _safe_route(codec, cm)
            # (a session re-established meanwhile already has fresh, empty bindings)
            if tokens is not None and _on_response(tokens, cm, resp_cm) and not retried:
                retried = True
                logger.info("peer forgot our access token binding: resending %s", route)
                continue
            if (
                not retried
                and resp_cm.code >> 5 == 4
                and session.established_profile is not None
                and used_profile != session.established_profile
            ):
                # encoded (as early data) with a predicted profile the peer did not pick
                retried = True
                continue
            # Decode with the session's codec as it is *now*: the first request of a
            # new session was encoded before the handshake told us the peer's server
            # name, but the response was encoded with the established context.
            try:
                response = await self._decode_response(
                    session,
                    resp_cm,
                    method=cm.code,
                    strings=tokens.strings if tokens is not None else None,
                    seq=request_seq(cm),
                )
            except RemoteProtocolError:
                raise
            except SynapseCoapError as e:
                raise RemoteProtocolError(f"undecodable response: {e}") from e
            self.metrics.request(route, response.status, time.monotonic() - started)
            return response

    async def observe(self, endpoint: Endpoint, request: HttpRequest) -> AsyncIterator[PushEvent]:
        """Register an Observe (RFC 7641) on ``request`` and yield what the server pushes.

        Each notification is yielded as it arrives (duplicates, i.e. a repeated
        Observe value, are dropped; notifications larger than one block are
        fetched whole, RFC 7959), in order; the generator ends after a final
        event. Closing the generator forgets the registration locally (a later
        notification is answered with RST, which ends it at the server).
        Raises LinkDown when the registration cannot be sent or the link fails.
        """
        session = await self._session(endpoint)
        retried = False
        while True:
            codec = session.codec
            tokens = session.tokens
            cm = codec.encode_request(request, tokens, observe=True)
            m = to_aiocoap(cm)
            m.opt.observe = 0
            m.remote = session.remote
            events: asyncio.Queue[Any] = asyncio.Queue()

            def acknowledged(ok: bool, events: asyncio.Queue[Any] = events) -> None:
                if ok:
                    events.put_nowait(_ACKED)

            # the server acknowledges a registration at once (it waits for news)
            m.transport_tuning = LinkTuning(
                self.link, prompt_ack=True, on_acknowledged=acknowledged
            )

            def on_event(ev: Any, events: asyncio.Queue[Any] = events) -> bool:
                events.put_nowait(ev)
                return not ev.is_last

            pipe = Pipe(m, self._context.log)
            stop = pipe.on_event(on_event)
            # this registration's notifications, possible bases of the next ones
            bases = ClientBases(codec.notification_template(request.target))
            try:
                try:
                    interface = await self._context.find_remote_and_interface(m)
                    interface.request(pipe)
                except coap_error.Error as e:
                    raise LinkDown(
                        f"cannot register at {endpoint.host}:{endpoint.port}: {e}"
                    ) from e
                last_seq: int | None = None
                while True:
                    ev = await events.get()
                    if ev is _ACKED:
                        yield PushEvent(None, False)
                        continue
                    if ev.exception is not None:
                        raise self._link_error(session, ev.exception)
                    if ev.message is None:
                        raise LinkDown("the registration ended without a response")
                    resp = ev.message
                    seq = resp.opt.observe
                    final = ev.is_last or seq is None
                    if not final and seq == last_seq:
                        continue  # a retransmitted notification whose ACK was lost
                    last_seq = seq
                    resp = await asyncio.wait_for(
                        self._complete_block2(session, cm, None, resp), self.link.request_timeout
                    )
                    resp_cm = _strip_transfer(from_aiocoap(resp))
                    resp_cm = CoapMessage(
                        resp_cm.code,
                        tuple(o for o in resp_cm.options if o.number != int(OptionNumber.OBSERVE)),
                        resp_cm.payload,
                    )
                    rebind = tokens is not None and _on_response(tokens, cm, resp_cm)
                    if rebind and final and not retried:
                        break  # the server forgot our token binding: register again
                    view = bases.view(seq)
                    try:
                        response = await self._decode_response(
                            session,
                            resp_cm,
                            strings=tokens.strings if tokens is not None else None,
                            bases=view,
                        )
                        view.commit()
                    except RemoteProtocolError:
                        raise
                    except SynapseCoapError as e:
                        raise RemoteProtocolError(f"undecodable notification: {e}") from e
                    self.metrics.request(_safe_route(codec, cm), response.status, 0.0)
                    yield PushEvent(response, final)
                    if final:
                        return
            except asyncio.TimeoutError:
                raise LinkDown("a notification's blocks did not arrive in time") from None
            finally:
                stop()
            retried = True
            logger.info("peer forgot our access token binding: registering again")

    def _link_error(self, session: _ClientSession, e: BaseException) -> SynapseCoapError:
        if isinstance(e, NoiseLinkError):
            err: SynapseCoapError = LinkDown(
                f"link to {session.endpoint.host}:{session.endpoint.port} failed: {e}"
            )
            err.__cause__ = e.cause
            return err
        if isinstance(e, SynapseCoapError):
            return e
        return LinkDown(f"no answer from {session.endpoint.host}:{session.endpoint.port}: {e}")

    async def _exchange(
        self, session: _ClientSession, cm: CoapMessage, *, early: bool, long_poll: bool = False
    ) -> CoapMessage:
        """One request/response including Block1 and Block2 transfers.

        ``long_poll``: the server acknowledges the request at once (it will wait),
        so its empty ACK is an RTT sample (see :mod:`synapse_coap.transport.manager`)."""
        template = to_aiocoap(cm)
        exp = self.link.block_size_exp
        payload = cm.payload
        size = 2 ** (exp + 4)
        last_request: Message | None = None  # the last block sent (Block1 transfers)
        if len(payload) <= size:
            # sent as is (aiocoap fills in type, id and token); a Block2 follow-up
            # is built afresh from ``cm``
            resp = await self._send_one(session, template, early=early, prompt_ack=long_poll)
        else:
            num = 0
            while True:
                start = num * size
                chunk = payload[start : start + size]
                more = start + size < len(payload)
                m = template.copy(payload=chunk)
                m.opt.block1 = BlockOption.BlockwiseTuple(num, more, exp)
                if num == 0:
                    m.opt.size1 = len(payload)
                resp = await self._send_one(session, m, early=early and num == 0 and not more)
                last_request = m
                b1 = resp.opt.block1
                if not more or resp.code != Code.CONTINUE:
                    break
                if b1 is None or b1.block_number != num:
                    raise RemoteProtocolError("peer answered a block with a mismatched Block1")
                if b1.size_exponent < exp:
                    # peer asks for smaller blocks (RFC 7959 2.3): continue at the same offset
                    exp = b1.size_exponent
                    size = 2 ** (exp + 4)
                    num = (start + len(chunk)) // size
                else:
                    num += 1
        resp = await self._complete_block2(session, cm, last_request, resp)
        return _strip_transfer(from_aiocoap(resp))

    async def _complete_block2(
        self, session: _ClientSession, cm: CoapMessage, last_request: Message | None, resp: Any
    ) -> Any:
        """Fetch the remaining blocks of a Block2 response (RFC 7959), ETag checked."""
        b2 = resp.opt.block2
        if b2 is not None and b2.more:
            if b2.block_number != 0:
                raise RemoteProtocolError("first response block is not block 0")
            body = bytearray(resp.payload)
            etag = resp.opt.etag
            szx = b2.size_exponent
            num = 0
            while True:
                num += 1
                if last_request is None:
                    follow = to_aiocoap(CoapMessage(cm.code, cm.options, b""))
                else:
                    follow = last_request.copy(payload=b"")
                follow.opt.block1 = None
                follow.opt.size1 = None
                follow.opt.block2 = BlockOption.BlockwiseTuple(num, False, szx)
                part = await self._send_one(session, follow, early=False)
                pb2 = part.opt.block2
                if pb2 is None:
                    raise RemoteProtocolError("peer stopped a Block2 transfer")
                if part.opt.etag != etag:
                    raise RemoteProtocolError("response changed during the Block2 transfer")
                offset = pb2.block_number * (2 ** (pb2.size_exponent + 4))
                if offset != len(body):
                    raise RemoteProtocolError("Block2 offset mismatch")
                body += part.payload
                if len(body) > self.max_body_size:
                    raise RemoteProtocolError(
                        f"response body over {self.max_body_size} bytes; transfer abandoned"
                    )
                if not pb2.more:
                    break
                num = pb2.block_number
                szx = pb2.size_exponent
            resp.payload = bytes(body)
        elif len(resp.payload) > self.max_body_size:
            raise RemoteProtocolError(f"response body over {self.max_body_size} bytes")
        return resp

    async def _send_one(
        self, session: _ClientSession, m: Message, *, early: bool, prompt_ack: bool = False
    ) -> Any:
        m.remote = session.remote
        m.transport_tuning = LinkTuning(self.link, early_data=early, prompt_ack=prompt_ack)
        req = self._context.request(m, handle_blockwise=False)
        try:
            return await req.response
        except asyncio.CancelledError:
            if m.token:
                self._abandon(session, m.token)
            raise
        except NoiseLinkError as e:
            raise LinkDown(
                f"link to {session.endpoint.host}:{session.endpoint.port} failed: {e}"
            ) from e.cause
        except coap_error.Error as e:
            cause = e.__cause__ if isinstance(e.__cause__, SynapseCoapError) else e
            raise LinkDown(
                f"no answer from {session.endpoint.host}:{session.endpoint.port}: {e}"
            ) from cause
        finally:
            untie_request(req)  # (answered or failed: its cycle is not needed any more)

    def _abandon(self, session: _ClientSession, token: bytes) -> None:
        """Tell the server the request with ``token`` is abandoned (cancel its handler)."""
        try:
            m = Message(code=Code.GET)
            m.mtype = NON
            m.token = token
            m.opt.add_option(OptionNumber(ABANDON_OPTION).create_option(decode=b""))
            m.opt.no_response = NO_RESPONSE_ALL
            m.remote = session.remote
            session.mman.send_message(m, None)
        except Exception:
            logger.debug("could not send the abandon notice", exc_info=True)


__all__ = ["CoapClient", "Endpoint", "PushEvent"]
