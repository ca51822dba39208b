"""The federation agent over a 10 s RTT link: NSTART holds, no spurious retransmission.

Real sockets, no Synapse: the agent (driven on the asyncio loop through a
bridge like the module's "shared" mode) -> the transport's CoapClient ->
the lab relay (5 s one way) -> the transport's CoapServer with a dispatcher
that records how many requests it is handling at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise import keys as noise_keys
from synapse_coap.synapse.agent import CoapFederationAgent
from synapse_coap.synapse.discovery import Discovery, FederationConfig

pytestmark = pytest.mark.integration

ONE_WAY = 5.0  # seconds: a 10 s round trip


class LoopBridge:
    """Bridge.submit in "shared" mode: tasks on the running loop, Deferreds fired there."""

    def submit(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> defer.Deferred[Any]:
        t = asyncio.get_running_loop().create_task(factory())
        return defer.Deferred.fromFuture(t)


class Recorder:
    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.seen: list[bytes] = []
        self.arrivals: list[float] = []

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        self.arrivals.append(asyncio.get_running_loop().time())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.seen.append(request.target)
        try:
            return HttpResponse(
                200,
                {"content-type": "application/json"},
                json.dumps(
                    {"target": request.target.decode(), "auth": request.header("authorization")}
                ).encode(),
            )
        finally:
            self.active -= 1


class Retransmissions:
    def __init__(self) -> None:
        self.count = 0

    def datagram(self, direction: str, kind: str, size: int) -> None: ...
    def handshake(self, outcome: str) -> None: ...
    def retransmission(self) -> None:
        self.count += 1

    def sessions(self, count: int) -> None: ...
    def request(self, route: str, status: int, seconds: float) -> None: ...
    def dropped(self, reason: str) -> None: ...


def test_three_transactions_at_10s_rtt() -> None:
    from synapse_coap import lab
    from synapse_coap.noise import trust as trust_mod
    from synapse_coap.transport import client as client_mod
    from synapse_coap.transport import link as link_mod
    from synapse_coap.transport import server as server_mod

    async def scenario() -> tuple[list[Any], Recorder, Retransmissions]:
        server_key = noise_keys.generate_private_key()
        server_pub = noise_keys.public_key(server_key)
        # Slow-link settings as docs/link-tuning.md suggests: the first RTO (before
        # any RTT sample) must exceed the 10 s round trip.
        link = link_mod.LinkParameters(bandwidth_bps=100.0)  # defaults + the bit rate
        recorder = Recorder()
        server = await server_mod.CoapServer.start(
            server_mod.ServerConfig(
                listen=(("127.0.0.1", 0),),
                static_key=server_key,
                link=link,
                server_name="hs2.test",
            ),
            recorder,
        )
        up = server.addresses[0]
        profile = lab.get_profile("lan").with_changes(latency=ONE_WAY)
        relay = await lab.Relay.start(
            lab.RelayConfig(listen=("127.0.0.1", 0), upstream=(up[0], up[1]), profile=profile)
        )
        rtx = Retransmissions()
        client = await client_mod.CoapClient.create(
            static_key=noise_keys.generate_private_key(),
            trust=trust_mod.TrustPolicy(),
            link=link,
            metrics=rtx,
            bind=("127.0.0.1", 0),
            server_name="hs1.test",
        )
        host, port = relay.address
        cfg = FederationConfig.from_config(
            {
                "fallback": "never",
                "discovery": False,
                "peers": {
                    "hs2.test": {
                        "endpoints": f"{host}:{port}",
                        "public_key": noise_keys.encode_public(server_pub),
                    }
                },
            }
        )
        agent = CoapFederationAgent(
            fallback=None,
            bridge=LoopBridge(),
            resolver=Discovery(cfg, clock=asyncio.get_running_loop().time),
            policy="never",
            client=client,
        )
        try:
            ds = [
                agent.request(
                    b"GET",
                    f"matrix-federation://hs2.test/_matrix/federation/v1/state_ids/!r:hs2.test?event_id=%24e{i}".encode(),
                    Headers(
                        {
                            b"Authorization": [
                                b'X-Matrix origin="hs1.test",key="ed25519:a",sig="c2ln"'
                            ]
                        }
                    ),
                )
                for i in range(3)
            ]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(d.asFuture(asyncio.get_running_loop()) for d in ds), return_exceptions=True
                ),
                150,
            )
        finally:
            await client.close()
            await relay.close()
            await server.close()
        return list(results), recorder, rtx

    results, recorder, rtx = asyncio.run(scenario())
    for r in results:
        assert not isinstance(r, (BaseException, Failure)), r
        assert r.code == 200
    # exact target bytes, each request handled exactly once (no duplicate from a retransmission)
    assert sorted(recorder.seen) == sorted(
        f"/_matrix/federation/v1/state_ids/!r:hs2.test?event_id=%24e{i}".encode() for i in range(3)
    )
    # NSTART = 1: the agent handed all three to the client at once, yet each request
    # left only after the previous exchange completed, i.e. a full round trip later.
    gaps = [b - a for a, b in zip(recorder.arrivals, recorder.arrivals[1:], strict=False)]
    assert all(g >= 2 * ONE_WAY * 0.9 for g in gaps), gaps
    assert rtx.count == 0, f"{rtx.count} spurious retransmissions at 10 s RTT"
