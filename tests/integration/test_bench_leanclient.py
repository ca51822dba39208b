"""bench/leanclient.py (the inbound bench's load client) against the product's CoapServer
over real loopback UDP, with the real wire codec: Noise and plain, token bindings and
the string table, concurrent requests, a separate response acknowledged."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.server import CoapServer, ServerConfig
from tests.harness.bench import load_bench

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = LinkParameters(ack_timeout=0.3, min_rto=0.2, empty_ack_delay=0.05)


class Dispatcher:
    """Answers JSON naming what it got; ``/slow`` waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[tuple[HttpRequest, PeerInfo]] = []

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.seen.append((request, peer))
        if request.target.startswith(b"/slow"):
            await self.release.wait()
        auth = dict(request.headers).get("authorization", "")
        body = json.dumps({"target": request.target.decode(), "auth": auth, "n": len(self.seen)})
        return HttpResponse(200, (("content-type", "application/json"),), body.encode())


class Counting(CountingMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def datagram(self, direction: str, kind: str, size: int) -> None:
        super().datagram(direction, kind, size)
        self.changed.set()


async def until(metrics: Counting, cond: Any) -> None:
    while not cond():
        metrics.changed.clear()
        await metrics.changed.wait()


def run(body: Any) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


def test_noise_session_concurrent_requests_with_bound_tokens() -> None:
    lean = load_bench("leanclient")

    async def body() -> None:
        key = generate_private_key()
        d = Dispatcher()
        server = await CoapServer.start(
            ServerConfig(
                listen=(("127.0.0.1", 0),), static_key=key, link=FAST, server_name="hs.test"
            ),
            d,
        )
        port = server.addresses[0][1]
        client = await lean.LeanClient.connect(
            "127.0.0.1", port, "hs.test", public_key(key), generate_private_key()
        )
        try:
            assert client.codec.profile.id > 0  # the negotiated dictionary profile
            auth = (("authorization", "Bearer syt_secret_token_1"),)
            reqs = [
                HttpRequest("GET", f"/_matrix/client/v3/account/whoami?n={i}".encode(), auth)
                for i in range(40)
            ]
            answers = await asyncio.gather(*(client.request(r) for r in reqs))
            assert [a.status for a in answers] == [200] * 40
            got = [json.loads(a.body) for a in answers]
            assert {g["target"] for g in got} == {r.target.decode() for r in reqs}
            assert {g["auth"] for g in got} == {"Bearer syt_secret_token_1"}
            # every request came over the Noise session, from this client's key
            assert all(p.secure and p.static_key is not None for _r, p in d.seen)
            # the token went literally once, then as a binding: later requests are smaller
            assert client.tokens._acked  # (bindings acknowledged by the server)
            assert client.stats["retransmitted"] == 0
        finally:
            client.close()
            await server.close()

    run(body)


def test_plain_separate_response_is_acknowledged() -> None:
    lean = load_bench("leanclient")

    async def body() -> None:
        d = Dispatcher()
        metrics = Counting()
        server = await CoapServer.start(
            ServerConfig(listen=(), plain_listen=(("127.0.0.1", 0),), link=FAST),
            d,
            metrics=metrics,
        )
        port = server.addresses[0][1]
        client = await lean.LeanClient.connect("127.0.0.1", port, "hs.test")
        try:
            fast = await client.request(HttpRequest("GET", b"/_matrix/client/versions"))
            assert fast.status == 200
            assert metrics.datagrams[("in", "plain")] == 1  # piggybacked: nothing to ACK
            slow = asyncio.ensure_future(client.request(HttpRequest("GET", b"/slow")))
            # the server gives up waiting to piggyback: an empty ACK first ...
            await until(metrics, lambda: metrics.datagrams[("out", "plain")] >= 2)
            assert not slow.done()
            d.release.set()
            answer = await slow
            assert answer.status == 200 and json.loads(answer.body)["target"] == "/slow"
            # ... then the response as a CON of its own, which the client acknowledges
            await until(metrics, lambda: metrics.datagrams[("in", "plain")] >= 3)
            assert metrics.datagrams[("out", "plain")] == 3
            assert metrics.retransmissions == 0
        finally:
            client.close()
            await server.close()

    run(body)
