"""The body codec's fast decoders: the native build's C decoder, else cbor2's native
decoder and one pass over its tree (see :mod:`synapse_coap.wire.body`).

With the native build (:mod:`synapse_coap.native`), ``synapse_coap/wire/_cbody.c``
parses the CBOR and applies the tables and tags below in one pass, in C; it accepts a
subset of what the cbor2 path accepts (no bignums), answers exactly what the reference
decoder answers for it, and gives :data:`FALLBACK` for everything else, which then
takes the cbor2 path.  Without the build (or with ``SYNAPSE_COAP_PURE=1``, or if the
tag numbers it was compiled with are not this module's) only the cbor2 path runs.

cbor2 parses the CBOR (definite lengths only, no duplicate keys, the depth cap).  Its
semantic decoders are overridden for the tags it would decode natively: bignums are
decoded, our tags that share a number with one of cbor2's come back as ``CBORTag``,
every other tag cbor2 knows is refused.  A decoder object is reused (a small pool per
context and depth cap), since handing cbor2 its semantic decoders costs more per call
than the parse.  No tag hook: every other tag comes back as ``CBORTag``, and one Python
pass over the tree, in document order, applies all of ours (identifiers, base64,
sigils, server names, ``mxc://``, timestamp deltas, string references, derived hashes)
together with the map keys and the value table.  Converting a tag in the pass costs
less than in a hook: cbor2 calls no Python per tag, and the pass visits the tag anyway.

Anything the pass does not accept completely (an unknown tag, a type JSON has no
place for, a tag that wraps something unexpected, a duplicate key after the tables
are applied, ...) gives :data:`FALLBACK`, and the reference decoder
(:class:`synapse_coap.wire.body_decode._Decoder`) gives the answer or the error, so
the two never disagree (``tests/unit/test_body.py::test_fast_decoder_*``).
"""

from __future__ import annotations

import binascii
import io
import logging
from collections.abc import Callable
from typing import Any

try:
    import cbor2
except ImportError:  # pragma: no cover - a declared dependency; without it the
    cbor2 = None  # type: ignore[assignment]  # the reference decoder decodes everything

from synapse_coap.errors import RemoteProtocolError
from synapse_coap.wire.body_tables import (
    _ED25519,
    _TS_HIGH,
    _TS_LOW,
    CBODY,
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
    BodyLimits,
    StringResolver,
    _simple_index,
    _value_from_simple,
    _zigzag,
    content_hash,
    python_content_hash,
)
from synapse_coap.wire.profile import Profile
from synapse_coap.wire.strings import TAG_REF, TAG_REF_WIDE

logger = logging.getLogger(__name__)

#: what :func:`decode_fast` returns when the reference decoder must decide
FALLBACK: Any = object()


class _Fallback(Exception):
    """The fast path does not accept this input; the reference decoder decides."""


class _Derived:
    """Placeholder for a ``hashes`` value the decoder recomputes."""


_DERIVED = _Derived()
#: tags cbor2 decodes natively that are not ours (dates, shared values, string
#: references, ...): refused, so they never take effect
_CBOR2_NATIVE_FOREIGN = (0, 1, 25, 28, 29, 30, 256, 258, 260, 261, 1004, 43000, 55799)
#: tags cbor2 decodes natively that are ours: string references (4, 5) and sigils with
#: a 2-byte tag; they come back as CBORTag for the pass
_CBOR2_NATIVE_OURS = (TAG_REF, TAG_REF_WIDE, 35, 36, 37, 52, 54, 100)
_CBOR_TAG: Any = getattr(cbor2, "CBORTag", None)
_CBOR_SIMPLE: Any = getattr(cbor2, "CBORSimpleValue", None)
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_b2a = binascii.b2a_base64
_Semantic = Callable[[Any, bool], Any]


def _refuse(value: Any, immutable: bool = False) -> Any:
    raise _Fallback


def _keep(tag: int) -> _Semantic:
    return lambda value, immutable: _CBOR_TAG(tag, value)


def _bignum(negative: bool) -> _Semantic:
    def decode(value: Any, immutable: bool) -> int:
        if type(value) is not bytes:
            raise _Fallback
        n = int.from_bytes(value, "big")
        return -1 - n if negative else n

    return decode


def _semantic() -> dict[int, _Semantic]:
    """cbor2's semantic decoders: every tag it would decode natively overridden (ours
    kept as CBORTag for the pass, bignums decoded, the others refused)."""
    sem: dict[int, _Semantic] = dict.fromkeys(_CBOR2_NATIVE_FOREIGN, _refuse)
    sem[TAG_BIGNUM_POS] = _bignum(False)
    sem[TAG_BIGNUM_NEG] = _bignum(True)
    for tag in _CBOR2_NATIVE_OURS:
        sem[tag] = _keep(tag)
    return sem


def _affixes(names: tuple[str, ...]) -> dict[int, tuple[str, str]]:
    """Tag -> (prefix, suffix) for the tags that put text between a fixed prefix and
    suffix: sigils, ed25519 key ids, ``mxc://`` (only for the context's server names)."""
    affixes: dict[int, tuple[str, str]] = {TAG_ED25519_KEY_ID: (_ED25519, "")}
    for k, name in enumerate(names):
        for s, prefix in enumerate(SIGILS):
            affixes[TAG_SIGIL_BASE + 4 * k + s] = (prefix, ":" + name)
            if k < 2:
                affixes[TAG_SIGIL_0 + 4 * k + s] = (prefix, ":" + name)
        affixes[TAG_MXC_BASE + k] = ("mxc://" + name + "/", "")
        if k == 0:
            affixes[TAG_MXC_0] = ("mxc://" + name + "/", "")
    return affixes


#: the tag numbers the C decoder must have been compiled with (its ``TAGS``)
_C_TAGS = {
    "TAG_REF": TAG_REF,
    "TAG_REF_WIDE": TAG_REF_WIDE,
    "TAG_EVENT_ID": TAG_EVENT_ID,
    "TAG_ROOM_HASH_ID": TAG_ROOM_HASH_ID,
    "TAG_B64": TAG_B64,
    "TAG_B64URL": TAG_B64URL,
    "TAG_SERVER": TAG_SERVER,
    "TAG_EVENT_ID_LIST": TAG_EVENT_ID_LIST,
    "TAG_TS_DELTA": TAG_TS_DELTA,
    "TAG_DERIVED_SHA256": TAG_DERIVED_SHA256,
    "_TS_LOW": _TS_LOW,
}


def _load_c() -> Any:
    """The C decoder module, or None (no native build, SYNAPSE_COAP_PURE=1, or one
    compiled with other tag numbers)."""
    mod = CBODY
    if mod is None:
        return None
    if getattr(mod, "TAGS", None) != _C_TAGS or _TS_HIGH != 1 << 64:
        logger.warning("synapse-coap: the C body decoder has other tag numbers: not used")
        return None
    return mod


_C: Any = _load_c()


def c_tables(mod: Any, profile: Profile, names: tuple[str, ...]) -> Any:
    """The C decoder's tables for one profile and context (``names``: the server names
    a body may reference, at most :data:`MAX_SERVER_REFS`), or None when they do not fit
    it (then only the cbor2 path runs)."""
    values = profile.values
    simple: list[str | None] = [None] * 256
    for n in (*range(20), *range(32, 256)):
        i = _value_from_simple(n)
        if i < len(values):
            simple[n] = values[i]
    try:
        return mod.Tables(
            tuple(profile.keys),
            tuple(simple),
            _affixes(names),
            names,
            FALLBACK,
            python_content_hash,  # (for what the module's own hash does not take)
        )
    except (TypeError, ValueError):
        return None


def dump_json_c(value: Any) -> bytes | None:
    """The C writer's JSON text of a decoded value (``wire/_cbody.c``: what
    ``mapping.jsonbody.dump_json`` gives, byte for byte), or None: no native build, or a
    value it does not take (a float, a lone surrogate, ...), which the caller then gives
    to Python's json. Cheaper than json's Python layer where it counts: once per request
    body, with the CPU's caches cold from the homeserver's own work."""
    if _C is None:
        return None
    out: bytes | None = _C.dump_json(value)
    return out


class _Context:
    """What the fast decoders need for one profile and context, built once."""

    __slots__ = ("affix", "ctables", "kget", "names", "pools", "semantic", "sget")

    def __init__(self, profile: Profile, servers: tuple[str, ...]) -> None:
        #: the integer a map key is sent as -> the key
        self.kget = {_zigzag(i): k for i, k in enumerate(profile.keys)}.get
        #: CBOR simple value number -> the value-table string
        self.sget = {_simple_index(i): v for i, v in enumerate(profile.values)}.get
        self.names = servers[:MAX_SERVER_REFS]
        self.affix = _affixes(self.names).get
        self.semantic = _semantic()
        #: max_depth -> decoders ready for reuse (one per concurrent decode at most)
        self.pools: dict[int, list[Any]] = {}
        #: the C decoder's tables (None: no C decoder)
        self.ctables: Any = None if _C is None else c_tables(_C, profile, self.names)


_CONTEXTS: dict[tuple[int, bytes, tuple[str, ...]], _Context] = {}
_MAX_CONTEXTS = 64
_POOL_MAX = 4
_EMPTY = io.BytesIO(b"")


def _context(profile: Profile, servers: tuple[str, ...]) -> _Context:
    key = (profile.id, profile.content_hash, servers)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        if len(_CONTEXTS) >= _MAX_CONTEXTS:
            _CONTEXTS.clear()
        ctx = _CONTEXTS[key] = _Context(profile, servers)
    return ctx


def _parse(ctx: _Context, data: bytes, max_depth: int) -> Any:
    """cbor2's tree of ``data`` (bignums decoded, our tags as CBORTag), or FALLBACK.
    Decoder objects are reused: handing cbor2 its semantic decoders costs more than a
    small parse."""
    pool = ctx.pools.get(max_depth)
    if pool is None:
        pool = ctx.pools.setdefault(max_depth, [])
    try:
        dec = pool.pop()
    except IndexError:
        dec = cbor2.CBORDecoder(
            _EMPTY,
            semantic_decoders=ctx.semantic,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    fp = io.BytesIO(data)
    dec.fp = fp
    try:
        tree = dec.decode()
    except (cbor2.CBORDecodeError, _Fallback, ValueError, TypeError, OverflowError, RecursionError):
        return FALLBACK  # the decoder is dropped: no state of a failed decode is reused
    dec.fp = _EMPTY  # do not keep the body alive
    if len(pool) < _POOL_MAX:
        pool.append(dec)
    if fp.tell() != len(data):
        return FALLBACK  # trailing bytes
    return tree


def decode_fast(
    data: bytes,
    profile: Profile,
    servers: tuple[str, ...],
    limits: BodyLimits,
    resolve: StringResolver | None,
) -> Any:
    """The decoded value of the CBOR ``data``, or FALLBACK when the reference decoder
    must decide.  Only for ``len(data) <= limits.max_items`` (so the item count cannot
    go over its cap, nor the event ids of lists: every item takes at least one byte, an
    id 32).  cbor2's depth limit counts like the reference decoder's (non-empty arrays
    and maps, and tags)."""
    ctx = _context(profile, servers)
    if ctx.ctables is not None:
        value = _C.decode(data, ctx.ctables, limits.max_depth, resolve)
        if value is not FALLBACK:
            return value
    if cbor2 is None:  # pragma: no cover
        return FALLBACK
    tree = _parse(ctx, data, limits.max_depth)
    if tree is FALLBACK:
        return FALLBACK
    try:
        return _walk(tree, ctx, resolve)
    except (_Fallback, RemoteProtocolError):
        return FALLBACK


class _State:
    """What one walk carries: the context's tables, the resolver, and the base of the
    next timestamp delta (the last int in [_TS_LOW, _TS_HIGH) in value position)."""

    __slots__ = ("affix", "kget", "names", "prev", "resolve", "sget")

    def __init__(self, ctx: _Context, resolve: StringResolver | None) -> None:
        self.kget = ctx.kget
        self.sget = ctx.sget
        self.affix = ctx.affix
        self.names = ctx.names
        self.resolve = resolve
        self.prev: int | None = None


def _walk(tree: Any, ctx: _Context, resolve: StringResolver | None) -> Any:
    """One walk over cbor2's tree in document order (so timestamp deltas resolve as the
    reference decoder resolves them): map keys, the value table, every tag of ours, the
    type of every value.  Maps are rebuilt, arrays (made by cbor2 for this call only)
    patched in place.  Module-level functions over locals: this is the codec's hottest
    Python code."""
    st = _State(ctx, resolve)
    t = type(tree)
    if t is dict:
        return _map(tree, st) if tree else tree
    if t is list:
        if tree:
            _list(tree, st)
        return tree
    if t is _CBOR_TAG:
        v = _tag(tree, st)
        if v is _DERIVED:
            raise _Fallback
        return v
    if t is _CBOR_SIMPLE:
        v = st.sget(tree.value)
        if v is None:
            raise _Fallback
        return v
    if t is str or t is int or t is float or t is bool or tree is None:
        return tree
    raise _Fallback


def _tag(x: Any, st: _State) -> Any:
    """The value of one of our tags (the most frequent first), _DERIVED for a derived
    hash; _Fallback for any other tag or content."""
    tag = x.tag
    v = x.value
    a = st.affix(tag)
    if a is not None:
        if type(v) is not str:
            raise _Fallback
        return a[0] + v + a[1]
    if tag == TAG_EVENT_ID_LIST:
        if type(v) is not bytes or not v or len(v) % 32:
            raise _Fallback
        if len(v) == 32:
            return ["$" + _b2a(v, newline=False).translate(_URL_SAFE, b"=").decode("ascii")]
        out = []  # a loop, not a comprehension: cheaper for the two or three ids of a PDU
        for i in range(0, len(v), 32):
            out.append(
                "$" + _b2a(v[i : i + 32], newline=False).translate(_URL_SAFE, b"=").decode("ascii")
            )
        return out
    if tag in (TAG_EVENT_ID, TAG_ROOM_HASH_ID):
        if type(v) is not bytes or len(v) != 32:
            raise _Fallback
        sigil = "$" if tag == TAG_EVENT_ID else "!"
        return sigil + _b2a(v, newline=False).translate(_URL_SAFE, b"=").decode("ascii")
    if tag == TAG_SERVER:
        if type(v) is not int or not 0 <= v < len(st.names):
            raise _Fallback
        return st.names[v]
    if tag == TAG_TS_DELTA:
        prev = st.prev
        if type(v) is not int or prev is None:
            raise _Fallback
        n = prev + v
        if not _TS_LOW <= n < _TS_HIGH:
            raise _Fallback
        st.prev = n
        return n
    if tag in (TAG_B64, TAG_B64URL):
        if type(v) is not bytes:
            raise _Fallback
        b = _b2a(v, newline=False).rstrip(b"=")
        return (b if tag == TAG_B64 else b.translate(_URL_SAFE)).decode("ascii")
    if tag == TAG_DERIVED_SHA256 and v is None:
        return _DERIVED
    if tag in (TAG_REF, TAG_REF_WIDE):
        if type(v) is not int or v < 0 or st.resolve is None:
            raise _Fallback
        return st.resolve(tag, v)
    raise _Fallback


def _key(k: Any, st: _State) -> str:
    """A map key that is not an integer of the key table nor text."""
    t = type(k)
    if t is _CBOR_SIMPLE:
        s = st.sget(k.value)
        if s is None:
            raise _Fallback
        return s
    if t is _CBOR_TAG and k.tag != TAG_TS_DELTA:
        s = _tag(k, st)
        if type(s) is str:
            return s
    raise _Fallback


def _map(x: dict[Any, Any], st: _State) -> dict[str, Any]:
    kget = st.kget
    tag_type = _CBOR_TAG
    d: dict[str, Any] = {}
    derived = False
    for k, v in x.items():
        if type(k) is int:
            k = kget(k)
            if k is None:
                raise _Fallback
        elif type(k) is not str:
            k = _key(k, st)
        t = type(v)
        if t is str:
            pass
        elif t is tag_type:
            v = _tag(v, st)
            if v is _DERIVED:
                if k != "hashes":
                    raise _Fallback
                derived = True
        elif t is dict:
            if v:
                v = _map(v, st)
        elif t is list:
            if v:
                _list(v, st)
        elif t is int:
            if _TS_LOW <= v < _TS_HIGH:
                st.prev = v
        elif t is _CBOR_SIMPLE:
            v = st.sget(v.value)
            if v is None:
                raise _Fallback
        elif not (t is bool or v is None or t is float):
            raise _Fallback
        d[k] = v
    if len(d) != len(x):
        raise _Fallback  # two keys that are one after the tables
    if derived:
        h = content_hash(d)
        if h is None:
            raise _Fallback
        d["hashes"] = {"sha256": h}
    return d


def _list(x: list[Any], st: _State) -> None:
    for i, v in enumerate(x):
        t = type(v)
        if t is str:
            pass
        elif t is dict:
            if v:
                x[i] = _map(v, st)
        elif t is _CBOR_TAG:
            v = _tag(v, st)
            if v is _DERIVED:
                raise _Fallback
            x[i] = v
        elif t is list:
            if v:
                _list(v, st)
        elif t is int:
            if _TS_LOW <= v < _TS_HIGH:
                st.prev = v
        elif t is _CBOR_SIMPLE:
            v = st.sget(v.value)
            if v is None:
                raise _Fallback
            x[i] = v
        elif not (t is bool or v is None or t is float):
            raise _Fallback
