"""CoapServer / CoapClient over real loopback UDP, Noise and plain.

No sleeps for synchronisation: tests await events raised by the dispatcher
stub or by metrics hooks. Timeouts only bound a failing test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from synapse_coap.errors import LimitExceeded, LinkDown, RemoteProtocolError, RequestTimeout
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.noise.trust import MemoryTrustStore, TrustPolicy
from synapse_coap.transport.client import CoapClient, Endpoint
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.offload import INLINE_DECODE_MAX, INLINE_ENCODE_MAX
from synapse_coap.transport.server import CoapServer, ServerConfig
from synapse_coap.wire.context import WireContext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = LinkParameters(ack_timeout=0.3, min_rto=0.2, empty_ack_delay=0.05)
STATUS_OPTION = 65108  # test codec only: the HTTP status of a response


class EchoCodec:
    """A minimal codec (test stand-in for WireCodec): method -> code, path -> Uri-Path."""

    METHODS = {"GET": 1, "POST": 2, "PUT": 3, "DELETE": 4}

    def __init__(self, profile_id: int = 0, context: WireContext = WireContext()) -> None:
        self.profile_id = profile_id

    def encode_request(
        self, req: HttpRequest, tokens: Any = None, *, observe: bool = False
    ) -> CoapMessage:
        segs = [s for s in req.target.split(b"/") if s]
        return CoapMessage(
            self.METHODS[req.method], tuple(CoapOption(11, s) for s in segs), req.body
        )

    def decode_request(self, msg: CoapMessage, tokens: Any = None) -> HttpRequest:
        method = {v: k for k, v in self.METHODS.items()}[msg.code]
        return HttpRequest(method, b"/" + b"/".join(msg.get(11)), (), msg.payload)

    def encode_response(
        self,
        resp: HttpResponse,
        *,
        want_json: bool = False,
        method: int = 1,
        strings: Any = None,
        seq: int | None = None,
        references: Any = None,
    ) -> CoapMessage:
        return CoapMessage(
            69, (CoapOption(STATUS_OPTION, resp.status.to_bytes(2, "big")),), resp.body
        )

    def decode_response(
        self, msg: CoapMessage, *, method: int = 1, strings: Any = None, seq: int | None = None
    ) -> HttpResponse:
        status = msg.first(STATUS_OPTION)
        return HttpResponse(int.from_bytes(status, "big") if status else 599, (), msg.payload)

    def route_name(self, msg: CoapMessage) -> str:
        return "/".join(v.decode() for v in msg.get(11)) or "root"

    def is_replay_safe(self, req: HttpRequest) -> bool:
        return req.method == "GET"

    def wants_json(self, msg: CoapMessage) -> bool:
        return False


def codec_factory(profile_id: int, context: WireContext) -> EchoCodec:
    return EchoCodec(profile_id, context)


def echo(request: HttpRequest) -> HttpResponse:
    """What the test dispatchers answer: the method, the target and the body."""
    body = request.method.encode() + b" " + request.target + b"\n" + request.body
    return HttpResponse(200, (("content-type", "text/plain"),), body)


class Dispatcher:
    """Echoes requests; /slow waits for ``release``; /forever never returns."""

    def __init__(self) -> None:
        self.peers: list[PeerInfo] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.peers.append(peer)
        if request.target == b"/slow":
            self.started.set()
            await self.release.wait()
        if request.target == b"/forever":
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return echo(request)


class EventMetrics(CountingMetrics):
    """CountingMetrics that can wake a test when something is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[tuple[Callable[[], bool], asyncio.Event]] = []

    def _poke(self) -> None:
        for cond, ev in self.waiters:
            if cond():
                ev.set()

    def when(self, cond: Callable[[], bool]) -> asyncio.Event:
        ev = asyncio.Event()
        self.waiters.append((cond, ev))
        if cond():
            ev.set()
        return ev

    def datagram(self, direction: str, kind: str, size: int) -> None:
        super().datagram(direction, kind, size)
        self._poke()

    def retransmission(self) -> None:
        super().retransmission()
        self._poke()


async def start_server(
    key: bytes,
    *,
    listen: tuple[tuple[str, int], ...] = (("::", 0),),
    plain: tuple[tuple[str, int], ...] = (),
    link: LinkParameters = FAST,
    dispatcher: Dispatcher | None = None,
    metrics: Any = None,
) -> tuple[CoapServer, Dispatcher]:
    d = dispatcher or Dispatcher()
    server = await CoapServer.start(
        ServerConfig(
            listen=listen, plain_listen=plain, static_key=key, link=link, server_name="hs.test"
        ),
        d,
        metrics=metrics,
        codec_factory=codec_factory,
    )
    return server, d


async def make_client(
    trust: TrustPolicy | None = None,
    *,
    link: LinkParameters = FAST,
    metrics: Any = None,
    bind=("::", 0),
) -> CoapClient:
    return await CoapClient.create(
        static_key=generate_private_key(),
        trust=trust or TrustPolicy(store=MemoryTrustStore()),
        link=link,
        metrics=metrics,
        bind=bind,
        codec_factory=codec_factory,
    )


@pytest.fixture
def server_key() -> bytes:
    return generate_private_key()


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@contextlib.asynccontextmanager
async def running_pair(
    server_key: bytes,
) -> AsyncIterator[tuple[CoapServer, Dispatcher, CoapClient, EventMetrics]]:
    server, d = await start_server(server_key)
    metrics = EventMetrics()
    client = await make_client(metrics=metrics)
    try:
        yield server, d, client, metrics
    finally:
        await client.close()
        await server.close()


def ep(server: CoapServer, host: str = "::1", **kw: Any) -> Endpoint:
    return Endpoint(host, server.addresses[0][1], "hs.test", **kw)


@aio
async def test_roundtrip_ipv6_and_ipv4_on_dual_stack(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, d, client, _m):
        r6 = await client.request(ep(server, "::1"), HttpRequest("GET", b"/_matrix/a"))
        assert r6.status == 200 and r6.body == b"GET /_matrix/a\n"
        r4 = await client.request(ep(server, "127.0.0.1"), HttpRequest("PUT", b"/x", (), b"hi"))
        assert r4.body == b"PUT /x\nhi"
        assert {p.host for p in d.peers} == {"::1", "127.0.0.1"}
        assert all(p.secure and p.static_key is not None for p in d.peers)


@aio
async def test_ipv4_only_bind(server_key: bytes) -> None:
    server, _d = await start_server(server_key, listen=(("127.0.0.1", 0),))
    client = await make_client(bind=("127.0.0.1", 0))
    try:
        assert server.addresses[0][0] == "127.0.0.1"
        r = await client.request(ep(server, "127.0.0.1"), HttpRequest("GET", b"/v4"))
        assert r.body == b"GET /v4\n"
    finally:
        await client.close()
        await server.close()


@aio
async def test_plain_listener_only_when_configured(server_key: bytes) -> None:
    server, d = await start_server(server_key, plain=(("::1", 0),))
    client = await make_client()
    try:
        plain_port = server.plain_addresses[0][1]
        r = await client.request(
            Endpoint("::1", plain_port, "hs.test", secure=False), HttpRequest("GET", b"/p")
        )
        assert r.body == b"GET /p\n"
        assert d.peers[-1].secure is False and d.peers[-1].static_key is None
        # the Noise port does not answer plain CoAP
        with pytest.raises(RequestTimeout):
            await client.request(
                Endpoint("::1", server.secure_addresses[0][1], "hs.test", secure=False),
                HttpRequest("GET", b"/p"),
                timeout=0.5,
            )
    finally:
        await client.close()
        await server.close()


@aio
async def test_blockwise_64k_both_ways(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, _d, client, metrics):
        body = bytes(range(256)) * 256  # 64 KiB
        r = await client.request(ep(server), HttpRequest("POST", b"/upload", (), body))
        assert r.status == 200
        assert r.body == b"POST /upload\n" + body
        # 64 blocks up, ~65 blocks down, each one datagram of at most 1024 B payload
        assert metrics.total("out", "record") >= 64
        assert max(metrics.sizes[("out", "record")]) <= 1024 + 80


@aio
async def test_request_body_cap(server_key: bytes) -> None:
    server = await CoapServer.start(
        ServerConfig(listen=(("::1", 0),), static_key=server_key, link=FAST, max_body_size=4096),
        Dispatcher(),
        codec_factory=codec_factory,
    )
    client = await make_client()
    try:
        r = await client.request(ep(server), HttpRequest("POST", b"/big", (), b"x" * 10_000))
        assert r.status == 599  # the 4.13 carries no status option in the test codec
    finally:
        await client.close()
        await server.close()


@aio
async def test_xx_first_contact_then_ik_zero_rtt(server_key: bytes) -> None:
    server, _d = await start_server(server_key)
    store = MemoryTrustStore()
    m1 = EventMetrics()
    c1 = await make_client(TrustPolicy(store=store), metrics=m1)
    try:
        r = await c1.request(ep(server), HttpRequest("GET", b"/first"))
        assert r.body == b"GET /first\n"
        # XX: msg1 and msg3 out (the GET rides in msg3), msg2 in, response in one record
        assert m1.datagrams[("out", "handshake")] == 2
        assert m1.datagrams[("in", "handshake")] == 1
        assert m1.datagrams[("out", "record")] == 0
        assert m1.datagrams[("in", "record")] == 1
        assert store.get("hs.test") == public_key(server_key)  # TOFU pinned
    finally:
        await c1.close()
    m2 = EventMetrics()
    c2 = await make_client(TrustPolicy(store=store), metrics=m2)
    try:
        r = await c2.request(ep(server), HttpRequest("GET", b"/again"))
        assert r.body == b"GET /again\n"
        # IK 0-RTT: the GET rides in message 1: one datagram out for the whole request
        assert m2.datagrams[("out", "handshake")] == 1
        assert m2.datagrams[("out", "record")] == 0
        assert m2.total("in") <= 2
        # a POST is not replay-safe: it waits for the handshake
        r = await c2.request(ep(server), HttpRequest("POST", b"/p", (), b"x"))
        assert r.status == 200
    finally:
        await c2.close()
        await server.close()


@aio
async def test_tofu_pins_and_changed_key_is_refused(server_key: bytes) -> None:
    from synapse_coap.noise.endpoint import NoiseLimits

    store = MemoryTrustStore()
    server, _d = await start_server(server_key, listen=(("::1", 0),))
    port = server.addresses[0][1]
    c1 = await make_client(TrustPolicy(store=store))
    try:
        await c1.request(ep(server), HttpRequest("GET", b"/first"))
        assert store.get("hs.test") == public_key(server_key)  # pinned on first use
    finally:
        await c1.close()
        await server.close()
    # the "same" server comes back with another key: refused, nothing dispatched
    impostor, d2 = await start_server(generate_private_key(), listen=(("::1", port),))
    c2 = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=store),
        link=FAST,
        limits=NoiseLimits(handshake_timeout=1.5),
        codec_factory=codec_factory,
    )
    try:
        with pytest.raises(LinkDown):
            await c2.request(
                Endpoint("::1", port, "hs.test"), HttpRequest("GET", b"/x"), timeout=20
            )
        assert d2.peers == []
        assert store.get("hs.test") == public_key(server_key)
    finally:
        await c2.close()
        await impostor.close()


@aio
async def test_port_change_mid_session_needs_no_new_handshake(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, d, client, metrics):
        await client.request(ep(server), HttpRequest("GET", b"/one"))
        handshakes = metrics.handshakes["ok"]
        old_port = d.peers[-1].port
        iface = client.noise_interface
        assert iface is not None
        new_addr = await iface.rebind(("::", 0))
        assert new_addr[1] != old_port
        r = await client.request(ep(server), HttpRequest("PUT", b"/two", (), b"z"))
        assert r.body == b"PUT /two\nz"
        assert d.peers[-1].port == new_addr[1]
        assert metrics.handshakes["ok"] == handshakes
        assert metrics.datagrams[("out", "handshake")] == 2  # only the first contact's


@aio
async def test_server_restart_rehandshakes_and_pending_request_completes(server_key: bytes) -> None:
    server, _d = await start_server(server_key, listen=(("::1", 0),))
    port = server.addresses[0][1]
    metrics = EventMetrics()
    client = await make_client(metrics=metrics)
    try:
        await client.request(ep(server), HttpRequest("GET", b"/before"))
        assert metrics.handshakes["ok"] == 1
        await server.close()
        retransmitted = metrics.when(lambda: metrics.retransmissions >= 1)
        pending = asyncio.create_task(
            client.request(ep(server), HttpRequest("PUT", b"/during", (), b"d"), timeout=30)
        )
        await asyncio.wait_for(retransmitted.wait(), 20)
        server2, d2 = await start_server(server_key, listen=(("::1", port),))
        try:
            r = await pending
            assert r.body == b"PUT /during\nd"
            assert metrics.handshakes["ok"] == 2
            assert d2.peers[-1].port == client.local_address[1]  # type: ignore[index]
        finally:
            await server2.close()
    finally:
        await client.close()


@aio
async def test_slow_handler_gets_empty_ack_then_separate_response(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, d, client, metrics):
        await client.request(ep(server), HttpRequest("GET", b"/warmup"))
        before_in = metrics.datagrams[("in", "record")]
        before_out = metrics.datagrams[("out", "record")]
        ack_seen = metrics.when(lambda: metrics.datagrams[("in", "record")] > before_in)
        task = asyncio.create_task(
            client.request(ep(server), HttpRequest("POST", b"/slow", (), b"s"))
        )
        await asyncio.wait_for(d.started.wait(), 10)
        await asyncio.wait_for(ack_seen.wait(), 10)  # the empty ACK arrived; handler still running
        assert not task.done()
        d.release.set()
        r = await task
        assert r.body == b"POST /slow\ns"
        # request + ACK of the separate response out; empty ACK + CON response in
        assert metrics.datagrams[("in", "record")] - before_in == 2
        assert metrics.datagrams[("out", "record")] - before_out == 2


@aio
async def test_fast_handler_piggybacks(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, _d, client, metrics):
        await client.request(ep(server), HttpRequest("GET", b"/warmup"))
        before = (metrics.datagrams[("in", "record")], metrics.datagrams[("out", "record")])
        await client.request(ep(server), HttpRequest("POST", b"/quick", (), b"q"))
        assert metrics.datagrams[("in", "record")] - before[0] == 1
        assert metrics.datagrams[("out", "record")] - before[1] == 1


@aio
async def test_abandoned_exchange_cancels_dispatch(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, d, client, _m):
        with pytest.raises(RequestTimeout):
            await client.request(ep(server), HttpRequest("POST", b"/forever", (), b""), timeout=1.0)
        await asyncio.wait_for(d.cancelled.wait(), 10)
        # the session is still usable
        r = await client.request(ep(server), HttpRequest("GET", b"/after"))
        assert r.status == 200


@aio
async def test_concurrent_requests_across_peers(server_key: bytes) -> None:
    s1, _ = await start_server(server_key)
    s2, _ = await start_server(generate_private_key())
    client = await make_client()
    try:
        reqs = [
            client.request(
                Endpoint("::1", s.addresses[0][1], name), HttpRequest("GET", f"/{i}".encode())
            )
            for i in range(10)
            for s, name in ((s1, "one.test"), (s2, "two.test"))
        ]
        results = await asyncio.gather(*reqs)
        assert sorted(r.body for r in results) == sorted(
            f"GET /{i}\n".encode() for i in range(10) for _ in range(2)
        )
    finally:
        await client.close()
        await s1.close()
        await s2.close()


@aio
async def test_garbage_datagrams_are_dropped_and_counted(server_key: bytes) -> None:
    async with running_pair(server_key) as (server, _d, client, _m):
        port = server.addresses[0][1]
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            for payload in (b"", b"\x00", b"\xff" * 50, b"\x80garbage", b"\x40\x01\x00\x01"):
                sock.sendto(payload, ("::1", port))
        finally:
            sock.close()
        r = await client.request(ep(server), HttpRequest("GET", b"/still-alive"))
        assert r.status == 200


@aio
async def test_well_known_core_lists_resources(server_key: bytes) -> None:
    from aiocoap import GET, Context, Message

    server, _d = await start_server(server_key, plain=(("::1", 0),))
    ctx = await Context.create_client_context()
    try:
        port = server.plain_addresses[0][1]
        msg = Message(code=GET, uri=f"coap://[::1]:{port}/.well-known/core")
        resp = await asyncio.wait_for(ctx.request(msg).response, 10)
        assert resp.code.is_successful()
        assert b"</_matrix/client>" in resp.payload
        assert resp.opt.content_format == 40
    finally:
        await ctx.shutdown()
        await server.close()


class HeaderDispatcher(Dispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.auth: list[str | None] = []

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.auth.append(request.header("authorization"))
        return HttpResponse(
            200, (("content-type", "application/json"),), b'{"ok":true,"target":"x"}'
        )


@aio
async def test_real_codec_sticky_token_survives_server_restart(server_key: bytes) -> None:
    """WireCodec end to end: the Bearer token is bound once, then referenced; a restarted
    server (which lost the binding) makes the client rebind transparently."""

    async def start(port: int = 0) -> tuple[CoapServer, HeaderDispatcher]:
        d = HeaderDispatcher()
        s = await CoapServer.start(
            ServerConfig(listen=(("::1", port),), static_key=server_key, link=FAST), d
        )
        return s, d

    server, d = await start()
    port = server.addresses[0][1]
    metrics = EventMetrics()
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=MemoryTrustStore()),
        link=FAST,
        metrics=metrics,
    )
    auth = (("authorization", "Bearer syt_secret_token_0123456789"),)
    target = b"/_matrix/client/v3/rooms/!r:hs.test/send/m.room.message/t1"
    try:
        for i in range(3):
            r = await client.request(
                Endpoint("::1", port, "hs.test"),
                HttpRequest("PUT", target + str(i).encode(), auth, b'{"body":"hi"}'),
            )
            assert r.status == 200 and r.body == b'{"ok":true,"target":"x"}'
        assert d.auth == ["Bearer syt_secret_token_0123456789"] * 3
        sizes = metrics.sizes[("out", "record")]
        # request 1 rides in XX message 3 with the token bound; 2 and 3 only reference it
        assert len(sizes) == 2 and sizes[0] == sizes[1]
        assert sizes[0] < 80
        await server.close()
        retransmitted = metrics.when(lambda: metrics.retransmissions >= 1)
        pending = asyncio.create_task(
            client.request(
                Endpoint("::1", port, "hs.test"),
                HttpRequest("PUT", target + b"9", auth, b'{"body":"again"}'),
                timeout=30,
            )
        )
        await asyncio.wait_for(retransmitted.wait(), 20)
        server2, d2 = await start(port)
        try:
            r = await pending
            assert r.status == 200
            assert d2.auth and d2.auth[-1] == "Bearer syt_secret_token_0123456789"
        finally:
            await server2.close()
    finally:
        await client.close()


class Gate:
    """Holds a large body's codec call until the test lets it go (issue 14).

    Stands in for a large compact-CBOR body that takes long to encode or decode:
    ``started`` is set once such a call begins; it returns when ``release`` is set
    (or fails after 20 s, which only bounds a broken test)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def hold(self, what: str) -> None:
        self.started.set()
        if not self.release.wait(20):
            raise AssertionError(f"the large {what} blocked the event loop")

    async def served_meanwhile(
        self, big: asyncio.Future[HttpResponse], other: CoapClient, server: CoapServer
    ) -> HttpResponse:
        """While the large call is held, ``other``'s small request is answered."""
        assert await asyncio.to_thread(self.started.wait, 20)
        small = await other.request(ep(server), HttpRequest("GET", b"/small"))
        assert small.body == b"GET /small\n"
        assert not big.done()
        self.release.set()
        return await big


class GatedDecodeCodec(EchoCodec):
    """EchoCodec whose decode of a large response is held by ``gate``."""

    gate = Gate()

    def decode_response(self, msg: CoapMessage, *, method: int = 1, **_kw: Any) -> HttpResponse:
        if len(msg.payload) > INLINE_DECODE_MAX:
            self.gate.hold("decode")
        return super().decode_response(msg, method=method)


@aio
async def test_large_response_decodes_off_the_loop(server_key: bytes) -> None:
    # issue 14: a large body used to be decoded on the event loop, so every other
    # request (and the transport itself) waited for it
    GatedDecodeCodec.gate = gate = Gate()
    server, _d = await start_server(server_key)
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=MemoryTrustStore()),
        link=FAST,
        codec_factory=lambda p, c: GatedDecodeCodec(p, c),
    )
    try:
        big_body = bytes(range(256)) * 16  # 4 KiB: decoded on a worker thread
        big = asyncio.ensure_future(
            client.request(ep(server), HttpRequest("POST", b"/big", (), big_body))
        )
        # the big decode is still running: a small request is served meanwhile
        r = await gate.served_meanwhile(big, client, server)
        assert r.status == 200 and r.body == b"POST /big\n" + big_body
    finally:
        gate.release.set()
        await client.close()
        await server.close()


class GatedRequestCodec(EchoCodec):
    """EchoCodec whose decode of a large request is held by ``gate``."""

    gate = Gate()

    def decode_request(self, msg: CoapMessage, tokens: Any = None) -> HttpRequest:
        if len(msg.payload) > INLINE_DECODE_MAX:
            self.gate.hold("decode")
        return super().decode_request(msg, tokens)


@aio
async def test_large_request_decodes_off_the_loop(server_key: bytes) -> None:
    # issue 14, the listener's side (the module inside Synapse, the gateway): a large
    # request body is decoded on a worker thread; other peers are served meanwhile
    GatedRequestCodec.gate = gate = Gate()
    server = await CoapServer.start(
        ServerConfig(listen=(("::", 0),), static_key=server_key, link=FAST, server_name="hs.test"),
        Dispatcher(),
        codec_factory=lambda p, c: GatedRequestCodec(p, c),
    )
    uploader, other = await make_client(), await make_client()
    try:
        big_body = bytes(range(256)) * 16  # 4 KiB, reassembled from Block1 and then decoded
        big = asyncio.ensure_future(
            uploader.request(ep(server), HttpRequest("POST", b"/big", (), big_body))
        )
        r = await gate.served_meanwhile(big, other, server)
        assert r.status == 200 and r.body == b"POST /big\n" + big_body
    finally:
        gate.release.set()
        await uploader.close()
        await other.close()
        await server.close()


class GatedEncodeCodec(EchoCodec):
    """EchoCodec whose encoding of a large response is held by ``gate``."""

    gate = Gate()

    def encode_response(self, resp: HttpResponse, **kw: Any) -> CoapMessage:
        if len(resp.body) > INLINE_ENCODE_MAX:
            self.gate.hold("encoding")
        return super().encode_response(resp, **kw)


class BigAnswers(Dispatcher):
    """Answers ``/big`` with a body over the inline encoding limit, echoes the rest."""

    BIG = bytes(range(256)) * 40  # 10 KiB

    async def dispatch(self, req: HttpRequest, peer: Any) -> HttpResponse:
        if req.target == b"/big":
            return HttpResponse(200, (), self.BIG)
        return await super().dispatch(req, peer)


@aio
async def test_large_response_encodes_off_the_loop(server_key: bytes) -> None:
    # issue 14: an answer of more than INLINE_ENCODE_MAX bytes (an initial /sync) is
    # encoded on a worker thread; other peers are served meanwhile
    GatedEncodeCodec.gate = gate = Gate()
    server = await CoapServer.start(
        ServerConfig(listen=(("::", 0),), static_key=server_key, link=FAST, server_name="hs.test"),
        BigAnswers(),
        codec_factory=lambda p, c: GatedEncodeCodec(p, c),
    )
    fetcher, other = await make_client(), await make_client()
    try:
        big = asyncio.ensure_future(fetcher.request(ep(server), HttpRequest("GET", b"/big")))
        r = await gate.served_meanwhile(big, other, server)
        assert r.status == 200 and r.body == BigAnswers.BIG
    finally:
        gate.release.set()
        await fetcher.close()
        await other.close()
        await server.close()


class FailingDecodeCodec(EchoCodec):
    """EchoCodec whose decode of a large response fails as the real codec's caps do."""

    def decode_response(self, msg: CoapMessage, *, method: int = 1, **_kw: Any) -> HttpResponse:
        if msg.payload.startswith((b"GET /odd", b"POST /odd")):
            raise LinkDown("a codec error that is not a protocol error")
        if len(msg.payload) > INLINE_DECODE_MAX:
            raise LimitExceeded("body inflates to more than 65536 bytes")
        return super().decode_response(msg, method=method)


@aio
async def test_decode_errors_map_the_same_on_and_off_the_loop(server_key: bytes) -> None:
    server, _d = await start_server(server_key)
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=MemoryTrustStore()),
        link=FAST,
        codec_factory=lambda p, c: FailingDecodeCodec(p, c),
    )
    try:
        big_body = bytes(range(256)) * 16
        # off the loop: the codec's RemoteProtocolError (here LimitExceeded) as it was
        with pytest.raises(LimitExceeded):
            await client.request(ep(server), HttpRequest("POST", b"/big", (), big_body))
        # any other codec error becomes RemoteProtocolError("undecodable response"),
        # off the loop and inline
        with pytest.raises(RemoteProtocolError, match="undecodable response"):
            await client.request(ep(server), HttpRequest("POST", b"/odd", (), big_body))
        with pytest.raises(RemoteProtocolError, match="undecodable response"):
            await client.request(ep(server), HttpRequest("GET", b"/odd"))
        # and the session is still usable
        r = await client.request(ep(server), HttpRequest("GET", b"/after"))
        assert r.body == b"GET /after\n"
    finally:
        await client.close()
        await server.close()
