"""What the body codec's encoder and decoder share: markers, private tags, limits, the
profile's tables and the small exact conversions (see :mod:`synapse_coap.wire.body`)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import attrs

try:
    import cbor2
except ImportError:  # pragma: no cover - a declared dependency; without it the
    cbor2 = None  # type: ignore[assignment]  # the reference decoder decodes everything

from synapse_coap.wire import cbor
from synapse_coap.wire.profile import Profile

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
#: identifier -> (tag, uint) of a session string table reference (see wire/strings.py)
StringRefs: TypeAlias = Mapping[str, tuple[int, int]]
#: (tag, uint) -> the referenced string; raises UnknownStringReference
StringResolver: TypeAlias = Callable[[int, int], str]
#: d -> the CBOR of the base a push notification names ``d`` Observe numbers back
#: (:mod:`synapse_coap.wire.push_base`); raises UnknownStringReference
BaseResolver: TypeAlias = Callable[[int], bytes]

# --- markers (first byte of an encoded body) --------------------------------------------
MARKER_DEFLATE = 0xFC
MARKER_DEFLATE_DICT = 0xFD
#: raw DEFLATE whose preset dictionary is the profile dictionary followed by the CBOR of
#: an earlier push notification (the base, named by the uint that follows the marker)
MARKER_DEFLATE_BASE = 0xFE
# 0xFF is reserved (and never a valid first CBOR byte here).
#: DEFLATE's window: a preset dictionary longer than this is cut to its last bytes
DEFLATE_WINDOW = 1 << 15

# --- private CBOR tags ---------------------------------------------------------------------
TAG_BIGNUM_POS = 2  # RFC 8949 bignums, for ints outside +-2**64
TAG_BIGNUM_NEG = 3
# 4, 5: session string table references (synapse_coap.wire.strings.TAG_REF, TAG_REF_WIDE)
TAG_EVENT_ID = 6  # "$" + 43 url-safe unpadded base64 chars  <- 32 bytes
TAG_ROOM_HASH_ID = 7  # "!" + 43 url-safe unpadded base64 chars (room v12) <- 32 bytes
TAG_B64 = 8  # unpadded standard base64 <- bytes
TAG_B64URL = 9  # unpadded url-safe base64 <- bytes
TAG_SIGIL_0 = 10  # 10-13: "@", "!", "#", "$" + local + ":" + server_names[0]; 14-17 server 1
TAG_SERVER = 18  # server_names[uint]
TAG_EVENT_ID_LIST = 19  # list of n >= 1 event ids <- 32*n bytes
TAG_ED25519_KEY_ID = 20  # "ed25519:" + text
TAG_TS_DELTA = 21  # big int (2**32 <= n < 2**64) as delta from the previous one (timestamps)
TAG_MXC_0 = 22  # "mxc://" + server_names[0] + "/" + text
TAG_DERIVED_SHA256 = 23  # {"sha256": content hash of the enclosing PDU}, content null
TAG_SIGIL_BASE = 32  # 32 + 4*k + sigil for server index k (2-byte tag)
TAG_MXC_BASE = 224  # 224 + k for server index k (2-byte tag)
MAX_SERVER_REFS = 32  # server indices >= this are sent as text

SIGILS = "@!#$"
_B64_MIN_LEN = 20  # shorter strings are more likely words; they stay text
_B64_STD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_B64_URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ED25519 = "ed25519:"


def base_dictionary(profile: Profile, base_cbor: bytes) -> bytes:
    """The preset dictionary of a body sent relative to a base (marker 0xfe): the
    profile dictionary followed by the base's CBOR, its last 32 KiB."""
    return (profile.dictionary + base_cbor)[-DEFLATE_WINDOW:]


_TS_LOW = 1 << 32  # ints in [_TS_LOW, _TS_HIGH) take part in delta coding
_TS_HIGH = 1 << 64
_MAX_ENCODE_DEPTH = 400  # stays under Python's recursion limit
#: the encoder remembers how it encoded short strings (keys that are not in the key table,
#: event types, versions, identifiers...): per context, up to this many, then starts over
_STRING_CACHE_ENTRIES = 4096
_STRING_CACHE_MAX_LEN = 96
_STRING_CACHE_CONTEXTS = 64


@attrs.frozen
class BodyLimits:
    """Caps applied when decoding a body from the network.

    ``max_encoded_bytes``: the body as received (compressed or not).
    ``max_decoded_bytes``: CBOR bytes after inflating; a decompression bomb stops here.
    ``max_depth``: nesting of arrays, maps and tags.
    ``max_items``: data items in total (every key, value and element counts).

    The output caps are also proportional to the input (a cheap body cannot
    buy expensive decoding): a body of ``n`` bytes may inflate to at most
    ``max(min_decoded_bytes, max_expansion * n)`` bytes and hold at most
    ``max(min_items, max_items_per_byte * n)`` items. Real bodies stay far
    below (DEFLATE with the dictionary gains well under 10x on Matrix JSON).
    """

    max_encoded_bytes: int = 16 * 1024 * 1024
    max_decoded_bytes: int = 64 * 1024 * 1024
    max_depth: int = 128
    max_items: int = 2_000_000
    max_expansion: int = 32
    max_items_per_byte: int = 8
    min_decoded_bytes: int = 64 * 1024
    min_items: int = 4096

    def for_input(self, size: int) -> BodyLimits:
        """The caps for one body of ``size`` bytes (the proportional ones applied)."""
        small = _SMALL_INPUT.get(id(self))
        if small is not None and small[0] is self and size <= small[1]:
            return small[2]  # a small body: both proportional caps at their minimum
        decoded = min(
            self.max_decoded_bytes, max(self.min_decoded_bytes, self.max_expansion * size)
        )
        items = min(self.max_items, max(self.min_items, self.max_items_per_byte * size))
        if decoded == self.max_decoded_bytes and items == self.max_items:
            return self
        # attrs.evolve costs more than decoding a small body: the result is remembered,
        # a function of these frozen caps and the two numbers only (keyed by identity,
        # cheaper to hash than the caps; the entry holds the caps, so the id stays theirs)
        key = (id(self), decoded, items)
        entry = _FOR_INPUT.get(key)
        if entry is None or entry[0] is not self:
            if len(_FOR_INPUT) >= _FOR_INPUT_MAX:
                _FOR_INPUT.clear()
            entry = _FOR_INPUT[key] = (
                self,
                attrs.evolve(self, max_decoded_bytes=decoded, max_items=items),
            )
        if size <= self._small_size():
            if len(_SMALL_INPUT) >= _FOR_INPUT_MAX:
                _SMALL_INPUT.clear()
            _SMALL_INPUT[id(self)] = (self, self._small_size(), entry[1])
        return entry[1]

    def _small_size(self) -> int:
        """The largest body size whose proportional caps are both at their minimum."""
        big = self.max_encoded_bytes
        by_bytes = self.min_decoded_bytes // self.max_expansion if self.max_expansion > 0 else big
        by_items = self.min_items // self.max_items_per_byte if self.max_items_per_byte > 0 else big
        return min(by_bytes, by_items)


_FOR_INPUT: dict[tuple[int, int, int], tuple[BodyLimits, BodyLimits]] = {}
#: id(caps) -> (caps, the largest small size, their caps for a small body): the caps of
#: every body up to that size are the same, one lookup instead of the arithmetic
_SMALL_INPUT: dict[int, tuple[BodyLimits, int, BodyLimits]] = {}
_FOR_INPUT_MAX = 1024


DEFAULT_BODY_LIMITS = BodyLimits()
#: What a listener accepts in a request body: decoding the worst body these caps
#: accept stays within tens of milliseconds (docs/wire-body.md, "Caps"). A request
#: body inflates at most 8x past 64 KiB (the JSON handed to Synapse can be up to 6x
#: the CBOR, control characters being escaped): the worst 61 KB body is 0.5 MB of
#: CBOR, not 1.9 MB. Senders keep to it (``encode_body(max_expansion=)``).
REQUEST_BODY_LIMITS = BodyLimits(
    max_decoded_bytes=8 * 1024 * 1024, max_items=16384, max_expansion=8
)


# =========================================================================================
# helpers shared by both directions
# =========================================================================================


_URL_SAFE = bytes.maketrans(b"+/", b"-_")


def _b64_unpadded(raw: bytes, url: bool) -> str:
    enc = binascii.b2a_base64(raw, newline=False).rstrip(b"=")
    return (enc.translate(_URL_SAFE) if url else enc).decode("ascii")


def _b64_decode_exact(text: str, url: bool) -> bytes | None:
    """The bytes whose unpadded base64 is exactly ``text``, or None."""
    if len(text) % 4 == 1:
        return None
    try:
        padded = text + "=" * (-len(text) % 4)
        raw = base64.urlsafe_b64decode(padded) if url else base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _b64_unpadded(raw, url) != text:
        return None
    return raw


#: one encoder for every canonical dump (building one per call costs more than a small
#: dump); no circular check: a cycle ends in RecursionError, which callers catch
_CANONICAL = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    check_circular=False,
    separators=(",", ":"),
    sort_keys=True,
)


_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
#: what _CANONICAL.encode() runs for a dict or a list, without building it per call
_c_canonical: Any = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(
        None, _CANONICAL.default, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
)


def _dump_canonical(value: Any) -> str:
    if _c_canonical is not None and isinstance(value, (dict, list)):
        return "".join(_c_canonical(value, 0))
    return _CANONICAL.encode(value)


def _canonical_json(value: Any) -> bytes:
    return _dump_canonical(value).encode("utf-8")


def _load_cbody() -> Any:
    try:
        return importlib.import_module("synapse_coap.wire._cbody")
    except ImportError:  # no native build, a stale one, or SYNAPSE_COAP_PURE=1
        return None


#: the native build's C body module (``wire/_cbody.c``), or None where the build is not
#: running; ``wire.body_fast`` decodes with it once its tag numbers are checked
CBODY: Any = _load_cbody()
_C_CONTENT_HASH: Callable[[dict[str, Any]], str | None] | None = getattr(
    CBODY, "content_hash", None
)


def content_hash(pdu: dict[str, Any]) -> str | None:
    """Matrix content hash of an event (spec: without unsigned, signatures, hashes).

    None when the event cannot be put in canonical JSON. The native build's C writer
    gives it where it takes the event (no float, no lone surrogate: the same str,
    ``tests/unit/test_cjson.py``), without json's Python layer, hashlib and binascii;
    :func:`python_content_hash` everything else.
    """
    if _C_CONTENT_HASH is not None and type(pdu) is dict:
        h = _C_CONTENT_HASH(pdu)
        if h is not None:
            return h
    return python_content_hash(pdu)


def python_content_hash(pdu: dict[str, Any]) -> str | None:
    """:func:`content_hash` with Python's json, hashlib and binascii."""
    stripped = dict(pdu)
    stripped.pop("unsigned", None)
    stripped.pop("signatures", None)
    stripped.pop("hashes", None)
    try:
        data = _dump_canonical(stripped).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return None
    return binascii.b2a_base64(hashlib.sha256(data).digest(), newline=False)[:43].decode("ascii")


def _zigzag(index: int) -> int:
    return index // 2 if index % 2 == 0 else -(index + 1) // 2


def _unzigzag(n: int) -> int:
    return 2 * n if n >= 0 else -2 * n - 1


@attrs.frozen
class _Tables:
    key_index: dict[str, int]
    value_index: dict[str, int]
    #: key -> its encoded integer key, only where that is not longer than the text key
    key_bytes: dict[str, bytes]
    #: value-table string -> its encoded simple value (the strings ``string()`` replaces)
    value_bytes: dict[str, bytes]
    #: per context (server names): string -> its encoding by ``string_uncached`` (bounded)
    strings: dict[tuple[str, ...], dict[str, bytes]] = attrs.field(factory=dict)


_TABLES: dict[tuple[int, bytes], _Tables] = {}


def _tables(profile: Profile) -> _Tables:
    cache_key = (profile.id, profile.content_hash)
    t = _TABLES.get(cache_key)
    if t is None or len(_TABLES) > 16:
        if len(_TABLES) > 16:
            _TABLES.clear()
        key_index = {k: i for i, k in enumerate(profile.keys)}
        value_index = {v: i for i, v in enumerate(profile.values) if i < 244}
        t = _Tables(
            key_index=key_index,
            value_index=value_index,
            key_bytes={k: enc for k, i in key_index.items() if (enc := _key_head(k, i))},
            value_bytes={
                v: _simple_head(i) for v, i in value_index.items() if i < 20 or len(v) >= 2
            },
        )
        _TABLES[cache_key] = t
    return t


def _key_head(k: str, idx: int) -> bytes:
    """The integer key for table index ``idx``, or b"" when the text key is not longer."""
    z = _zigzag(idx)
    enc = cbor.head(cbor.MAJOR_UINT, z) if z >= 0 else cbor.head(cbor.MAJOR_NEGINT, -1 - z)
    return enc if len(enc) <= 1 + len(k.encode("utf-8", "surrogatepass")) else b""


def _simple_head(idx: int) -> bytes:
    n = _simple_index(idx)
    return bytes((0xE0 | n,)) if n < 20 else bytes((0xF8, n))


def _simple_index(i: int) -> int:
    """Value-table index -> CBOR simple value number (skipping 20-31)."""
    return i if i < 20 else i + 12


def _value_from_simple(n: int) -> int:
    return n if n < 20 else n - 12


# =========================================================================================
# encoder
# =========================================================================================
