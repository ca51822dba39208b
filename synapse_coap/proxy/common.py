"""Pieces shared by the sidecar and the gateway.

- Matrix JSON error responses (what a client understands instead of a hang).
- Timeouts derived from the request (long-poll ``/sync`` waits longer).
- Header hygiene: hop-by-hop headers are never forwarded.
- Log hygiene: targets are logged with credentials removed, bodies never,
  unless the explicit payload-dump switch is on (``--dump-payloads`` or
  ``SYNAPSE_COAP_DUMP_PAYLOADS=1``).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Iterable

from synapse_coap.errors import ConfigValueError
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.redact import (  # the one implementation, re-exported
    SECRET_HEADERS as SECRET_HEADERS,
)
from synapse_coap.mapping.redact import (
    SECRET_QUERY_KEYS as SECRET_QUERY_KEYS,
)
from synapse_coap.mapping.redact import (
    redact_headers as redact_headers,
)
from synapse_coap.mapping.redact import (
    redact_target as redact_target,
)

logger = logging.getLogger(__name__)

#: The logger the payload dumps go to (so they can be routed on their own).
dump_logger = logging.getLogger("synapse_coap.proxy.dump")

#: Environment variable that switches payload dumps on, like coap-proxy's PROXY_DUMP_PAYLOADS.
DUMP_ENV = "SYNAPSE_COAP_DUMP_PAYLOADS"

#: Headers that belong to one HTTP connection and are never forwarded (RFC 9110 §7.6.1),
#: plus the ones the receiving HTTP stack recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
    }
)


def dump_enabled(flag: bool) -> bool:
    """The payload-dump switch: the command-line flag or ``SYNAPSE_COAP_DUMP_PAYLOADS=1``."""
    if flag:
        return True
    return os.environ.get(DUMP_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def matrix_error(status: int, errcode: str, error: str) -> HttpResponse:
    """A Matrix-style JSON error response (``{"errcode": ..., "error": ...}``)."""
    body = json.dumps({"errcode": errcode, "error": error}).encode()
    return HttpResponse(
        status=status,
        headers=(("content-type", "application/json"),),
        body=body,
    )


def query_param(target: bytes, name: str) -> str | None:
    """The first value of query parameter ``name`` in a raw request target, or None."""
    _, _, query = target.partition(b"?")
    if not query:
        return None
    try:
        pairs = urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    except ValueError:
        return None
    for key, value in pairs:
        if key == name:
            return value
    return None


def request_timeout(target: bytes, default: float, long_poll_slack: float) -> float:
    """How long to wait for the response to a request.

    A long-poll (``/sync``, ``/events``, ``/notifications``... anything with a
    ``timeout`` query parameter in milliseconds) gets its own timeout plus
    ``long_poll_slack`` seconds; everything else gets ``default``.
    """
    value = query_param(target, "timeout")
    if value is None:
        return default
    try:
        ms = float(value)
    except ValueError:
        return default
    if not ms >= 0 or ms > 24 * 3600 * 1000:  # NaN, negative or absurd: ignore
        return default
    return max(default, ms / 1000.0 + long_poll_slack)


def forwardable_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Drop hop-by-hop headers; names lower-cased, order kept."""
    return tuple((k.lower(), v) for k, v in headers if k.lower() not in HOP_BY_HOP)


def dump_request(stage: str, request: HttpRequest, size: int | None = None) -> None:
    """Log one request of a payload dump (only called when the switch is on)."""
    dump_logger.info(
        "%s request: %s %s headers=%s body(%d B)=%r%s",
        stage,
        request.method,
        redact_target(request.target),
        redact_headers(request.headers),
        len(request.body),
        request.body[:4096],
        "" if size is None else f" wire size {size} B",
    )


def dump_response(stage: str, response: HttpResponse, size: int | None = None) -> None:
    """Log one response of a payload dump (only called when the switch is on)."""
    dump_logger.info(
        "%s response: %d headers=%s body(%d B)=%r%s",
        stage,
        response.status,
        redact_headers(response.headers),
        len(response.body),
        response.body[:4096],
        "" if size is None else f" wire size {size} B",
    )


def parse_host_port(text: str, path: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` (or just a host when ``default_port`` is given)."""
    text = text.strip()
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigValueError(path, f"unterminated IPv6 literal in {text!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigValueError(path, f"expected [HOST]:PORT, got {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ConfigValueError(
            path, f"write IPv6 addresses in brackets, e.g. [::1]:8008, got {text!r}"
        )
    else:
        host, port_text = text, None
    if not host:
        raise ConfigValueError(path, f"missing host in {text!r}")
    if port_text is None:
        if default_port is None:
            raise ConfigValueError(path, f"missing port in {text!r} (expected HOST:PORT)")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigValueError(path, f"port must be a number 0-65535, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigValueError(path, f"port must be a number 0-65535, got {port}")
    return host, port


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def configure_logging(debug: bool) -> None:
    """Logging for the command-line programs: INFO (or DEBUG with ``--debug-log``) to stderr."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        # aiohttp's access log prints full targets (which may hold access_token=...).
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
