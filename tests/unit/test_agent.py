"""The outbound federation agent, with a fake CoapClient on a real (manually run) asyncio loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from io import BytesIO
from typing import Any

import pytest
from synapse.http.client import QuieterFileBodyProducer, read_body_with_max_size
from synapse.http.matrixfederationclient import check_content_type_is
from twisted.internet import defer, task
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from synapse_coap.errors import KeyChangedError, LinkDown, RequestTimeout
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse.agent import CoapFederationAgent
from synapse_coap.synapse.agent_http import classify_route, parse_federation_uri
from synapse_coap.synapse.discovery import CoapTarget, Discovery, FederationConfig, SrvRecord
from synapse_coap.transport.convert import default_codec_factory, supported_profile_offers
from synapse_coap.wire.context import WireContext


class FakeBridge:
    """Like Bridge.submit, but the asyncio loop only runs when the test calls run()."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.submitted = 0

    def submit(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> defer.Deferred[Any]:
        self.submitted += 1
        t = self.loop.create_task(factory())
        d: defer.Deferred[Any] = defer.Deferred(lambda _: t.cancel())

        def fire(fut: asyncio.Task[Any]) -> None:
            if d.called:
                return
            if fut.cancelled():
                d.errback(Failure(defer.CancelledError()))
            elif fut.exception() is not None:
                d.errback(Failure(fut.exception()))
            else:
                d.callback(fut.result())

        t.add_done_callback(fire)
        return d

    def run(self) -> None:
        for _ in range(20):
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self) -> None:
        self.loop.close()


class FakeClient:
    def __init__(self) -> None:
        self.requests: list[tuple[Any, HttpRequest]] = []
        self.replies: dict[int, object] = {}  # by port: HttpResponse, Exception, or "hang"
        self.cancelled = 0

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.requests.append((endpoint, request))
        reply = self.replies.get(
            endpoint[1].port, HttpResponse(200, {"content-type": "application/json"}, b"{}")
        )
        if reply == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, HttpResponse)
        return reply


class FakeFallback:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, Any, Any]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> defer.Deferred[str]:
        self.calls.append((method, uri, headers, bodyProducer))
        return defer.succeed("fallback-response")


def endpoint_factory(server_name: str, target: CoapTarget) -> tuple[str, CoapTarget]:
    return (server_name, target)


class Setup:
    def __init__(
        self,
        cfg: dict[str, Any],
        *,
        policy: str = "https",
        srv: dict[str, list[SrvRecord]] | None = None,
    ) -> None:
        self.bridge = FakeBridge()
        self.client = FakeClient()
        self.fallback = FakeFallback()
        self.config = FederationConfig.from_config(cfg)
        srv = srv or {}
        self.discovery = Discovery(
            self.config,
            clock=lambda: 0.0,
            srv_lookup=lambda name: defer.succeed(srv.get(name, [])),
            probe=None,
        )
        self.agent = CoapFederationAgent(
            fallback=self.fallback,
            bridge=self.bridge,
            resolver=self.discovery,
            policy=policy,
            client=self.client,
            endpoint_factory=endpoint_factory,
        )


@pytest.fixture
def setup() -> Any:
    s = Setup({"peers": {"hs2.test": ["127.0.0.1:7001", "127.0.0.1:7002"]}})
    yield s
    s.bridge.close()


def outcome(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def pumped_producer(data: bytes) -> tuple[QuieterFileBodyProducer, Callable[[], None]]:
    """Synapse's body producer with a cooperator the test drives by hand."""
    work: list[Callable[[], None]] = []

    def scheduler(x: Callable[[], None]) -> Any:
        work.append(x)
        return type("Call", (), {"cancel": lambda self: None})()

    coop = task.Cooperator(scheduler=scheduler, terminationPredicateFactory=lambda: lambda: False)

    def pump() -> None:
        while work:
            work.pop(0)()

    return QuieterFileBodyProducer(BytesIO(data), cooperator=coop), pump


def test_parse_keeps_target_bytes_exactly() -> None:
    uri = b"matrix-federation://hs2.test:8448/_matrix/federation/v1/query/profile?user_id=%40bob%3Ahs2.test&field=displayname"
    dest, target = parse_federation_uri(uri)
    assert dest == "hs2.test:8448"
    assert (
        target
        == b"/_matrix/federation/v1/query/profile?user_id=%40bob%3Ahs2.test&field=displayname"
    )
    assert parse_federation_uri(b"matrix-federation://h?x=1") == ("h", b"/?x=1")
    with pytest.raises(ValueError):
        parse_federation_uri(b"https://h/x")


def test_classify_route_uses_the_route_tables_names() -> None:
    assert classify_route(b"/_matrix/federation/v1/send/1234") == "federation.v1.send.1"
    assert classify_route(b"/_matrix/key/v2/server") == "key.v2.server.0"
    assert classify_route(b"/_matrix/key/v2/query") == "key.v2.query.0"
    assert (
        classify_route(b"/_matrix/federation/v1/query/profile?user_id=x") == "federation.v1.query"
    )
    assert (
        classify_route(b"/_matrix/federation/v1/user/devices/%40a%3Ab")
        == "federation.v1.user.devices"
    )
    assert (
        classify_route(b"/_matrix/federation/v1/media/download/abc")
        == "federation.v1.media.download"
    )
    assert classify_route(b"/_matrix/federation/v2/send_join/!r:x/$e") == "federation.v2.send_join"
    # what the route table cannot carry travels (and is named) literally, as the listener does
    assert classify_route(b"/_matrix/federation/v1/%40weird") == "literal"
    assert classify_route(b"/other") == "literal"
    assert classify_route(b"/_matrix/federation/v1/send/1?\xff") == "literal"


#: Real federation request targets, as Synapse's federation client sends them.
FEDERATION_TARGETS = [
    ("PUT", b"/_matrix/federation/v1/send/1700000000123"),
    (
        "GET",
        b"/_matrix/federation/v1/make_join/%21room%3Ahs2.test/%40alice%3Ahs1.test?ver=10&ver=11",
    ),
    ("PUT", b"/_matrix/federation/v2/send_join/%21room%3Ahs2.test/%24ev1a2b3c?omit_members=true"),
    ("PUT", b"/_matrix/federation/v1/send_join/%21room%3Ahs2.test/%24ev1a2b3c"),
    ("GET", b"/_matrix/key/v2/server"),
    ("GET", b"/_matrix/federation/v1/query/profile?user_id=%40bob%3Ahs2.test&field=displayname"),
    ("GET", b"/_matrix/federation/v1/backfill/%21room%3Ahs2.test?v=%24ev1a2b3c&limit=100"),
    ("GET", b"/_matrix/federation/v1/state_ids/%21room%3Ahs2.test?event_id=%24ev1a2b3c"),
    ("GET", b"/_matrix/federation/v1/media/download/AbCdEfGhIjKlMnOp?timeout_ms=20000"),
    ("GET", b"/_matrix/federation/v1/user/devices/%40bob%3Ahs2.test"),
    ("GET", b"/_matrix/federation/v1/version"),
    ("GET", b"/_matrix/federation/v1/no_such_endpoint/x"),
]


@pytest.mark.parametrize(("method", "target"), FEDERATION_TARGETS)
def test_agent_names_a_request_as_the_receiving_listener_does(
    setup: Setup, method: str, target: bytes
) -> None:
    """The agent's route label == the peer listener's route label for the same request."""
    body = b'{"pdus":[]}' if method == "PUT" else b""
    headers = Headers(
        {
            b"Authorization": [
                b'X-Matrix origin="hs1.test",destination="hs2.test",key="ed25519:a",sig="c2ln"'
            ]
        }
    )
    if body:
        headers.addRawHeader(b"Content-Type", b"application/json")
    producer, pump = pumped_producer(body) if body else (None, lambda: None)
    d = setup.agent.request(
        method.encode(), b"matrix-federation://hs2.test" + target, headers, producer
    )
    pump()
    setup.bridge.run()
    assert outcome(d).code == 200
    ((_endpoint, req),) = setup.client.requests
    (agent_route,) = setup.agent.stats.entered
    assert setup.agent.stats.requests == {(agent_route, "coap"): 1}

    # The CoapClient encodes this request for a session (after the handshake both ends
    # know each other's server names); the peer's listener names what arrives.
    offered = supported_profile_offers()[0][0]
    context = WireContext(("hs2.test", "hs1.test"))
    sent = default_codec_factory(offered, context).encode_request(req)
    listener_route = default_codec_factory(offered, context).route_name(sent)

    assert agent_route == listener_route
    expect_literal = b"no_such_endpoint" in target
    assert (agent_route == "literal") == expect_literal
    # no identifier ever enters a label
    for ident in ("room", "hs1", "hs2", "alice", "bob", "ev1a2b3c", "1700000000123", "AbCd"):
        assert ident not in agent_route


def test_coap_request_carries_exact_target_headers_and_body(setup: Setup) -> None:
    body = json.dumps({"pdus": [], "edus": [{"edu_type": "m.typing"}]}).encode()
    producer, pump = pumped_producer(body)
    auth = b'X-Matrix origin="hs1.test",destination="hs2.test",key="ed25519:a",sig="c2ln"'
    uri = b"matrix-federation://hs2.test/_matrix/federation/v1/send/17?x=%2F"
    setup.client.replies[7001] = HttpResponse(
        200, {"content-type": "application/json"}, b'{"pdus":{}}'
    )
    d = setup.agent.request(
        b"PUT",
        uri,
        Headers({b"Authorization": [auth], b"Content-Type": [b"application/json"]}),
        producer,
    )
    pump()
    setup.bridge.run()
    resp = outcome(d)
    ((endpoint, req),) = setup.client.requests
    assert endpoint == ("hs2.test", CoapTarget("127.0.0.1", 7001))
    assert req.method == "PUT"
    assert req.target == b"/_matrix/federation/v1/send/17?x=%2F"
    assert req.body == body
    assert req.header("authorization") == auth.decode()
    assert req.header("content-type") == "application/json"
    # What Synapse does with the response:
    assert resp.code == 200 and resp.phrase == b"OK"
    check_content_type_is(resp.headers, "application/json")
    sink = BytesIO()
    assert outcome(read_body_with_max_size(resp, sink, 1000)) == len(b'{"pdus":{}}')
    assert sink.getvalue() == b'{"pdus":{}}'
    assert resp.request.absoluteURI == uri
    assert setup.agent.stats.requests[("federation.v1.send.1", "coap")] == 1
    assert setup.agent.stats.entered == {"federation.v1.send.1": 1}
    assert setup.agent.stats.outcomes["ok"] == 1
    assert setup.fallback.calls == []


def test_error_status_and_max_size(setup: Setup) -> None:
    setup.client.replies[7001] = HttpResponse(
        401, {"content-type": "application/json"}, b'{"errcode":"M_UNAUTHORIZED"}' * 10
    )
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
    setup.bridge.run()
    resp = outcome(d)
    assert resp.code == 401 and resp.phrase == b"Unauthorized"
    # a body over Synapse's limit is refused cleanly (the "transport" abort is a no-op)
    res = outcome(read_body_with_max_size(resp, BytesIO(), 20))
    assert isinstance(res, Failure)


def test_link_down_tries_next_endpoint_then_connect_error(setup: Setup) -> None:
    setup.client.replies[7001] = LinkDown("no handshake")
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
    setup.bridge.run()
    assert outcome(d).code == 200
    assert [e[1].port for e, _ in setup.client.requests] == [7001, 7002]

    setup.client.replies[7002] = LinkDown("no handshake")
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
    setup.bridge.run()
    f = outcome(d)
    assert isinstance(f, Failure) and f.check(ConnectError)
    assert setup.agent.stats.outcomes["link_down"] == 1
    assert setup.fallback.calls == []  # a static CoAP peer never silently goes HTTPS


def test_timeout_and_key_change_map_to_what_synapse_retries(setup: Setup) -> None:
    setup.client.replies[7001] = RequestTimeout("no answer")
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
    setup.bridge.run()
    f = outcome(d)
    assert isinstance(f, Failure) and f.check(defer.TimeoutError)

    setup.client.replies[7001] = KeyChangedError("hs2.test", "aaaa", "bbbb")
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
    setup.bridge.run()
    f = outcome(d)
    assert isinstance(f, Failure) and f.check(ConnectError)
    assert "changed" in str(f.value)
    assert len(setup.client.requests) == 2  # a refused key is not retried on the next endpoint


def test_cancel_cancels_the_asyncio_request(setup: Setup) -> None:
    setup.client.replies[7001] = "hang"
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/federation/v1/version")
    setup.bridge.run()
    assert not d.called
    assert len(setup.client.requests) == 1
    d.cancel()  # what Synapse's timeout_deferred does
    setup.bridge.run()
    f = outcome(d)
    assert isinstance(f, Failure) and f.check(defer.CancelledError)
    assert setup.client.cancelled == 1
    assert setup.agent.stats.outcomes["cancelled"] == 1


def test_cancel_while_reading_body_stops_producer(setup: Setup) -> None:
    producer, _pump = pumped_producer(b"{}")
    d = setup.agent.request(
        b"PUT", b"matrix-federation://hs2.test/_matrix/federation/v1/send/1", None, producer
    )
    d.cancel()
    assert isinstance(outcome(d), Failure)
    assert setup.client.requests == []


def test_fallback_https_delegates_untouched() -> None:
    s = Setup({"discovery": False})
    producer, _ = pumped_producer(b"{}")
    headers = Headers({b"Authorization": [b"X-Matrix ..."]})
    uri = b"matrix-federation://stock.test/_matrix/federation/v1/send/9"
    d = s.agent.request(b"PUT", uri, headers, producer)
    assert outcome(d) == "fallback-response"
    assert s.fallback.calls == [(b"PUT", uri, headers, producer)]
    assert s.client.requests == [] and s.bridge.submitted == 0
    assert s.agent.stats.requests[("federation.v1.send.1", "https")] == 1
    assert s.agent.stats.entered == {"federation.v1.send.1": 1}
    s.bridge.close()


def test_fallback_never_fails_like_unreachable() -> None:
    s = Setup({"discovery": False, "fallback": "never"}, policy="never")
    d = s.agent.request(b"GET", b"matrix-federation://stock.test/_matrix/key/v2/server")
    f = outcome(d)
    assert isinstance(f, Failure) and f.check(ConnectError)
    assert "fallback" in str(f.value)
    assert s.fallback.calls == []
    s.bridge.close()


def test_discovered_destination_is_forgotten_when_it_stops_answering() -> None:
    srv = {"_matrix-coap._udp.d.test": [SrvRecord(0, 0, 7009, "127.0.0.1")]}
    s = Setup({}, srv=srv)
    s.client.replies[7009] = LinkDown("gone")
    d = s.agent.request(b"GET", b"matrix-federation://d.test/_matrix/key/v2/server")
    s.bridge.run()
    assert isinstance(outcome(d), Failure)
    assert s.discovery.peek("d.test") is None  # will rediscover next time
    s.bridge.close()


def test_lazy_client_factory_runs_once() -> None:
    s = Setup({"peers": {"hs2.test": "127.0.0.1:7001"}})
    made: list[int] = []

    async def factory() -> FakeClient:
        made.append(1)
        await asyncio.sleep(0)
        return s.client

    agent = CoapFederationAgent(
        fallback=s.fallback,
        bridge=s.bridge,
        resolver=s.discovery,
        client_factory=factory,
        endpoint_factory=endpoint_factory,
    )
    ds = [
        agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
        for _ in range(3)
    ]
    s.bridge.run()
    assert [outcome(d).code for d in ds] == [200, 200, 200]
    assert made == [1]
    s.bridge.close()


def test_non_federation_uri_goes_to_fallback(setup: Setup) -> None:
    d = setup.agent.request(b"GET", b"https://example.org/x")
    assert outcome(d) == "fallback-response"


def test_key_change_chained_under_link_down_is_not_retried_elsewhere(setup: Setup) -> None:
    """The transport reports a refused key as LinkDown caused by KeyChangedError."""
    err = LinkDown("handshake refused")
    err.__cause__ = KeyChangedError("hs2.test", "aaaa", "bbbb")
    setup.client.replies[7001] = err
    d = setup.agent.request(b"GET", b"matrix-federation://hs2.test/_matrix/key/v2/server")
    setup.bridge.run()
    f = outcome(d)
    assert isinstance(f, Failure) and f.check(ConnectError)
    assert "bbbb" in str(f.value)
    assert [e[1].port for e, _ in setup.client.requests] == [7001]
    assert setup.agent.stats.outcomes["refused"] == 1


class FakeHttpClient:
    def __init__(self) -> None:
        self.agent = FakeFallback()


class FakeHs:
    hostname = "hs1.test"

    def __init__(self) -> None:
        import netaddr

        self.http_client = FakeHttpClient()
        self.config = type(
            "C",
            (),
            {
                "server": type(
                    "S",
                    (),
                    {
                        "federation_ip_range_blocklist": netaddr.IPSet(["10.0.0.0/8"]),
                        "federation_ip_range_allowlist": netaddr.IPSet(["10.1.2.3/32"]),
                    },
                )()
            },
        )()

    def get_federation_http_client(self) -> FakeHttpClient:
        return self.http_client

    def get_clock(self) -> Any:
        return type("Clock", (), {"time": lambda self: 5.0})()


def test_install_replaces_the_agent_and_keeps_https_as_fallback() -> None:
    from synapse_coap.synapse.agent import install_federation_agent

    hs = FakeHs()
    api = type("Api", (), {"_hs": hs})()
    old = hs.http_client.agent
    bridge = FakeBridge()
    client = FakeClient()
    client.replies[5683] = LinkDown("nobody home")
    cfg = FederationConfig.from_config({"peers": {"hs2.test": "127.0.0.1:7001"}})
    agent = install_federation_agent(
        api, bridge=bridge, config=cfg, client=client, endpoint_factory=endpoint_factory
    )
    assert hs.http_client.agent is agent
    assert agent.fallback is old
    # idempotent: a second install keeps the first agent (and its fallback)
    assert install_federation_agent(api, bridge=bridge, config=cfg, client=client) is agent
    # Synapse's IP blocklist applies to discovery (probe never sent to 10.0.0.9) ...
    d = agent.request(b"GET", b"matrix-federation://10.0.0.9:8448/_matrix/key/v2/server")
    bridge.run()
    assert outcome(d) == "fallback-response"
    assert client.requests == []
    # ... except what the allowlist lets through: probed, no answer -> HTTPS
    d = agent.request(b"GET", b"matrix-federation://10.1.2.3/_matrix/key/v2/server")
    bridge.run()
    assert outcome(d) == "fallback-response"
    ((endpoint, probe),) = client.requests
    assert endpoint == ("10.1.2.3", CoapTarget("10.1.2.3", 5683))
    assert (probe.method, probe.target) == ("GET", b"/_matrix/federation/v1/version")
    bridge.close()


def test_probe_any_answer_means_coap() -> None:
    from synapse_coap.synapse.agent import make_probe

    bridge = FakeBridge()
    client = FakeClient()
    client.replies[1] = HttpResponse(404, {}, b"")
    client.replies[2] = RequestTimeout("silence")

    async def get_client() -> FakeClient:
        return client

    probe = make_probe(bridge, get_client, 3.0, endpoint_factory)
    d1 = probe("a.test", CoapTarget("a.test", 1))
    d2 = probe("b.test", CoapTarget("b.test", 2))
    bridge.run()
    assert outcome(d1) is True
    assert outcome(d2) is False
    bridge.close()


def test_response_and_agent_provide_the_twisted_interfaces(setup: Setup) -> None:
    from twisted.web.iweb import IAgent, IResponse
    from zope.interface.verify import verifyObject

    from synapse_coap.synapse.agent import CoapResponse

    assert verifyObject(IResponse, CoapResponse(HttpResponse(204, {}, b"")))
    assert verifyObject(IAgent, setup.agent)


def test_a_route_that_cannot_be_named_is_unknown_and_still_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from synapse_coap.synapse import agent_http as agent_mod

    def broken() -> Any:
        raise OSError("maps directory unreadable")

    monkeypatch.setattr(agent_mod, "_route_namer", broken)
    s = Setup({"discovery": False})
    uri = b"matrix-federation://stock.test/_matrix/federation/v1/send/9"
    assert outcome(s.agent.request(b"PUT", uri)) == "fallback-response"
    assert s.agent.stats.entered == {"unknown": 1}
    s.bridge.close()
