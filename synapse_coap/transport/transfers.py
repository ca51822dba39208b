"""Blockwise transfer state under one byte budget: partial Block1 uploads, cached Block2 responses.

A peer can open a blockwise transfer cheaply and walk away: the first blocks
of an upload, or the first block of a large response (the whole response is
kept for the blocks that follow). :class:`TransferStore` holds both kinds
under one global byte budget and a per-session count, and forgets them after
their timeout (``expire``, driven by a timer) even if nobody touches the
store again.

- A new entry beyond its session's count evicts that session's least recently
  used entry (a peer abandoning transfers only hurts itself).
- Bytes beyond the budget evict the least recently used entries of all
  sessions, never the one being stored; one body larger than the whole budget
  is refused (the caller answers 4.13 / 5.03).
- An evicted upload's next block is answered 4.08 (Request Entity Incomplete)
  and an evicted response's next block is built again, as RFC 7959 allows.

Every eviction is counted (``evictions[reason]``).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs

from synapse_coap.confmap import from_mapping
from synapse_coap.errors import ConfigValueError

#: Bytes an entry costs beyond its payload (message objects, keys, bookkeeping).
ENTRY_OVERHEAD = 1024


def _int_at_least(name: str, lo: int) -> Callable[[Any, Any, int], None]:
    def check(_inst: Any, _attr: Any, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigValueError(name, f"must be an integer >= {lo}, got {value!r}")

    return check


def _timeout(_inst: Any, _attr: Any, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise ConfigValueError(
            "timeout", f"must be a positive number of seconds or null, got {value!r}"
        )


@attrs.frozen
class TransferLimits:
    """Memory a listener gives blockwise transfers and requests in flight.

    - ``budget``: bytes for partial Block1 uploads and cached Block2 responses
      together (default 16 MiB). A request body larger than it is refused
      with 4.13 and Size1 (at 100 bit/s 16 MiB takes two weeks to send).
    - ``per_session``: transfers one session may hold (its oldest goes first).
    - ``timeout``: seconds after its last block a transfer is forgotten
      (null: the link's EXCHANGE_LIFETIME, at least 120 s).
    - ``requests_per_session``: requests one session may have in flight;
      more are answered 5.03 with Max-Age 1.
    """

    budget: int = attrs.field(default=16 * 1024 * 1024, validator=_int_at_least("budget", 65536))
    per_session: int = attrs.field(default=8, validator=_int_at_least("per_session", 1))
    timeout: float | None = attrs.field(default=None, validator=_timeout)
    requests_per_session: int = attrs.field(
        default=32, validator=_int_at_least("requests_per_session", 1)
    )

    @classmethod
    def from_config(
        cls, config: Mapping[str, object] | None, path: str = "transfers"
    ) -> TransferLimits:
        """Build from a config mapping; ConfigValueError names ``path.field``."""
        return from_mapping(cls, config, path)


class _Entry:
    __slots__ = ("session", "size", "touched", "value")

    def __init__(self, session: Hashable, value: object, size: int, now: float) -> None:
        self.session = session
        self.value = value
        self.size = size
        self.touched = now


class TransferStore:
    def __init__(
        self,
        budget: int,
        per_session: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.per_session = per_session
        self.timeout = timeout
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._per_session: Counter[Hashable] = Counter()
        self.bytes = 0
        self.evictions: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.touched = self._clock()
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: Hashable, session: Hashable, value: object, size: int) -> bool:
        """Store (or replace) ``key``; False if ``size`` alone exceeds the budget."""
        cost = size + ENTRY_OVERHEAD
        if cost > self.budget:
            self.pop(key)
            self.evictions["too_large"] += 1
            return False
        now = self._clock()
        old = self._entries.get(key)
        if old is None:
            while self._per_session[session] >= self.per_session:
                self._evict_oldest(lambda e: e.session == session, "session_limit")
            self._entries[key] = _Entry(session, value, cost, now)
            self._per_session[session] += 1
        else:
            self.bytes -= old.size
            old.value, old.size, old.touched = value, cost, now
            self._entries.move_to_end(key)
        self.bytes += cost
        while self.bytes > self.budget:
            self._evict_oldest(lambda e: e is not self._entries[key], "budget")
        return True

    def pop(self, key: Hashable) -> object | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._forget(entry)
        return entry.value

    def expire(self) -> int:
        """Forget entries untouched for ``timeout``; returns how many."""
        now = self._clock()
        stale = [k for k, e in self._entries.items() if now - e.touched > self.timeout]
        for k in stale:
            self.pop(k)
        self.evictions["timeout"] += len(stale)
        return len(stale)

    def _forget(self, entry: _Entry) -> None:
        self.bytes -= entry.size
        self._per_session[entry.session] -= 1
        if self._per_session[entry.session] <= 0:
            del self._per_session[entry.session]

    def _evict_oldest(self, which: Callable[[_Entry], bool], reason: str) -> None:
        for k, e in self._entries.items():
            if which(e):
                self.pop(k)
                self.evictions[reason] += 1
                return
        raise AssertionError("nothing to evict")  # pragma: no cover - callers checked
