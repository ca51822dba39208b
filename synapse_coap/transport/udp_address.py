"""UDP addresses as the Noise transport keys them: hosts normalized (an IPv4-mapped IPv6
address is its IPv4 address), the host ``sendto`` wants on a socket's family, and bound
dual-stack sockets. The caches are bounded (cleared when full)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

Address = tuple[str, int]


#: host strings seen on sockets -> their normalized form, and (family, host) -> the
#: host to pass to sendto (None: unsendable from that family). Parsing an address
#: with :mod:`ipaddress` costs tens of microseconds, and a datagram needs it twice;
#: the caches are bounded (cleared when full), so a flood of new addresses only
#: costs the parsing it would have cost anyway.
_ADDRESS_CACHE_MAX = 1024


_normalized_hosts: dict[str, str] = {}


_send_hosts: dict[tuple[int, str], str | None] = {}


def _normalize_host(host: str) -> str:
    found = _normalized_hosts.get(host)
    if found is not None:
        return found
    out = host
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            out = str(ip.ipv4_mapped)
    if len(_normalized_hosts) >= _ADDRESS_CACHE_MAX:
        _normalized_hosts.clear()
    _normalized_hosts[host] = out
    return out


def _send_host(family: int, host: str) -> str | None:
    """``host`` as ``sendto`` on a ``family`` socket wants it; None if it cannot reach it."""
    key = (family, host)
    try:
        return _send_hosts[key]
    except KeyError:
        pass
    out: str | None = host
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        if family == socket.AF_INET6:
            if isinstance(ip, ipaddress.IPv4Address):
                out = "::ffff:" + host
        elif isinstance(ip, ipaddress.IPv6Address):
            out = None
    if len(_send_hosts) >= _ADDRESS_CACHE_MAX:
        _send_hosts.clear()
    _send_hosts[key] = out
    return out


def normalize_address(addr: Any) -> Address:
    """(host, port[, flow, scope]) from a socket -> (host, port), IPv4-mapped stripped."""
    return (_normalize_host(str(addr[0])), int(addr[1]))


def make_udp_socket(host: str, port: int) -> socket.socket:
    """A bound non-blocking UDP socket; IPv6 binds are dual-stack (IPV6_V6ONLY=0)."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family, _type, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setblocking(False)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock
