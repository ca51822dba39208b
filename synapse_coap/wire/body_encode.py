"""The body codec's encoder: a JSON value to CBOR with the profile's keys, values and
tags, then the smallest of its DEFLATE forms (see :mod:`synapse_coap.wire.body`)."""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, cast

try:
    import cbor2
except ImportError:  # pragma: no cover - a declared dependency; without it the
    cbor2 = None  # type: ignore[assignment]  # the reference decoder decodes everything

from synapse_coap.errors import LocalProtocolError
from synapse_coap.wire import cbor
from synapse_coap.wire.body_tables import (
    _B64_MIN_LEN,
    _B64_STD,
    _B64_URL,
    _ED25519,
    _MAX_ENCODE_DEPTH,
    _STRING_CACHE_CONTEXTS,
    _STRING_CACHE_ENTRIES,
    _STRING_CACHE_MAX_LEN,
    _TS_HIGH,
    _TS_LOW,
    DEFAULT_BODY_LIMITS,
    MARKER_DEFLATE,
    MARKER_DEFLATE_BASE,
    MARKER_DEFLATE_DICT,
    MAX_SERVER_REFS,
    SIGILS,
    TAG_B64,
    TAG_B64URL,
    TAG_BIGNUM_NEG,
    TAG_BIGNUM_POS,
    TAG_DERIVED_SHA256,
    TAG_ED25519_KEY_ID,
    TAG_EVENT_ID,
    TAG_EVENT_ID_LIST,
    TAG_MXC_0,
    TAG_MXC_BASE,
    TAG_ROOM_HASH_ID,
    TAG_SERVER,
    TAG_SIGIL_0,
    TAG_SIGIL_BASE,
    TAG_TS_DELTA,
    JSONValue,
    StringRefs,
    _b64_decode_exact,
    _tables,
    base_dictionary,
    content_hash,
)
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.deflate import _deflate, cannot_shrink
from synapse_coap.wire.profile import Profile

logger = logging.getLogger(__name__)

#: heads of the small maps and arrays (cbor.head of a length under 24)
_MAP_HEADS = tuple(cbor.head(cbor.MAJOR_MAP, i) for i in range(24))
_ARRAY_HEADS = tuple(cbor.head(cbor.MAJOR_ARRAY, i) for i in range(24))
#: a derived content hash: the tag, then null
_DERIVED_HASH = cbor.head(cbor.MAJOR_TAG, TAG_DERIVED_SHA256) + cbor.NULL
#: the string cache where it must not be consulted first (references come before it)
_NO_CACHE: dict[str, bytes] = {}


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
            n = len(v)
            out.append(_MAP_HEADS[n] if n < 24 else cbor.head(cbor.MAJOR_MAP, n))
            # What key() and value() do, with the commonest items inline (a key of the
            # key table; a string of the value table or the string cache, when there
            # are no references to try first; true, false, null): the same bytes,
            # without a call per item.
            key_bytes = self.key_bytes
            value_bytes = self.value_bytes
            cache = self.cache if self.refs is None else _NO_CACHE
            inner = depth + 1
            for k, item in v.items():
                if isinstance(k, str):
                    enc = key_bytes.get(k)
                    if enc is None:
                        enc = value_bytes.get(k)
                        if enc is None:
                            enc = cache.get(k)
                else:
                    enc = None
                if enc is not None:
                    out.append(enc)
                else:
                    self.key(k)
                if derived and k == "hashes":
                    out.append(_DERIVED_HASH)
                elif isinstance(item, str):
                    enc = value_bytes.get(item)
                    if enc is None:
                        enc = cache.get(item)
                    if enc is not None:
                        out.append(enc)
                    else:
                        self.string(item)
                elif item is True:
                    out.append(cbor.TRUE)
                elif item is False:
                    out.append(cbor.FALSE)
                elif item is None:
                    out.append(cbor.NULL)
                else:
                    self.value(item, inner)
        elif isinstance(v, (list, tuple)):
            if depth >= _MAX_ENCODE_DEPTH:
                raise LocalProtocolError("JSON value nested too deeply to encode")
            if v and self.event_id_list(v):
                return
            n = len(v)
            out.append(_ARRAY_HEADS[n] if n < 24 else cbor.head(cbor.MAJOR_ARRAY, n))
            value_bytes = self.value_bytes
            cache = self.cache if self.refs is None else _NO_CACHE
            inner = depth + 1
            for item in v:
                if isinstance(item, str):
                    enc = value_bytes.get(item)
                    if enc is None:
                        enc = cache.get(item)
                    if enc is not None:
                        out.append(enc)
                    else:
                        self.string(item)
                else:
                    self.value(item, inner)
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


def _load_cenc() -> Any:
    """The C transcoder (``wire/_cenc.c``), or None (no native build,
    ``SYNAPSE_COAP_PURE=1``, or one compiled with other constants)."""
    try:
        mod = importlib.import_module("synapse_coap.wire._cenc")
    except ImportError:
        return None
    if (
        getattr(mod, "TAG_TS_DELTA", None) != TAG_TS_DELTA
        or getattr(mod, "MAX_DEPTH", None) != _MAX_ENCODE_DEPTH
        or _TS_LOW != 1 << 32
        or _TS_HIGH != 1 << 64
    ):
        logger.warning("synapse-coap: the C body transcoder has other constants: not used")
        return None
    return mod


_CENC: Any = _load_cenc()


def response_ids_fast(body: bytes, limit: int) -> tuple[str, ...] | None:
    """:func:`synapse_coap.wire.strings.response_identifiers` (at most ``limit``, 0-64)
    in one pass over the JSON text by the C transcoder's module, or None where it does
    not take the body (no native build; see ``wire/_cenc.c``): the caller then runs the
    reference."""
    if _CENC is None:
        return None
    return cast("tuple[str, ...] | None", _CENC.response_ids(body, limit))


class _Miss:
    """What the C transcoder calls for a string that is neither in the value table nor
    in the string cache: :meth:`_Encoder.string` (which fills the cache), its bytes."""

    __slots__ = ("enc",)

    def __init__(self, profile: Profile, context: WireContext) -> None:
        self.enc = _Encoder(profile, context)

    def __call__(self, s: str) -> bytes:
        out = self.enc.out
        out.clear()
        self.enc.string(s)
        return b"".join(out)


#: (profile id, content hash, server names, thread) -> the transcoder's arguments after
#: the body. Per thread: a :class:`_Miss` writes into its encoder's output list, and the
#: decode pool encodes large answers while the loop's thread encodes the others
_FAST: dict[tuple[int, bytes, tuple[str, ...], int], tuple[Any, ...]] = {}
_FAST_MAX = 64


def encode_json_fast(
    body: bytes,
    profile: Profile,
    context: WireContext = WireContext(),
    max_expansion: int = DEFAULT_BODY_LIMITS.max_expansion,
) -> bytes | None:
    """``encode_body(parse_json_exact(body), profile, context, max_expansion=...)`` in
    one pass over the JSON text by the C transcoder, or None where it does not take the
    body (floats, big integers, derived content hashes, event id lists, anything not
    plain JSON, no native build: see ``wire/_cenc.c``); the caller then runs that."""
    if _CENC is None:
        return None
    key = (profile.id, profile.content_hash, context.server_names, threading.get_ident())
    args = _FAST.get(key)
    if args is None:
        if len(_FAST) >= _FAST_MAX:
            _FAST.clear()
        t = _tables(profile)
        miss = _Miss(profile, context)
        args = _FAST[key] = (t.key_bytes, t.value_bytes, miss.enc.cache, miss)
    raw = _CENC.transcode(body, *args)
    if raw is None:
        return None
    return _plain_or_dict(raw, profile, max_expansion)


#: bodies up to this size get one DEFLATE attempt, with the dictionary when the profile has
#: one: on every body of the corpora (876 bodies up to 3.5 KB) the dictionary form was the
#: smaller; larger bodies try both
ONE_ATTEMPT_MAX = 16 * 1024


def encode_body(
    value: JSONValue,
    profile: Profile,
    context: WireContext = WireContext(),
    refs: StringRefs | None = None,
    max_expansion: int = DEFAULT_BODY_LIMITS.max_expansion,
    base: tuple[int, bytes] | None = None,
) -> bytes:
    """Encode a JSON value; the result's first byte says which encoding was used.

    ``base``: ``(d, cbor)``, a push notification's base (:mod:`~synapse_coap.wire.push_base`):
    the CBOR of the notification ``d`` Observe numbers back, which the receiver holds;
    the body may then be DEFLATE with the profile dictionary followed by that CBOR as
    preset dictionary (marker 0xfe, then ``d`` as a CBOR uint), when that is smaller.

    ``refs``: strings the receiver's session string table holds, as
    (tag, uint) references (:class:`synapse_coap.wire.strings.SenderStrings`);
    without it the output is the same as before the table existed.

    ``max_expansion``: the receiver's expansion cap (:class:`BodyLimits`; request
    bodies have a lower one than responses): a DEFLATE form that inflates more than
    that, past ``min_decoded_bytes``, would be refused, so the CBOR goes uncompressed.

    Raises LocalProtocolError if the value cannot be represented exactly
    (lone surrogates, non-string keys, non-JSON types); callers then carry raw JSON.
    """
    raw = _encode_cbor(value, profile, context, refs)
    best = raw
    if base is not None and len(raw) > 4:
        best = _smallest(
            raw, _plain_or_dict(raw, profile, max_expansion), _with_base(raw, profile, base)
        )
        if len(raw) > max(DEFAULT_BODY_LIMITS.min_decoded_bytes, max_expansion * len(best)):
            return raw
        return best
    return _plain_or_dict(raw, profile, max_expansion)


def _smallest(*forms: bytes) -> bytes:
    return min(forms, key=len)


def _with_base(raw: bytes, profile: Profile, base: tuple[int, bytes]) -> bytes:
    d, base_cbor = base
    if not 0 <= d <= 0xFFFFFFFF:
        raise ValueError(f"base distance {d} out of range")
    head = bytes((MARKER_DEFLATE_BASE,)) + cbor.head(0, d)
    return head + _deflate(raw, base_dictionary(profile, base_cbor), keep=False)


def _plain_or_dict(raw: bytes, profile: Profile, max_expansion: int) -> bytes:
    best = raw
    # (a short body that no DEFLATE form can make shorter, proven without a run: a
    # /send's or a sent message's answer, its event id's hash 32 bytes of 37-40)
    if len(raw) > 4 and not cannot_shrink(raw, profile.dictionary):
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
        if len(raw) > max(DEFAULT_BODY_LIMITS.min_decoded_bytes, max_expansion * len(best)):
            return raw  # the receiver's expansion cap would refuse the compressed form
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
