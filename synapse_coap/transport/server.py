"""The CoAP server: Noise (and optionally plain) UDP listeners feeding a Dispatcher.

Each request is decoded with the session's :class:`WireCodec` (the profile the
handshake negotiated; a plain listener uses the base profile), handed to
``dispatcher.dispatch(HttpRequest, PeerInfo)`` in the exchange's own asyncio
task, and the HttpResponse is encoded back. aiocoap does the message layer,
tuned by :class:`LinkMessageManager`: a response ready before the peer's
retransmission timer would fire rides on the ACK; a slow one (long-poll
/sync) gets an empty ACK, then a separate confirmable response.

* Block1 request bodies are reassembled here, in linear time and capped at
  ``ServerConfig.max_body_size`` (aiocoap's own reassembly is uncapped and
  quadratic); Block2 responses come from a per-exchange cache.
* An exchange the peer abandons (its session closes, or it reuses the
  request's token, or sends the private Abandon option) cancels the dispatch
  task.
* ``/.well-known/core`` lists what the listener serves (RFC 6690).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from aiocoap import interfaces
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.protocol import Context

from synapse_coap.errors import (
    ConfigValueError,
    LimitExceeded,
    RemoteProtocolError,
    SynapseCoapError,
)
from synapse_coap.mapping.dispatch import Dispatcher, PeerInfo
from synapse_coap.mapping.messages import CoapMessage, HttpResponse
from synapse_coap.mapping.redact import redact_target
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.aiocoap_compat import block2_cache
from synapse_coap.transport.convert import (
    ABANDON_OPTION,
    BLOCKWISE_OPTIONS,
    Codec,
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
from synapse_coap.transport.manager import LinkMessageManager, attach_transport
from synapse_coap.transport.metrics import NullMetrics, TransportMetrics
from synapse_coap.transport.noise_udp import (
    NoiseMessageInterface,
    NoiseRemote,
    SessionEndpoint,
    normalize_address,
)
from synapse_coap.transport.plain import PlainUDP
from synapse_coap.wire.context import WireContext

logger = logging.getLogger(__name__)

#: Options that belong to the transfer, not to the request the codec sees.
_TRANSFER_OPTIONS = BLOCKWISE_OPTIONS | {int(OptionNumber.NO_RESPONSE), ABANDON_OPTION}

DEFAULT_RESOURCES: tuple[str, ...] = (
    "/_matrix/client",
    "/_matrix/federation",
    "/_matrix/key",
    "/_matrix/media",
    "/.well-known/matrix",
)


def _limits_default() -> Any:
    from synapse_coap.noise.endpoint import NoiseLimits  # type: ignore

    return NoiseLimits()


def _address_list(value: Any) -> tuple[tuple[str, int], ...]:
    out = []
    for item in value:
        host, port = item
        out.append((str(host), int(port)))
    return tuple(out)


@attrs.frozen
class ServerConfig:
    """Where and how to listen.

    ``listen``: Noise/UDP sockets (``::`` is dual-stack); ``plain_listen``:
    unencrypted CoAP sockets (opt-in, for loopback tooling and private
    networks). ``static_key``: our X25519 private key (required when
    ``listen`` is not empty). ``max_body_size`` caps reassembled (Block1)
    request bodies. ``payload_dump`` logs decrypted requests at DEBUG (never
    on in production). ``resources``: the paths ``/.well-known/core`` lists.
    """

    listen: tuple[tuple[str, int], ...] = attrs.field(
        default=(("::", 5683),), converter=_address_list
    )
    plain_listen: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_address_list)
    static_key: bytes | None = None
    trust: TrustPolicy = attrs.field(factory=lambda: TrustPolicy(accept_any_initiator=True))
    limits: Any = attrs.field(factory=_limits_default)
    link: LinkParameters = attrs.field(factory=LinkParameters)
    server_name: str | None = None
    max_body_size: int = 50 * 1024 * 1024
    payload_dump: bool = False
    resources: tuple[str, ...] = DEFAULT_RESOURCES

    def __attrs_post_init__(self) -> None:
        if self.listen and self.static_key is None:
            raise ConfigValueError("static_key", "a static key is required for Noise listeners")
        if self.static_key is not None and len(self.static_key) != 32:
            raise ConfigValueError("static_key", "must be a 32-byte X25519 private key")
        if self.max_body_size < 1024:
            raise ConfigValueError("max_body_size", "must be at least 1024 bytes")
        for i, (_host, port) in enumerate(self.listen + self.plain_listen):
            if not 0 <= port <= 65535:
                raise ConfigValueError(f"listen[{i}]", f"port {port} out of range 0..65535")


# -- Block1 reassembly (linear, capped) ----------------------------------------------


class _Block1Reply(Exception):
    def __init__(self, message: Message) -> None:
        self.message = message


class _Assembly:
    __slots__ = ("body", "request", "touched")

    def __init__(self, request: Message, now: float) -> None:
        self.request = request
        self.body = bytearray()
        self.touched = now


class Block1Assembler:
    """RFC 7959 Block1 server side: O(n) reassembly, capped size, bounded count and age."""

    MAX_ASSEMBLIES = 256

    def __init__(
        self, max_body_size: int, lifetime: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_body_size = max_body_size
        self.lifetime = lifetime
        self._clock = clock
        self._assemblies: OrderedDict[Any, _Assembly] = OrderedDict()

    @staticmethod
    def _key(req: Message) -> Any:
        return (
            req.remote.blockwise_key,
            req.code,
            req.get_cache_key(
                [
                    OptionNumber.BLOCK1,
                    OptionNumber.BLOCK2,
                    OptionNumber.OBSERVE,
                    OptionNumber.SIZE1,
                ]
            ),
        )

    def _too_large(self) -> _Block1Reply:
        m = Message(code=Code.REQUEST_ENTITY_TOO_LARGE)
        m.opt.size1 = self.max_body_size
        return _Block1Reply(m)

    def _expire(self, now: float) -> None:
        while self._assemblies:
            key, first = next(iter(self._assemblies.items()))
            if (
                now - first.touched <= self.lifetime
                and len(self._assemblies) <= self.MAX_ASSEMBLIES
            ):
                break
            self._assemblies.pop(key)

    def feed(self, req: Message) -> Message:
        """The complete request, or raise _Block1Reply with 2.31 / 4.08 / 4.13."""
        block1 = req.opt.block1
        if block1 is None:
            if len(req.payload) > self.max_body_size:
                raise self._too_large()
            return req
        now = self._clock()
        self._expire(now)
        if req.opt.size1 is not None and req.opt.size1 > self.max_body_size:
            raise self._too_large()
        key = self._key(req)
        size = 2 ** (block1.size_exponent + 4) if block1.size_exponent < 7 else 1024
        offset = block1.block_number * size
        if block1.more and len(req.payload) % 16:
            m = Message(code=Code.BAD_REQUEST, payload=b"Block1 payload not a block multiple")
            raise _Block1Reply(m)
        if block1.block_number == 0:
            asm = _Assembly(req, now)
            self._assemblies[key] = asm
            self._assemblies.move_to_end(key)
        else:
            found = self._assemblies.get(key)
            if found is None or offset > len(found.body):
                self._assemblies.pop(key, None)
                raise _Block1Reply(Message(code=Code.REQUEST_ENTITY_INCOMPLETE))
            asm = found
            if offset < len(asm.body):
                # a repeated block (its ACK was lost after dedup expired): restart from it
                del asm.body[offset:]
            asm.touched = now
            self._assemblies.move_to_end(key)
        if offset + len(req.payload) > self.max_body_size:
            self._assemblies.pop(key, None)
            raise self._too_large()
        asm.body += req.payload
        if block1.more:
            m = Message(code=Code.CONTINUE)
            m.opt.block1 = block1
            raise _Block1Reply(m)
        self._assemblies.pop(key, None)
        full = asm.request.copy(payload=bytes(asm.body))
        full.opt.block1 = block1
        full.remote = req.remote
        full.token = req.token
        full.mid = req.mid
        full.mtype = req.mtype
        return full


# -- sessions ----------------------------------------------------------------------


@attrs.define
class _ServerSession:
    codec: Codec
    tokens: Any
    peer: PeerInfo


def _receiver_tokens(*, strings: bool = False) -> Any:
    """Per-session token bindings; with ``strings`` also the session string table."""
    try:
        from synapse_coap.mapping.tokens import (  # type: ignore
            ReceiverTokens,
        )
        from synapse_coap.wire.strings import ReceiverStrings
    except ImportError:
        return None
    return ReceiverTokens(strings=ReceiverStrings() if strings else None)


def _json_error(status: int, errcode: str, error: str) -> HttpResponse:
    body = json.dumps({"errcode": errcode, "error": error}).encode()
    return HttpResponse(status, (("content-type", "application/json"),), body)


def _link_format(resources: tuple[str, ...]) -> bytes:
    parts = ["</.well-known/core>;ct=40"]
    for path in resources:
        name = path.strip("/").replace("/", ".").replace("_", "")
        parts.append(f'<{path}>;rt="{name}"')
    return ",".join(parts).encode()


class _Root(interfaces.Resource):  # type: ignore[misc]
    """The single aiocoap resource: every request goes through here."""

    def __init__(self, server: CoapServer) -> None:
        super().__init__()
        self._server = server
        link = server.config.link
        lifetime = max(link.exchange_lifetime, 120.0)
        self._block1 = Block1Assembler(server.config.max_body_size, lifetime)
        self._block2 = block2_cache(lifetime)

    async def render(self, request: Any) -> Any:  # pragma: no cover - not used
        raise NotImplementedError

    async def needs_blockwise_assembly(self, request: Any) -> bool:  # pragma: no cover
        return False

    async def render_to_pipe(self, pipe: Any) -> None:
        req = pipe.request
        if req.opt.get_option(ABANDON_OPTION):
            # the token layer already cancelled the previous request on this token
            res = Message(code=Code.CHANGED)
            res.opt.no_response = 26
            pipe.add_response(res, is_last=True)
            return
        try:
            assembled = self._block1.feed(req)
        except _Block1Reply as reply:
            pipe.add_response(reply.message, is_last=True)
            return

        async def build() -> Message:
            return await self._server._render(assembled)

        res = await self._block2.extract_or_insert(assembled, build)
        if assembled.opt.block1 is not None:
            res.opt.block1 = assembled.opt.block1
        pipe.add_response(res, is_last=True)


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
        self._plain: list[Any] = []
        self._plain_sessions: OrderedDict[Any, _ServerSession] = OrderedDict()
        self._secure_addresses: list[tuple[str, int]] = []
        self._plain_addresses: list[tuple[str, int]] = []
        self._closed = False

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
        loop = asyncio.get_running_loop()
        self._context = Context(loop=loop, serversite=_Root(self), loggername=__name__ + ".coap")
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

                _mman, iface = await attach_transport(
                    self._context, config.link, self.metrics, make_noise
                )
                self._noise.append(iface)
                self._secure_addresses.append(iface.local_address)
            for bind in config.plain_listen:

                async def make_plain(mman: LinkMessageManager, bind: Any = bind) -> Any:
                    return await PlainUDP.create_server_transport_endpoint(
                        mman, log=self._context.log, loop=loop, bind=bind, multicast=[]
                    )

                _mman, iface = await attach_transport(
                    self._context, config.link, self.metrics, make_plain
                )
                self._plain.append(iface)
                sockname = iface.transport.get_extra_info("socket").getsockname()
                self._plain_addresses.append(normalize_address(sockname))
        except BaseException:
            await self.close()
            raise
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
        if self._context is not None:
            await self._context.shutdown()
        self._plain_sessions.clear()

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
            if (session.peer.host, session.peer.port) != (host, port):
                session.peer = attrs.evolve(session.peer, host=host, port=port)
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

    async def _render(self, req: Message) -> Message:
        started = time.monotonic()
        cm = from_aiocoap(req)
        cm = CoapMessage(
            cm.code,
            tuple(o for o in cm.options if o.number not in _TRANSFER_OPTIONS),
            cm.payload,
        )
        uri_path = [o.value for o in cm.options if o.number == int(OptionNumber.URI_PATH)]
        if uri_path == [b".well-known", b"core"]:
            if cm.code != int(Code.GET):
                return Message(code=Code.METHOD_NOT_ALLOWED)
            res = Message(code=Code.CONTENT, payload=_link_format(self.config.resources))
            res.opt.content_format = 40
            return res
        session = self._session(req.remote)
        codec = session.codec
        try:
            route = codec.route_name(cm)
        except Exception:
            route = "unknown"
        want_json = False
        try:
            want_json = codec.wants_json(cm)
            http_req = codec.decode_request(cm, tokens=session.tokens)
        except LimitExceeded as e:
            logger.info("request from %s over a limit: %s", session.peer.host, e)
            return self._finish(
                codec, route, started, _json_error(413, "M_TOO_LARGE", str(e)), want_json
            )
        except RemoteProtocolError as e:
            if type(e).__name__ in ("UnknownTokenReference", "UnknownStringReference"):
                return self._unknown_token(codec, route, started, e, want_json)
            logger.info("undecodable request from %s: %s", session.peer.host, e)
            return self._finish(
                codec, route, started, _json_error(400, "M_BAD_JSON", str(e)), want_json
            )
        if self.config.payload_dump:
            logger.debug(
                "request %s %s from %s: %r",
                http_req.method,
                redact_target(http_req.target),
                session.peer,
                http_req.body[:4096],
            )
        try:
            response = await self.dispatcher.dispatch(http_req, session.peer)
        except asyncio.CancelledError:
            logger.info(
                "exchange %s from %s abandoned; dispatch cancelled", route, session.peer.host
            )
            raise
        except SynapseCoapError as e:
            logger.warning("dispatch of %s failed: %s", route, e)
            response = _json_error(502, "M_UNKNOWN", "upstream failed")
        except Exception:
            logger.exception("dispatcher raised on %s", route)
            response = _json_error(500, "M_UNKNOWN", "internal server error")
        return self._finish(codec, route, started, response, want_json)

    def _finish(
        self, codec: Codec, route: str, started: float, response: HttpResponse, want_json: bool
    ) -> Message:
        self.metrics.request(route, response.status, time.monotonic() - started)
        try:
            out = to_aiocoap(codec.encode_response(response, want_json=want_json))
        except SynapseCoapError as e:
            logger.error("cannot encode the response to %s: %s", route, e)
            return Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"response not encodable")
        return out

    def _unknown_token(
        self, codec: Codec, route: str, started: float, error: Exception, want_json: bool
    ) -> Message:
        """4.01 + Token-Reset (or 4.00 + String-Reset): the client resets and resends."""
        logger.info("unknown session reference on %s: asking the client to reset: %s", route, error)
        builder = getattr(codec, "unknown_token_response", None)
        if callable(builder):
            try:
                cm = builder(error)
                status = 400 if type(error).__name__ == "UnknownStringReference" else 401
                self.metrics.request(route, status, time.monotonic() - started)
                return to_aiocoap(cm)
            except Exception:
                logger.exception("building the unknown-token response failed")
        return self._finish(
            codec,
            route,
            started,
            _json_error(401, "M_UNKNOWN_TOKEN", "unknown access token reference; resend"),
            want_json,
        )


def _default_endpoint(config: ServerConfig, clock: Callable[[], float]) -> SessionEndpoint:
    from synapse_coap.noise.endpoint import NoiseEndpoint  # type: ignore

    if config.static_key is None:
        raise ConfigValueError("static_key", "a static key is required for Noise listeners")
    endpoint: SessionEndpoint = NoiseEndpoint(
        config.static_key,
        trust=config.trust,
        limits=config.limits,
        profiles=supported_profile_offers(),
        app_payload=server_name_payload(config.server_name),
        clock=clock,
        link_bandwidth_bps=config.link.bandwidth_bps,
    )
    return endpoint


__all__ = ["DEFAULT_RESOURCES", "Block1Assembler", "CoapServer", "ServerConfig"]
