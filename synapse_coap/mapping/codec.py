"""HTTP request/response <-> compact CoAP message, exactly (docs/wire.md).

``WireCodec(profile, context)`` is sans-I/O and stateless apart from the
token objects the caller passes in.  What survives a round trip:

* the method (CoAP code, or POST + ``HTTP-Method`` option);
* the request target, byte for byte (route id + Uri-Path + Uri-Query, or the
  literal ``Target`` option);
* every status 100-599 (CoAP code, plus ``HTTP-Status`` when the code alone
  does not say it);
* the headers that matter (:data:`SIGNIFICANT_HEADERS`), values exact, in
  :func:`significant_headers` order; every other header is dropped on purpose;
* the body: bytes exactly, except a JSON body (``Content-Type:
  application/json``) in the body codec, which comes back as the same JSON
  *value* (types, unicode and key order kept) serialised compactly.

In a Noise session the token objects also carry the session string table
(:mod:`synapse_coap.wire.strings`): a request whose JSON body has identifiers
gets a ``String-Seq`` option and may reference identifiers of earlier,
acknowledged requests.  Without a table the bytes are exactly as before.

Beside it: the Authorization option's compact form (``authorization``), exact
JSON bodies and their memo (``jsonbody``), the listener's CoAP rules
(``coap_rules``) and strict text (``text``).

Size: about 650 lines, most of them :class:`WireCodec`, one class because the
request and response mappings in both directions share the route table, the
profile's key and value tables, the session context and the body memo.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from synapse_coap.errors import LocalProtocolError, RemoteProtocolError
from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.authorization import (
    AUTH_LITERAL,
    decode_authorization,
    encode_authorization,
)
from synapse_coap.mapping.coap import sort_options
from synapse_coap.mapping.coap_rules import (
    ProxyingNotSupported,
    UnsupportedMethod,
    _check_critical,
    accepted_format,
)
from synapse_coap.mapping.jsonbody import (
    BODY_MEMO,
    dump_json,
    parse_json_exact,
)
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.mapping.push import SyncQuery
from synapse_coap.mapping.text import (
    _strict_text,
    _text,
    _utf8,
)
from synapse_coap.mapping.tokens import (
    ReceiverTokens,
    SenderTokens,
    UnknownTokenReference,
    decode_uint,
    encode_uint,
)
from synapse_coap.wire.body import (
    DEFAULT_BODY_LIMITS,
    MARKER_DEFLATE_BASE,
    REQUEST_BODY_LIMITS,
    BodyLimits,
    body_cbor,
    decode_body,
    decode_cbor,
    encode_body,
    encode_json_fast,
)
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.profile import Profile
from synapse_coap.wire.push_base import BASE_MAX, Base, Kept, NotificationBase, template
from synapse_coap.wire.routes import FLAG_NO_AUTH, ID_ALPHABET
from synapse_coap.wire.strings import (
    ReceiverStrings,
    Resolver,
    SenderStrings,
    UnknownStringReference,
    path_number,
    request_identifiers,
    response_identifiers,
    wants_response_ids,
)

logger = logging.getLogger(__name__)

#: The headers carried, in the order a decoded message lists them.
SIGNIFICANT_HEADERS: tuple[str, ...] = (
    "content-type",
    "authorization",
    "cache-control",
    "etag",
    "retry-after",
    "location",
    "content-disposition",
)
_HEADER_INDEX = {name: i for i, name in enumerate(SIGNIFICANT_HEADERS)}

#: Query keys are referenced by one character of this alphabet (index in query_keys.json).
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
QUERY_LITERAL = "="  # first char of a Uri-Query value carrying the parameter verbatim
QUERY_CONTINUATION = "~"  # first char of a Uri-Query value continuing the previous one
MAX_QUERY_OPTION = 255  # RFC 7252 5.10
#: Longest single option value; a longer literal target is split over repeats.
MAX_TARGET_CHUNK = 65535 + 269
#: A decoded literal target longer than this is refused.
MAX_TARGET = 1 << 20

#: Synapse's JSON responses say this; it travels as Max-Age 0.
NO_CACHE = "no-cache, no-store, must-revalidate"
#: A Content-Type option with this value means "no Content-Type header at all".
CT_ABSENT = b""
#: ... and this one an empty Content-Type header value (not valid UTF-8, so no clash).
CT_EMPTY = b"\xff"

# RFC 3986 pchar minus "%" (tools' Uri-Path/Uri-Query values are re-escaped with this).
_PCHAR_SAFE = "!$&'()*+,;=:@"
_QUERY_SAFE = "!$'()*+,;=:@/?"


def significant_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The headers the wire carries, in the order a decoded message has them."""
    index = _HEADER_INDEX
    kept = []
    for k, v in headers:
        k = k.lower()
        if k in index:
            kept.append((k, v))
    if len(kept) == 2:
        if index[kept[0][0]] > index[kept[1][0]]:
            kept.reverse()
    elif len(kept) > 2:
        kept.sort(key=lambda kv: index[kv[0]])
    return tuple(kept)


_HEADER_UNSAFE = frozenset("\r\n\x00")


def _check_http_safe(headers: list[tuple[str, str]]) -> None:
    """No CR, LF or NUL in a decoded header (header splitting; aiohttp would refuse it
    with a 500): RemoteProtocolError, which a listener answers 4.00."""
    for name, value in headers:
        if not _HEADER_UNSAFE.isdisjoint(value) or not _HEADER_UNSAFE.isdisjoint(name):
            raise RemoteProtocolError(f"header {name[:40]!r} holds CR, LF or NUL")


_NOT_PARSED: Any = object()
#: what an absent option's values read as (shared: never modified)
_NO_VALUES: list[bytes] = []
#: The content options of a compact JSON response.
_COMPACT_OPTION = CoapOption(n.CONTENT_FORMAT, encode_uint(n.CF_COMPACT))
_COMPACT_LABEL = [_COMPACT_OPTION]
#: Cache-Control: no-cache, no-store, must-revalidate (Synapse's JSON answers) as Max-Age 0
_MAX_AGE_ZERO = CoapOption(n.MAX_AGE, b"")


# --- X-Matrix ----------------------------------------------------------------------


# --- the codec ------------------------------------------------------------------------


#: (profile id, content hash) -> (profile, its query keys, key -> index): one copy per
#: profile, not per session (a listener holds a codec per session)
_KEY_TABLES: dict[tuple[int, bytes], tuple[Profile, list[str], dict[str, int]]] = {}


def _query_key_tables(profile: Profile) -> tuple[list[str], dict[str, int]]:
    cached = _KEY_TABLES.get((profile.id, profile.content_hash))
    if cached is not None and cached[0] is profile:
        return cached[1], cached[2]
    keys = list(profile.query_keys[: len(KEY_ALPHABET)])
    index = {k: i for i, k in enumerate(keys)}
    if len(_KEY_TABLES) < 64:
        _KEY_TABLES[(profile.id, profile.content_hash)] = (profile, keys, index)
    return keys, index


class WireCodec:
    """Encode and decode HTTP messages for one session (profile + shared context)."""

    __slots__ = ("_key_index", "_memo_key", "_query_keys", "context", "profile", "routes")

    def __init__(self, profile: Profile, context: WireContext = WireContext()) -> None:
        self.profile = profile
        self.context = context
        self.routes = profile.routes
        self._query_keys, self._key_index = _query_key_tables(profile)
        # (a Profile's tables are too large to hash per call: its identity stands in)
        self._memo_key = (id(profile), profile.id, profile.content_hash, context.server_names)

    # ---------------------------------------------------------------- requests
    def encode_request(
        self, req: HttpRequest, tokens: SenderTokens | None = None, *, observe: bool = False
    ) -> CoapMessage:
        """The CoAP message for ``req``; ``tokens``: the session's bindings and string
        table (None: plain CoAP); ``observe``: it registers an Observe (its notifications
        are not recorded in the string table, so it is not numbered for a response)."""
        options: list[CoapOption] = []
        method = req.method
        code = n.HTTP_TO_COAP_METHOD.get(method)
        if code is None:
            if not method:
                raise LocalProtocolError("empty HTTP method")
            code = n.POST
            options.append(CoapOption(n.OPT_HTTP_METHOD, _utf8(method)))
        headers = significant_headers(req.headers)
        auth = [v for k, v in headers if k == "authorization"]
        if len(auth) == 1 and auth[0].startswith("Bearer ") and tokens is not None:
            token_opts = tokens.options_for(auth[0][len("Bearer ") :])
            if token_opts is None:
                options.append(
                    CoapOption(n.OPT_AUTHORIZATION, bytes([AUTH_LITERAL]) + _utf8(auth[0]))
                )
            else:
                options += token_opts
        else:
            for credentials in auth:
                options.append(
                    CoapOption(n.OPT_AUTHORIZATION, encode_authorization(credentials, self.context))
                )
        flags = 0 if auth else FLAG_NO_AUTH
        strings = tokens.strings if tokens is not None else None
        value: Any = _NOT_PARSED
        numbered: tuple[int, dict[str, tuple[int, int]]] | None = None
        if strings is not None:
            value = _json_value(headers, req.body)
            numbered = strings.begin(
                request_identifiers(req.target, None if value is _NOT_PARSED else value),
                wants_response=not observe and wants_response_ids(method, req.target),
            )
        path_refs = (
            None
            if numbered is None
            else {ident: path_number(*ref) for ident, ref in numbered[1].items()}
        )
        options += self._encode_target(method, req.target, flags, path_refs)
        options += self._encode_headers(headers, response=False)
        if numbered is None:
            content_opts, payload = self._encode_content(headers, req.body, want_json=False)
        else:
            seq, refs = numbered
            options.append(CoapOption(n.OPT_STRING_SEQ, encode_uint(seq)))
            content_opts, payload = self._encode_content(
                headers, req.body, want_json=False, refs=refs, value=value
            )
            if value is not _NOT_PARSED and content_opts:
                # sent as JSON after all (not encodable): the receiver sees no body ids
                assert strings is not None
                strings.restate(seq, request_identifiers(req.target))
        options += content_opts
        return CoapMessage(code, sort_options(options), payload)

    def _encode_target(
        self,
        method: str,
        target: bytes,
        flags: int,
        path_refs: Mapping[str, int] | None = None,
    ) -> list[CoapOption]:
        path, sep, query = target.partition(b"?")
        segments = (
            self.routes.encode_target(method, path, self.context, flags, path_refs)
            if path
            else None
        )
        query_values: list[str] | None = []
        if sep:
            query_values = self.encode_query(query)
        if segments is None or query_values is None:
            out = [
                CoapOption(n.OPT_TARGET, target[i : i + MAX_TARGET_CHUNK])
                for i in range(0, max(len(target), 1), MAX_TARGET_CHUNK)
            ]
            if flags & FLAG_NO_AUTH:
                out.append(CoapOption(n.OPT_NO_AUTH, b""))
            return out
        out = [CoapOption(n.URI_PATH, s.encode("utf-8")) for s in segments]
        out += [CoapOption(n.URI_QUERY, q.encode("utf-8")) for q in query_values]
        return out

    def encode_query(self, query: bytes) -> list[str] | None:
        """Uri-Query values for a raw query string (without "?"), or None if not UTF-8."""
        try:
            text = query.decode("utf-8")
        except UnicodeDecodeError:
            return None
        out: list[str] = []
        for param in text.split("&"):
            key, eq, value = param.partition("=")
            i = self._key_index.get(key) if eq else None
            item = KEY_ALPHABET[i] + value if i is not None else QUERY_LITERAL + param
            out += _chunks(item)
        return out

    def decode_query(self, values: Sequence[str]) -> str:
        params: list[str] = []
        for v in values:
            if not v:
                raise RemoteProtocolError("empty Uri-Query value")
            head, rest = v[0], v[1:]
            if head == QUERY_CONTINUATION:
                if not params:
                    raise RemoteProtocolError("Uri-Query continuation without a parameter")
                params[-1] += rest
            elif head == QUERY_LITERAL:
                params.append(rest)
            else:
                i = KEY_ALPHABET.find(head)
                if i < 0 or i >= len(self._query_keys):
                    raise RemoteProtocolError(f"unknown query key reference {head!r}")
                params.append(self._query_keys[i] + "=" + rest)
        return "&".join(params)

    def decode_request(
        self,
        msg: CoapMessage,
        tokens: ReceiverTokens | None = None,
        limits: BodyLimits = REQUEST_BODY_LIMITS,
    ) -> HttpRequest:
        """The HTTP request; RemoteProtocolError (or UnknownTokenReference) if it cannot be."""
        o = msg.options_index()
        if n.PROXY_URI in o or n.PROXY_SCHEME in o:
            raise ProxyingNotSupported("Proxy-Uri / Proxy-Scheme: this endpoint is not a proxy")
        _check_critical(msg)
        if msg.code == n.EMPTY or msg.code >= 32:
            raise RemoteProtocolError(f"CoAP code {n.code_str(msg.code)} is not a request")
        method_opt = o.get(n.OPT_HTTP_METHOD, _NO_VALUES)
        if method_opt:
            if len(method_opt) != 1 or msg.code != n.POST or not method_opt[0]:
                raise RemoteProtocolError("bad HTTP-Method option")
            method = _strict_text(method_opt[0], "HTTP-Method option")
        else:
            method = n.COAP_TO_HTTP_METHOD.get(msg.code, "")
            if not method:
                raise UnsupportedMethod(f"unknown CoAP method code {n.code_str(msg.code)}")
        seq = request_seq(msg)
        strings = tokens.strings if tokens is not None else None
        resolver = strings.resolver(seq) if strings is not None and seq is not None else None
        target, routed, flags = self._decode_target(msg, resolver)
        headers: list[tuple[str, str]] = []
        # Content-Type first, then Authorization (significant_headers order).
        content_headers, body, value = self._decode_content(msg, limits, resolver=resolver)
        if resolver is not None:
            assert strings is not None and seq is not None
            strings.record(seq, request_identifiers(target, value))
        headers += content_headers
        headers += self._decode_request_auth(msg, tokens, routed, flags)
        headers += self._decode_headers(msg, response=False)
        _check_http_safe(headers)
        return HttpRequest(method, target, significant_headers(headers), body, value)

    def _decode_target(
        self, msg: CoapMessage, resolver: Resolver | None = None
    ) -> tuple[bytes, bool, int]:
        o = msg.options_index()
        literal = o.get(n.OPT_TARGET, _NO_VALUES)
        paths = [_strict_text(v, "Uri-Path") for v in o.get(n.URI_PATH, _NO_VALUES)]
        queries = [_strict_text(v, "Uri-Query") for v in o.get(n.URI_QUERY, _NO_VALUES)]
        if literal:
            if paths or queries:
                raise RemoteProtocolError("Target option together with Uri-Path/Uri-Query")
            target = b"".join(literal)
            if len(target) > MAX_TARGET:
                raise RemoteProtocolError("literal target too long")
            if not target:
                raise RemoteProtocolError("empty Target option")
            flags = FLAG_NO_AUTH if n.OPT_NO_AUTH in o else 0
            return target, True, flags
        if n.OPT_NO_AUTH in o:
            raise RemoteProtocolError("No-Auth option without a Target option")
        if not paths or paths[0][:1] in ("_", ".", ""):
            # A standard CoAP tool: plain path segments, plain query.
            plain = "/" + "/".join(quote(s, safe=_PCHAR_SAFE) for s in paths)
            if queries:
                plain += "?" + "&".join(quote(q, safe=_QUERY_SAFE) for q in queries)
            return plain.encode("ascii"), False, 0
        if paths[0][0] not in ID_ALPHABET:
            raise RemoteProtocolError(f"bad route id {paths[0][:16]!r}")
        path, flags = self.routes.decode_path_flags(
            paths, self.context, None if resolver is None else resolver.path
        )
        if queries:
            path += b"?" + self.decode_query(queries).encode("utf-8")
        return path, True, flags

    def _decode_request_auth(
        self, msg: CoapMessage, tokens: ReceiverTokens | None, routed: bool, flags: int
    ) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        o = msg.options_index()
        binds = o.get(n.OPT_TOKEN_BIND, _NO_VALUES)
        refs = o.get(n.OPT_TOKEN_REF, _NO_VALUES)
        auths = o.get(n.OPT_AUTHORIZATION, _NO_VALUES)
        if len(binds) + len(refs) > 1 or ((binds or refs) and auths):
            raise RemoteProtocolError("conflicting authorization options")
        if (binds or refs or auths) and flags & FLAG_NO_AUTH:
            raise RemoteProtocolError("authorization options on a request marked No-Auth")
        if binds:
            store = tokens if tokens is not None else ReceiverTokens()
            out.append(("authorization", "Bearer " + store.bind(binds[0])))
        elif refs:
            if tokens is None:
                raise UnknownTokenReference("token reference without a token store")
            out.append(("authorization", "Bearer " + tokens.lookup(decode_uint(refs[0]))))
        elif auths:
            out += [("authorization", decode_authorization(v, self.context)) for v in auths]
        elif routed and not flags & FLAG_NO_AUTH and tokens is not None:
            out.append(("authorization", "Bearer " + tokens.lookup(0)))
        return out

    # --------------------------------------------------------------- responses
    def encode_response(
        self,
        resp: HttpResponse,
        *,
        want_json: bool = False,
        method: int = n.GET,
        strings: ReceiverStrings | None = None,
        seq: int | None = None,
        references: ReceiverStrings | None = None,
        base: Base | None = None,
    ) -> CoapMessage:
        """The response to a request with CoAP method code ``method``.

        ``strings``/``seq``: the session string table and the request's number
        (:func:`request_seq`): a 2xx JSON answer's identifiers are recorded.
        ``references``: the session string table, for a push notification: its
        body may reference identifiers the client sent (``String-Seq`` names the
        base, see :mod:`synapse_coap.wire.strings`). ``base``: for a push
        notification, the last delivered notification
        (:mod:`synapse_coap.wire.push_base`): the body may be compressed relative to
        it, and then carries no Content-Format (the body's marker says it all), nor
        String-Seq when its references resolve against the base's.

        The code follows the method (200 is 2.05 for GET, 2.04 for POST/PUT/PATCH,
        2.02 for DELETE); ``HTTP-Status`` travels only when the code alone, read
        for that method, would not give back the exact status.
        """
        status = resp.status
        if not 100 <= status <= 599:
            raise LocalProtocolError(f"HTTP status {status} out of range 100-599")
        options: list[CoapOption] = []
        code = n.status_to_code(status, method)
        if n.code_to_status(code, method) != status:
            options.append(CoapOption(n.OPT_HTTP_STATUS, encode_uint(status)))
        headers = significant_headers(resp.headers)
        options += self._encode_headers(headers, response=True)
        content_opts, payload = self._encode_content(
            headers, resp.body, want_json=want_json, label=True
        )
        if (
            base is not None
            and 200 <= status < 300
            and content_opts == _COMPACT_LABEL
            and len(payload) <= BASE_MAX
        ):
            # (a larger notification is rarely like the one before: not worth more
            # compressions on the loop)
            extra, content_opts, payload = self._notification(
                resp.body, content_opts, payload, references, base
            )
            options += extra
        elif references is not None and 200 <= status < 300 and content_opts == _COMPACT_LABEL:
            referenced = self._with_references(resp.body, payload, references)
            if referenced is not None:
                payload = referenced[1]
                options.append(CoapOption(n.OPT_STRING_SEQ, encode_uint(referenced[0])))
        options += content_opts
        if strings is not None and seq is not None and 200 <= status < 300:
            strings.record_response(seq, _response_ids(headers, resp.body))
        return CoapMessage(code, sort_options(options), payload)

    def _notification(
        self,
        body: bytes,
        content_opts: list[CoapOption],
        payload: bytes,
        table: ReceiverStrings | None,
        base: Base,
    ) -> tuple[list[CoapOption], list[CoapOption], bytes]:
        """(String-Seq options, content options, payload) of a push notification's
        compact body: the smallest of without/with the string table's references,
        each without/with the base (docs/wire-body.md sections 5 and 6)."""
        try:
            value = parse_json_exact(body)
            candidates: list[tuple[list[CoapOption], list[CoapOption], bytes]] = [
                ([], content_opts, payload)
            ]
            pair = (base.d, base.cbor)
            relative = encode_body(value, self.profile, self.context, base=pair)
            if relative[0] == MARKER_DEFLATE_BASE:
                candidates.append(([], [], relative))
            if table is not None:
                highest, refs = table.references()
                if refs:
                    seq_opt = [CoapOption(n.OPT_STRING_SEQ, encode_uint(highest))]
                    referenced = encode_body(value, self.profile, self.context, refs, base=pair)
                    if referenced[0] != MARKER_DEFLATE_BASE:
                        candidates.append((seq_opt, content_opts, referenced))
                    elif highest == base.string_seq:
                        candidates.append(([], [], referenced))  # resolved as the base's
                    else:
                        candidates.append((seq_opt, [], referenced))
        except (ValueError, LocalProtocolError, RecursionError):
            return [], content_opts, payload

        def cost(c: tuple[list[CoapOption], list[CoapOption], bytes]) -> int:
            # an option's header is 1 byte, 3 for String-Seq's number (65031)
            return (
                len(c[2])
                + sum(3 + len(o.value) for o in c[0])
                + sum(1 + len(o.value) for o in c[1])
            )

        return min(candidates, key=cost)

    def notification_template(self, target: bytes) -> bytes | None:
        """The CBOR of the template of an Observe registration of ``target`` (a
        ``/sync``): the start of every base's preset dictionary
        (:func:`synapse_coap.wire.push_base.template`); None without a ``since``."""
        query = SyncQuery.parse(target)
        since = query.since if query is not None else None
        if since is None:
            return None
        try:
            # no server names: the template depends on the profile and since alone, even
            # when a registration went out under a context predicted before the handshake
            return body_cbor(encode_body(template(since), self.profile), self.profile)
        except (LocalProtocolError, RemoteProtocolError):
            return None

    def notification_kept(self, msg: CoapMessage, base: Base | None) -> Kept:
        """What the client that decodes notification ``msg`` keeps of it
        (:meth:`decode_response` with ``bases``): the CBOR of its compact body and
        its effective String-Seq. ``base``: the one ``msg`` was encoded with."""
        string_seq = request_seq(msg)
        if msg.get(n.OPT_CONTENT_TYPE) or not msg.payload:
            return Kept(None, string_seq)
        cfs = msg.get(n.CONTENT_FORMAT)
        if cfs and (len(cfs) > 1 or decode_uint(cfs[0], 2) != n.CF_COMPACT):
            return Kept(None, string_seq)
        if string_seq is None and base is not None and msg.payload[0] == MARKER_DEFLATE_BASE:
            string_seq = base.string_seq

        def resolve(d: int) -> bytes:
            if base is None or d != base.d:
                raise UnknownStringReference("not the base this notification was encoded with")
            return base.cbor

        try:
            return Kept(
                body_cbor(msg.payload, self.profile, DEFAULT_BODY_LIMITS, resolve), string_seq
            )
        except RemoteProtocolError:
            return Kept(None, string_seq)

    def _with_references(
        self, body: bytes, payload: bytes, table: ReceiverStrings
    ) -> tuple[int, bytes] | None:
        """(base, payload) of a compact JSON body with the server's references, if shorter."""
        base, refs = table.references()
        if not refs:
            return None
        try:
            shorter = encode_body(parse_json_exact(body), self.profile, self.context, refs)
        except (ValueError, LocalProtocolError, RecursionError):
            return None
        return (base, shorter) if len(shorter) + 4 < len(payload) else None

    def decode_response(
        self,
        msg: CoapMessage,
        limits: BodyLimits = DEFAULT_BODY_LIMITS,
        *,
        method: int = n.GET,
        strings: SenderStrings | None = None,
        seq: int | None = None,
        bases: NotificationBase | None = None,
    ) -> HttpResponse:
        """The HTTP response in ``msg``, which answers a request with CoAP method ``method``.

        ``strings``/``seq``: the session string table and the request's number: a 2xx
        answer acknowledges the number (with the answer's identifiers), and a
        notification's references (``String-Seq``) resolve against it. ``bases``: a
        push notification's (:mod:`synapse_coap.wire.push_base`): its body may be
        relative to an earlier notification; what is kept of it is left in ``bases.kept``."""
        _check_critical(msg)
        if not n.code(2, 0) <= msg.code < n.code(6, 0):
            raise RemoteProtocolError(f"CoAP code {n.code_str(msg.code)} is not a response")
        status_opts = msg.options_index().get(n.OPT_HTTP_STATUS, _NO_VALUES)
        if status_opts:
            status = decode_uint(status_opts[0], 2)
            if len(status_opts) != 1 or not 100 <= status <= 599:
                raise RemoteProtocolError("bad HTTP-Status option")
        else:
            status = n.code_to_status(msg.code, method)
        headers: list[tuple[str, str]] = []
        base = request_seq(msg)
        resolver: Callable[[int, int], str] | None = None
        if base is not None:
            if strings is None:
                raise UnknownStringReference("a response with references, and no string table")
            resolver = strings.own_resolver(base)
        elif bases is not None and msg.payload[:1] == _BASE_MARKER:
            resolver = _inherited_resolver(strings, bases)
        content_headers, body, _value = self._decode_content(
            msg, limits, resolver=resolver, bases=bases
        )
        headers += content_headers
        headers += self._decode_headers(msg, response=True)
        _check_http_safe(headers)
        significant = significant_headers(headers)
        if strings is not None and seq is not None and 200 <= status < 300:
            strings.acknowledge(seq, _response_ids(significant, body))
        return HttpResponse(status, significant, body)

    def unknown_token_response(self, error: Exception | None = None) -> CoapMessage:
        """What a server answers to :class:`UnknownTokenReference`: 4.01 + Token-Reset.

        Given an :class:`UnknownStringReference` instead: 4.00 + String-Reset
        (the client forgets its string table and resends without references).
        """
        if isinstance(error, UnknownStringReference):
            return CoapMessage(
                n.BAD_REQUEST,
                (
                    CoapOption(n.CONTENT_FORMAT, encode_uint(n.CF_JSON)),
                    CoapOption(n.OPT_STRING_RESET, b""),
                ),
                b'{"errcode":"M_UNKNOWN","error":"Session string reference unknown; resend"}',
            )
        body = (
            b'{"errcode":"M_UNKNOWN_TOKEN","error":"Token binding unknown on this session; rebind"}'
        )
        return CoapMessage(
            n.UNAUTHORIZED,
            (
                CoapOption(n.CONTENT_FORMAT, encode_uint(n.CF_JSON)),
                CoapOption(n.OPT_TOKEN_RESET, b""),
            ),
            body,
        )

    # ----------------------------------------------------------------- headers
    def _encode_headers(
        self, headers: Sequence[tuple[str, str]], *, response: bool
    ) -> list[CoapOption]:
        groups: Iterable[tuple[str, Sequence[str]]]
        if len(headers) <= 2 and (len(headers) < 2 or headers[0][0] != headers[1][0]):
            # (the usual answer: Content-Type and perhaps Cache-Control, each once)
            groups = [(k, (v,)) for k, v in headers]
        else:
            by_name: dict[str, list[str]] = {}
            for k, v in headers:
                by_name.setdefault(k, []).append(v)
            groups = by_name.items()
        out: list[CoapOption] = []
        for name, values in groups:
            if name in ("content-type", "authorization"):
                continue
            if response and len(values) == 1:
                special = _special_response_header(name, values[0])
                if special is not None:
                    out.append(special)
                    continue
            idx = _HEADER_INDEX[name]
            out += [CoapOption(n.OPT_HEADER, bytes([idx]) + _utf8(v)) for v in values]
        return out

    def _decode_headers(self, msg: CoapMessage, *, response: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        o = msg.options_index()
        if response:
            max_age = o.get(n.MAX_AGE, _NO_VALUES)
            if len(max_age) > 1:
                raise RemoteProtocolError("repeated Max-Age option")
            if max_age:
                seconds = decode_uint(max_age[0], 4)
                out.append(("cache-control", NO_CACHE if seconds == 0 else f"max-age={seconds}"))
            etags = o.get(n.ETAG, _NO_VALUES)
            if len(etags) > 1:
                raise RemoteProtocolError("repeated ETag option in a response")
            if etags:
                out.append(("etag", _etag_text(etags[0])))
        for value in o.get(n.OPT_HEADER, _NO_VALUES):
            if not value or value[0] >= len(SIGNIFICANT_HEADERS) or value[0] < 2:
                raise RemoteProtocolError("bad Header option")
            out.append((SIGNIFICANT_HEADERS[value[0]], _text(value[1:], "Header option")))
        return out

    # ----------------------------------------------------------------- content
    def _encode_content(
        self,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        want_json: bool,
        refs: Mapping[str, tuple[int, int]] | None = None,
        value: Any = _NOT_PARSED,
        label: bool = False,
    ) -> tuple[list[CoapOption], bytes]:
        """Content options and payload. ``label``: name the compact body with
        Content-Format :data:`~synapse_coap.mapping.numbers.CF_COMPACT` (responses
        always do; requests leave it out, it is the default). ``refs``: string table
        references of a numbered request (``value``: its parsed JSON body)."""
        cts = [v for k, v in headers if k == "content-type"]
        if len(cts) > 1:
            return [CoapOption(n.OPT_CONTENT_TYPE, _utf8(ct) or CT_EMPTY) for ct in cts], body
        if not cts:
            if not body:
                return [], b""
            return [CoapOption(n.OPT_CONTENT_TYPE, CT_ABSENT)], body
        ct = cts[0]
        if ct == n.JSON_MEDIA_TYPE:
            if body and not want_json:
                try:
                    compact = [_COMPACT_OPTION] if label else []
                    # the receiver's expansion cap: a listener's for a request
                    limits = DEFAULT_BODY_LIMITS if label else REQUEST_BODY_LIMITS
                    if refs is None or value is _NOT_PARSED:
                        return compact, self._encode_json_body(body, value, limits.max_expansion)
                    return compact, encode_body(
                        value, self.profile, self.context, refs, limits.max_expansion
                    )
                except (ValueError, LocalProtocolError, RecursionError) as e:
                    logger.debug("JSON body sent raw: %s", type(e).__name__)
            return [CoapOption(n.CONTENT_FORMAT, encode_uint(n.CF_JSON))], body
        cf = n.MEDIA_TYPE_TO_CF.get(ct)
        if cf is not None:
            return [CoapOption(n.CONTENT_FORMAT, encode_uint(cf))], body
        return [CoapOption(n.OPT_CONTENT_TYPE, _utf8(ct) or CT_EMPTY)], body

    def _decode_content(
        self,
        msg: CoapMessage,
        limits: BodyLimits,
        *,
        resolver: Callable[[int, int], str] | None = None,
        bases: NotificationBase | None = None,
    ) -> tuple[list[tuple[str, str]], bytes, Any]:
        """Content headers, body, and (decoded with ``resolver`` only) the JSON value.
        ``bases``: a notification's (what is kept of it is left in ``bases.kept``)."""
        o = msg.options_index()
        cts = o.get(n.OPT_CONTENT_TYPE, _NO_VALUES)
        cfs = o.get(n.CONTENT_FORMAT, _NO_VALUES)
        if len(cfs) > 1 or (cfs and cts):
            raise RemoteProtocolError("conflicting Content-Format / Content-Type options")
        if cts:
            if len(cts) == 1 and cts[0] == CT_ABSENT:
                return [], msg.payload, None
            if CT_ABSENT in cts:
                raise RemoteProtocolError("bad Content-Type option")
            return (
                [("content-type", "" if v == CT_EMPTY else _text(v, "Content-Type")) for v in cts],
                msg.payload,
                None,
            )
        if cfs:
            cf = decode_uint(cfs[0], 2)
            if cf == n.CF_COMPACT:
                cfs = []
        if cfs:
            media = n.CF_TO_MEDIA_TYPE.get(cf)
            if media is None:
                raise RemoteProtocolError(f"unsupported Content-Format {cf}")
            return [("content-type", media)], msg.payload, None
        if not msg.payload:
            return [], b"", None
        value: Any = None
        if bases is not None:
            # never the memo: the same payload means another body against another base
            raw = body_cbor(msg.payload, self.profile, limits, bases)
            value = decode_cbor(
                raw, self.profile, self.context, limits.for_input(len(msg.payload)), resolver
            )
            body = _dump_decoded(value)
            string_seq = request_seq(msg)
            if string_seq is None and msg.payload[0] == MARKER_DEFLATE_BASE:
                string_seq = bases.base_string_seq
            bases.kept = Kept(raw, string_seq)
        elif resolver is not None:
            value = decode_body(msg.payload, self.profile, self.context, limits, resolver)
            body = _dump_decoded(value)
        else:
            payload = msg.payload
            body = BODY_MEMO.convert(
                (1, self._memo_key, limits, payload),
                payload,
                lambda: _dump_decoded(decode_body(payload, self.profile, self.context, limits)),
            )
        return [("content-type", n.JSON_MEDIA_TYPE)], body, value

    def _encode_json_body(
        self,
        body: bytes,
        value: Any = _NOT_PARSED,
        max_expansion: int = DEFAULT_BODY_LIMITS.max_expansion,
    ) -> bytes:
        """encode_body() of the JSON ``body`` (no string table references), memoised.

        Raises what parse_json_exact / encode_body raise (ValueError, LocalProtocolError).
        """

        def encode() -> bytes:
            if value is _NOT_PARSED:
                fast = encode_json_fast(body, self.profile, self.context, max_expansion)
                if fast is not None:
                    return fast
            parsed = parse_json_exact(body) if value is _NOT_PARSED else value
            return encode_body(parsed, self.profile, self.context, max_expansion=max_expansion)

        if not BODY_MEMO.takes(body):
            return encode()  # (no key built for a memo that would not keep it)
        return BODY_MEMO.convert((0, self._memo_key, max_expansion, body), body, encode)

    # ------------------------------------------------------------------- misc
    def route_name(self, msg: CoapMessage) -> str:
        """A stable name for metrics and logs (never contains arguments or tokens)."""
        o = msg.options_index()
        if n.OPT_TARGET in o:
            return "literal"
        try:
            paths = [_strict_text(v, "Uri-Path") for v in o.get(n.URI_PATH, _NO_VALUES)]
        except RemoteProtocolError:
            return "unknown"
        if not paths or paths[0][:1] in ("_", ".", ""):
            return "plain"
        return self.routes.route_name(paths)

    def route_name_for_target(self, target: bytes) -> str:
        """The :meth:`route_name` a receiver gives a request this codec encodes for ``target``.

        For a sender's metrics, so that both ends label a request alike: the route
        table's name when the target travels as a route id, "literal" when it travels
        verbatim in the Target option. Like :meth:`route_name`, never an argument.
        """
        try:
            options = self._encode_target("GET", target, 0)
        except LocalProtocolError:
            return "unknown"
        return self.route_name(CoapMessage(n.GET, tuple(options), b""))

    def is_replay_safe(self, req: HttpRequest) -> bool:
        """GET/HEAD, or PUT to a route with a transaction id (may ride as 0-RTT early data)."""
        if req.method in ("GET", "HEAD"):
            return True
        if req.method != "PUT":
            return False
        try:
            path = req.target.split(b"?", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            return False
        found = self.routes.match(path.split("/")[1:])
        return found is not None and any(a.kind == "txn" for a in found[0].args)

    def wants_json(self, msg: CoapMessage) -> bool:
        """The request carried ``Accept: 50`` (a standard CoAP tool wanting plain JSON)."""
        return accepted_format(msg) == n.CF_JSON


_BASE_MARKER = bytes((MARKER_DEFLATE_BASE,))


def _inherited_resolver(
    strings: SenderStrings | None, bases: NotificationBase
) -> Callable[[int, int], str]:
    """The references of a relative notification without String-Seq resolve against
    its base's effective String-Seq (docs/wire-body.md section 6)."""

    def resolve(tag: int, number: int) -> str:
        seq = bases.base_string_seq
        if strings is None or seq is None:
            raise UnknownStringReference("a reference, and no String-Seq to resolve it against")
        return strings.own_resolver(seq)(tag, number)

    return resolve


def request_seq(msg: CoapMessage) -> int | None:
    """The String-Seq number of a request message (None: not numbered)."""
    seqs = msg.options_index().get(n.OPT_STRING_SEQ, _NO_VALUES)
    if len(seqs) > 1:
        raise RemoteProtocolError("repeated String-Seq option")
    return decode_uint(seqs[0], 4) if seqs else None


def _json_value(headers: Sequence[tuple[str, str]], body: bytes) -> Any:
    """The parsed JSON body of a request (``_NOT_PARSED``: none, or not parseable)."""
    cts = [v for k, v in headers if k == "content-type"]
    if not body or cts != [n.JSON_MEDIA_TYPE]:
        return _NOT_PARSED
    try:
        return parse_json_exact(body)
    except (ValueError, RecursionError):
        return _NOT_PARSED


def _response_ids(headers: Sequence[tuple[str, str]], body: bytes) -> tuple[str, ...]:
    """What both ends record for a 2xx answer (the same bytes give the same list)."""
    cts = [v for k, v in headers if k == "content-type"]
    return response_identifiers(body) if cts == [n.JSON_MEDIA_TYPE] else ()


def _dump_decoded(value: Any) -> bytes:
    try:
        return dump_json(value)
    except (ValueError, TypeError, RecursionError) as e:
        raise RemoteProtocolError(f"body is not JSON: {type(e).__name__}") from e


def _chunks(item: str) -> list[str]:
    """Split a Uri-Query value into <= 255-byte options (continuations start with "~")."""
    out: list[str] = []
    current = ""
    size = 0
    for ch in item:
        w = len(_utf8(ch))
        if size + w > MAX_QUERY_OPTION:
            out.append(current)
            current, size = QUERY_CONTINUATION, 1
        current += ch
        size += w
    out.append(current)
    return out


#: a Cache-Control header that travels as Max-Age, and an ETag that travels as ETag
_MAX_AGE_HEADER = re.compile(r"max-age=([1-9][0-9]{0,9})")
_ETAG_HEADER = re.compile(r'"([\x21\x23-\x7e]{1,8})"')


def _special_response_header(name: str, value: str) -> CoapOption | None:
    if name == "cache-control":
        if value == NO_CACHE:
            return _MAX_AGE_ZERO
        m = _MAX_AGE_HEADER.fullmatch(value)
        if m and int(m.group(1)) < 1 << 32:
            return CoapOption(n.MAX_AGE, encode_uint(int(m.group(1))))
    if name == "etag":
        m = _ETAG_HEADER.fullmatch(value)
        if m:
            return CoapOption(n.ETAG, m.group(1).encode("ascii"))
    return None


def _etag_text(raw: bytes) -> str:
    if raw and all(0x21 <= b <= 0x7E and b != 0x22 for b in raw):
        return '"' + raw.decode("ascii") + '"'
    return '"' + raw.hex() + '"'
