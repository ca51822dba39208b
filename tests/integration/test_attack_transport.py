"""Attacks on a real CoapServer over loopback UDP from a peer with a valid session
(issue 14): mutated CoAP messages inside records, cheap-to-send expensive bodies,
abandoned block transfers. The server runs the real WireCodec; the dispatcher
echoes. Every case must be answered with an RFC 7252 code or dropped and counted,
never logged with a traceback."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiocoap.message import Direction, Message
from aiocoap.numbers.types import CON
from aiocoap.optiontypes import BlockOption

from synapse_coap.errors import ConfigValueError
from synapse_coap.mapping.codec import WireCodec
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.transport.convert import to_aiocoap
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.server import CoapServer, ServerConfig
from synapse_coap.transport.transfers import TransferLimits
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import load_profile
from synapse_coap_lab.attack import RawPeer, coap_message, mutations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FAST = LinkParameters(ack_timeout=0.3, min_rto=0.2, empty_ack_delay=0.05)
#: 50 x 100 = 5,000 mutated messages here (about 3 s); bench/attack.py sends 20,000
BATCHES = 50
URI_PATH, URI_QUERY, CONTENT_FORMAT, BLOCK1, BLOCK2 = 11, 15, 12, 27, 23


class Echo:
    def __init__(self) -> None:
        self.peers: list[PeerInfo] = []

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.peers.append(peer)
        return HttpResponse(200, (("content-type", "application/json"),), b"{}")


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def start(
    key: bytes | None = None, port: int = 0, **config: Any
) -> tuple[CoapServer, Echo, CountingMetrics]:
    echo, metrics = Echo(), CountingMetrics()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("127.0.0.1", port),),
            static_key=key or generate_private_key(),
            link=FAST,
            server_name="hs.test",
            **config,
        ),
        echo,
        metrics=metrics,
    )
    return server, echo, metrics


PING_PATH = [(URI_PATH, b".well-known"), (URI_PATH, b"core")]


async def ping(peer: RawPeer, mid: int) -> bytes:
    """A valid CON GET /.well-known/core; returns the answer's plaintext."""
    token = mid.to_bytes(4, "big")
    peer.send(coap_message(1, mid & 0xFFFF, token, PING_PATH))
    while True:
        got = await asyncio.wait_for(peer.received.get(), 10)
        if got[4 : 4 + (got[0] & 0x0F)] == token:
            return got


def seeds() -> list[bytes]:
    """Header-valid CoAP messages of the kinds a client sends."""
    matrix = [(URI_PATH, b"c"), (URI_PATH, b"r"), (URI_QUERY, b"1=x")]
    return [
        coap_message(1, 1, b"\x01\x02", matrix),
        coap_message(2, 2, b"\x03", [*matrix, (CONTENT_FORMAT, b"\xff\x10")], b"\xa1\x01\x02"),
        coap_message(3, 3, b"", [(URI_PATH, b"x"), (BLOCK1, b"\x0e")], b"a" * 64),
        coap_message(1, 4, b"\x09", [(URI_PATH, b"x"), (BLOCK2, b"\x16")]),
        coap_message(1, 5, b"\x07", [(URI_PATH, b"\xff\xfe"), (URI_QUERY, b"\xc3\x28")]),
    ]


@aio
async def test_mutated_coap_inside_a_session_no_traceback_each_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """issue 14: bad UTF-8 in an option raised UnicodeDecodeError, logged as an ERROR
    traceback for each datagram (2,237 tracebacks from 20,000 datagrams)."""
    caplog.set_level(logging.DEBUG)
    server, _echo, metrics = await start()
    peer = await RawPeer(server.addresses[0]).open()
    try:
        await peer.connect()
        rnd = random.Random(14)
        n = 0
        for batch in range(BATCHES):
            for pt in mutations(seeds(), 100, rnd):
                if len(pt) <= peer.endpoint.max_plaintext():
                    peer.send(pt)
                    n += 1
            answer = await ping(peer, 60000 + batch)
            assert answer[1] == 69  # 2.05: the listener still serves
    finally:
        peer.close()
        await server.close()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks[0].getMessage()
    assert n > BATCHES * 95
    assert metrics.drops["bad_coap"] > 0
    # one warning per source per interval, not one per datagram
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 5, [r.getMessage() for r in warnings]


def encoded_request(method: str, target: bytes, mid: int) -> bytes:
    """A request as the real client codec (base profile) puts it on the wire."""
    cm = WireCodec(load_profile(0), WireContext()).encode_request(HttpRequest(method, target))
    m = to_aiocoap(cm)
    m.mid, m.token, m.mtype = mid, mid.to_bytes(2, "big"), CON
    return bytes(m.encode())


@aio
async def test_0rtt_identity_and_replay_after_restart(tmp_path: Any) -> None:
    """issue 14: 0-RTT requests were forwarded with an unvalidated source address as the
    client's identity; a captured 0-RTT request replayed once after a restart."""
    key = generate_private_key()
    state = str(tmp_path / "coap.key.replay")
    server, echo, _m = await start(key=key, replay_state_path=state)
    port = server.addresses[0][1]
    peer = await RawPeer(("127.0.0.1", port)).open()
    try:
        early = encoded_request("GET", b"/_matrix/client/versions", 7)
        await peer.connect(peer_static=public_key(key), early_data=early)
        ik1 = peer.raw_out[0]
        assert ik1[0] == 0x81
        await asyncio.wait_for(peer.received.get(), 10)
        assert [p.identity_host for p in echo.peers] == [None]  # 0-RTT: not validated
        peer.send(encoded_request("GET", b"/_matrix/client/versions", 8))
        await asyncio.wait_for(peer.received.get(), 10)
        assert [p.identity_host for p in echo.peers] == [None, "127.0.0.1"]
    finally:
        peer.close()
        await server.close()
    # Restart with the same key and state file on the same port: the replay is refused.
    server2, echo2, _m2 = await start(key=key, replay_state_path=state, port=port)
    replayer = await RawPeer(("127.0.0.1", port)).open()
    honest = await RawPeer(("127.0.0.1", port)).open()
    try:
        replayer.send_raw(ik1)
        await honest.connect()
        await ping(honest, 9)  # the server has processed the replay by now
        assert echo2.peers == []
        stats = server2.noise_interfaces[0].endpoint.stats  # type: ignore[attr-defined]
        assert stats["early_data.refused.before_restart"] == 1
    finally:
        replayer.close()
        honest.close()
        await server2.close()


async def exchange(peer: RawPeer, messages: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send CON requests at once; their answers in the same order (matched by token)."""
    want = {m[4 : 4 + (m[0] & 0x0F)]: i for i, m in enumerate(messages)}
    out: list[bytes | None] = [None] * len(messages)
    for m in messages:
        peer.send(m)
    left = len(messages)
    while left:
        got = await asyncio.wait_for(peer.received.get(), timeout)
        i = want.get(got[4 : 4 + (got[0] & 0x0F)])
        if i is not None and out[i] is None and got[1] != 0:
            out[i] = got
            left -= 1
    return [o for o in out if o is not None]


def with_block(message: bytes, option: int, num: int, more: bool, payload: bytes) -> bytes:
    m = Message.decode(message)
    value = BlockOption.BlockwiseTuple(num, more, 6)
    if option == BLOCK1:
        m.opt.block1 = value
    else:
        m.opt.block2 = value
    m.payload = payload
    m.direction = Direction.OUTGOING
    return bytes(m.encode())


class BigEcho(Echo):
    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.peers.append(peer)
        body = request.target * (8192 // len(request.target) + 1)
        return HttpResponse(200, (("content-type", "application/octet-stream"),), body[:8192])


@aio
async def test_abandoned_uploads_and_fetches_stay_within_the_budget_and_expire() -> None:
    """issue 14: 256 partial Block1 uploads of up to 50 MiB each could be held, and the
    Block2 response cache had no limit. 1,000 of each, from 50 sessions."""
    budget = 1024 * 1024
    echo, metrics = BigEcho(), CountingMetrics()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("127.0.0.1", 0),),
            static_key=generate_private_key(),
            link=FAST,
            transfers=TransferLimits(budget=budget, timeout=1.0),
        ),
        echo,
        metrics=metrics,
    )
    peers = [await RawPeer(server.addresses[0], bind=f"127.14.{i}.1").open() for i in range(50)]
    try:
        await asyncio.gather(*(p.connect() for p in peers))
        highest = 0
        for round_ in range(20):
            for n, peer in enumerate(peers):
                i = round_ * 50 + n
                put = encoded_request("PUT", b"/_matrix/client/v3/upload/%d" % i, 2 * i + 1)
                get = encoded_request("GET", b"/_matrix/media/v3/download/s/%d" % i, 2 * i + 2)
                msgs = [with_block(put, BLOCK1, 0, True, b"x" * 1024)]
                msgs.append(with_block(get, BLOCK2, 0, False, b""))
                answers = await exchange(peer, msgs)
                assert [a[1] for a in answers] == [95, 69]  # 2.31 Continue, 2.05 block 0
                highest = max(highest, server.transfers.bytes)
        assert highest <= budget
        assert metrics.drops["transfer_budget"] > 0
        # stalled transfers are freed after their timeout, with nobody touching them
        for _ in range(100):
            if len(server.transfers) == 0:
                break
            await asyncio.sleep(0.05)
        assert len(server.transfers) == 0 and server.transfers.bytes == 0
        assert metrics.drops["transfer_timeout"] > 0
    finally:
        for p in peers:
            p.close()
        await server.close()


class SlowEcho(Echo):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.peers.append(peer)
        await self.release.wait()
        return HttpResponse(200, (("content-type", "application/json"),), b"{}")


@aio
async def test_requests_beyond_the_per_session_limit_get_503_and_are_counted() -> None:
    echo, metrics = SlowEcho(), CountingMetrics()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("127.0.0.1", 0),),
            static_key=generate_private_key(),
            link=FAST,
            transfers=TransferLimits(requests_per_session=4),
        ),
        echo,
        metrics=metrics,
    )
    peer = await RawPeer(server.addresses[0]).open()
    try:
        await peer.connect()
        msgs = [
            encoded_request("GET", b"/_matrix/client/v3/sync?since=%d" % i, 100 + i)
            for i in range(10)
        ]
        task = asyncio.ensure_future(exchange(peer, msgs))
        while metrics.drops["session_request_limit"] < 6:
            await asyncio.sleep(0.01)
        echo.release.set()
        answers = await task
        codes = sorted(a[1] for a in answers)
        assert codes == [69] * 4 + [163] * 6  # 2.05 x 4, 5.03 Service Unavailable x 6
        assert len(echo.peers) == 4
    finally:
        peer.close()
        await server.close()


@aio
async def test_gateway_pins_client_keys(tmp_path: Any) -> None:
    """issue 14: the gateway could not pin client keys at all (the module can)."""
    from synapse_coap.noise.keys import write_key_file
    from synapse_coap.proxy.runner import GatewayConfig, start_gateway

    key_path = tmp_path / "gw.key"
    write_key_file(key_path, generate_private_key())
    allowed = generate_private_key()
    with pytest.raises(ConfigValueError, match="--client-key"):
        GatewayConfig(
            listen=(), http_target="http://127.0.0.1:9", key_path=key_path, only_pinned_clients=True
        )
    gateway = await start_gateway(
        GatewayConfig(
            listen=(("127.0.0.1", 0),),
            http_target="http://127.0.0.1:9",
            key_path=key_path,
            client_keys=(("phone", public_key(allowed)),),
            only_pinned_clients=True,
        )
    )
    stranger = await RawPeer(gateway.addresses[0]).open()
    friend = await RawPeer(gateway.addresses[0], static_key=allowed).open()
    try:
        await friend.connect()
        await ping(friend, 1)
        await stranger.connect()  # XX: the client's side completes when it sends XX3 ...
        with pytest.raises(asyncio.TimeoutError):  # ... but the gateway refuses it
            await asyncio.wait_for(ping(stranger, 2), 1.0)
        stats = gateway.server.noise_interfaces[0].endpoint.stats
        assert stats["handshakes.refused"] >= 1
    finally:
        stranger.close()
        friend.close()
        await gateway.close()
