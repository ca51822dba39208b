"""The body codec: a JSON value <-> compact bytes, exactly.

Layout (documented in docs/wire-body.md):

* the value becomes CBOR (RFC 8949) where
  - map keys found in the profile's key table are small integers
    (zig-zag: table index 0, 1, 2, 3 ... -> 0, -1, 1, -2 ..., so 48 keys take one byte);
  - strings found in the profile's value table are CBOR simple values
    (index 0-19 -> one byte, 20-243 -> two bytes);
  - identifiers and base64 are binary under private tags, only when the
    decoder gives back the identical string (checked on encode);
  - a federation PDU's ``hashes.sha256`` is left out when the receiver can
    recompute it exactly;
  - in a session with a string table (wire/strings.py), strings the receiver
    certainly holds are tags 4/5 wrapping a short reference;
* then raw DEFLATE (level 9) is tried: with the profile's preset dictionary
  only, for bodies up to ``ONE_ATTEMPT_MAX`` when the profile has one (it won on
  every corpus body), else with and without it; the smallest form is sent.
  Plain CBOR is sent as
  is (its first byte is never 0xfc-0xfe); compressed forms start with a
  one-byte marker: 0xfc = DEFLATE, 0xfd = DEFLATE with the profile dictionary.

Decoding checks every cap before allocating: encoded size, inflated size
(``max_length``), nesting depth and item count.  Two decoders give the same
result: a fast one (cbor2's native decoder with depth, duplicate-key and
indefinite-length checks, then a Python pass over the tree that applies the
profile's keys, values and tags and checks the depth again), used when the body
has at most ``max_items`` bytes (so at most that many items); and the reference
decoder, an iterative byte walk (no input can cause a RecursionError).  Any
input the fast path does not accept completely is decoded by the reference
decoder, which gives the answer or the error; a property test checks that the
two agree.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import zlib
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import attrs

try:
    import cbor2
except ImportError:  # pragma: no cover - a declared dependency; without it the
    cbor2 = None  # type: ignore[assignment]  # the reference decoder decodes everything

from synapse_coap.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from synapse_coap.wire import cbor
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import Profile
from synapse_coap.wire.strings import TAG_REF, TAG_REF_WIDE

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
#: identifier -> (tag, uint) of a session string table reference (see wire/strings.py)
StringRefs: TypeAlias = Mapping[str, tuple[int, int]]
#: (tag, uint) -> the referenced string; raises UnknownStringReference
StringResolver: TypeAlias = Callable[[int, int], str]

# --- markers (first byte of an encoded body) --------------------------------------------
MARKER_DEFLATE = 0xFC
MARKER_DEFLATE_DICT = 0xFD
# 0xFE and 0xFF are reserved (0xff is also never a valid first CBOR byte here).

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
        decoded = min(
            self.max_decoded_bytes, max(self.min_decoded_bytes, self.max_expansion * size)
        )
        items = min(self.max_items, max(self.min_items, self.max_items_per_byte * size))
        if decoded == self.max_decoded_bytes and items == self.max_items:
            return self
        return attrs.evolve(self, max_decoded_bytes=decoded, max_items=items)


DEFAULT_BODY_LIMITS = BodyLimits()
#: What a listener accepts in a request body: decoding the worst body these caps
#: accept stays within tens of milliseconds (docs/wire-body.md, "Caps").
REQUEST_BODY_LIMITS = BodyLimits(max_decoded_bytes=8 * 1024 * 1024, max_items=16384)


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


def _canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True
    ).encode("utf-8")


def content_hash(pdu: dict[str, Any]) -> str | None:
    """Matrix content hash of an event (spec: without unsigned, signatures, hashes).

    None when the event cannot be put in canonical JSON.
    """
    stripped = {k: v for k, v in pdu.items() if k not in ("unsigned", "signatures", "hashes")}
    try:
        data = _canonical_json(stripped)
    except (TypeError, ValueError, RecursionError):
        return None
    return _b64_unpadded(hashlib.sha256(data).digest(), url=False)


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


class _Encoder:
    def __init__(
        self, profile: Profile, context: WireContext, refs: StringRefs | None = None
    ) -> None:
        self.refs = refs or None
        t = _tables(profile)
        self.key_bytes = t.key_bytes
        self.value_bytes = t.value_bytes
        names = context.server_names[:MAX_SERVER_REFS]
        self.servers = {name: i for i, name in enumerate(names)}
        cache = t.strings.get(names)
        if cache is None:
            if len(t.strings) >= _STRING_CACHE_CONTEXTS:
                t.strings.clear()
            cache = t.strings[names] = {}
        self.cache: dict[str, bytes] = cache
        self.out: list[bytes] = []
        self.prev_big: int | None = None  # last int in [_TS_LOW, _TS_HIGH) in value position

    # -- strings ---------------------------------------------------------------------------
    def text(self, s: str) -> None:
        try:
            raw = s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LocalProtocolError(
                "string is not valid Unicode (lone surrogate); carry the body as raw JSON"
            ) from e
        self.out.append(cbor.head(cbor.MAJOR_TEXT, len(raw)))
        self.out.append(raw)

    def tagged_bytes(self, tag: int, raw: bytes) -> None:
        self.out.append(cbor.head(cbor.MAJOR_TAG, tag))
        self.out.append(cbor.head(cbor.MAJOR_BYTES, len(raw)))
        self.out.append(raw)

    def string(self, s: str) -> None:
        out = self.out
        simple = self.value_bytes.get(s)
        if simple is not None:
            out.append(simple)
            return
        if not s:
            out.append(b"\x60")
            return
        if self.refs is not None:
            ref = self.refs.get(s)
            if ref is not None:
                out.append(cbor.head(cbor.MAJOR_TAG, ref[0]))
                out.append(cbor.head(cbor.MAJOR_UINT, ref[1]))
                return
        cache = self.cache
        enc = cache.get(s)
        if enc is not None:
            out.append(enc)
            return
        mark = len(out)
        self.string_uncached(s)
        if len(s) <= _STRING_CACHE_MAX_LEN:
            enc = b"".join(out[mark:])
            del out[mark:]
            out.append(enc)
            if len(cache) >= _STRING_CACHE_ENTRIES:
                cache.clear()
            cache[s] = enc

    def string_uncached(self, s: str) -> None:
        """What ``string`` sends for ``s`` after the value table and references: a
        function of ``s`` and the context's server names only (so it can be cached)."""
        out = self.out
        n_len = len(s)
        srv = self.servers.get(s)
        if srv is not None:
            out.append(cbor.head(cbor.MAJOR_TAG, TAG_SERVER))
            out.append(cbor.head(cbor.MAJOR_UINT, srv))
            return
        first = s[0]
        if n_len == 44 and first in "$!":
            raw = _b64_decode_exact(s[1:], url=True)
            if raw is not None:
                self.tagged_bytes(TAG_EVENT_ID if first == "$" else TAG_ROOM_HASH_ID, raw)
                return
        if first in SIGILS:
            colon = s.find(":")
            if colon > 0:
                k = self.servers.get(s[colon + 1 :])
                if k is not None:
                    sig = SIGILS.index(first)
                    tag = TAG_SIGIL_0 + 4 * k + sig if k < 2 else TAG_SIGIL_BASE + 4 * k + sig
                    out.append(cbor.head(cbor.MAJOR_TAG, tag))
                    self.text(s[1:colon])
                    return
        if s.startswith(_ED25519) and n_len > len(_ED25519):
            out.append(cbor.head(cbor.MAJOR_TAG, TAG_ED25519_KEY_ID))
            self.text(s[len(_ED25519) :])
            return
        if s.startswith("mxc://"):
            slash = s.find("/", 6)
            if slash > 0:
                k = self.servers.get(s[6:slash])
                if k is not None:
                    out.append(cbor.head(cbor.MAJOR_TAG, TAG_MXC_0 if k == 0 else TAG_MXC_BASE + k))
                    self.text(s[slash + 1 :])
                    return
        if n_len >= _B64_MIN_LEN:
            chars = set(s)
            for url, alphabet, tag in ((False, _B64_STD, TAG_B64), (True, _B64_URL, TAG_B64URL)):
                if chars <= alphabet:
                    raw = _b64_decode_exact(s, url)
                    if raw is not None:
                        self.tagged_bytes(tag, raw)
                        return
        self.text(s)

    def key(self, k: object) -> None:
        enc = self.key_bytes.get(k) if isinstance(k, str) else None
        if enc is not None:
            self.out.append(enc)
            return
        if not isinstance(k, str):
            raise LocalProtocolError(f"JSON object key must be a string, not {type(k).__name__}")
        self.string(k)

    # -- values ----------------------------------------------------------------------------
    def value(self, v: object, depth: int) -> None:
        out = self.out
        if isinstance(v, str):
            self.string(v)
        elif v is None:
            out.append(cbor.NULL)
        elif v is True:
            out.append(cbor.TRUE)
        elif v is False:
            out.append(cbor.FALSE)
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, float):
            out.append(cbor.encode_float(v))
        elif isinstance(v, dict):
            if depth >= _MAX_ENCODE_DEPTH:
                raise LocalProtocolError("JSON value nested too deeply to encode")
            derived = self.derived_hash(v)
            out.append(cbor.head(cbor.MAJOR_MAP, len(v)))
            for k, item in v.items():
                self.key(k)
                if derived and k == "hashes":
                    out.append(cbor.head(cbor.MAJOR_TAG, TAG_DERIVED_SHA256))
                    out.append(cbor.NULL)
                else:
                    self.value(item, depth + 1)
        elif isinstance(v, (list, tuple)):
            if depth >= _MAX_ENCODE_DEPTH:
                raise LocalProtocolError("JSON value nested too deeply to encode")
            if v and self.event_id_list(v):
                return
            out.append(cbor.head(cbor.MAJOR_ARRAY, len(v)))
            for item in v:
                self.value(item, depth + 1)
        else:
            raise LocalProtocolError(f"not a JSON value: {type(v).__name__}")

    def integer(self, v: int) -> None:
        out = self.out
        if v >= 0:
            if v < _TS_HIGH:
                if v >= _TS_LOW:
                    prev = self.prev_big
                    self.prev_big = v
                    if prev is not None and -_TS_LOW < v - prev < _TS_LOW:
                        delta = v - prev
                        out.append(cbor.head(cbor.MAJOR_TAG, TAG_TS_DELTA))
                        if delta >= 0:
                            out.append(cbor.head(cbor.MAJOR_UINT, delta))
                        else:
                            out.append(cbor.head(cbor.MAJOR_NEGINT, -1 - delta))
                        return
                out.append(cbor.head(cbor.MAJOR_UINT, v))
            else:
                self.tagged_bytes(TAG_BIGNUM_POS, v.to_bytes((v.bit_length() + 7) // 8, "big"))
        else:
            n = -1 - v
            if n < (1 << 64):
                out.append(cbor.head(cbor.MAJOR_NEGINT, n))
            else:
                self.tagged_bytes(TAG_BIGNUM_NEG, n.to_bytes((n.bit_length() + 7) // 8, "big"))

    def event_id_list(self, v: list[Any] | tuple[Any, ...]) -> bool:
        parts = []
        refs = self.refs
        for item in v:
            if not (isinstance(item, str) and len(item) == 44 and item[0] == "$"):
                return False
            if refs is not None and item in refs:
                return False  # an array of references is shorter
            raw = _b64_decode_exact(item[1:], url=True)
            if raw is None or len(raw) != 32:
                return False
            parts.append(raw)
        self.tagged_bytes(TAG_EVENT_ID_LIST, b"".join(parts))
        return True

    @staticmethod
    def derived_hash(d: dict[Any, Any]) -> bool:
        hashes = d.get("hashes")
        if not (isinstance(hashes, dict) and len(hashes) == 1):
            return False
        given = hashes.get("sha256")
        if not isinstance(given, str):
            return False
        return content_hash(d) == given


def _encode_cbor(
    value: JSONValue, profile: Profile, context: WireContext, refs: StringRefs | None = None
) -> bytes:
    enc = _Encoder(profile, context, refs)
    try:
        enc.value(value, 0)
    except RecursionError as e:  # pragma: no cover - guarded by _MAX_ENCODE_DEPTH
        raise LocalProtocolError("JSON value nested too deeply to encode") from e
    return b"".join(enc.out)


#: primed (de)compressors per dictionary, copied for each body: priming a 32 KiB window
#: with the dictionary costs more than compressing a small body
_PRIMED_COMPRESS: dict[bytes, Any] = {}
_PRIMED_DECOMPRESS: dict[bytes, Any] = {}
_PRIMED_MAX = 8
#: bodies up to this size get one DEFLATE attempt, with the dictionary when the profile has
#: one: on every body of the corpora (876 bodies up to 3.5 KB) the dictionary form was the
#: smaller; larger bodies try both
ONE_ATTEMPT_MAX = 16 * 1024


def _primed(cache: dict[bytes, Any], zdict: bytes, make: Callable[[], Any]) -> Any:
    obj = cache.get(zdict)
    if obj is None:
        if len(cache) >= _PRIMED_MAX:
            cache.clear()
        obj = cache[zdict] = make()
    return obj


def _deflate(data: bytes, zdict: bytes) -> bytes:
    if zdict:
        base = _primed(
            _PRIMED_COMPRESS,
            zdict,
            lambda: zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict),
        )
    else:
        base = _primed(_PRIMED_COMPRESS, b"", lambda: zlib.compressobj(9, zlib.DEFLATED, -15, 9))
    c = base.copy()
    out: bytes = c.compress(data) + c.flush()
    return out


def encode_body(
    value: JSONValue,
    profile: Profile,
    context: WireContext = WireContext(),
    refs: StringRefs | None = None,
) -> bytes:
    """Encode a JSON value; the result's first byte says which encoding was used.

    ``refs``: strings the receiver's session string table holds, as
    (tag, uint) references (:class:`synapse_coap.wire.strings.SenderStrings`);
    without it the output is the same as before the table existed.

    Raises LocalProtocolError if the value cannot be represented exactly
    (lone surrogates, non-string keys, non-JSON types); callers then carry raw JSON.
    """
    raw = _encode_cbor(value, profile, context, refs)
    best = raw
    if len(raw) > 4:
        if profile.dictionary and len(raw) <= ONE_ATTEMPT_MAX:
            with_dict = _deflate(raw, profile.dictionary)
            if len(with_dict) + 1 < len(best):
                best = bytes((MARKER_DEFLATE_DICT,)) + with_dict
            return best
        plain = _deflate(raw, b"")
        if len(plain) + 1 < len(best):
            best = bytes((MARKER_DEFLATE,)) + plain
        if profile.dictionary:
            with_dict = _deflate(raw, profile.dictionary)
            if len(with_dict) + 1 < len(best):
                best = bytes((MARKER_DEFLATE_DICT,)) + with_dict
    return best


def encode_stages(
    value: JSONValue, profile: Profile, context: WireContext = WireContext()
) -> dict[str, bytes]:
    """Each stage of the pipeline, for the benchmark.

    ``cbor``: generic CBOR with text keys (cbor2); ``cbor_int_keys``: the profile's
    CBOR (integer keys, value table, binary identifiers); ``deflate``: that, raw
    DEFLATE without dictionary; ``dictionary``: with the profile dictionary;
    ``final``: what :func:`encode_body` sends.
    """
    import cbor2

    try:
        generic = cbor2.dumps(value)
    except (UnicodeEncodeError, cbor2.CBOREncodeError, TypeError, ValueError) as e:
        raise LocalProtocolError(f"cannot encode as CBOR: {e}") from e
    raw = _encode_cbor(value, profile, context)
    return {
        "cbor": generic,
        "cbor_int_keys": raw,
        "deflate": _deflate(raw, b""),
        "dictionary": _deflate(raw, profile.dictionary),
        "final": encode_body(value, profile, context),
    }


# =========================================================================================
# decoder
# =========================================================================================


class _Derived:
    """Placeholder for a ``hashes`` value the decoder recomputes."""


_DERIVED = _Derived()
_NO_KEY = object()


class _Frame:
    __slots__ = ("container", "derived", "key", "kind", "remaining", "tag")

    def __init__(self, kind: int, container: Any, remaining: int, tag: int = 0) -> None:
        self.kind = kind  # 0 array, 1 map, 2 tag
        self.container = container
        self.remaining = remaining
        self.tag = tag
        self.key: Any = _NO_KEY
        self.derived = False


_ALLOWED_TAGS_1 = frozenset(range(2, 24))


class _Decoder:
    def __init__(
        self,
        data: bytes,
        profile: Profile,
        context: WireContext,
        limits: BodyLimits,
        resolve: StringResolver | None = None,
    ) -> None:
        self.resolve = resolve
        self.data = data
        self.keys = profile.keys
        self.values = profile.values
        self.servers = context.server_names
        self.limits = limits
        self.prev_big: int | None = None

    def fail(self, msg: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"bad body: {msg}")

    def server(self, k: int) -> str:
        if k >= len(self.servers) or k >= MAX_SERVER_REFS:
            raise self.fail(f"server reference {k} is not in this session's context")
        return self.servers[k]

    def apply_tag(self, tag: int, content: Any) -> Any:
        if tag == TAG_DERIVED_SHA256:
            if content is not None:
                raise self.fail("derived-hash tag must wrap null")
            return _DERIVED
        if tag == TAG_TS_DELTA:
            if type(content) is not int or self.prev_big is None:
                raise self.fail("timestamp delta without a previous timestamp")
            n = self.prev_big + content
            if not _TS_LOW <= n < _TS_HIGH:
                raise self.fail("timestamp delta out of range")
            return n
        if tag in (TAG_REF, TAG_REF_WIDE):
            if type(content) is not int or content < 0:
                raise self.fail("string reference must wrap an unsigned integer")
            if self.resolve is None:
                raise self.fail("string reference outside a session string table")
            return self.resolve(tag, content)
        if tag in (TAG_BIGNUM_POS, TAG_BIGNUM_NEG):
            if not isinstance(content, bytes):
                raise self.fail(f"tag {tag} must wrap a byte string")
            n = int.from_bytes(content, "big")
            return n if tag == TAG_BIGNUM_POS else -1 - n
        if tag in (TAG_EVENT_ID, TAG_ROOM_HASH_ID, TAG_EVENT_ID_LIST, TAG_B64, TAG_B64URL):
            if not isinstance(content, bytes):
                raise self.fail(f"tag {tag} must wrap a byte string")
            if tag == TAG_B64:
                return _b64_unpadded(content, url=False)
            if tag == TAG_B64URL:
                return _b64_unpadded(content, url=True)
            if tag == TAG_EVENT_ID_LIST:
                if not content or len(content) % 32:
                    raise self.fail("event id list must be a non-empty multiple of 32 bytes")
                return [
                    "$" + _b64_unpadded(content[i : i + 32], url=True)
                    for i in range(0, len(content), 32)
                ]
            if len(content) != 32:
                raise self.fail("identifier hash must be 32 bytes")
            sigil = "$" if tag == TAG_EVENT_ID else "!"
            return sigil + _b64_unpadded(content, url=True)
        if tag == TAG_SERVER:
            if not isinstance(content, int) or isinstance(content, bool) or content < 0:
                raise self.fail("server tag must wrap an unsigned integer")
            return self.server(content)
        if not isinstance(content, str):
            raise self.fail(f"tag {tag} must wrap a text string")
        if TAG_SIGIL_0 <= tag < TAG_SIGIL_0 + 8:
            k, sig = divmod(tag - TAG_SIGIL_0, 4)
            return SIGILS[sig] + content + ":" + self.server(k)
        if TAG_SIGIL_BASE <= tag < TAG_SIGIL_BASE + 4 * MAX_SERVER_REFS:
            k, sig = divmod(tag - TAG_SIGIL_BASE, 4)
            return SIGILS[sig] + content + ":" + self.server(k)
        if tag == TAG_ED25519_KEY_ID:
            return _ED25519 + content
        if tag == TAG_MXC_0:
            return "mxc://" + self.server(0) + "/" + content
        if TAG_MXC_BASE <= tag < TAG_MXC_BASE + MAX_SERVER_REFS:
            return "mxc://" + self.server(tag - TAG_MXC_BASE) + "/" + content
        raise self.fail(f"unknown tag {tag}")  # pragma: no cover - filtered earlier

    @staticmethod
    def tag_allowed(tag: int) -> bool:
        return (
            tag in _ALLOWED_TAGS_1
            or TAG_SIGIL_BASE <= tag < TAG_SIGIL_BASE + 4 * MAX_SERVER_REFS
            or TAG_MXC_BASE <= tag < TAG_MXC_BASE + MAX_SERVER_REFS
        )

    def build(self, x: Any, depth: int) -> Any:
        """The JSON value of cbor2's tree ``x`` (fast path; see _decode_fast).

        Applies what :meth:`decode` applies, in the same order (so timestamp deltas
        and string references resolve alike); raises _Fallback on anything the
        reference decoder might answer differently.
        """
        t = type(x)
        if t is str or t is int or t is float or t is bool or x is None or t is bytes:
            return x
        if t is list:
            if not x:
                return x
            if depth >= self.limits.max_depth:
                raise _Fallback
            out = []
            for item in x:
                it = type(item)
                if it in _LEAVES:
                    out.append(item)
                    continue
                if it is int:
                    if _TS_LOW <= item < _TS_HIGH:
                        self.prev_big = item
                    out.append(item)
                    continue
                v = self.build(item, depth + 1)
                if v is _DERIVED:
                    raise _Fallback
                if type(v) is int and _TS_LOW <= v < _TS_HIGH:
                    self.prev_big = v
                out.append(v)
            return out
        if t is dict:
            if not x:
                return x
            if depth >= self.limits.max_depth:
                raise _Fallback
            d: dict[str, Any] = {}
            keys = self.keys
            derived = False
            for k, item in x.items():
                kt = type(k)
                if kt is int:
                    idx = _unzigzag(k)
                    if idx >= len(keys):
                        raise _Fallback
                    k = keys[idx]
                elif kt is not str:
                    k = self.build(k, depth + 1)
                    if type(k) is not str:
                        raise _Fallback
                if k in d:
                    raise _Fallback
                it = type(item)
                if it in _LEAVES:
                    d[k] = item
                    continue
                if it is int:
                    if _TS_LOW <= item < _TS_HIGH:
                        self.prev_big = item
                    d[k] = item
                    continue
                v = self.build(item, depth + 1)
                if v is _DERIVED:
                    if k != "hashes":
                        raise _Fallback
                    derived = True
                elif type(v) is int and _TS_LOW <= v < _TS_HIGH:
                    self.prev_big = v
                d[k] = v
            if derived:
                h = content_hash(d)
                if h is None:
                    raise _Fallback
                d["hashes"] = {"sha256": h}
            return d
        if t is _CBOR_TAG:
            tag = x.tag
            if not self.tag_allowed(tag) or depth >= self.limits.max_depth:
                raise _Fallback
            return self.apply_tag(tag, self.build(x.value, depth + 1))
        if t is _CBOR_SIMPLE:
            n = x.value
            if 20 <= n < 32:
                raise _Fallback
            idx = _value_from_simple(n)
            if idx >= len(self.values):
                raise _Fallback
            return self.values[idx]
        raise _Fallback

    def finish_map(self, frame: _Frame) -> None:
        if frame.derived:
            d = frame.container
            h = content_hash(d)
            if h is None:
                raise self.fail("cannot recompute the content hash of this event")
            d["hashes"] = {"sha256": h}

    def decode(self) -> JSONValue:
        data = self.data
        end = len(data)
        limits = self.limits
        max_depth = limits.max_depth
        items_left = limits.max_items
        stack: list[_Frame] = []
        pos = 0
        keys = self.keys
        values = self.values
        while True:
            items_left -= 1
            if items_left < 0:
                raise LimitExceeded(f"body has more than {limits.max_items} items")
            major, info, arg, pos = cbor.read_head(data, pos)
            value: Any
            if major == cbor.MAJOR_UINT:
                value = arg
            elif major == cbor.MAJOR_NEGINT:
                value = -1 - arg
            elif major in (cbor.MAJOR_BYTES, cbor.MAJOR_TEXT):
                if arg > end - pos:
                    raise self.fail("string runs past the end of the body")
                chunk = data[pos : pos + arg]
                pos += arg
                if major == cbor.MAJOR_BYTES:
                    value = chunk
                else:
                    try:
                        value = chunk.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise self.fail("text string is not valid UTF-8") from e
            elif major in (cbor.MAJOR_ARRAY, cbor.MAJOR_MAP):
                need = arg if major == cbor.MAJOR_ARRAY else 2 * arg
                if need > end - pos:
                    raise self.fail("container runs past the end of the body")
                if need > items_left:
                    raise LimitExceeded(f"body has more than {limits.max_items} items")
                if arg == 0:
                    value = [] if major == cbor.MAJOR_ARRAY else {}
                else:
                    if len(stack) >= max_depth:
                        raise LimitExceeded(f"body nested deeper than {max_depth}")
                    if major == cbor.MAJOR_ARRAY:
                        stack.append(_Frame(0, [], arg))
                    else:
                        stack.append(_Frame(1, {}, arg))
                    continue
            elif major == cbor.MAJOR_TAG:
                if not self.tag_allowed(arg):
                    raise self.fail(f"unknown tag {arg}")
                if len(stack) >= max_depth:
                    raise LimitExceeded(f"body nested deeper than {max_depth}")
                stack.append(_Frame(2, None, 1, arg))
                continue
            else:  # major 7
                if info in (25, 26, 27):
                    if pos + arg > end:
                        raise self.fail("float runs past the end of the body")
                    value = cbor.decode_float(arg, data[pos : pos + arg])
                    pos += arg
                elif arg == 20:
                    value = False
                elif arg == 21:
                    value = True
                elif arg == 22:
                    value = None
                elif (info < 24 and arg < 20) or (info == 24 and arg >= 32):
                    idx = _value_from_simple(arg)
                    if idx >= len(values):
                        raise self.fail(f"simple value {arg} is not in the value table")
                    value = values[idx]
                else:
                    raise self.fail(f"unsupported simple value {arg}")
            # deliver `value` upwards, closing finished containers
            while True:
                if not stack:
                    if pos != end:
                        raise self.fail(f"{end - pos} trailing bytes after the body")
                    if value is _DERIVED:
                        raise self.fail("derived hash outside an event")
                    result: JSONValue = value
                    return result
                top = stack[-1]
                if top.kind == 2:
                    stack.pop()
                    value = self.apply_tag(top.tag, value)
                    continue
                if top.kind == 0:
                    if value is _DERIVED:
                        raise self.fail("derived hash outside an event")
                    if type(value) is int and _TS_LOW <= value < _TS_HIGH:
                        self.prev_big = value
                    top.container.append(value)
                    top.remaining -= 1
                else:
                    if top.key is _NO_KEY:
                        if isinstance(value, int) and not isinstance(value, bool):
                            idx = _unzigzag(value)
                            if idx >= len(keys):
                                raise self.fail(f"key {value} is not in the key table")
                            value = keys[idx]
                        elif not isinstance(value, str):
                            raise self.fail("map key is not a string")
                        if value in top.container:
                            raise self.fail(f"duplicate map key {value!r}")
                        top.key = value
                        break
                    if value is _DERIVED:
                        if top.key != "hashes":
                            raise self.fail("derived hash outside an event's hashes")
                        top.derived = True
                    elif type(value) is int and _TS_LOW <= value < _TS_HIGH:
                        self.prev_big = value
                    top.container[top.key] = value
                    top.key = _NO_KEY
                    top.remaining -= 1
                if top.remaining:
                    break
                stack.pop()
                if top.kind == 1:
                    self.finish_map(top)
                value = top.container


def _inflate(data: bytes, zdict: bytes, limits: BodyLimits) -> bytes:
    try:
        base = _primed(
            _PRIMED_DECOMPRESS,
            zdict,
            lambda: zlib.decompressobj(-15, zdict=zdict) if zdict else zlib.decompressobj(-15),
        )
        d = base.copy()
        out: bytes = d.decompress(data, limits.max_decoded_bytes + 1)
    except zlib.error as e:
        raise RemoteProtocolError(f"bad body: DEFLATE stream is corrupt ({e})") from e
    if len(out) > limits.max_decoded_bytes:
        raise LimitExceeded(f"body inflates to more than {limits.max_decoded_bytes} bytes")
    if not d.eof:
        raise RemoteProtocolError("bad body: DEFLATE stream is truncated")
    if d.unused_data:
        raise RemoteProtocolError("bad body: trailing bytes after the DEFLATE stream")
    return out


def decode_body(
    data: bytes,
    profile: Profile,
    context: WireContext = WireContext(),
    limits: BodyLimits = DEFAULT_BODY_LIMITS,
    resolve: StringResolver | None = None,
) -> JSONValue:
    """Decode what :func:`encode_body` produced (RemoteProtocolError / LimitExceeded).

    ``resolve`` turns session string table references into strings
    (:meth:`synapse_coap.wire.strings.ReceiverStrings.resolver`); without it a
    reference is a RemoteProtocolError.
    """
    if len(data) > limits.max_encoded_bytes:
        raise LimitExceeded(f"body is larger than {limits.max_encoded_bytes} bytes")
    if not data:
        raise RemoteProtocolError("bad body: empty")
    limits = limits.for_input(len(data))
    marker = data[0]
    if marker == MARKER_DEFLATE:
        data = _inflate(data[1:], b"", limits)
    elif marker == MARKER_DEFLATE_DICT:
        if not profile.dictionary:
            raise RemoteProtocolError(
                f"bad body: dictionary-compressed, but profile {profile.id} has no dictionary"
            )
        data = _inflate(data[1:], profile.dictionary, limits)
    elif len(data) > limits.max_decoded_bytes:
        raise LimitExceeded(f"body is larger than {limits.max_decoded_bytes} bytes")
    if len(data) <= limits.max_items:
        result: JSONValue = _decode_fast(data, profile, context, limits, resolve)
        if result is not _FALLBACK:
            return result
    return _Decoder(data, profile, context, limits, resolve).decode()


# =========================================================================================
# fast decoder: cbor2's native decoder, then one pass over the tree
# =========================================================================================


class _Fallback(Exception):
    """The fast path does not accept this input; the reference decoder decides."""


_FALLBACK = object()
_BAD = object()
#: leaf types the fast pass keeps as they are (ints in timestamp range are not leaves:
#: they set the base of the next timestamp delta)
_LEAVES = frozenset((str, float, bool, type(None), bytes))
#: tags cbor2 decodes natively that are not ours (dates, shared values, string references,
#: ...): refused, so they never take effect
_CBOR2_NATIVE_FOREIGN = (0, 1, 25, 28, 29, 30, 256, 258, 260, 261, 1004, 43000, 55799)
#: tags cbor2 decodes natively that are ours: kept as tags for the pass over the tree
_CBOR2_NATIVE_OURS = (2, 3, 4, 5, 35, 36, 37, 52, 54, 100)


def _keep_tag(tag: int) -> Callable[[Any, bool], Any]:
    return lambda value, immutable: cbor2.CBORTag(tag, value)


def _refuse_tag(value: Any, immutable: bool) -> Any:
    return _BAD


_SEMANTIC = {
    **{t: _keep_tag(t) for t in _CBOR2_NATIVE_OURS},
    **{t: _refuse_tag for t in _CBOR2_NATIVE_FOREIGN},
}
_CBOR_TAG: Any = getattr(cbor2, "CBORTag", None)
_CBOR_SIMPLE: Any = getattr(cbor2, "CBORSimpleValue", None)


def _decode_fast(
    data: bytes,
    profile: Profile,
    context: WireContext,
    limits: BodyLimits,
    resolve: StringResolver | None,
) -> Any:
    """The decoded value, or _FALLBACK when the reference decoder must decide."""
    if cbor2 is None:  # pragma: no cover
        return _FALLBACK
    fp = io.BytesIO(data)
    try:
        tree = cbor2.CBORDecoder(
            fp,
            semantic_decoders=_SEMANTIC,
            max_depth=limits.max_depth + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        return _FALLBACK
    if fp.tell() != len(data):
        return _FALLBACK
    dec = _Decoder(data, profile, context, limits, resolve)
    try:
        value = dec.build(tree, 0)
    except (_Fallback, RemoteProtocolError):
        return _FALLBACK
    if value is _DERIVED:
        return _FALLBACK
    return value
