"""Adaptive NSTART over real loopback UDP and Noise: a measured fast link lets several
requests be in flight to one peer at once; ``max_nstart: 1`` keeps RFC 7252's one.

The server never sends an empty ACK here (``empty_ack_delay`` 60 s), so a request
occupies its NSTART slot until its handler returns. The handler of the "held"
requests only returns once three of them are inside it at the same time, or once
the client has retransmitted (i.e. waited a whole RTO without sending more). No
sleeps and no wall-clock assertions: the timeouts only bound a failing test.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.client import CoapClient, Endpoint
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.server import CoapServer, ServerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

CONCURRENT = 3
WARM_UP = 6  # > nstart_samples (4): enough RTT samples for the limit to grow
ROOM = b"/_matrix/client/v3/rooms/!r:hs.test/send/m.room.message/"


class Gate:
    """Records how many held requests are inside the handler at once."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.held_seen = 0
        self.release = asyncio.Event()
        #: held requests the server had seen when the client first retransmitted
        self.seen_at_retransmission: int | None = None

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        if b"/held" in request.target:
            self.held_seen += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.active >= CONCURRENT:
                self.release.set()
            try:
                await self.release.wait()
            finally:
                self.active -= 1
        # echo the body, so warm-up exchanges carry a few hundred bytes each way
        return HttpResponse(200, (("content-type", "text/plain"),), request.body)


class Metrics(CountingMetrics):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate
        self.retransmissions = 0

    def retransmission(self) -> None:
        super().retransmission()
        self.retransmissions += 1
        if self.gate.seen_at_retransmission is None:
            self.gate.seen_at_retransmission = self.gate.held_seen
        # the client waited a whole RTO without sending another request: stop holding
        self.gate.release.set()


async def scenario(max_nstart: int) -> tuple[Gate, Metrics, list[HttpResponse]]:
    server_key = generate_private_key()
    gate = Gate()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("127.0.0.1", 0),),
            static_key=server_key,
            link=LinkParameters(empty_ack_delay=60.0),  # no empty ACK frees a slot
            server_name="hs.test",
        ),
        gate,
    )
    metrics = Metrics(gate)
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(pinned={"hs.test": public_key(server_key)}),
        link=LinkParameters(max_nstart=max_nstart),  # otherwise the defaults
        metrics=metrics,
        bind=("127.0.0.1", 0),
    )
    try:
        ep = Endpoint("127.0.0.1", server.addresses[0][1], "hs.test")
        for i in range(WARM_UP):
            body = base64.b64encode(os.urandom(450))  # 600 bytes that DEFLATE cannot shrink
            r = await asyncio.wait_for(
                client.request(ep, HttpRequest("PUT", ROOM + b"w%d" % i, (), body)), 10
            )
            assert r.status == 200 and r.body == body
        assert metrics.retransmissions == 0, "loopback warm-up retransmitted"
        responses = await asyncio.wait_for(
            asyncio.gather(
                *(
                    client.request(ep, HttpRequest("PUT", ROOM + b"held%d" % i, (), b"x"))
                    for i in range(CONCURRENT)
                )
            ),
            20,
        )
    finally:
        await client.close()
        await server.close()
    return gate, metrics, list(responses)


def test_measured_fast_link_lets_concurrent_requests_in_flight() -> None:
    gate, metrics, responses = asyncio.run(scenario(max_nstart=4))
    assert [r.status for r in responses] == [200] * CONCURRENT
    # all three were inside the handler together: none waited for another's ACK
    assert gate.max_active == CONCURRENT, (
        f"at most {gate.max_active} request(s) in flight at once "
        f"({gate.seen_at_retransmission} seen when the client retransmitted)"
    )
    assert metrics.retransmissions == 0


def test_max_nstart_one_keeps_one_request_in_flight() -> None:
    gate, metrics, responses = asyncio.run(scenario(max_nstart=1))
    assert [r.status for r in responses] == [200] * CONCURRENT
    # the first held request sat unacknowledged for a whole RTO (the client
    # retransmitted it), and still the other two had not been sent
    assert metrics.retransmissions >= 1
    assert gate.seen_at_retransmission == 1
    assert gate.max_active == 1
    assert gate.held_seen == CONCURRENT


class LongPollGate:
    """A long-poll /sync that only returns once a send has completed behind it."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()
        self.poll_entered = asyncio.Event()

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        if request.target.startswith(b"/_matrix/client/v3/sync"):
            self.poll_entered.set()
            await self.sent.wait()
            return HttpResponse(
                200, (("content-type", "application/json"),), b'{"next_batch":"s2"}'
            )
        return HttpResponse(200, (("content-type", "application/json"),), b'{"event_id":"$e"}')


async def long_poll_then_send() -> list[str]:
    server_key = generate_private_key()
    gate = LongPollGate()
    # the server would hold an ordinary request's ACK for a minute: only a long-poll's
    # prompt ACK lets the send (NSTART 1) through while the long-poll waits
    server = await CoapServer.start(
        ServerConfig(
            listen=(("127.0.0.1", 0),),
            static_key=server_key,
            link=LinkParameters(empty_ack_delay=60.0),
            server_name="hs.test",
        ),
        gate,
    )
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(pinned={"hs.test": public_key(server_key)}),
        link=LinkParameters(max_nstart=1),
        bind=("127.0.0.1", 0),
    )
    order: list[str] = []
    try:
        ep = Endpoint("127.0.0.1", server.addresses[0][1], "hs.test")
        await asyncio.wait_for(
            client.request(ep, HttpRequest("GET", b"/_matrix/client/versions")), 10
        )

        async def poll() -> None:
            await client.request(ep, HttpRequest("GET", b"/_matrix/client/v3/sync?timeout=30000"))
            order.append("poll")

        task = asyncio.ensure_future(poll())
        await asyncio.wait_for(gate.poll_entered.wait(), 10)
        r = await asyncio.wait_for(
            client.request(ep, HttpRequest("PUT", ROOM + b"t1", (), b"{}")), 10
        )
        assert r.status == 200
        order.append("send")
        gate.sent.set()
        await asyncio.wait_for(task, 10)
    finally:
        await client.close()
        await server.close()
    return order


def test_send_is_not_held_behind_an_outstanding_long_poll() -> None:
    assert asyncio.run(long_poll_then_send()) == ["send", "poll"]
