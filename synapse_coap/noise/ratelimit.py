"""Handshake rate limiting: a token bucket per source (IPv4 address or IPv6 /64)."""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict

#: Buckets remembered at most; the least recently used are forgotten first
#: (a forgotten source starts again with a full burst).
MAX_BUCKETS = 4096


def source_key(host: str) -> str:
    """The rate-limit key for a source host: the IPv4 address, or the IPv6 /64."""
    if host.count(".") == 3 and ":" not in host:  # a dotted IPv4 address: itself
        return host
    return _source_key(host)


@functools.lru_cache(maxsize=4096)
def _source_key(host: str) -> str:
    bare = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


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
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return allowed
