"""30 % loss each way (the lab's ``lossy`` profile: 9.6 kbit/s, 300 ms one way),
DEFAULT link and Noise settings: every request completes exactly once and the
session layer does not re-handshake on every lost datagram. (The 50-exchange
version runs sans-I/O in virtual time: tests/unit/test_noise_endpoint.py.)

Real loopback sockets through the seeded lab relay; no sleeps.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

from synapse_coap.lab import Relay, RelayConfig, get_profile
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.client import CoapClient, Endpoint
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.server import CoapServer, ServerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MESSAGES = 20  # ~4 s each on average at this profile; 50 take ~3.5 minutes


class Counting:
    def __init__(self) -> None:
        self.calls: collections.Counter[bytes] = collections.Counter()

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.calls[request.target] += 1
        return HttpResponse(200, (("content-type", "text/plain"),), b"ok " + request.target)


def test_fifty_sequential_requests_at_30_percent_loss_with_defaults() -> None:
    async def scenario() -> tuple[Counting, CountingMetrics, dict[str, int], list[int]]:
        server_key = generate_private_key()
        link = LinkParameters()  # the defaults, nothing tuned for the link
        d = Counting()
        server = await CoapServer.start(
            ServerConfig(
                listen=(("127.0.0.1", 0),), static_key=server_key, link=link, server_name="hs.test"
            ),
            d,
        )
        relay = await Relay.start(
            RelayConfig(
                listen=("127.0.0.1", 0),
                upstream=server.addresses[0],
                profile=get_profile("lossy"),
                seed=7,
            )
        )
        metrics = CountingMetrics()
        client = await CoapClient.create(
            static_key=generate_private_key(),
            trust=TrustPolicy(pinned={"hs.test": public_key(server_key)}),
            link=link,
            metrics=metrics,
            bind=("127.0.0.1", 0),
        )
        statuses: list[int] = []
        try:
            host, port = relay.address
            ep = Endpoint(host, port, "hs.test")
            for i in range(MESSAGES):
                body = b'{"msgtype":"m.text","body":"hello %d"}' % i
                target = b"/_matrix/client/v3/rooms/!r:hs.test/send/m.room.message/t%d" % i
                r = await client.request(ep, HttpRequest("PUT", target, (), body))
                statuses.append(r.status)
            assert client.noise_interface is not None
            stats = dict(client.noise_interface.endpoint.stats)  # type: ignore[attr-defined]
        finally:
            await client.close()
            await relay.close()
            await server.close()
        return d, metrics, stats, statuses

    d, metrics, stats, statuses = asyncio.run(scenario())
    assert statuses == [200] * MESSAGES
    assert len(d.calls) == MESSAGES and set(d.calls.values()) == {1}  # exactly once each
    assert metrics.retransmissions > 0  # the link really lost datagrams
    # re-handshakes are rare (loss is not lost state), not one per lost datagram
    assert stats.get("rehandshakes", 0) < 6, stats
    # a failed re-handshake never took the channel down: one channel, all handshakes on it
    assert metrics.handshakes["ok"] == stats.get("handshakes.completed", 0)
