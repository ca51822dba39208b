"""JSON bodies exactly as the HTTP side wrote them: strict parsing (no duplicate keys, no NaN),
the canonical dump, and the memo of encoded bodies (:data:`BODY_MEMO`)."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from synapse_coap.wire.body_fast import dump_json_c


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


#: one decoder for every body (``json.loads`` with hooks builds a decoder and its scanner
#: per call; the decoder keeps no state between calls, as json's own default one)
_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def parse_json_exact(body: bytes) -> Any:
    """The JSON value of ``body``, or raise ValueError if it is not plain, exact JSON.

    Refused: invalid UTF-8, NaN/Infinity, duplicate keys, anything json rejects,
    and nesting deep enough to hit the recursion limit.
    """
    try:
        return _STRICT.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e)) from e


def dump_json(value: Any) -> bytes:
    """How a JSON value from the body codec is serialised on the HTTP side (the native
    build's C writer where it takes the value, the same bytes: ``wire.body_fast``)."""
    fast = dump_json_c(value)
    if fast is not None:
        return fast
    return dump_json_python(value)


def dump_json_python(value: Any) -> bytes:
    """:func:`dump_json` with Python's json."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8", "surrogatepass"
    )


class BodyMemo:
    """A small LRU of finished body conversions: (profile, context, bytes) -> bytes.

    The body codec is pure Python and costs about 3 us per JSON item each way
    (a 1.5 KB ``/versions`` response: ~0.5 ms to encode, ~0.5 ms to decode), while
    many bodies repeat exactly (``/versions``, server keys, capabilities, push
    rules, ``{}``). Both conversions are deterministic functions of the key, so
    a hit gives exactly the bytes a fresh run would (decoded bodies only after
    they passed every cap under the same limits: the limits are part of the
    key). Conversions that depend on session state (string table references)
    are never memoised. Bounded by entry size, count and total bytes.
    """

    def __init__(self, max_entries: int = 256, max_item: int = 8192, max_total: int = 2 << 20):
        self.max_entries = max_entries
        self.max_item = max_item
        self.max_total = max_total
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def takes(self, data: bytes) -> bool:
        """Whether :meth:`convert` would remember (or find) the conversion of ``data``."""
        return self.max_entries > 0 and len(data) <= self.max_item

    def convert(self, key: Hashable, data: bytes, fn: Callable[[], bytes]) -> bytes:
        """``fn()`` (which converts ``data``, part of ``key``), or its remembered result."""
        if not self.takes(data):
            return fn()
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        out = fn()
        size = len(data) + len(out)
        if len(out) <= 8 * self.max_item:
            with self._lock:
                if key not in self._items:
                    self._items[key] = out
                    self._total += size
                    while self._items and (
                        len(self._items) > self.max_entries or self._total > self.max_total
                    ):
                        old_key, old = self._items.popitem(last=False)
                        self._total -= _memo_size(old_key, old)
        return out

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0


def _memo_size(key: Hashable, value: bytes) -> int:
    data = key[-1] if isinstance(key, tuple) and key and isinstance(key[-1], bytes) else b""
    return len(data) + len(value)


#: Shared by every WireCodec (the key names the profile and the session context).
#: ``SYNAPSE_COAP_BODY_MEMO=0`` in the environment switches it off (bench/inbound.py
#: does, so that every request pays for the codec, as distinct requests would).
BODY_MEMO = BodyMemo(max_entries=0 if os.environ.get("SYNAPSE_COAP_BODY_MEMO") == "0" else 256)
