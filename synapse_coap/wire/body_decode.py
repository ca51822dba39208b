"""The body codec's decoders: the fast one (cbor2 and one pass) and the reference byte
walk, every cap checked before allocating (see :mod:`synapse_coap.wire.body`)."""

from __future__ import annotations

from typing import Any

try:
    import cbor2
except ImportError:  # pragma: no cover - a declared dependency; without it the
    cbor2 = None  # type: ignore[assignment]  # the reference decoder decodes everything

from synapse_coap.errors import LimitExceeded, RemoteProtocolError
from synapse_coap.wire import cbor
from synapse_coap.wire.body_fast import FALLBACK as _FALLBACK
from synapse_coap.wire.body_fast import decode_fast
from synapse_coap.wire.body_tables import (
    _ED25519,
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
    BaseResolver,
    BodyLimits,
    JSONValue,
    StringResolver,
    _b64_unpadded,
    _unzigzag,
    _value_from_simple,
    base_dictionary,
    content_hash,
)
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.deflate import inflate
from synapse_coap.wire.profile import Profile
from synapse_coap.wire.strings import TAG_REF, TAG_REF_WIDE


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
        #: event ids out of event-id lists (one CBOR item each, n JSON strings): capped
        #: at ``limits.max_items`` too, else a body at the item cap could still carry
        #: one id per 32 bytes of its decoded size
        self.list_ids = 0

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
                self.list_ids += len(content) // 32
                if self.list_ids > self.limits.max_items:
                    raise LimitExceeded(
                        f"body has more than {self.limits.max_items} event ids in lists"
                    )
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
                if type(value) is bytes and (not stack or stack[-1].kind != 2):
                    # (JSON has no byte strings: one is only ever a tag's content)
                    raise self.fail("byte string outside a tag")
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
    out, ended, trailing = inflate(data, zdict, limits.max_decoded_bytes + 1)
    if len(out) > limits.max_decoded_bytes:
        raise LimitExceeded(f"body inflates to more than {limits.max_decoded_bytes} bytes")
    if not ended:
        raise RemoteProtocolError("bad body: DEFLATE stream is truncated")
    if trailing:
        raise RemoteProtocolError("bad body: trailing bytes after the DEFLATE stream")
    return out


def decode_body(
    data: bytes,
    profile: Profile,
    context: WireContext = WireContext(),
    limits: BodyLimits = DEFAULT_BODY_LIMITS,
    resolve: StringResolver | None = None,
    base: BaseResolver | None = None,
) -> JSONValue:
    """Decode what :func:`encode_body` produced (RemoteProtocolError / LimitExceeded).

    ``resolve`` turns session string table references into strings
    (:meth:`synapse_coap.wire.strings.ReceiverStrings.resolver`); without it a
    reference is a RemoteProtocolError. ``base``: the bases of a push notification
    (:mod:`synapse_coap.wire.push_base`); without it a body sent relative to a base
    (marker 0xfe) is a RemoteProtocolError.
    """
    raw = body_cbor(data, profile, limits, base)
    return decode_cbor(raw, profile, context, limits.for_input(len(data)), resolve)


def body_cbor(
    data: bytes,
    profile: Profile,
    limits: BodyLimits = DEFAULT_BODY_LIMITS,
    base: BaseResolver | None = None,
) -> bytes:
    """The CBOR of an encoded body: inflated when it is DEFLATE (RemoteProtocolError /
    LimitExceeded); the caps of ``limits``, proportional to ``len(data)``."""
    if len(data) > limits.max_encoded_bytes:
        raise LimitExceeded(f"body is larger than {limits.max_encoded_bytes} bytes")
    if not data:
        raise RemoteProtocolError("bad body: empty")
    limits = limits.for_input(len(data))
    marker = data[0]
    if marker == MARKER_DEFLATE:
        return _inflate(data[1:], b"", limits)
    if marker in (MARKER_DEFLATE_DICT, MARKER_DEFLATE_BASE) and not profile.dictionary:
        raise RemoteProtocolError(
            f"bad body: dictionary-compressed, but profile {profile.id} has no dictionary"
        )
    if marker == MARKER_DEFLATE_DICT:
        return _inflate(data[1:], profile.dictionary, limits)
    if marker == MARKER_DEFLATE_BASE:
        major, _info, d, pos = cbor.read_head(data, 1)
        if major != 0 or d > 0xFFFFFFFF or data[1:pos] != cbor.head(0, d):
            raise RemoteProtocolError("bad body: bad base distance")
        if base is None:
            raise RemoteProtocolError("bad body: relative to a base, outside a push notification")
        return _inflate(data[pos:], base_dictionary(profile, base(d)), limits)
    if len(data) > limits.max_decoded_bytes:
        raise LimitExceeded(f"body is larger than {limits.max_decoded_bytes} bytes")
    return data


def decode_cbor(
    data: bytes,
    profile: Profile,
    context: WireContext = WireContext(),
    limits: BodyLimits = DEFAULT_BODY_LIMITS,
    resolve: StringResolver | None = None,
) -> JSONValue:
    """Decode the CBOR of a body (:func:`body_cbor`); ``limits`` already proportional."""
    if len(data) <= limits.max_items:
        fast = decode_fast(data, profile, context.server_names, limits, resolve)
        if fast is not _FALLBACK:
            result: JSONValue = fast
            return result
    return _Decoder(data, profile, context, limits, resolve).decode()


# =========================================================================================
# fast decoder: cbor2's native decoder, then one pass over the tree (wire/body_fast.py)
# =========================================================================================


def _decode_fast(
    data: bytes,
    profile: Profile,
    context: WireContext,
    limits: BodyLimits,
    resolve: StringResolver | None,
) -> Any:
    """The decoded value, or _FALLBACK when the reference decoder must decide."""
    return decode_fast(data, profile, context.server_names, limits, resolve)
