"""The sidecar's response cache (sans-I/O, clock injected).

Every request avoided on a 100 bit/s link saves seconds, and clients ask for
the same slowly-changing documents again and again (Element asks for
``/versions`` on every start and often more). The sidecar is a *private*
cache in front of one user's client:

- Only ``GET`` responses with status 200 are stored.
- Freshness comes from the response: ``Cache-Control: max-age=N`` (the CoAP
  Max-Age option is turned into it by the codec). ``no-store`` / ``no-cache``
  and a missing ``max-age`` mean "do not store"...
- ...except for a few routes the spec describes as slowly changing (server
  capabilities, profiles), which get a short built-in lifetime
  (:data:`DEFAULT_ROUTE_TTLS`) even when Synapse sends its blanket
  ``no-cache, no-store``. A successful non-GET request to a path drops every
  entry on the same path (``PUT .../profile/@u/displayname`` drops the cached
  profile), so a user always sees their own changes.
- Entries are keyed by the exact target *and* the caller's credentials (a
  SHA-256 of the Authorization header, never the token itself), so one
  user's authenticated response is never served to another token.
- Bounded by entry count and total body bytes (least recently used out first).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable

import attrs

from synapse_coap.mapping.messages import HttpRequest, HttpResponse

#: Built-in lifetimes (seconds) for routes that change rarely, applied when the
#: response itself gives no positive max-age. Regexes over the path (no query).
DEFAULT_ROUTE_TTLS: tuple[tuple[str, float], ...] = (
    (r"^/_matrix/client/versions$", 600.0),
    (r"^/_matrix/client/(?:r0|v3)/capabilities$", 300.0),
    (r"^/_matrix/client/(?:r0|v3)/profile/[^/]+(?:/(?:displayname|avatar_url))?$", 60.0),
    (r"^/_matrix/client/v1/media/config$", 3600.0),
    (r"^/_matrix/media/(?:r0|v3)/config$", 3600.0),
    (r"^/_matrix/client/v1/media/thumbnail/", 86400.0),
    (r"^/_matrix/media/(?:r0|v3)/thumbnail/", 86400.0),
    (r"^/\.well-known/matrix/client$", 3600.0),
)

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)


def max_age(cache_control: str | None) -> float | None:
    """Freshness lifetime from a Cache-Control value: None if absent, 0 if the response must not be stored."""
    if cache_control is None:
        return None
    lowered = cache_control.lower()
    directives = {d.strip().split("=", 1)[0] for d in lowered.split(",")}
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    match = _MAX_AGE.search(lowered)
    if match is None:
        return None
    return float(min(int(match.group(1)), 365 * 86400))


def _path(target: bytes) -> bytes:
    return target.partition(b"?")[0]


@attrs.frozen
class CacheKey:
    target: bytes
    credentials: str


@attrs.define
class _Entry:
    response: HttpResponse
    stored_at: float
    expires_at: float


class ResponseCache:
    """A bounded LRU of fresh GET responses. ``clock`` returns seconds (monotonic)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_entries: int = 512,
        max_bytes: int = 32 * 1024 * 1024,
        max_entry_bytes: int = 4 * 1024 * 1024,
        route_ttls: tuple[tuple[str, float], ...] = DEFAULT_ROUTE_TTLS,
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_entry_bytes = max_entry_bytes
        self._route_ttls = tuple((re.compile(p), ttl) for p, ttl in route_ttls)
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: HttpRequest) -> CacheKey:
        auth = request.header("authorization")
        credentials = "" if auth is None else hashlib.sha256(auth.encode()).hexdigest()
        return CacheKey(request.target, credentials)

    def is_candidate(self, request: HttpRequest) -> bool:
        """Could a response to this request ever be stored?"""
        return request.method == "GET" and not request.body

    def lookup(self, request: HttpRequest) -> HttpResponse | None:
        """A fresh stored response with an ``age`` header, or None."""
        if not self.is_candidate(request):
            return None
        key = self.key(request)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is None or now >= entry.expires_at:
            if entry is not None:
                self._remove(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        age = int(max(0.0, now - entry.stored_at))
        headers = tuple((k, v) for k, v in entry.response.headers if k != "age")
        return attrs.evolve(entry.response, headers=(*headers, ("age", str(age))))

    def ttl_for(self, request: HttpRequest, response: HttpResponse) -> float:
        """How long this response may be served from the cache (0 = not at all)."""
        if not self.is_candidate(request) or response.status != 200:
            return 0.0
        explicit = max_age(response.header("cache-control"))
        if explicit is not None and explicit > 0:
            return explicit
        path = _path(request.target).decode("latin-1")
        for pattern, ttl in self._route_ttls:
            if pattern.search(path):
                return ttl
        return 0.0

    def store(self, request: HttpRequest, response: HttpResponse) -> bool:
        """Remember ``response`` if it is cacheable. Returns whether it was stored."""
        ttl = self.ttl_for(request, response)
        if ttl <= 0 or len(response.body) > self._max_entry_bytes:
            return False
        key = self.key(request)
        if key in self._entries:
            self._remove(key)
        now = self._clock()
        self._entries[key] = _Entry(response, now, now + ttl)
        self._bytes += len(response.body)
        while self._entries and (
            len(self._entries) > self._max_entries or self._bytes > self._max_bytes
        ):
            oldest = next(iter(self._entries))
            self._remove(oldest)
        return True

    def invalidate(self, request: HttpRequest) -> int:
        """After a successful change (any non-GET), drop entries on the same path. Returns the count."""
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return 0
        path = _path(request.target)
        doomed = [
            k
            for k in self._entries
            if _path(k.target).startswith(path) or path.startswith(_path(k.target))
        ]
        for k in doomed:
            self._remove(k)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.response.body)
