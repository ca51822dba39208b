"""Federation destinations: the ``federation:`` config, the cache, SRV ordering, discovery."""

from __future__ import annotations

import base64
import random
from collections import Counter
from typing import Any

import pytest
from twisted.internet import defer

from synapse_coap.errors import ConfigValueError
from synapse_coap.synapse.discovery import (
    SRV_SERVICE,
    CoapTarget,
    Discovery,
    FederationConfig,
    Resolution,
    ResolutionCache,
    SrvRecord,
    order_srv_records,
    probe_target,
    split_host_port,
)
from synapse_coap.synapse.hostnames import is_valid_host

KEY = bytes(range(32))
KEY_B64 = base64.b64encode(KEY).decode().rstrip("=")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def result_of(d: defer.Deferred[Resolution]) -> Resolution:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    value = out[0]
    assert isinstance(value, Resolution), value
    return value


# -- config --------------------------------------------------------------------------------


def test_config_defaults() -> None:
    cfg = FederationConfig.from_config(None)
    assert cfg.fallback == "https"
    assert cfg.discovery is True
    assert cfg.probe_port == 5683
    assert cfg.peers == ()


def test_config_peers_all_forms() -> None:
    cfg = FederationConfig.from_config(
        {
            "fallback": "never",
            "discovery": False,
            "probe_port": 5684,
            "cache_ttl": 60,
            "negative_cache_ttl": 5,
            "peers": {
                "a.test": "127.0.0.1:7001",
                "b.test": ["127.0.0.1:7002", "[::1]:7003"],
                "c.test": {"endpoints": "c.example", "public_key": KEY_B64},
            },
        }
    )
    peers = cfg.peer_map
    assert peers["a.test"].targets == (CoapTarget("127.0.0.1", 7001),)
    assert peers["b.test"].targets == (CoapTarget("127.0.0.1", 7002), CoapTarget("::1", 7003))
    assert peers["c.test"].targets == (CoapTarget("c.example", 5683, KEY),)
    assert peers["c.test"].public_key == KEY
    assert cfg.fallback == "never" and cfg.discovery is False and cfg.probe_port == 5684
    assert cfg.cache_ttl == 60.0 and cfg.negative_cache_ttl == 5.0


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ({"fallback": "http"}, "federation.fallback"),
        ({"discovery": "yes"}, "federation.discovery"),
        ({"probe_port": 0}, "federation.probe_port"),
        ({"probe_port": True}, "federation.probe_port"),
        ({"cache_ttl": -1}, "federation.cache_ttl"),
        ({"negative_cache_ttl": "x"}, "federation.negative_cache_ttl"),
        ({"peers": ["a.test"]}, "federation.peers"),
        ({"peers": {"a.test": "host:99999"}}, "federation.peers.a.test"),
        ({"peers": {"a.test": []}}, "federation.peers.a.test"),
        ({"peers": {"a.test": {"endpoints": ["h:1", 5]}}}, "federation.peers.a.test.endpoints[1]"),
        (
            {"peers": {"a.test": {"endpoint": "h:1", "public_key": "abc"}}},
            "federation.peers.a.test.public_key",
        ),
        ({"peers": {"a.test": {"public_key": KEY_B64}}}, "federation.peers.a.test.endpoints"),
        (
            {"peers": {"a.test": {"endpoints": "h:1", "pin": KEY_B64}}},
            "federation.peers.a.test.pin",
        ),
        ({"bogus": 1}, "federation.bogus"),
        ({"peers": {"a.test": {"endpoints": "bad host!"}}}, "federation.peers.a.test.endpoints"),
        ({"peers": {"a.test": ["ok.example:1", "-x.example:1"]}}, "federation.peers.a.test[1]"),
        ({"peers": {"a.test": "a..example:1"}}, "federation.peers.a.test"),
        ({"peers": {"a.test": "999.1.2.3:1"}}, "federation.peers.a.test"),
        ({"peers": {"a.test": "[not-v6]:1"}}, "federation.peers.a.test"),
        ({"peers": {"a.test": "under_score.example"}}, "federation.peers.a.test"),
    ],
)
def test_config_errors_name_the_field(obj: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigValueError) as e:
        FederationConfig.from_config(obj)
    assert e.value.path == path


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "fe80::1", "example.org", "example.org.", "hs-1.test", "localhost", "x1"],
)
def test_valid_endpoint_hosts_are_accepted(host: str) -> None:
    assert is_valid_host(host)
    endpoint = f"[{host}]:5683" if ":" in host else f"{host}:5683"
    cfg = FederationConfig.from_config({"peers": {"a.test": endpoint}})
    assert cfg.peer_map["a.test"].targets[0].host == host


def test_split_host_port() -> None:
    assert split_host_port("example.org") == ("example.org", None)
    assert split_host_port("example.org:8448") == ("example.org", 8448)
    assert split_host_port("[::1]:5683") == ("::1", 5683)
    assert split_host_port("[::1]") == ("::1", None)
    assert split_host_port("::1", 7) == ("::1", 7)
    for bad in ("", "h:", "h:x", "[::1", "[::1]x", ":5"):
        with pytest.raises(ValueError):
            split_host_port(bad)


def test_probe_target_ignores_the_https_port() -> None:
    assert probe_target("hs.example:8448", 5683) == CoapTarget("hs.example", 5683)
    assert probe_target("[::1]:8448", 6000) == CoapTarget("::1", 6000)


# -- cache -----------------------------------------------------------------------------------


def test_cache_expiry_positive_and_negative() -> None:
    clock = FakeClock()
    cache = ResolutionCache(clock)
    pos = Resolution("a.test", (CoapTarget("h", 1),), "srv")
    neg = Resolution("b.test", (), "none")
    cache.put(pos, 100)
    cache.put(neg, 10)
    clock.now += 9.9
    assert cache.get("a.test") == pos
    assert cache.get("b.test") == neg
    clock.now += 0.1
    assert cache.get("b.test") is None  # negative entry expired at exactly its ttl
    assert cache.get("a.test") == pos
    clock.now += 90
    assert cache.get("a.test") is None
    assert len(cache) == 0


def test_cache_is_bounded_and_evicts_soonest_expiry() -> None:
    clock = FakeClock()
    cache = ResolutionCache(clock, max_entries=3)
    for i, ttl in enumerate((50, 10, 30)):
        cache.put(Resolution(f"s{i}", (), "none"), ttl)
    cache.put(Resolution("new", (), "none"), 40)
    assert len(cache) == 3
    assert cache.get("s1") is None  # expired first -> evicted
    assert {n for n in ("s0", "s2", "new") if cache.get(n) is not None} == {"s0", "s2", "new"}


# -- SRV ordering --------------------------------------------------------------------------


def test_srv_priority_order_is_strict() -> None:
    recs = [
        SrvRecord(20, 0, 1, "c"),
        SrvRecord(10, 5, 1, "a"),
        SrvRecord(30, 100, 1, "d"),
        SrvRecord(10, 5, 2, "b"),
    ]
    for seed in range(20):
        out = order_srv_records(recs, random.Random(seed))
        assert [r.priority for r in out] == [10, 10, 20, 30]
        assert {r.target for r in out[:2]} == {"a", "b"}


def test_srv_weights_bias_the_first_pick() -> None:
    recs = [SrvRecord(0, 90, 1, "heavy"), SrvRecord(0, 10, 1, "light"), SrvRecord(0, 0, 1, "zero")]
    rng = random.Random(1)
    firsts = Counter(order_srv_records(recs, rng)[0].target for _ in range(2000))
    assert firsts["zero"] == 0  # zero weight goes after the weighted ones
    assert 1600 < firsts["heavy"] < 1990
    assert firsts["light"] > 50


def test_srv_dot_target_means_no_service() -> None:
    assert order_srv_records([SrvRecord(0, 0, 0, ".")], random.Random(0)) == []


# -- the Twisted shell -------------------------------------------------------------------


class Dns:
    def __init__(self, records: dict[str, list[SrvRecord]]) -> None:
        self.records = records
        self.queries: list[str] = []
        self.pending: dict[str, defer.Deferred[list[SrvRecord]]] = {}
        self.hold = False

    def __call__(self, name: str) -> defer.Deferred[list[SrvRecord]]:
        self.queries.append(name)
        if self.hold:
            d: defer.Deferred[list[SrvRecord]] = defer.Deferred()
            self.pending[name] = d
            return d
        return defer.succeed(self.records.get(name, []))


class Prober:
    def __init__(self, answering: set[tuple[str, int]]) -> None:
        self.answering = answering
        self.calls: list[tuple[str, CoapTarget]] = []

    def __call__(self, server_name: str, target: CoapTarget) -> defer.Deferred[bool]:
        self.calls.append((server_name, target))
        return defer.succeed((target.host, target.port) in self.answering)


def make(
    cfg: dict[str, object] | None = None,
    records: dict[str, list[SrvRecord]] | None = None,
    answering: set[tuple[str, int]] | None = None,
    allowed: object = None,
) -> tuple[Discovery, FakeClock, Dns, Prober]:
    clock = FakeClock()
    dns = Dns(records or {})
    prober = Prober(answering or set())
    disc = Discovery(
        FederationConfig.from_config(cfg or {}),
        clock=clock,
        probe=prober,
        srv_lookup=dns,
        address_allowed=allowed,  # type: ignore[arg-type]
        rng=random.Random(0),
        own_server_name="me.test",
    )
    return disc, clock, dns, prober


def test_static_peer_wins_without_io() -> None:
    disc, _, dns, prober = make(
        {"peers": {"a.test": {"endpoints": "127.0.0.1:9", "public_key": KEY_B64}}}
    )
    res = result_of(disc.resolve("a.test"))
    assert res.targets == (CoapTarget("127.0.0.1", 9, KEY),)
    assert res.source == "static"
    assert dns.queries == [] and prober.calls == []


def test_srv_then_cache_then_expiry() -> None:
    name = f"{SRV_SERVICE}.b.test"
    disc, clock, dns, prober = make(
        {"cache_ttl": 100},
        records={
            name: [SrvRecord(5, 0, 6000, "coap2.b.test"), SrvRecord(1, 0, 6001, "coap1.b.test")]
        },
    )
    res = result_of(disc.resolve("b.test:8448"))
    assert res.source == "srv"
    assert res.targets == (CoapTarget("coap1.b.test", 6001), CoapTarget("coap2.b.test", 6000))
    assert dns.queries == [name]
    assert prober.calls == []  # SRV answered: no probe
    assert disc.peek("b.test:8448") == res
    result_of(disc.resolve("b.test:8448"))
    assert dns.queries == [name]  # cached
    clock.now += 100
    assert disc.peek("b.test:8448") is None
    result_of(disc.resolve("b.test:8448"))
    assert dns.queries == [name, name]


def test_probe_when_no_srv_and_negative_cache() -> None:
    disc, clock, _dns, prober = make(
        {"negative_cache_ttl": 30, "probe_port": 5700}, answering={("c.test", 5700)}
    )
    res = result_of(disc.resolve("c.test"))
    assert res == Resolution("c.test", (CoapTarget("c.test", 5700),), "probe")

    res = result_of(disc.resolve("d.test:8448"))
    assert res == Resolution("d.test:8448", (), "none")
    assert prober.calls[-1] == ("d.test:8448", CoapTarget("d.test", 5700))
    n_probes = len(prober.calls)
    result_of(disc.resolve("d.test:8448"))
    assert len(prober.calls) == n_probes  # negative result cached
    clock.now += 30
    result_of(disc.resolve("d.test:8448"))
    assert len(prober.calls) == n_probes + 1


def test_ip_literal_skips_srv_and_blocklist_applies() -> None:
    disc, _, dns, prober = make(
        answering={("10.0.0.1", 5683)}, allowed=lambda ip: not ip.startswith("10.")
    )
    res = result_of(disc.resolve("10.0.0.1:8448"))
    assert res.targets == ()
    assert dns.queries == []  # no SRV for an IP literal
    assert prober.calls == []  # blocklisted address is never probed


def test_discovery_off_means_static_only() -> None:
    disc, _, dns, prober = make({"discovery": False})
    res = result_of(disc.resolve("x.test"))
    assert res.targets == ()
    assert dns.queries == [] and prober.calls == []


def test_never_discovers_itself() -> None:
    disc, _, _dns, prober = make(answering={("me.test", 5683)})
    assert result_of(disc.resolve("me.test")).targets == ()
    assert prober.calls == []


def test_concurrent_resolves_share_one_lookup_and_cancel_is_local() -> None:
    name = f"{SRV_SERVICE}.e.test"
    disc, _, dns, _ = make(records={name: [SrvRecord(0, 0, 7000, "e.test")]})
    dns.hold = True
    d1 = disc.resolve("e.test")
    d2 = disc.resolve("e.test")
    d3 = disc.resolve("e.test")
    assert dns.queries == [name]
    d2.cancel()
    failures: list[object] = []
    d2.addErrback(failures.append)
    dns.pending[name].callback(dns.records[name])
    assert result_of(d1).targets == (CoapTarget("e.test", 7000),)
    assert result_of(d3).targets == (CoapTarget("e.test", 7000),)
    assert len(failures) == 1
    assert disc.stats["srv"] == 1


def test_failing_lookup_is_a_negative_result_not_an_error() -> None:
    clock = FakeClock()

    def broken(name: str) -> defer.Deferred[list[SrvRecord]]:
        return defer.fail(RuntimeError("resolver exploded"))

    disc = Discovery(FederationConfig(), clock=clock, srv_lookup=broken)
    assert result_of(disc.resolve("f.test")).targets == ()


def test_twisted_srv_lookup_parses_records_and_nxdomain() -> None:
    from twisted.names import dns
    from twisted.names.error import DNSNameError, DNSServerError

    from synapse_coap.synapse.discovery import twisted_srv_lookup

    class FakeResolver:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def lookupService(self, name: str) -> defer.Deferred[Any]:
            self.asked.append(name)
            if name.startswith("_matrix-coap._udp.gone"):
                return defer.fail(DNSNameError(name))
            if name.startswith("_matrix-coap._udp.broken"):
                return defer.fail(DNSServerError(name))
            answers = [
                dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(10, 5, 5684, "coap.a.test")),
                dns.RRHeader(name, dns.A, payload=dns.Record_A("127.0.0.1")),
            ]
            return defer.succeed((answers, [], []))

    r = FakeResolver()
    recs = result_list(twisted_srv_lookup("_matrix-coap._udp.a.test", r))
    assert recs == [SrvRecord(priority=10, weight=5, port=5684, target="coap.a.test")]
    assert result_list(twisted_srv_lookup("_matrix-coap._udp.gone.test", r)) == []
    assert result_list(twisted_srv_lookup("_matrix-coap._udp.broken.test", r)) == []
    assert r.asked[0] == "_matrix-coap._udp.a.test"


def result_list(d: defer.Deferred[list[SrvRecord]]) -> list[SrvRecord]:
    out: list[object] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], list), out
    return out[0]
