"""The sidecar's SRV lookup (synapse_coap.proxy.resolver) over a fake nameserver:
targets in RFC 2782 order, their addresses, the fallback to the host, TTLs."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from synapse_coap.errors import ConfigValueError
from synapse_coap.proxy.resolver import (
    FALLBACK_TTL,
    MAX_SRV_LISTENERS,
    Listeners,
    SrvSource,
    nameservers_from_resolv_conf,
    parse_dns_server,
    resolve_listeners,
)
from synapse_coap.wire import dns
from synapse_coap.wire.dns import Record, SrvRecord

NAME = "_matrix-coap._udp.hs.test"


class FakeResolver:
    """Answers from a zone: (name, type) -> records; NXDOMAIN for names not in it;
    ``None`` (no server answered) when ``down``."""

    def __init__(self, zone: dict[tuple[str, int], list[Record]], glue: bool = False) -> None:
        self.zone = zone
        self.glue = glue
        self.down = False
        self.asked: list[tuple[str, int]] = []

    async def query(self, name: str, qtype: int) -> dns.Response | None:
        self.asked.append((name, qtype))
        if self.down:
            return None
        if name not in {n for n, _ in self.zone}:
            return dns.Response(1, dns.RCODE_NXDOMAIN, False, name, qtype)
        answers = tuple(self.zone.get((name, qtype), []))
        extra: list[Record] = []
        if self.glue:
            for rr in answers:
                if isinstance(rr.data, SrvRecord):
                    extra += self.zone.get((rr.data.target, dns.TYPE_A), [])
        return dns.Response(1, 0, False, name, qtype, answers, tuple(extra))

    async def addresses(self, host: str) -> tuple[list[str], float]:
        found: list[str] = []
        ttls: list[float] = []
        for qtype in (dns.TYPE_A, dns.TYPE_AAAA):
            response = await self.query(host, qtype)
            for rr in response.records(qtype, host) if response else []:
                found.append(str(rr.data))
                ttls.append(rr.ttl)
        return found, min(ttls, default=FALLBACK_TTL)


def srv(prio: int, weight: int, port: int, target: str, ttl: int = 600) -> Record:
    return Record(NAME, dns.TYPE_SRV, ttl, SrvRecord(prio, weight, port, target))


def a(name: str, address: str, ttl: int = 300) -> Record:
    return Record(name, dns.TYPE_AAAA if ":" in address else dns.TYPE_A, ttl, address)


def resolve(resolver: FakeResolver, seed: int = 0, host: str = "hs.test") -> Listeners:
    return asyncio.run(
        resolve_listeners(
            host,
            resolver,  # type: ignore[arg-type]
            default_port=5683,
            rng=random.Random(seed),
        )
    )


def test_every_target_in_priority_order_with_its_addresses() -> None:
    zone = {
        (NAME, dns.TYPE_SRV): [
            srv(20, 0, 7000, "backup.hs.test"),
            srv(10, 1, 6000, "l1.hs.test"),
            srv(10, 1, 6001, "192.0.2.9"),  # a literal target is used as it is
        ],
        ("l1.hs.test", dns.TYPE_A): [a("l1.hs.test", "192.0.2.1", ttl=30)],
        ("l1.hs.test", dns.TYPE_AAAA): [a("l1.hs.test", "2001:db8::1")],
        ("backup.hs.test", dns.TYPE_A): [a("backup.hs.test", "192.0.2.3")],
    }
    got = resolve(FakeResolver(zone))
    assert got.source == "srv"
    addresses = got.addresses
    assert set(addresses[:3]) == {("192.0.2.1", 6000), ("2001:db8::1", 6000), ("192.0.2.9", 6001)}
    assert addresses[3:] == (("192.0.2.3", 7000),)
    assert got.ttl == 30  # the smallest TTL on the way


def test_equal_priorities_spread_by_weight_over_many_sidecars() -> None:
    zone = {
        (NAME, dns.TYPE_SRV): [srv(0, 3, 5683, "192.0.2.1"), srv(0, 1, 5683, "192.0.2.2")],
    }
    firsts = Counter(resolve(FakeResolver(zone), seed).addresses[0][0] for seed in range(400))
    assert 240 < firsts["192.0.2.1"] < 360
    assert firsts["192.0.2.2"] == 400 - firsts["192.0.2.1"]


def test_addresses_in_the_additional_section_need_no_second_query() -> None:
    zone = {
        (NAME, dns.TYPE_SRV): [srv(0, 0, 6000, "l1.hs.test")],
        ("l1.hs.test", dns.TYPE_A): [a("l1.hs.test", "192.0.2.1")],
    }
    resolver = FakeResolver(zone, glue=True)
    assert resolve(resolver).addresses == (("192.0.2.1", 6000),)
    assert resolver.asked == [(NAME, dns.TYPE_SRV)]


def test_a_target_without_addresses_is_left_to_the_system_resolver() -> None:
    zone = {(NAME, dns.TYPE_SRV): [srv(0, 0, 6000, "in-etc-hosts.test")]}
    assert resolve(FakeResolver(zone)).addresses == (("in-etc-hosts.test", 6000),)


@pytest.mark.parametrize(
    "zone",
    [
        {},  # NXDOMAIN
        {(NAME, dns.TYPE_A): []},  # the name exists, no SRV record
        {(NAME, dns.TYPE_SRV): [srv(0, 0, 0, ".")]},  # "no service"
    ],
)
def test_without_srv_the_host_itself_on_the_default_port(zone: dict) -> None:  # type: ignore[type-arg]
    got = resolve(FakeResolver(zone))
    assert got.addresses == (("hs.test", 5683),)
    assert got.source == "host"


def test_dns_down_and_ip_literals_use_the_host() -> None:
    resolver = FakeResolver({})
    resolver.down = True
    assert resolve(resolver).addresses == (("hs.test", 5683),)
    resolver.asked.clear()
    assert resolve(resolver, host="192.0.2.5").addresses == (("192.0.2.5", 5683),)
    assert resolver.asked == []


def test_listeners_are_bounded() -> None:
    zone = {
        (NAME, dns.TYPE_SRV): [srv(0, 0, 6000 + i, f"t{i}.hs.test") for i in range(20)],
        **{
            (f"t{i}.hs.test", dns.TYPE_A): [a(f"t{i}.hs.test", f"192.0.2.{j}") for j in range(5)]
            for i in range(20)
        },
    }
    assert len(resolve(FakeResolver(zone)).addresses) == MAX_SRV_LISTENERS


def test_srv_source_knows_when_its_answer_expires() -> None:
    now = [0.0]
    zone = {(NAME, dns.TYPE_SRV): [srv(0, 0, 6000, "192.0.2.1", ttl=60)]}
    source = SrvSource(
        "hs.test",
        FakeResolver(zone),  # type: ignore[arg-type]
        default_port=5683,
        clock=lambda: now[0],
    )
    assert source.expired
    asyncio.run(source.resolve())
    assert not source.expired
    now[0] = 61.0
    assert source.expired


def test_resolv_conf() -> None:
    text = "# comment\nsearch example.org\nnameserver 10.0.0.53\nnameserver dns.example\nnameserver fe80::1%eth0\nnameserver ::1 ; x\n"
    assert nameservers_from_resolv_conf(text) == [
        ("10.0.0.53", 53),
        ("fe80::1%eth0", 53),
        ("::1", 53),
    ]
    assert nameservers_from_resolv_conf("") == [("127.0.0.1", 53)]


def test_dns_server_flag() -> None:
    assert parse_dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_dns_server("[::1]") == ("::1", 53)
    with pytest.raises(ConfigValueError, match="--dns-server"):
        parse_dns_server("dns.example.org")


def test_a_name_dns_cannot_carry_is_not_asked_for() -> None:
    from synapse_coap.proxy.resolver import DnsResolver

    resolver = DnsResolver([("192.0.2.53", 53)])
    assert asyncio.run(resolver.query("x" * 64 + ".test", dns.TYPE_SRV)) is None
