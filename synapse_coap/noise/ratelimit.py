"""Handshake rate limiting: a token bucket per source (IPv4 address or IPv6 /64)."""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict

#: Buckets remembered at most; the least recently used are forgotten first
#: (a forgotten source starts again with a full burst).
MAX_BUCKETS = 4096


def address_key(host: str, v4_bits: int, v6_bits: int) -> str:
    """The network of ``host`` at the given prefix lengths (IPv4, IPv6): the key a
    source is counted under. An IPv4-mapped IPv6 address counts as its IPv4 address;
    a name that is not an address is its own key."""
    if host.count(".") == 3 and ":" not in host:  # a dotted IPv4 address: no parsing
        if v4_bits == 32:
            return host
        if v4_bits == 24:
            return host.rpartition(".")[0] + ".0/24"
    return _address_key(host, v4_bits, v6_bits)


@functools.lru_cache(maxsize=4096)
def _address_key(host: str, v4_bits: int, v6_bits: int) -> str:
    bare = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is None:
            return str(ipaddress.IPv6Network((ip, v6_bits), strict=False))
        ip = mapped
    if v4_bits == 32:
        return str(ip)
    return str(ipaddress.IPv4Network((ip, v4_bits), strict=False))


def source_key(host: str) -> str:
    """The rate-limit key for a source host: the IPv4 address, or the IPv6 /64."""
    return address_key(host, 32, 64)


def refill(tokens: float, last: float, now: float, rate: float, burst: float) -> float:
    """The tokens of a bucket that held ``tokens`` at ``last``, at ``now``."""
    return min(burst, tokens + max(0.0, now - last) * rate)


class TokenBucket:
    """One token bucket (``rate`` per second, ``burst`` at most), starting full."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.last: float | None = None

    def take(self, now: float) -> bool:
        """Take one token; False if none is left."""
        if self.last is not None:
            self.tokens = refill(self.tokens, self.last, now, self.rate, self.burst)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class HandshakeRateLimiter:
    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, host: str, now: float) -> bool:
        """Take one token for ``host``'s source; False if none is left."""
        key = source_key(host)
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = refill(tokens, last, now, self.rate, self.burst)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return allowed
