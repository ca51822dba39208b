"""The CoAP server: Noise (and optionally plain) UDP listeners feeding a Dispatcher.

Each request is decoded with the session's :class:`WireCodec` (the profile the
handshake negotiated; a plain listener uses the base profile), handed to
``dispatcher.dispatch(HttpRequest, PeerInfo)`` in the exchange's own asyncio
task, and the HttpResponse is encoded back. aiocoap does the message layer,
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
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiocoap import interfaces
from aiocoap.blockwise import IncompleteException
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption
from aiocoap.protocol import Context

from synapse_coap.errors import (
    ConfigValueError,
    LimitExceeded,
    RemoteProtocolError,
    SynapseCoapError,
)
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.codec import accepted_format
from synapse_coap.mapping.dispatch import Dispatcher, PeerInfo
from synapse_coap.mapping.messages import CoapMessage, HttpResponse
from synapse_coap.mapping.push import (
    VERSIONS_PATH,
    PushConfig,
    SyncQuery,
    advertise_observe,
)
from synapse_coap.mapping.redact import redact_target
from synapse_coap.mapping.tokens import ReceiverTokens, UnknownTokenReference
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.aiocoap_compat import block_key, extract_block
from synapse_coap.transport.convert import (
    ABANDON_OPTION,
    BLOCKWISE_OPTIONS,
    NO_RESPONSE_ALL,
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
from synapse_coap.transport.push import Observation, Registration, Registrations
from synapse_coap.transport.transfers import ENTRY_OVERHEAD, TransferLimits, TransferStore
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
    ``replay_state_path``: a small file where the 0-RTT anti-replay watermark is
    kept across restarts (docs/security.md); None: a restart forgets it.

    ``transfers``: the byte budget of blockwise transfer state and the
    per-session limits (:class:`TransferLimits`).
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
    replay_state_path: str | None = None
    transfers: TransferLimits = attrs.field(factory=TransferLimits)
    push: PushConfig = attrs.field(factory=PushConfig)

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
    __slots__ = ("body", "request")

    def __init__(self, request: Message) -> None:
        self.request = request
        self.body = bytearray()


class Block1Assembler:
    """RFC 7959 Block1 server side: O(n) reassembly, capped size; partial bodies live in
    a :class:`TransferStore` (one byte budget with cached Block2 responses, a count
    per session, a timeout)."""

    def __init__(self, max_body_size: int, store: TransferStore) -> None:
        self.max_body_size = max_body_size
        self._store = store

    @property
    def effective_max(self) -> int:
        """The largest body that can be reassembled (the size cap, within the budget)."""
        return min(self.max_body_size, self._store.budget - ENTRY_OVERHEAD)

    @staticmethod
    def _key(req: Message) -> Any:
        return (
            "b1",
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
        m.opt.size1 = self.effective_max
        return _Block1Reply(m)

    def feed(self, req: Message) -> Message:
        """The complete request, or raise _Block1Reply with 2.31 / 4.08 / 4.13."""
        block1 = req.opt.block1
        if block1 is None:
            if len(req.payload) > self.max_body_size:
                raise self._too_large()
            return req
        if req.opt.size1 is not None and req.opt.size1 > self.effective_max:
            raise self._too_large()
        key = self._key(req)
        size = 2 ** (block1.size_exponent + 4) if block1.size_exponent < 7 else 1024
        offset = block1.block_number * size
        if block1.more and len(req.payload) % 16:
            m = Message(code=Code.BAD_REQUEST, payload=b"Block1 payload not a block multiple")
            raise _Block1Reply(m)
        if block1.block_number == 0:
            asm = _Assembly(req)
        else:
            found = self._store.get(key)
            if not isinstance(found, _Assembly) or offset > len(found.body):
                self._store.pop(key)
                raise _Block1Reply(Message(code=Code.REQUEST_ENTITY_INCOMPLETE))
            asm = found
            if offset < len(asm.body):
                # a repeated block (its ACK was lost after dedup expired): restart from it
                del asm.body[offset:]
        if offset + len(req.payload) > self.effective_max:
            self._store.pop(key)
            raise self._too_large()
        asm.body += req.payload
        if block1.more:
            self._store.put(key, req.remote.blockwise_key, asm, len(asm.body))
            m = Message(code=Code.CONTINUE)
            m.opt.block1 = block1
            raise _Block1Reply(m)
        self._store.pop(key)
        full = asm.request.copy(payload=bytes(asm.body))
        full.opt.block1 = block1
        full.remote = req.remote
        full.token = req.token
        full.mid = req.mid
        full.mtype = req.mtype
        return full


class Block2Responses:
    """RFC 7959 Block2 server side: a response too large for one message is kept (in the
    shared :class:`TransferStore`) for the blocks that follow block 0.

    Pushed representations (Observe notifications larger than one block, see
    :mod:`synapse_coap.transport.push`) are kept the same way under their
    registration request's key; serving their last block is reported to the pusher.
    """

    MAX_PUSHED = 4096

    def __init__(self, store: TransferStore) -> None:
        self._store = store
        self._on_last: dict[Any, Callable[[], None]] = {}

    def put_pushed(self, request: Message, full: Message, on_last: Callable[[], None]) -> None:
        key = ("b2", block_key(request))
        self._store.put(key, request.remote.blockwise_key, full, len(full.payload))
        self._on_last[key] = on_last
        while len(self._on_last) > self.MAX_PUSHED:
            self._on_last.pop(next(iter(self._on_last)))

    async def extract_or_insert(
        self, req: Message, build: Callable[[], Awaitable[Message]]
    ) -> Message:
        key = ("b2", block_key(req))
        block2 = req.opt.block2
        if block2 is None or block2.block_number == 0:
            assembled = await build()
        else:
            found = self._store.get(key)
            if not isinstance(found, Message):
                raise IncompleteException
            assembled = found
        limit = req.remote.maximum_payload_size
        if len(assembled.payload) > limit or (
            block2 is not None and len(assembled.payload) > block2.size
        ):
            self._store.put(key, req.remote.blockwise_key, assembled, len(assembled.payload))
            block2 = block2 or BlockOption.BlockwiseTuple(0, 0, req.remote.maximum_block_size_exp)
            part: Message = extract_block(
                assembled, block2.block_number, block2.size_exponent, limit
            )
            if block2.block_number > 0 and part.opt.block2 is not None and not part.opt.block2.more:
                hook = self._on_last.pop(key, None)
                if hook is not None:
                    hook()
            return part
        return assembled


# -- sessions ----------------------------------------------------------------------


@attrs.define
class _ServerSession:
    codec: Codec
    tokens: Any
    peer: PeerInfo


def _receiver_tokens(*, strings: bool = False) -> Any:
    """Per-session token bindings; with ``strings`` also the session string table."""
    return ReceiverTokens(strings=ReceiverStrings() if strings else None)


def _json_error(status: int, errcode: str, error: str) -> HttpResponse:
    body = json.dumps({"errcode": errcode, "error": error}).encode()
    return HttpResponse(status, (("content-type", "application/json"),), body)


#: The observable resource listed in ``/.well-known/core`` when push is enabled.
OBSERVABLE_SYNC = "/_matrix/client/v3/sync"


def _links(
    resources: tuple[str, ...], observable: tuple[str, ...] = ()
) -> list[tuple[str, dict[str, str]]]:
    """(href, attributes) of what ``/.well-known/core`` lists (``obs``: RFC 7641 §6)."""
    out = [("/.well-known/core", {"ct": "40"})]
    for path in resources:
        out.append((path, {"rt": path.strip("/").replace("/", ".").replace("_", "")}))
    for path in observable:
        name = path.strip("/").replace("/", ".").replace("_", "")
        out.append((path, {"rt": name, "obs": ""}))
    return out


def _link_value(attrs: dict[str, str], name: str) -> str:
    if name == "rt":
        return f'{name}="{attrs[name]}"'
    return f"{name}={attrs[name]}" if attrs[name] else name


def _filter_matches(href: str, attrs: dict[str, str], query: str) -> bool:
    """RFC 6690 4.1: ``name=value``, a trailing ``*`` matching any suffix; for a
    space-separated attribute (rt, if) any one of its values matches."""
    name, _, want = query.partition("=")
    prefix = want.endswith("*")
    want = want[:-1] if prefix else want
    if name == "href":
        values = [href]
    elif name in attrs:
        values = attrs[name].split(" ") if name in ("rt", "if") else [attrs[name]]
    else:
        return False
    return any(v.startswith(want) if prefix else v == want for v in values)


def _link_format(
    resources: tuple[str, ...],
    queries: list[str] | None = None,
    observable: tuple[str, ...] = (),
) -> bytes:
    """The RFC 6690 document, filtered by its ``Uri-Query`` values (RFC 6690 4.1)."""
    parts = []
    for href, link_attrs in _links(resources, observable):
        if queries and not all(_filter_matches(href, link_attrs, q) for q in queries):
            continue
        parts.append(";".join([f"<{href}>", *(_link_value(link_attrs, k) for k in link_attrs)]))
    return ",".join(parts).encode()


class _Root(interfaces.Resource):  # type: ignore[misc]
    """The single aiocoap resource: every request goes through here."""

    def __init__(self, server: CoapServer) -> None:
        super().__init__()
        self._server = server
        config = server.config
        limits = config.transfers
        timeout = limits.timeout
        if timeout is None:
            timeout = max(config.link.exchange_lifetime, 120.0)
        self.transfers = TransferStore(limits.budget, limits.per_session, timeout)
        self._block1 = Block1Assembler(config.max_body_size, self.transfers)
        self._block2 = Block2Responses(self.transfers)
        self._in_flight: dict[Any, int] = {}

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
        session = req.remote.blockwise_key
        in_flight = self._in_flight.get(session, 0)
        if in_flight >= self._server.config.transfers.requests_per_session:
            # RFC 7252 5.03 with Max-Age: come back later
            self._server.metrics.dropped("session_request_limit")
            res = Message(code=Code.SERVICE_UNAVAILABLE, payload=b"too many requests in flight")
            res.opt.max_age = 1
            pipe.add_response(res, is_last=True)
            return
        self._in_flight[session] = in_flight + 1
        try:
            await self._render_to_pipe(pipe, req)
        finally:
            left = self._in_flight[session] - 1
            if left:
                self._in_flight[session] = left
            else:
                del self._in_flight[session]

    async def _render_to_pipe(self, pipe: Any, req: Any) -> None:
        evicted = sum(self.transfers.evictions.values())
        try:
            try:
                assembled = self._block1.feed(req)
            except _Block1Reply as reply:
                pipe.add_response(reply.message, is_last=True)
                return
            if (
                assembled.opt.observe == 0
                and assembled.opt.block2 is None
                and self._server.config.push.enabled
                and await self._server._observe(assembled, pipe, self._block2)
            ):
                return

            async def build() -> Message:
                full: Message = await self._server._render(assembled)
                if assembled.opt.size2 is not None and full.payload:
                    # RFC 7959 4: Size2 asked for (usually 0): say the whole size (every block)
                    full.opt.size2 = len(full.payload)
                return full

            res = await self._block2.extract_or_insert(assembled, build)
        finally:
            if sum(self.transfers.evictions.values()) != evicted:
                self._server._count_evictions()
        if assembled.opt.block1 is not None:
            res.opt.block1 = assembled.opt.block1
        pipe.add_response(res, is_last=True)

    def expire(self) -> None:
        """Forget stalled transfers (a timer calls this)."""
        if self.transfers.expire():
            self._server._count_evictions()


#: Seconds between writes of the 0-RTT anti-replay watermark.
REPLAY_STATE_INTERVAL = 30.0


def read_replay_state(path: str | None, *, now: float, window: float) -> float:
    """``early_data_not_before`` for a starting responder: the watermark its previous run
    wrote (0 if there was none). An unreadable file refuses 0-RTT for two windows."""
    if path is None:
        return 0.0
    try:
        with open(path, encoding="ascii") as f:
            return float(f.read().strip())
    except FileNotFoundError:
        return 0.0
    except (OSError, ValueError) as e:
        logger.warning(
            "0-RTT replay state %s unreadable (%s): no 0-RTT for %.0f s", path, e, 2 * window
        )
        return now + 2 * window


def write_replay_state(path: str, value: float) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{value:.0f}\n")
    os.replace(tmp, path)


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
        self._mmans: list[LinkMessageManager] = []
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
        self._root = _Root(self)
        self._context = Context(loop=loop, serversite=self._root, loggername=__name__ + ".coap")
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
        if self._context is not None:
            await self._context.shutdown()
        self._plain_sessions.clear()

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

    def _reject_non(self, req: Message, reason: str) -> Message:
        """Reject the Non-confirmable request ``req`` (RFC 7252 4.3): a Reset with its
        Message ID goes out now; the returned response is suppressed (No-Response)."""
        self.metrics.dropped("non_bad_option")
        for mman in self._mmans:
            if mman.message_interface is getattr(req.remote, "interface", None):
                mman.reset_now(req.remote, req.mid, reason)
                break
        out = Message(code=Code.BAD_OPTION)
        out.opt.no_response = NO_RESPONSE_ALL
        return out

    def _acknowledge_now(self, req: Message) -> None:
        for mman in self._mmans:
            if mman.acknowledge_now(req.remote, req.token):
                return

    async def _render(self, req: Message) -> Message:
        started = time.monotonic()
        cm = from_aiocoap(req)
        cm = CoapMessage(
            cm.code,
            tuple(o for o in cm.options if o.number not in _TRANSFER_OPTIONS),
            cm.payload,
        )
        method = cm.code
        try:
            accept = accepted_format(cm)
        except RemoteProtocolError:
            return Message(code=Code.BAD_REQUEST, payload=b"bad Accept option")
        uri_path = [o.value for o in cm.options if o.number == int(OptionNumber.URI_PATH)]
        if uri_path == [b".well-known", b"core"] and not cm.get(n.OPT_TARGET):
            if cm.code != int(Code.GET):
                return Message(code=Code.METHOD_NOT_ALLOWED)
            if accept not in (None, n.CF_LINK_FORMAT):
                return Message(code=Code.NOT_ACCEPTABLE)
            queries = [
                o.value.decode("utf-8", "replace")
                for o in cm.options
                if o.number == int(OptionNumber.URI_QUERY)
            ]
            observable = (OBSERVABLE_SYNC,) if self.config.push.enabled else ()
            res = Message(
                code=Code.CONTENT,
                payload=_link_format(self.config.resources, queries, observable),
            )
            res.opt.content_format = n.CF_LINK_FORMAT
            return res
        if accept is not None and accept not in _ACCEPTABLE:
            return Message(code=Code.NOT_ACCEPTABLE)
        session = self._session(req.remote)
        codec = session.codec
        try:
            route = codec.route_name(cm)
        except Exception:
            route = "unknown"
        want_json = accept == n.CF_JSON
        try:
            http_req = codec.decode_request(cm, tokens=session.tokens)
        except LimitExceeded as e:
            logger.info("request from %s over a limit: %s", session.peer.host, e)
            return self._finish(
                codec, route, started, _json_error(413, "M_TOO_LARGE", str(e)), want_json, method
            )
        except (UnknownTokenReference, UnknownStringReference) as e:
            return self._unknown_token(codec, route, started, e, want_json, method)
        except RemoteProtocolError as e:
            logger.info("undecodable request from %s: %s", session.peer.host, e)
            coap_code: int | None = getattr(e, "coap_code", None)
            if coap_code == n.BAD_OPTION and req.mtype == Type.NON:
                # RFC 7252 5.4.1: an unrecognized critical option in a NON rejects the
                # message (4.3): no response, a matching Reset
                return self._reject_non(req, str(e))
            if coap_code is None:
                return self._finish(
                    codec,
                    route,
                    started,
                    _json_error(400, "M_BAD_JSON", str(e)),
                    want_json,
                    method,
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
            out.code = Code(coap_code)
            return out
        if http_req.is_long_poll:
            # it will wait: acknowledge now, so the peer's next request is not held
            # behind this one's ACK (its NSTART slot) and its RTT sample stays honest
            self._acknowledge_now(req)
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
        if (
            self.config.push.enabled
            and response.status == 200
            and http_req.target.partition(b"?")[0] == VERSIONS_PATH
        ):
            advertised = advertise_observe(response.body)
            if advertised is not None:
                response = attrs.evolve(response, body=advertised)
        out = self._finish(codec, route, started, response, want_json, method)
        if (
            accept is not None
            and out.code.is_successful()
            and out.payload
            and out.opt.content_format != accept
        ):
            # RFC 7252 5.10.4: the resource answered in another format than the one asked
            return Message(code=Code.NOT_ACCEPTABLE)
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
            http_req = codec.decode_request(cm, tokens=session.tokens)
        except Exception:
            return False  # the normal path answers (and logs) it
        query = SyncQuery.parse(http_req.target) if http_req.method == "GET" else None
        auth = http_req.header("authorization")
        if query is None or auth is None:
            return False
        reg = Registration(
            session=session,
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
                self._finish(codec, route, time.monotonic(), error, want_json, int(cm.code)),
                is_last=True,
            )
            return True
        # a registration waits for news like a long-poll: acknowledge it at once
        self._acknowledge_now(req)
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
    ) -> Message:
        self.metrics.request(route, response.status, time.monotonic() - started)
        try:
            out = to_aiocoap(codec.encode_response(response, want_json=want_json, method=method))
        except SynapseCoapError as e:
            logger.error("cannot encode the response to %s: %s", route, e)
            return Message(code=Code.INTERNAL_SERVER_ERROR, payload=b"response not encodable")
        return out

    def _unknown_token(
        self,
        codec: Codec,
        route: str,
        started: float,
        error: Exception,
        want_json: bool,
        method: int,
    ) -> Message:
        """4.01 + Token-Reset (or 4.00 + String-Reset): the client resets and resends."""
        logger.info("unknown session reference on %s: asking the client to reset: %s", route, error)
        builder = getattr(codec, "unknown_token_response", None)
        if callable(builder):
            try:
                cm = builder(error)
                status = 400 if isinstance(error, UnknownStringReference) else 401
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
            method,
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
        early_data_not_before=read_replay_state(
            config.replay_state_path,
            now=time.time(),
            window=float(getattr(config.limits, "early_data_window", 60.0)),
        ),
    )
    return endpoint


__all__ = ["DEFAULT_RESOURCES", "Block1Assembler", "CoapServer", "ServerConfig"]
