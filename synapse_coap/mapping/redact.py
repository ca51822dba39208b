"""Log hygiene for HTTP requests: credentials never reach a log line.

One implementation for every layer that logs a request target or headers (the
CoAP server's payload dump, the sidecar and the gateway). Sans-I/O.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

#: Query parameters that carry credentials or secrets: never logged. (Matrix: access and
#: refresh tokens, login tokens, 3PID validation's client_secret / sid / token, the
#: user-interactive auth session, SSO/OIDC callback codes and state.)
SECRET_QUERY_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "loginToken",
        "token",
        "client_secret",
        "sid",
        "session",
        "id_access_token",
        "code",
        "state",
        "mac",
        "nonce",
    }
)

#: Headers whose value is never logged, even in a payload dump.
SECRET_HEADERS = frozenset({"authorization", "cookie", "set-cookie"})

REDACTED = "<redacted>"


def redact_target(target: bytes) -> str:
    """The request target for a log line: credentials in the query replaced by ``<redacted>``.

    A parameter counts as a credential by its name after percent-decoding
    (``acc%65ss_token`` too); the name is logged as it was sent.
    """
    text = target.decode("latin-1")
    path, sep, query = text.partition("?")
    if not sep:
        return path
    parts = []
    for item in query.split("&"):
        raw_key = item.partition("=")[0]
        key = urllib.parse.unquote_plus(raw_key)
        parts.append(f"{raw_key}={REDACTED}" if key in SECRET_QUERY_KEYS else item)
    return path + "?" + "&".join(parts)


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers for a log line, with credentials replaced by ``<redacted>``."""
    return [(k, REDACTED if k.lower() in SECRET_HEADERS else v) for k, v in headers]
