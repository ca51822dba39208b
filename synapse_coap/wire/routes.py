"""The route table: a Matrix request path <-> a short route id plus compressed arguments.

A path such as ``/_matrix/client/v3/rooms/!abc:example.org/send/m.room.message/m17.3``
becomes the Uri-Path option values ``["s", <room>, <event type>, <txn id>]``:

* **route id** (first value): one or two characters from ``[0-9a-zA-Z]`` naming a
  path template (``maps/profile-1/routes.json``, generated from Synapse's own
  servlets by ``scripts/gen-routes``).  An optional trailing *suffix* character
  from :data:`SUFFIXES` says which percent-encoding style the arguments used and
  carries the codec's flags (bit 0: "no Authorization").  Route ids never start
  with ``_`` or ``.``, so plain paths from standard CoAP tools
  (``_matrix``, ``client``, ``versions`` / ``.well-known``, ``core``) are told apart.
* **arguments** (one value each, valid UTF-8 as Uri-Path requires): the
  percent-decoded value, compressed by :func:`encode_arg` (sigil stripped, a
  known server name replaced by a one-character reference, enum-like values
  from a table, identifiers packed 7 bits per byte).

The whole path must come back byte for byte (X-Matrix signs it):
:meth:`RouteTable.encode_target` decodes what it encoded and returns ``None``
if anything differs; the caller then carries the target literally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import attrs

from synapse_coap.errors import LocalProtocolError, RemoteProtocolError
from synapse_coap.wire.context import WireContext

#: Characters a route id is made of (never ``_`` or ``.``).
ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Route-id suffixes: index ``i`` (1-7) = ``style + 4 * flags``; no suffix = 0.
SUFFIXES = "!$&'()*"
#: Flag bit carried in the suffix: the request has no Authorization header.
FLAG_NO_AUTH = 1
MAX_FLAGS = 1

#: Percent-encoding styles, tried in this order (the first that reproduces
#: every argument wins): 0 Python ``quote(v, safe="")`` (matrix-nio,
#: Synapse's federation client), 1 not escaped at all (``!room:server``),
#: 2 JavaScript ``encodeURIComponent`` (Element), 3 RFC 3986 pchar-safe.
STYLE_SAFE: tuple[str | None, ...] = ("", None, "!'()*", "!$&'()*+,;=:@")

SIGILS: Mapping[str, str] = {"room": "!", "event": "$", "user": "@", "alias": "#"}

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
B64STD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGITS_DOT = "0123456789."
HEX_DASH = "0123456789abcdef-"

#: Packers, by index: (required prefix, alphabet).  Index 0 = not packed.
PACKERS: tuple[tuple[str, str], ...] = (
    ("", ""),
    ("", B64URL),
    ("", LETTERS),
    ("", ALNUM),
    ("", DIGITS_DOT),
    ("m", DIGITS_DOT),
    ("", HEX_DASH),
    ("", B64STD),
)
_PACKER_INDEX = {a: {c: i for i, c in enumerate(a)} for _p, a in PACKERS}

# Argument form bytes (the first character when it is below 0x20):
FORM_LITERAL = 0x00  # the value follows verbatim
FORM_PACKED_FIRST = 0x01  # 0x01-0x10: 1 + packer * 2 + has_server_ref
FORM_SERVER = 0x11  # the whole value is server_names[ord(next char)]
FORM_ENUM_FIRST = 0x12  # 0x12-0x1e: enums[form - 0x12]
ENUM_DIRECT = 0x1F - FORM_ENUM_FIRST  # 13 one-byte enum values
FORM_ENUM_EXT = 0x1F  # enums[13 + ord(next char)]
#: In a request numbered for the session string table (wire/strings.py) only: the
#: argument is an identifier the receiver recorded, ``(d - 1) * MAX_IDS + pos`` in
#: one or two base-128 characters after this one.  Without a table, a value
#: starting with it is an ordinary (bare) value, as before.
FORM_STRING_REF = 0x7F

#: Resolves a path reference number (``(d - 1) * MAX_IDS + pos``) to its identifier.
PathResolver = Callable[[int], str]

#: Longest Uri-Path value (RFC 7252 5.10).
MAX_SEGMENT = 255


def _pack(text: str, alphabet: str) -> str:
    index = _PACKER_INDEX[alphabet]
    n = 1
    base = len(alphabet)
    for ch in text:
        n = n * base + index[ch]
    out: list[str] = []
    while n:
        n, d = divmod(n, 128)
        out.append(chr(d))
    return "".join(reversed(out))


def _unpack(text: str, alphabet: str) -> str:
    if not text or len(text) > MAX_SEGMENT:
        raise RemoteProtocolError("bad packed route argument")
    n = 0
    for ch in text:
        o = ord(ch)
        if o >= 128:
            raise RemoteProtocolError("bad packed route argument")
        n = n * 128 + o
    base = len(alphabet)
    out: list[str] = []
    while n > 1:
        n, d = divmod(n, base)
        out.append(alphabet[d])
    if n != 1:
        raise RemoteProtocolError("bad packed route argument")
    return "".join(reversed(out))


def _ref_chars(number: int) -> str:
    if number < 128:
        return chr(FORM_STRING_REF) + chr(number)
    if number < 128 * 128:
        return chr(FORM_STRING_REF) + chr(number >> 7) + chr(number & 127)
    raise LocalProtocolError(f"path reference {number} out of range")


def _ref_number(text: str) -> int:
    digits = [ord(c) for c in text[1:]]
    if (
        not 1 <= len(digits) <= 2
        or any(d >= 128 for d in digits)
        or digits[0] == 0 < len(digits) - 1
    ):
        raise RemoteProtocolError("bad string reference in route argument")
    number = 0
    for d in digits:
        number = number * 128 + d
    return number


def decode_arg(
    text: str,
    kind: str,
    context: WireContext,
    enums: Sequence[str],
    resolve: PathResolver | None = None,
) -> str:
    """Inverse of :func:`encode_arg`; RemoteProtocolError on anything malformed.

    ``resolve``: the session string table of a numbered request (None: no table)."""
    sigil = SIGILS.get(kind, "")
    if resolve is not None and text[:1] == chr(FORM_STRING_REF):
        return resolve(_ref_number(text))
    if not text or ord(text[0]) >= 0x20:
        return sigil + text
    form = ord(text[0])
    if form == FORM_LITERAL:
        return text[1:]
    if form == FORM_SERVER:
        if len(text) != 2:
            raise RemoteProtocolError("bad server reference in route argument")
        return _server(context, ord(text[1]))
    if FORM_ENUM_FIRST <= form < FORM_ENUM_EXT:
        if len(text) != 1:
            raise RemoteProtocolError("bad enum reference in route argument")
        return _enum(enums, form - FORM_ENUM_FIRST)
    if form == FORM_ENUM_EXT:
        if len(text) != 2:
            raise RemoteProtocolError("bad enum reference in route argument")
        return _enum(enums, ENUM_DIRECT + ord(text[1]))
    packer, has_server = divmod(form - FORM_PACKED_FIRST, 2)
    pos = 1
    suffix = ""
    if has_server:
        if len(text) < 2:
            raise RemoteProtocolError("truncated route argument")
        suffix = ":" + _server(context, ord(text[1]))
        pos = 2
    body = text[pos:]
    prefix, alphabet = PACKERS[packer]
    if alphabet:
        body = prefix + _unpack(body, alphabet)
    return sigil + body + suffix


def _server(context: WireContext, index: int) -> str:
    if index >= len(context.server_names):
        raise RemoteProtocolError(f"unknown server name reference {index}")
    return context.server_names[index]


def _enum(enums: Sequence[str], index: int) -> str:
    if index >= len(enums):
        raise RemoteProtocolError(f"unknown enum reference {index}")
    return enums[index]


def encode_arg(
    value: str,
    kind: str,
    context: WireContext,
    enums: Sequence[str],
    enum_index: Mapping[str, int] | None = None,
    refs: Mapping[str, int] | None = None,
) -> str:
    """The shortest form of ``value`` (by UTF-8 bytes) that :func:`decode_arg` reverses exactly.

    ``refs``: identifier -> path reference number, for a request numbered for the
    session string table (None: no table)."""
    if enum_index is None:
        enum_index = {e: i for i, e in enumerate(enums)}
    candidates = ["\x00" + value]
    resolve: PathResolver | None = None
    if refs is not None:
        if value in refs:
            candidates.append(_ref_chars(refs[value]))
        resolve = _resolver_for(refs)
    sigil = SIGILS.get(kind, "")
    i = enum_index.get(value)
    if i is not None:
        if i < ENUM_DIRECT:
            candidates.append(chr(FORM_ENUM_FIRST + i))
        elif i - ENUM_DIRECT < 128:
            candidates.append(chr(FORM_ENUM_EXT) + chr(i - ENUM_DIRECT))
    si = context.server_index(value)
    if si is not None and si < 128:
        candidates.append(chr(FORM_SERVER) + chr(si))
    if value.startswith(sigil):
        body = value[len(sigil) :]
        candidates.append(body)
        parts: list[tuple[str, int | None]] = [(body, None)]
        if ":" in body:
            local, server = body.split(":", 1)
            ref = context.server_index(server)
            if ref is not None and ref < 128:
                parts.append((local, ref))
        for local, ref in parts:
            head = "" if ref is None else chr(ref)
            if ref is not None:
                candidates.append(chr(FORM_PACKED_FIRST + 1) + head + local)
            for p, (prefix, alphabet) in enumerate(PACKERS):
                if not alphabet or not local.startswith(prefix):
                    continue
                rest = local[len(prefix) :]
                index = _PACKER_INDEX[alphabet]
                if all(c in index for c in rest):
                    form = FORM_PACKED_FIRST + p * 2 + (0 if ref is None else 1)
                    candidates.append(chr(form) + head + _pack(rest, alphabet))
    best = None
    for cand in sorted(candidates, key=lambda c: len(c.encode("utf-8", "surrogatepass"))):
        try:
            if decode_arg(cand, kind, context, enums, resolve) == value:
                best = cand
                break
        except RemoteProtocolError:
            continue
    if best is None:  # pragma: no cover - the literal form always decodes back
        raise LocalProtocolError("route argument cannot be encoded")
    return best


def _resolver_for(refs: Mapping[str, int]) -> PathResolver:
    by_number = {number: ident for ident, number in refs.items()}

    def resolve(number: int) -> str:
        try:
            return by_number[number]
        except KeyError:
            raise RemoteProtocolError(f"no identifier for path reference {number}") from None

    return resolve


@attrs.frozen
class Arg:
    name: str
    kind: str
    tail: bool = False


@attrs.frozen
class Route:
    id: str
    name: str
    template: str
    segments: tuple[str | Arg, ...]
    methods: tuple[str, ...] = ()

    @property
    def args(self) -> tuple[Arg, ...]:
        return tuple(s for s in self.segments if isinstance(s, Arg))


@attrs.define
class _Node:
    lits: dict[str, _Node] = attrs.Factory(dict)
    arg: _Node | None = None
    tail: Route | None = None
    end: Route | None = None


def _style(value: str, style: int) -> str:
    safe = STYLE_SAFE[style]
    if safe is None:
        return value
    return quote(value, safe=safe)


def _suffix(style: int, flags: int) -> str:
    idx = style + 4 * flags
    return SUFFIXES[idx - 1] if idx else ""


class RouteTable:
    """Path templates by route id; see the module docstring for the wire form."""

    def __init__(
        self,
        routes: Sequence[Route],
        enums: Sequence[str] = (),
        version: int = 1,
    ) -> None:
        self.version = version
        self.routes: tuple[Route, ...] = tuple(routes)
        self.enums: tuple[str, ...] = tuple(enums)
        self._enum_index = {e: i for i, e in enumerate(self.enums)}
        self._by_id: dict[str, Route] = {}
        self._root = _Node()
        for r in self.routes:
            if not r.id or r.id[0] in "_." or any(c not in ID_ALPHABET for c in r.id):
                raise LocalProtocolError(f"invalid route id {r.id!r}")
            if r.id in self._by_id:
                raise LocalProtocolError(f"duplicate route id {r.id!r}")
            self._by_id[r.id] = r
            node = self._root
            for i, seg in enumerate(r.segments):
                if isinstance(seg, Arg) and seg.tail:
                    if i != len(r.segments) - 1:
                        raise LocalProtocolError(f"tail argument not last in {r.template}")
                    node.tail = node.tail or r
                    break
                if isinstance(seg, Arg):
                    if node.arg is None:
                        node.arg = _Node()
                    node = node.arg
                else:
                    node = node.lits.setdefault(seg, _Node())
            else:
                node.end = node.end or r

    # --- construction -------------------------------------------------------
    @classmethod
    def from_json(cls, obj: Any) -> RouteTable:
        """Build from the parsed ``routes.json``; LocalProtocolError if malformed."""
        try:
            kinds: dict[str, str] = dict(obj.get("arg_kinds", {}))
            enums = [str(e) for e in obj.get("enums", [])]
            routes = []
            for entry in obj["routes"]:
                template = str(entry["template"])
                segs: list[str | Arg] = []
                for seg in template.split("/")[1:]:
                    if seg.startswith("{") and seg.endswith("}"):
                        name = seg[1:-1]
                        tail = name.endswith("*")
                        name = name.rstrip("*")
                        kind = "tail" if tail else kinds.get(name, "str")
                        segs.append(Arg(name, kind, tail))
                    else:
                        segs.append(seg)
                routes.append(
                    Route(
                        id=str(entry["id"]),
                        name=str(entry.get("name", entry["id"])),
                        template=template,
                        segments=tuple(segs),
                        methods=tuple(entry.get("methods", ())),
                    )
                )
            return cls(routes, enums, int(obj.get("version", 1)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LocalProtocolError(f"malformed route table: {e!r}") from e

    # --- lookup -------------------------------------------------------------
    def get(self, route_id: str) -> Route | None:
        return self._by_id.get(route_id)

    def match(self, segments: Sequence[str]) -> tuple[Route, list[str]] | None:
        """The route whose template matches these raw path segments, and the raw argument texts."""
        return self._match(self._root, segments, 0, [])

    def _match(
        self, node: _Node, segs: Sequence[str], i: int, acc: list[str]
    ) -> tuple[Route, list[str]] | None:
        if i == len(segs):
            return (node.end, acc) if node.end is not None else None
        child = node.lits.get(segs[i])
        if child is not None:
            found = self._match(child, segs, i + 1, acc)
            if found:
                return found
        if node.arg is not None:
            found = self._match(node.arg, segs, i + 1, [*acc, segs[i]])
            if found:
                return found
        if node.tail is not None:
            return node.tail, [*acc, "/".join(segs[i:])]
        return None

    # --- the wire form ------------------------------------------------------
    def split_route_id(self, first: str) -> tuple[Route, int, int]:
        """``"s!"`` -> (route, style, flags); RemoteProtocolError for an unknown id."""
        idx = 0
        if first and first[-1] in SUFFIXES:
            idx = SUFFIXES.index(first[-1]) + 1
            first = first[:-1]
        route = self._by_id.get(first)
        if route is None:
            raise RemoteProtocolError(f"unknown route id {first[:16]!r}")
        style, flags = idx % 4, idx // 4
        return route, style, flags

    def encode_target(
        self,
        method: str,
        target: bytes,
        context: WireContext,
        flags: int = 0,
        refs: Mapping[str, int] | None = None,
    ) -> list[str] | None:
        """Uri-Path values for the path of ``target`` (any query is ignored), or None.

        ``refs``: identifier -> path reference number (a request numbered for the
        session string table; None: no table).

        None means the table cannot reproduce the path byte for byte (no
        matching route, invalid UTF-8, an unusual percent-encoding, an
        argument over 255 bytes): the caller carries the target literally.
        """
        del method  # the route id does not depend on the method
        if not 0 <= flags <= MAX_FLAGS:
            raise LocalProtocolError(f"route flags {flags} out of range")
        path = target.split(b"?", 1)[0]
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not text.startswith("/"):
            return None
        found = self.match(text.split("/")[1:])
        if found is None:
            return None
        route, raws = found
        values: list[str] = []
        for arg, raw in zip(route.args, raws, strict=True):
            if arg.tail:
                values.append(raw)
                continue
            try:
                values.append(unquote_to_bytes(raw).decode("utf-8"))
            except UnicodeDecodeError:
                return None
        style = None
        for s in range(len(STYLE_SAFE)):
            if all(
                arg.tail or _style(v, s) == raw
                for arg, v, raw in zip(route.args, values, raws, strict=True)
            ):
                style = s
                break
        if style is None:
            return None
        out = [route.id + _suffix(style, flags)]
        for arg, v in zip(route.args, values, strict=True):
            arg_refs = None if arg.tail else refs
            out.append(encode_arg(v, arg.kind, context, self.enums, self._enum_index, arg_refs))
        if any(len(v.encode("utf-8")) > MAX_SEGMENT for v in out):
            return None
        resolve = None if refs is None else _resolver_for(refs)
        try:
            if self.decode_path_flags(out, context, resolve) != (path, flags):
                return None
        except RemoteProtocolError:
            return None
        return out

    def decode_path(self, method: str, segments: Sequence[str], context: WireContext) -> bytes:
        """The raw request path (no query) for Uri-Path values that start with a route id."""
        del method
        return self.decode_path_flags(segments, context)[0]

    def decode_path_flags(
        self,
        segments: Sequence[str],
        context: WireContext,
        resolve: PathResolver | None = None,
    ) -> tuple[bytes, int]:
        if not segments:
            raise RemoteProtocolError("no route id")
        route, style, flags = self.split_route_id(segments[0])
        args = route.args
        if len(segments) - 1 != len(args):
            raise RemoteProtocolError(
                f"route {route.id!r} takes {len(args)} arguments, got {len(segments) - 1}"
            )
        values = iter(segments[1:])
        parts = [""]
        for seg in route.segments:
            if isinstance(seg, Arg):
                v = next(values)
                if seg.tail:
                    parts.append(decode_arg(v, "tail", context, self.enums))
                else:
                    arg = decode_arg(v, seg.kind, context, self.enums, resolve)
                    parts.append(_style(arg, style))
            else:
                parts.append(seg)
        try:
            return "/".join(parts).encode("utf-8"), flags
        except UnicodeEncodeError as e:  # pragma: no cover - inputs are valid UTF-8
            raise RemoteProtocolError("route argument is not valid UTF-8") from e

    def route_name(self, segments: Sequence[str]) -> str:
        """A stable human name for metrics and logs (``"client.v3.rooms._.send.3"``)."""
        if not segments:
            return "root"
        try:
            return self.split_route_id(segments[0])[0].name
        except RemoteProtocolError:
            return "unknown"
