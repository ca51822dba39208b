"""Which homeservers speak CoAP, and where: the ``federation:`` config, a cache and discovery.

Resolution order for a destination ``server_name`` (see docs/federation.md):

1. the static ``peers`` map from the config (endpoints plus an optional pinned
   Noise public key) -- never expires, never touches DNS;
2. the cache of earlier discoveries (positive and negative entries, each with
   an expiry; the clock is injected);
3. if ``discovery`` is on: DNS SRV ``_matrix-coap._udp.<host>``, targets in
   RFC 2782 order (priority ascending, weighted random within a priority);
4. else a probe of the federation host itself on ``probe_port`` (a CoAP
   ``GET /_matrix/federation/v1/version`` with a short timeout): any answer
   means the host speaks CoAP;
5. otherwise: no CoAP endpoint; the agent then falls back to HTTPS or refuses,
   as the config says.

The first part of this module is sans-I/O (config, cache, host parsing; the SRV
records and their order are :mod:`synapse_coap.wire.dns`, shared with the sidecar); :class:`Discovery` is the thin Twisted shell that runs the lookups.
DNS and the probe are injected callables returning Deferreds, so the shell is
unit-tested without a network.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer

from synapse_coap.errors import ConfigValueError
from synapse_coap.synapse.hostnames import (
    HOST_FORM,
    decode_public_key,
    is_valid_host,
    split_host_port,
)
from synapse_coap.wire.dns import (  # SrvRecord, order_srv_records, is_ip_literal: re-exported
    MAX_SRV_TARGETS,
    SRV_SERVICE,
    SrvRecord,
    is_ip_literal,
    order_srv_records,
)

logger = logging.getLogger(__name__)

#: The default CoAP port (RFC 7252 ``coap``); the module listener's default too.
DEFAULT_COAP_PORT = 5683
#: Fallback policies: delegate to Synapse's own HTTPS agent, or refuse.
FALLBACK_POLICIES = ("https", "never")
#: Bound on cached discovery results (each entry is a few hundred bytes).
MAX_CACHE_ENTRIES = 10_000


# ---------------------------------------------------------------------------------------
# value objects and config


@attrs.frozen
class CoapTarget:
    """One CoAP endpoint of a homeserver: where to send datagrams, and the pinned key if any."""

    host: str
    port: int
    static_key: bytes | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@attrs.frozen
class Resolution:
    """The outcome of resolving a destination.

    ``targets`` empty means "no CoAP endpoint" (HTTPS fallback or refusal).
    ``source`` is one of "static", "srv", "probe", "none" (for logs and tests).
    """

    server_name: str
    targets: tuple[CoapTarget, ...]
    source: str

    @property
    def speaks_coap(self) -> bool:
        return bool(self.targets)


def _target_from_config(value: object, path: str, key: bytes | None) -> CoapTarget:
    if not isinstance(value, str):
        raise ConfigValueError(path, f'expected "host:port" as a string, got {value!r}')
    try:
        host, port = split_host_port(value, DEFAULT_COAP_PORT)
    except ValueError as e:
        raise ConfigValueError(path, f'expected "host:port" ({e})') from None
    bracketed = value.strip().startswith("[")
    if not is_valid_host(host) or (bracketed and ":" not in host):
        raise ConfigValueError(path, f'bad host {host!r}: expected "host:port" with {HOST_FORM}')
    if port is None:  # pragma: no cover - default given above
        port = DEFAULT_COAP_PORT
    return CoapTarget(host=host, port=port, static_key=key)


@attrs.frozen
class PeerEntry:
    """A static peer: a server name, its CoAP endpoints (tried in order) and pinned key."""

    server_name: str
    targets: tuple[CoapTarget, ...]
    public_key: bytes | None = None

    @classmethod
    def from_config(cls, server_name: str, value: object, path: str) -> PeerEntry:
        """Accepts ``"host:port"``, a list of them, or a mapping with
        ``endpoints`` (string or list) and optional ``public_key`` (base64)."""
        key: bytes | None = None
        endpoints: object
        if isinstance(value, Mapping):
            unknown = set(value) - {"endpoints", "endpoint", "public_key"}
            if unknown:
                raise ConfigValueError(
                    f"{path}.{sorted(unknown)[0]}",
                    "unknown key (allowed: endpoints, public_key)",
                )
            endpoints = value.get("endpoints", value.get("endpoint"))
            if endpoints is None:
                raise ConfigValueError(f"{path}.endpoints", 'required: "host:port" or a list')
            key_text = value.get("public_key")
            if key_text is not None:
                if not isinstance(key_text, str):
                    raise ConfigValueError(f"{path}.public_key", "expected a base64 string")
                try:
                    key = decode_public_key(key_text)
                except ValueError as e:
                    raise ConfigValueError(f"{path}.public_key", str(e)) from None
            sub = f"{path}.endpoints"
        else:
            endpoints = value
            sub = path
        targets: tuple[CoapTarget, ...]
        if isinstance(endpoints, str):
            targets = (_target_from_config(endpoints, sub, key),)
        elif isinstance(endpoints, list | tuple):
            if not endpoints:
                raise ConfigValueError(sub, "needs at least one endpoint")
            targets = tuple(
                _target_from_config(e, f"{sub}[{i}]", key) for i, e in enumerate(endpoints)
            )
        else:
            raise ConfigValueError(sub, f'expected "host:port" or a list, got {endpoints!r}')
        return cls(server_name=server_name, targets=targets, public_key=key)


def _positive(obj: Mapping[str, Any], name: str, default: float, path: str) -> float:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigValueError(f"{path}.{name}", f"expected a positive number, got {value!r}")
    return float(value)


@attrs.frozen
class FederationConfig:
    """The ``federation:`` section of the module config.

    ``peers``: server_name -> endpoints (+ pinned key). ``fallback``: "https"
    (default: destinations without CoAP use Synapse's own HTTPS agent) or
    "never" (they fail like an unreachable server). ``discovery``: try DNS SRV
    and a probe for servers not in ``peers``. ``probe_port``: the CoAP port a
    probe tries on the federation host. ``cache_ttl`` / ``negative_cache_ttl``:
    seconds a discovered / not-found result is kept. ``probe_timeout``:
    seconds to wait for a probe's answer. ``request_timeout``: an upper bound
    on one CoAP exchange (None: Synapse's own timeouts cancel it).
    """

    peers: tuple[PeerEntry, ...] = ()
    fallback: str = "https"
    discovery: bool = True
    probe_port: int = DEFAULT_COAP_PORT
    probe_timeout: float = 10.0
    cache_ttl: float = 3600.0
    negative_cache_ttl: float = 600.0
    request_timeout: float | None = None

    @property
    def peer_map(self) -> dict[str, PeerEntry]:
        return {p.server_name: p for p in self.peers}

    @classmethod
    def from_config(cls, obj: object, path: str = "federation") -> FederationConfig:
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise ConfigValueError(path, f"expected a mapping, got {type(obj).__name__}")
        allowed = {
            "peers",
            "fallback",
            "discovery",
            "probe_port",
            "probe_timeout",
            "cache_ttl",
            "negative_cache_ttl",
            "request_timeout",
        }
        unknown = set(obj) - allowed
        if unknown:
            raise ConfigValueError(
                f"{path}.{sorted(unknown)[0]}",
                f"unknown key (allowed: {', '.join(sorted(allowed))})",
            )
        peers_obj = obj.get("peers") or {}
        if not isinstance(peers_obj, Mapping):
            raise ConfigValueError(f"{path}.peers", "expected a mapping server_name -> endpoints")
        peers = []
        for name, value in peers_obj.items():
            if not isinstance(name, str) or not name:
                raise ConfigValueError(f"{path}.peers", f"bad server name {name!r}")
            peers.append(PeerEntry.from_config(name, value, f"{path}.peers.{name}"))
        fallback = obj.get("fallback", "https")
        if fallback not in FALLBACK_POLICIES:
            raise ConfigValueError(
                f"{path}.fallback",
                f"expected one of {', '.join(FALLBACK_POLICIES)}, got {fallback!r}",
            )
        discovery = obj.get("discovery", True)
        if not isinstance(discovery, bool):
            raise ConfigValueError(
                f"{path}.discovery", f"expected true or false, got {discovery!r}"
            )
        probe_port = obj.get("probe_port", DEFAULT_COAP_PORT)
        if (
            isinstance(probe_port, bool)
            or not isinstance(probe_port, int)
            or not 0 < probe_port < 65536
        ):
            raise ConfigValueError(
                f"{path}.probe_port", f"expected a port 1-65535, got {probe_port!r}"
            )
        request_timeout = obj.get("request_timeout")
        if request_timeout is not None:
            request_timeout = _positive(obj, "request_timeout", 0, path)
        return cls(
            peers=tuple(peers),
            fallback=fallback,
            discovery=discovery,
            probe_port=probe_port,
            probe_timeout=_positive(obj, "probe_timeout", 10.0, path),
            cache_ttl=_positive(obj, "cache_ttl", 3600.0, path),
            negative_cache_ttl=_positive(obj, "negative_cache_ttl", 600.0, path),
            request_timeout=request_timeout,
        )


# ---------------------------------------------------------------------------------------
# sans-I/O core: cache, what to probe (SRV ordering: synapse_coap.wire.dns)


def probe_target(server_name: str, probe_port: int) -> CoapTarget:
    """The federation host of ``server_name`` on the CoAP probe port.

    The server name's own port (if any) is the HTTPS port, so it is not used.
    Raises ValueError for a malformed server name.
    """
    host, _port = split_host_port(server_name)
    return CoapTarget(host=host, port=probe_port)


@attrs.define
class _CacheEntry:
    resolution: Resolution
    expires: float


class ResolutionCache:
    """Discovery results with an expiry, positive and negative; clock injected.

    Bounded: when full, the entry that expires first is evicted.
    """

    def __init__(self, clock: Callable[[], float], max_entries: int = MAX_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, _CacheEntry] = {}

    def get(self, server_name: str) -> Resolution | None:
        """The cached resolution, or None if absent or expired (expired ones are dropped)."""
        entry = self._entries.get(server_name)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            del self._entries[server_name]
            return None
        return entry.resolution

    def put(self, resolution: Resolution, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(resolution.server_name, None)
            return
        if resolution.server_name not in self._entries and len(self._entries) >= self._max:
            self._expire()
            if len(self._entries) >= self._max:
                victim = min(self._entries, key=lambda k: self._entries[k].expires)
                del self._entries[victim]
        self._entries[resolution.server_name] = _CacheEntry(resolution, self._clock() + ttl)

    def invalidate(self, server_name: str) -> None:
        self._entries.pop(server_name, None)

    def _expire(self) -> None:
        now = self._clock()
        for name in [k for k, e in self._entries.items() if now >= e.expires]:
            del self._entries[name]

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------------
# the Twisted shell

#: SRV lookup: the full SRV name -> Deferred list of records ([] when there are none).
SrvLookup = Callable[[str], "defer.Deferred[list[SrvRecord]]"]
#: Probe: (server_name, target) -> Deferred bool (True: the target answered CoAP).
Probe = Callable[[str, CoapTarget], "defer.Deferred[bool]"]
#: Host lookup: hostname -> Deferred list of IP address strings.
HostLookup = Callable[[str], "defer.Deferred[list[str]]"]


def twisted_srv_lookup(name: str, resolver: Any = None) -> defer.Deferred[list[SrvRecord]]:
    """SRV lookup with ``twisted.names`` (default: ``twisted.names.client``, the system
    resolver config, /etc/hosts aside); NXDOMAIN and DNS failures -> [] (logged)."""
    from twisted.names import dns
    from twisted.names.error import DNSNameError, DomainError

    if resolver is None:
        from twisted.names import client

        resolver = client

    def ok(result: tuple[list[Any], list[Any], list[Any]]) -> list[SrvRecord]:
        answers = result[0]
        out = []
        for rr in answers:
            if rr.type != dns.SRV or rr.payload is None:
                continue
            p = rr.payload
            target = p.target.name.decode("ascii", "replace").rstrip(".") or "."
            out.append(SrvRecord(priority=p.priority, weight=p.weight, port=p.port, target=target))
        return out

    def failed(f: Any) -> list[SrvRecord]:
        if f.check(DNSNameError):
            return []
        if f.check(DomainError):
            logger.info("SRV lookup of %s failed: %s", name, f.getErrorMessage())
            return []
        return f  # type: ignore[no-any-return]

    d: defer.Deferred[Any] = resolver.lookupService(name)
    d.addCallbacks(ok, failed)
    return d


class Discovery:
    """Resolves destinations to CoAP endpoints; call it on the reactor thread.

    ``resolve`` coalesces concurrent lookups of the same name (one SRV query,
    one probe) and caches the outcome; ``peek`` answers from the static map
    and cache only (never does I/O). ``address_allowed`` filters IP literals
    from discovery (not from the static map: the operator wrote those), e.g.
    with Synapse's ``federation_ip_range_blocklist``.
    """

    def __init__(
        self,
        config: FederationConfig,
        *,
        clock: Callable[[], float],
        probe: Probe | None = None,
        srv_lookup: SrvLookup | None = None,
        address_allowed: Callable[[str], bool] | None = None,
        rng: random.Random | None = None,
        own_server_name: str | None = None,
    ) -> None:
        self.config = config
        self._static = config.peer_map
        self._cache = ResolutionCache(clock)
        self._probe = probe
        self._srv = srv_lookup if srv_lookup is not None else twisted_srv_lookup
        self._allowed = address_allowed
        self._rng = rng if rng is not None else random.Random()
        self._own = own_server_name
        self._inflight: dict[str, defer.Deferred[Resolution]] = {}
        #: Lookups by outcome: "static", "cached", "disabled" (answered at once) and
        #: "srv", "probe", "none" (discoveries run), for tests and metrics.
        self.stats: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def peek(self, server_name: str) -> Resolution | None:
        """The answer without I/O: static peer, cached result, or None (must discover)."""
        peer = self._static.get(server_name)
        if peer is not None:
            return Resolution(server_name, peer.targets, "static")
        cached = self._cache.get(server_name)
        if cached is not None:
            return cached
        if not self.config.discovery:
            return Resolution(server_name, (), "none")
        return None

    def forget(self, server_name: str) -> None:
        """Drop a cached discovery (e.g. after its endpoints all failed)."""
        self._cache.invalidate(server_name)

    def resolve(self, server_name: str) -> defer.Deferred[Resolution]:
        """A Deferred firing with the Resolution (never fails; no CoAP -> empty targets).

        Cancelling the returned Deferred does not cancel a lookup other callers wait for.
        """
        known = self.peek(server_name)
        if known is not None:
            if server_name in self._static:
                self._count("static")
            elif not self.config.discovery:
                self._count("disabled")
            else:
                self._count("cached")
            return defer.succeed(known)
        shared = self._inflight.get(server_name)
        if shared is None:
            shared = defer.ensureDeferred(self._discover(server_name))
            self._inflight[server_name] = shared

            def done(res: Resolution) -> Resolution:
                self._inflight.pop(server_name, None)
                return res

            shared.addBoth(done)
        mine: defer.Deferred[Resolution] = defer.Deferred()

        def relay(res: Any) -> Any:
            if mine.called:
                return res
            if isinstance(res, Resolution):
                mine.callback(res)
            else:
                mine.errback(res)
            return res

        shared.addBoth(relay)
        return mine

    async def _discover(self, server_name: str) -> Resolution:
        try:
            res = await self._discover_uncached(server_name)
        except Exception:
            logger.exception("CoAP discovery of %s failed", server_name)
            res = Resolution(server_name, (), "none")
        ttl = self.config.cache_ttl if res.speaks_coap else self.config.negative_cache_ttl
        self._cache.put(res, ttl)
        self._count(res.source)
        if res.speaks_coap:
            logger.info(
                "CoAP discovery: %s -> %s (via %s)",
                server_name,
                ", ".join(str(t) for t in res.targets),
                res.source,
            )
        else:
            logger.info("CoAP discovery: %s has no CoAP endpoint", server_name)
        return res

    def _address_ok(self, host: str) -> bool:
        if self._allowed is None or not is_ip_literal(host):
            return True
        ok = self._allowed(host)
        if not ok:
            logger.warning("CoAP discovery: refusing blocklisted address %s", host)
        return ok

    async def _discover_uncached(self, server_name: str) -> Resolution:
        if server_name == self._own:
            return Resolution(server_name, (), "none")
        try:
            target = probe_target(server_name, self.config.probe_port)
        except ValueError as e:
            logger.warning("CoAP discovery: bad server name %r: %s", server_name, e)
            return Resolution(server_name, (), "none")
        if not is_ip_literal(target.host):
            records = await self._srv(f"{SRV_SERVICE}.{target.host}")
            ordered = order_srv_records(records, self._rng)[:MAX_SRV_TARGETS]
            targets = tuple(
                CoapTarget(host=r.target, port=r.port)
                for r in ordered
                if self._address_ok(r.target)
            )
            if targets:
                return Resolution(server_name, targets, "srv")
        if self._probe is not None and self._address_ok(target.host):
            try:
                answered = await self._probe(server_name, target)
            except Exception as e:
                logger.info("CoAP probe of %s at %s failed: %s", server_name, target, e)
                answered = False
            if answered:
                return Resolution(server_name, (target,), "probe")
        return Resolution(server_name, (), "none")


def static_targets(peers: Sequence[PeerEntry]) -> dict[str, tuple[CoapTarget, ...]]:
    """server_name -> targets, for the module (e.g. to pin keys in the TrustPolicy)."""
    return {p.server_name: p.targets for p in peers}
