"""The body codec's fast decoder: cbor2's native decoder and one pass over its tree
(see :mod:`synapse_coap.wire.body`).

cbor2 parses the CBOR (definite lengths only, no duplicate keys, the depth cap) and
applies the *stateless* private tags itself, through semantic decoders built once
per profile and context: identifiers, base64, sigils, server names, ``mxc://``,
bignums.  A decoder object is reused (a small pool per context and depth cap), since
handing cbor2 a table of semantic decoders costs more per call than the parse.  One
Python pass then applies what depends on the document order or the session: map
keys, the value table, timestamp deltas, string references and derived hashes.

Anything the pass does not accept completely (an unknown tag, a type JSON has no
place for, a tag that wraps something unexpected, a duplicate key after the tables
are applied, ...) gives :data:`FALLBACK`, and the reference decoder
(:class:`synapse_coap.wire.body_decode._Decoder`) gives the answer or the error, so
the two never disagree (``tests/unit/test_body.py::test_fast_decoder_*``).
"""

from __future__ import annotations

import binascii
import io
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
    _b64_unpadded,
    _simple_index,
    _zigzag,
    content_hash,
)
from synapse_coap.wire.profile import Profile
from synapse_coap.wire.strings import TAG_REF, TAG_REF_WIDE

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
_CBOR_TAG: Any = getattr(cbor2, "CBORTag", None)
_CBOR_SIMPLE: Any = getattr(cbor2, "CBORSimpleValue", None)
_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_b2a = binascii.b2a_base64
_Semantic = Callable[[Any, bool], Any]
_Convert = Callable[[Any], Any]


def _refuse(value: Any, immutable: bool = False) -> Any:
    raise _Fallback


def _keep(tag: int) -> _Semantic:
    """Tags the pass applies (they depend on the order or the session)."""
    return lambda value, immutable: _CBOR_TAG(tag, value)


def _hash_id(sigil: str) -> _Convert:
    def decode(value: Any) -> str:
        if type(value) is not bytes or len(value) != 32:
            raise _Fallback
        return sigil + _b2a(value, newline=False).translate(_URL_SAFE, b"=").decode("ascii")

    return decode


def _b64(url: bool) -> _Convert:
    def decode(value: Any) -> str:
        if type(value) is not bytes:
            raise _Fallback
        return _b64_unpadded(value, url)

    return decode


def _event_id_list(value: Any) -> list[str]:
    if type(value) is not bytes or not value or len(value) % 32:
        raise _Fallback
    out = []  # a loop, not a comprehension: cheaper for the one to three ids of a PDU
    for i in range(0, len(value), 32):
        out.append("$" + _b2a(value[i : i + 32], newline=False).translate(_URL_SAFE, b"=").decode())
    return out


def _bignum(negative: bool) -> _Semantic:
    def decode(value: Any, immutable: bool) -> int:
        if type(value) is not bytes:
            raise _Fallback
        n = int.from_bytes(value, "big")
        return -1 - n if negative else n

    return decode


def _ed25519(value: Any) -> str:
    if type(value) is not str:
        raise _Fallback
    return _ED25519 + value


def _conversions(servers: tuple[str, ...]) -> dict[int, _Convert]:
    """Tag -> the conversion of its content, for every stateless tag of ours (those
    that depend only on the content and the context's server names)."""
    names = servers[:MAX_SERVER_REFS]

    def server_tag(value: Any) -> str:
        if type(value) is not int or not 0 <= value < len(names):
            raise _Fallback
        return names[value]

    def sigil(prefix: str, k: int) -> _Convert:
        if k >= len(names):
            return _refuse
        suffix = ":" + names[k]

        def decode(value: Any) -> str:
            if type(value) is not str:
                raise _Fallback
            return prefix + value + suffix

        return decode

    def mxc(k: int) -> _Convert:
        if k >= len(names):
            return _refuse
        prefix = "mxc://" + names[k] + "/"

        def decode(value: Any) -> str:
            if type(value) is not str:
                raise _Fallback
            return prefix + value

        return decode

    conv: dict[int, _Convert] = {
        TAG_EVENT_ID: _hash_id("$"),
        TAG_ROOM_HASH_ID: _hash_id("!"),
        TAG_B64: _b64(False),
        TAG_B64URL: _b64(True),
        TAG_SERVER: server_tag,
        TAG_EVENT_ID_LIST: _event_id_list,
        TAG_ED25519_KEY_ID: _ed25519,
        TAG_MXC_0: mxc(0),
    }
    for k in range(2):
        for s, prefix in enumerate(SIGILS):
            conv[TAG_SIGIL_0 + 4 * k + s] = sigil(prefix, k)
    for k in range(MAX_SERVER_REFS):
        for s, prefix in enumerate(SIGILS):
            conv[TAG_SIGIL_BASE + 4 * k + s] = sigil(prefix, k)
        conv[TAG_MXC_BASE + k] = mxc(k)
    return conv


def _decoders(
    conv: dict[int, _Convert], servers: tuple[str, ...]
) -> tuple[dict[int, _Semantic], Callable[[Any, bool], Any]]:
    """cbor2's semantic decoders (the tags it would decode natively: ours are
    overridden, the others refused) and its tag hook (every other tag: ours are
    converted, the rest come back as CBORTag for the pass, which refuses unknown ones).

    The hook is cheaper per tag than cbor2's semantic decoders, so only the tags
    cbor2 would otherwise decode itself go through them."""
    sem: dict[int, _Semantic] = dict.fromkeys(_CBOR2_NATIVE_FOREIGN, _refuse)
    sem[TAG_BIGNUM_POS] = _bignum(False)
    sem[TAG_BIGNUM_NEG] = _bignum(True)
    sem[TAG_REF] = _keep(TAG_REF)
    sem[TAG_REF_WIDE] = _keep(TAG_REF_WIDE)
    for tag in _CBOR2_NATIVE_OURS:
        f = conv[tag]
        sem[tag] = lambda value, immutable, f=f: f(value)  # type: ignore[misc]
    get = conv.get
    b2a = _b2a
    url_safe = _URL_SAFE
    names = servers[:MAX_SERVER_REFS]
    n_names = len(names)
    # the tags that put text between a fixed prefix and suffix: sigils, ed25519, mxc
    affixes: dict[int, tuple[str, str]] = {TAG_ED25519_KEY_ID: (_ED25519, "")}
    for k, name in enumerate(names):
        for s, prefix in enumerate(SIGILS):
            affixes[TAG_SIGIL_BASE + 4 * k + s] = (prefix, ":" + name)
            if k < 2:
                affixes[TAG_SIGIL_0 + 4 * k + s] = (prefix, ":" + name)
        affixes[TAG_MXC_BASE + k] = ("mxc://" + name + "/", "")
        if k == 0:
            affixes[TAG_MXC_0] = ("mxc://" + name + "/", "")
    affix = affixes.get

    def hook(t: Any, immutable: bool) -> Any:
        tag = t.tag
        v = t.value
        # the common tags inline (a call less each), the rest by table
        a = affix(tag)
        if a is not None:
            if type(v) is not str:
                raise _Fallback
            return a[0] + v + a[1]
        if tag == TAG_SERVER and type(v) is int and 0 <= v < n_names:
            return names[v]
        if tag == TAG_EVENT_ID_LIST and type(v) is bytes and len(v) == 32:
            return ["$" + b2a(v, newline=False).translate(url_safe, b"=").decode("ascii")]
        if tag in (TAG_EVENT_ID, TAG_ROOM_HASH_ID) and type(v) is bytes and len(v) == 32:
            sigil = "$" if tag == TAG_EVENT_ID else "!"
            return sigil + b2a(v, newline=False).translate(url_safe, b"=").decode("ascii")
        if tag == TAG_B64 and type(v) is bytes:
            return b2a(v, newline=False).rstrip(b"=").decode("ascii")
        f = get(tag)
        if f is None:
            return t  # TAG_TS_DELTA, TAG_DERIVED_SHA256 or not ours: the pass decides
        return f(v)

    return sem, hook


#: tags cbor2 decodes natively that are ours (sigils with a 2-byte tag)
_CBOR2_NATIVE_OURS = (35, 36, 37, 52, 54, 100)


class _Context:
    """What the fast decoder needs for one profile and context, built once."""

    __slots__ = ("hook", "kget", "pools", "semantic", "sget")

    def __init__(self, profile: Profile, servers: tuple[str, ...]) -> None:
        #: the integer a map key is sent as -> the key
        self.kget = {_zigzag(i): k for i, k in enumerate(profile.keys)}.get
        #: CBOR simple value number -> the value-table string
        self.sget = {_simple_index(i): v for i, v in enumerate(profile.values)}.get
        self.semantic, self.hook = _decoders(_conversions(servers), servers)
        #: max_depth -> decoders ready for reuse (one per concurrent decode at most)
        self.pools: dict[int, list[Any]] = {}


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
    """cbor2's tree of ``data`` (stateless tags applied), or FALLBACK.  Decoder objects
    are reused: handing cbor2 its semantic decoders costs more than a small parse."""
    pool = ctx.pools.get(max_depth)
    if pool is None:
        pool = ctx.pools.setdefault(max_depth, [])
    try:
        dec = pool.pop()
    except IndexError:
        dec = cbor2.CBORDecoder(
            _EMPTY,
            semantic_decoders=ctx.semantic,
            tag_hook=ctx.hook,
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
    go over its cap: every item takes at least one byte).  cbor2's depth limit counts
    like the reference decoder's (non-empty arrays and maps, and tags)."""
    if cbor2 is None:  # pragma: no cover
        return FALLBACK
    ctx = _context(profile, servers)
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

    __slots__ = ("kget", "prev", "resolve", "sget")

    def __init__(self, ctx: _Context, resolve: StringResolver | None) -> None:
        self.kget = ctx.kget
        self.sget = ctx.sget
        self.resolve = resolve
        self.prev: int | None = None


def _walk(tree: Any, ctx: _Context, resolve: StringResolver | None) -> Any:
    """One walk over cbor2's tree in document order (so timestamp deltas resolve as the
    reference decoder resolves them): map keys, the value table, the tags cbor2 left
    (deltas, string references, derived hashes), the type of every value.  Maps are
    rebuilt, arrays (made by cbor2 for this call only) patched in place.  Module-level
    functions over locals: this is the codec's hottest Python code."""
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
    if t is str or t is int or t is float or t is bool or tree is None or t is bytes:
        return tree
    raise _Fallback


def _ref(tag: int, v: Any, st: _State) -> str:
    if type(v) is not int or v < 0 or st.resolve is None:
        raise _Fallback
    return st.resolve(tag, v)


def _tag(x: Any, st: _State) -> Any:
    tag = x.tag
    v = x.value
    if tag == TAG_TS_DELTA:
        prev = st.prev
        if type(v) is not int or prev is None:
            raise _Fallback
        n = prev + v
        if not _TS_LOW <= n < _TS_HIGH:
            raise _Fallback
        st.prev = n
        return n
    if tag in (TAG_REF, TAG_REF_WIDE):
        return _ref(tag, v, st)
    if tag == TAG_DERIVED_SHA256 and v is None:
        return _DERIVED
    raise _Fallback


def _key(k: Any, st: _State) -> str:
    t = type(k)
    if t is _CBOR_SIMPLE:
        s = st.sget(k.value)
        if s is None:
            raise _Fallback
        return s
    if t is _CBOR_TAG and k.tag in (TAG_REF, TAG_REF_WIDE):
        return _ref(k.tag, k.value, st)
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
        elif t is dict:
            if v:
                v = _map(v, st)
        elif t is list:
            if v:
                _list(v, st)
        elif t is int:
            if _TS_LOW <= v < _TS_HIGH:
                st.prev = v
        elif t is tag_type:
            v = _tag(v, st)
            if v is _DERIVED:
                if k != "hashes":
                    raise _Fallback
                derived = True
        elif t is _CBOR_SIMPLE:
            v = st.sget(v.value)
            if v is None:
                raise _Fallback
        elif not (t is bool or v is None or t is float or t is bytes):
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
        elif t is list:
            if v:
                _list(v, st)
        elif t is int:
            if _TS_LOW <= v < _TS_HIGH:
                st.prev = v
        elif t is _CBOR_TAG:
            v = _tag(v, st)
            if v is _DERIVED:
                raise _Fallback
            x[i] = v
        elif t is _CBOR_SIMPLE:
            v = st.sget(v.value)
            if v is None:
                raise _Fallback
            x[i] = v
        elif not (t is bool or v is None or t is float or t is bytes):
            raise _Fallback
