"""Where a homeserver's CoAP listeners are: DNS SRV ``_matrix-coap._udp.<host>`` for the sidecar.

``--homeserver coap://example.org`` (a name, no port) makes the sidecar look up
``_matrix-coap._udp.example.org`` SRV, order the targets per RFC 2782 (priority,
then weighted random within a priority, so many sidecars spread over
equal-priority listeners by weight), and look up each target's A and AAAA
records (literal IP targets are used as they are; addresses in the answer's
additional section are used without another query). Every address becomes a
listener the sidecar can move to. Without an SRV record (NXDOMAIN, no answer, or
DNS unreachable) the host itself on port 5683 is used, as federation does.

The messages are :mod:`synapse_coap.wire.dns` (sans-I/O); :class:`DnsResolver` is
the thin asyncio UDP shell: the nameservers of /etc/resolv.conf (or
``--dns-server``), a timeout per try, every server tried in turn, and a second
round. A truncated answer (TC bit) is used as far as it came: there is no TCP
fallback (an SRV answer for a handful of listeners fits in 512 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from synapse_coap.errors import ConfigValueError, RemoteProtocolError
from synapse_coap.proxy.common import parse_host_port
from synapse_coap.wire import dns

logger = logging.getLogger(__name__)

DNS_PORT = 53
RESOLV_CONF = Path("/etc/resolv.conf")
#: Seconds one try waits for an answer, and the rounds over all servers.
DEFAULT_TIMEOUT = 2.0
DEFAULT_ATTEMPTS = 2
#: Listeners taken from one SRV lookup (addresses of all targets together).
MAX_SRV_LISTENERS = 16
#: Seconds a result without a TTL (the fallback to the host) is kept before asking again.
FALLBACK_TTL = 300.0


def nameservers_from_resolv_conf(text: str) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf, in order (what is not an IP skipped);
    the glibc default 127.0.0.1 when there are none."""
    servers: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append((str(ipaddress.ip_address(fields[1])), DNS_PORT))
            except ValueError:
                continue
    return servers or [("127.0.0.1", DNS_PORT)]


def parse_dns_server(text: str, path: str = "--dns-server") -> tuple[str, int]:
    """``HOST[:PORT]`` of a nameserver (an IP address; port 53 by default)."""
    host, port = parse_host_port(text, path, default_port=DNS_PORT)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigValueError(path, f"expected an IP address[:PORT], got {text!r}") from None
    return host, port


@attrs.frozen
class Listeners:
    """What a name resolved to: ``(host, port)`` pairs in the order to use them, how
    long that holds (seconds), and ``source`` "srv" or "host" (no SRV record)."""

    addresses: tuple[tuple[str, int], ...]
    ttl: float
    source: str


class _Waiter(asyncio.DatagramProtocol):
    def __init__(self, query_id: int, name: str, qtype: int) -> None:
        self.query = (query_id, name, qtype)
        self.answer: asyncio.Future[dns.Response] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            response = dns.parse_response(data)
        except RemoteProtocolError as e:
            logger.info("DNS: bad answer from %s dropped: %s", addr, e)
            return
        if dns.matches(response, *self.query) and not self.answer.done():
            self.answer.set_result(response)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class DnsResolver:
    """Asks nameservers over UDP; see the module doc.

    ``servers``: ``(ip, port)`` pairs (default: /etc/resolv.conf). ``timeout``: seconds
    per try; ``attempts``: rounds over all servers.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if servers is None:
            try:
                text = RESOLV_CONF.read_text()
            except OSError:
                text = ""
            servers = nameservers_from_resolv_conf(text)
        self.servers = tuple(servers)
        self.timeout = timeout
        self.attempts = attempts

    async def query(self, name: str, qtype: int) -> dns.Response | None:
        """The first usable answer (NOERROR or NXDOMAIN), or None when no server gave one."""
        try:
            dns.encode_name(name)
        except ValueError as e:
            logger.warning("DNS: %s", e)
            return None
        for _round in range(self.attempts):
            for server in self.servers:
                response = await self._ask(server, name, qtype)
                if response is None:
                    continue
                if response.rcode in (dns.RCODE_NOERROR, dns.RCODE_NXDOMAIN):
                    if response.truncated:
                        logger.info("DNS: answer for %s truncated; using what came (no TCP)", name)
                    return response
                logger.info("DNS: %s answered rcode %d for %s", server[0], response.rcode, name)
        return None

    async def _ask(self, server: tuple[str, int], name: str, qtype: int) -> dns.Response | None:
        query_id = secrets.randbits(16)
        loop = asyncio.get_running_loop()
        try:
            transport, waiter = await loop.create_datagram_endpoint(
                lambda: _Waiter(query_id, name, qtype), remote_addr=server
            )
        except OSError as e:
            logger.info("DNS: cannot reach %s: %s", server[0], e)
            return None
        try:
            transport.sendto(dns.encode_query(query_id, name, qtype))
            return await asyncio.wait_for(waiter.answer, self.timeout)
        except (TimeoutError, OSError) as e:
            logger.info("DNS: no answer from %s:%d for %s (%s)", *server, name, type(e).__name__)
            return None
        finally:
            transport.close()

    async def addresses(self, host: str) -> tuple[list[str], float]:
        """A then AAAA addresses of ``host`` and their smallest TTL ([] if none)."""
        found: list[str] = []
        ttls: list[float] = []
        answers = await asyncio.gather(
            self.query(host, dns.TYPE_A), self.query(host, dns.TYPE_AAAA)
        )
        for qtype, response in zip((dns.TYPE_A, dns.TYPE_AAAA), answers, strict=True):
            if response is None:
                continue
            for rr in response.records(qtype, host):
                if isinstance(rr.data, str) and rr.data not in found:
                    found.append(rr.data)
                    ttls.append(rr.ttl)
        return found, min(ttls, default=FALLBACK_TTL)


async def resolve_listeners(
    host: str,
    resolver: DnsResolver,
    *,
    default_port: int,
    rng: random.Random | None = None,
) -> Listeners:
    """The listeners ``host`` publishes with SRV (see the module doc), or ``host`` itself
    on ``default_port`` when it publishes none."""
    fallback = Listeners(((host, default_port),), FALLBACK_TTL, "host")
    if dns.is_ip_literal(host):
        return fallback
    name = f"{dns.SRV_SERVICE}.{host}"
    response = await resolver.query(name, dns.TYPE_SRV)
    if response is None or response.rcode != dns.RCODE_NOERROR:
        logger.info("DNS: no SRV record %s; using %s:%d", name, host, default_port)
        return fallback
    srv = response.records(dns.TYPE_SRV, name)
    records = [rr.data for rr in srv if isinstance(rr.data, dns.SrvRecord)]
    ordered = dns.order_srv_records(records, rng or random.Random())[: dns.MAX_SRV_TARGETS]
    if not ordered:
        logger.info("DNS: no usable SRV record %s; using %s:%d", name, host, default_port)
        return fallback
    ttls = [float(rr.ttl) for rr in srv]
    addresses: list[tuple[str, int]] = []
    for record in ordered:
        for address in await _target_addresses(record.target, response, resolver, ttls):
            if (address, record.port) not in addresses:
                addresses.append((address, record.port))
    addresses = addresses[:MAX_SRV_LISTENERS]
    logger.info(
        "DNS: %s -> %s",
        name,
        ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses),
    )
    return Listeners(tuple(addresses), min(ttls, default=FALLBACK_TTL), "srv")


async def _target_addresses(
    target: str, response: dns.Response, resolver: DnsResolver, ttls: list[float]
) -> list[str]:
    """A target's addresses: itself if an IP literal, else from the additional section,
    else from an A/AAAA lookup; the name itself (the system resolves it) if none."""
    if dns.is_ip_literal(target):
        return [target]
    glue = [rr for t in (dns.TYPE_A, dns.TYPE_AAAA) for rr in response.records(t, target)]
    if glue:
        ttls.extend(float(rr.ttl) for rr in glue)
        return [rr.data for rr in glue if isinstance(rr.data, str)]
    found, ttl = await resolver.addresses(target)
    if found:
        ttls.append(ttl)
        return found
    return [target]


class SrvSource:
    """One name's SRV listeners for the address book: resolves, and knows when the
    answer's TTL ran out (``clock`` injected)."""

    def __init__(
        self,
        host: str,
        resolver: DnsResolver,
        *,
        default_port: int,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self._resolver = resolver
        self._default_port = default_port
        self._clock = clock
        self._rng = rng or random.Random()
        self.expires = float("-inf")

    @property
    def expired(self) -> bool:
        return self._clock() >= self.expires

    async def resolve(self) -> Listeners:
        listeners = Listeners(((self.host, self._default_port),), FALLBACK_TTL, "host")
        with contextlib.suppress(OSError):
            listeners = await resolve_listeners(
                self.host, self._resolver, default_port=self._default_port, rng=self._rng
            )
        self.expires = self._clock() + listeners.ttl
        return listeners
