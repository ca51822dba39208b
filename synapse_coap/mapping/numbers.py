"""Protocol numbers: CoAP methods, response codes, options and content formats.

IANA numbers mirror the CoAP registries (RFC 7252 12.1-12.3, RFC 7959,
RFC 8132, RFC 8516).  The project's private options come from the
*experimental use* range 65000-65535 (RFC 7252 12.2); their low bits are
chosen on purpose (RFC 7252 5.4.6):

* bit 0 set = **critical**: a recipient that does not understand the option
  must reject the message rather than silently misinterpret it;
* bit 1 set = **unsafe to forward**: a proxy that does not understand it must
  not forward it blindly;
* ``number & 0x1e == 0x1c`` would mark NoCacheKey; none of ours does.

docs/wire.md documents each option's value format.
"""

from __future__ import annotations

# --- message types (RFC 7252 3) ---------------------------------------------
CON = 0
NON = 1
ACK = 2
RST = 3


def code(cls: int, detail: int) -> int:
    """The 8-bit code ``c.dd`` as an int: ``code(2, 5) == 69``."""
    return (cls << 5) | detail


def code_str(value: int) -> str:
    """``69 -> "2.05"``."""
    return f"{value >> 5}.{value & 31:02d}"


# --- method codes (RFC 7252 12.1.1, RFC 8132) -------------------------------
EMPTY = 0
GET = 1
POST = 2
PUT = 3
DELETE = 4
FETCH = 5
PATCH = 6
IPATCH = 7

#: HTTP methods with a CoAP method code of their own.  Any other HTTP method
#: travels as POST plus the critical private option :data:`OPT_HTTP_METHOD`.
HTTP_TO_COAP_METHOD: dict[str, int] = {
    "GET": GET,
    "POST": POST,
    "PUT": PUT,
    "DELETE": DELETE,
    "PATCH": PATCH,
}
COAP_TO_HTTP_METHOD: dict[int, str] = {v: k for k, v in HTTP_TO_COAP_METHOD.items()}
# Standard CoAP tools may send FETCH/iPATCH; they have no HTTP equivalent that
# Synapse serves, so they decode to their CoAP names (Synapse answers 405).
COAP_TO_HTTP_METHOD[FETCH] = "FETCH"
COAP_TO_HTTP_METHOD[IPATCH] = "IPATCH"

# --- response codes -----------------------------------------------------------
CREATED = code(2, 1)
DELETED = code(2, 2)
VALID = code(2, 3)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
CONTINUE = code(2, 31)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
FORBIDDEN = code(4, 3)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
NOT_ACCEPTABLE = code(4, 6)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)
CONFLICT = code(4, 9)
PRECONDITION_FAILED = code(4, 12)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
UNPROCESSABLE_ENTITY = code(4, 22)
TOO_MANY_REQUESTS = code(4, 29)
INTERNAL_SERVER_ERROR = code(5, 0)
NOT_IMPLEMENTED = code(5, 1)
BAD_GATEWAY = code(5, 2)
SERVICE_UNAVAILABLE = code(5, 3)
GATEWAY_TIMEOUT = code(5, 4)
PROXYING_NOT_SUPPORTED = code(5, 5)

#: HTTP statuses that have a CoAP response code with the same meaning
#: (RFC 8075 7 as a guide; one code per status so the mapping is a bijection).
#: Every other status travels as its class code (2.00 for 1xx-3xx, 4.00,
#: 5.00) plus the elective option :data:`OPT_HTTP_STATUS`.
HTTP_TO_COAP_STATUS: dict[int, int] = {
    200: CONTENT,
    201: CREATED,
    204: CHANGED,
    304: VALID,
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    406: NOT_ACCEPTABLE,
    409: CONFLICT,
    412: PRECONDITION_FAILED,
    413: REQUEST_ENTITY_TOO_LARGE,
    415: UNSUPPORTED_CONTENT_FORMAT,
    422: UNPROCESSABLE_ENTITY,
    429: TOO_MANY_REQUESTS,
    500: INTERNAL_SERVER_ERROR,
    501: NOT_IMPLEMENTED,
    502: BAD_GATEWAY,
    503: SERVICE_UNAVAILABLE,
    504: GATEWAY_TIMEOUT,
}
COAP_TO_HTTP_STATUS: dict[int, int] = {v: k for k, v in HTTP_TO_COAP_STATUS.items()}
# CoAP-only codes (never produced by our encoder) from other peers:
COAP_TO_HTTP_STATUS.update(
    {DELETED: 200, CONTINUE: 200, BAD_OPTION: 400, PROXYING_NOT_SUPPORTED: 502}
)
COAP_TO_HTTP_STATUS[REQUEST_ENTITY_INCOMPLETE] = 400


def success_code(method: int) -> int:
    """The code an HTTP 200 gets, by the request's CoAP method (RFC 7252 5.8, RFC 8075 7).

    GET (and FETCH, and any unknown method) -> 2.05 Content; POST, PUT, PATCH,
    iPATCH -> 2.04 Changed; DELETE -> 2.02 Deleted.
    """
    if method in (POST, PUT, PATCH, IPATCH):
        return CHANGED
    if method == DELETE:
        return DELETED
    return CONTENT


def status_to_code(status: int, method: int = GET) -> int:
    """The CoAP response code for an HTTP ``status`` answering a ``method`` request.

    200 -> the method's :func:`success_code`; a status in :data:`HTTP_TO_COAP_STATUS`
    -> its code; any other 1xx-3xx -> the method's success code; other 4xx/5xx ->
    4.00/5.00. Whether the exact status must travel too: see :func:`code_to_status`.
    """
    if status == 200:
        return success_code(method)
    found = HTTP_TO_COAP_STATUS.get(status)
    if found is not None:
        return found
    if status < 400:
        return success_code(method)
    return code(status // 100, 0)


def code_to_status(value: int, method: int = GET) -> int:
    """The HTTP status a response code stands for when no ``HTTP-Status`` option says
    otherwise: the inverse of :func:`status_to_code` on every status it maps alone.

    The method's success code -> 200; a code in :data:`COAP_TO_HTTP_STATUS` -> its
    status; any other code -> its class times 100.
    """
    if value == success_code(method):
        return 200
    return COAP_TO_HTTP_STATUS.get(value, (value >> 5) * 100)


# --- IANA option numbers (RFC 7252 5.10, RFC 7959, RFC 7641) ---------------
IF_MATCH = 1
URI_HOST = 3
ETAG = 4
IF_NONE_MATCH = 5
OBSERVE = 6
URI_PORT = 7
LOCATION_PATH = 8
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
LOCATION_QUERY = 20
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
PROXY_URI = 35
PROXY_SCHEME = 39
SIZE1 = 60
NO_RESPONSE = 258

# --- private options (experimental range, RFC 7252 12.2) --------------------
#: Exact HTTP status (uint) when the CoAP code alone does not say it.  Elective, safe.
OPT_HTTP_STATUS = 65000
#: An extra HTTP header (1-byte name index + value).  Elective, safe.
OPT_HEADER = 65004
#: "Forget your acknowledged token bindings and rebind" (in a 4.01).  Elective, safe.
OPT_TOKEN_RESET = 65008
#: Exact media type (text) when no Content-Format matches.  Critical, unsafe.
OPT_CONTENT_TYPE = 65003
#: The literal request target (path and query, raw bytes, concatenated over repeats).  Critical, unsafe.
OPT_TARGET = 65007
#: The HTTP method when it has no CoAP code (text).  Critical, unsafe.
OPT_HTTP_METHOD = 65011
#: An ``Authorization`` header: compact X-Matrix or a literal value.  Critical, unsafe.
OPT_AUTHORIZATION = 65015
#: Bind a Bearer token to an index for this session (index byte + token).  Critical, unsafe.
OPT_TOKEN_BIND = 65019
#: Use the Bearer token bound at this index (uint).  Critical, unsafe.
OPT_TOKEN_REF = 65023
#: "This request has no Authorization" (only where the route id cannot say so).  Critical, unsafe.
OPT_NO_AUTH = 65027
#: Session string table sequence number of this request (uint, <= 4 bytes; only in a
#: Noise session, only when the JSON body has identifiers).  Critical, unsafe.
OPT_STRING_SEQ = 65031
#: "Forget which of your requests I recorded; resend without references" (in a 4.00).
#: Elective, safe.
OPT_STRING_RESET = 65012

PRIVATE_OPTIONS: dict[int, str] = {
    OPT_HTTP_STATUS: "HTTP-Status",
    OPT_HEADER: "Header",
    OPT_TOKEN_RESET: "Token-Reset",
    OPT_CONTENT_TYPE: "Content-Type",
    OPT_TARGET: "Target",
    OPT_HTTP_METHOD: "HTTP-Method",
    OPT_AUTHORIZATION: "Authorization",
    OPT_TOKEN_BIND: "Token-Bind",
    OPT_TOKEN_REF: "Token-Ref",
    OPT_NO_AUTH: "No-Auth",
    OPT_STRING_SEQ: "String-Seq",
    OPT_STRING_RESET: "String-Reset",
}

#: Options the codec understands (or that the transport consumes before it: Block1/2,
#: Observe, Size1/2, No-Response).  Any other *critical* option is rejected
#: (RFC 7252 5.4.1), e.g. If-Match, If-None-Match and Proxy-Uri, which we do not implement.
KNOWN_OPTIONS: frozenset[int] = frozenset(
    {
        URI_HOST,
        ETAG,
        OBSERVE,
        URI_PORT,
        URI_PATH,
        CONTENT_FORMAT,
        MAX_AGE,
        URI_QUERY,
        ACCEPT,
        BLOCK2,
        BLOCK1,
        SIZE2,
        SIZE1,
        NO_RESPONSE,
        *PRIVATE_OPTIONS,
    }
)


def is_critical(number: int) -> bool:
    return bool(number & 1)


def is_unsafe(number: int) -> bool:
    return bool(number & 2)


def is_no_cache_key(number: int) -> bool:
    return (number & 0x1E) == 0x1C


# --- content formats (RFC 7252 12.3 and the IANA registry) ------------------
CF_TEXT_PLAIN = 0
CF_LINK_FORMAT = 40
CF_XML = 41
CF_OCTET_STREAM = 42
CF_EXI = 47
CF_JSON = 50
CF_JSON_PATCH = 51
CF_MERGE_PATCH = 52
CF_CBOR = 60
CF_IMAGE_GIF = 21
CF_IMAGE_JPEG = 22
CF_IMAGE_PNG = 23
#: The project's compact JSON body (CBOR with integer keys, then raw DEFLATE with the
#: profile's dictionary when smaller; docs/wire-body.md). A number of the Content-Formats
#: registry's *experimental use* range 65000-65535 (RFC 7252 12.3). Every response in
#: the compact body carries it; a request in the compact body may omit it (the default).
CF_COMPACT = 65300

#: Exact HTTP ``Content-Type`` strings with a registered Content-Format.
#: ``application/json`` is *not* here: it is the default (no option, body in
#: the project's body codec), or Content-Format 50 when carried raw.
MEDIA_TYPE_TO_CF: dict[str, int] = {
    "text/plain; charset=utf-8": CF_TEXT_PLAIN,
    "application/link-format": CF_LINK_FORMAT,
    "application/xml": CF_XML,
    "application/octet-stream": CF_OCTET_STREAM,
    "application/exi": CF_EXI,
    "application/json-patch+json": CF_JSON_PATCH,
    "application/merge-patch+json": CF_MERGE_PATCH,
    "application/cbor": CF_CBOR,
    "image/gif": CF_IMAGE_GIF,
    "image/jpeg": CF_IMAGE_JPEG,
    "image/png": CF_IMAGE_PNG,
}
CF_TO_MEDIA_TYPE: dict[int, str] = {v: k for k, v in MEDIA_TYPE_TO_CF.items()}
CF_TO_MEDIA_TYPE[CF_JSON] = "application/json"
JSON_MEDIA_TYPE = "application/json"
