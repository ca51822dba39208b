"""Frozen value objects shared by every layer above the codec.

``HttpRequest``/``HttpResponse`` are what the HTTP side sees (Synapse's
servlets, aiohttp, Twisted agents); ``CoapMessage`` is what goes inside a
Noise record (or a plain UDP datagram): a code, options and a payload.
"""

from __future__ import annotations

from typing import Any

import attrs

# (compiled by the native build, which this module, with its converters, cannot be)
from synapse_coap.mapping.coap_message import CoapMessage, CoapOption


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    """Normalise headers to a tuple of (lower-case name, value) pairs, order kept."""
    items = value.items() if isinstance(value, dict) else value
    out = []
    for k, v in items:  # type: ignore[attr-defined]
        if type(k) is not str:
            k = str(k)
        out.append((k.lower(), v if type(v) is str else str(v)))
    return tuple(out)


@attrs.frozen
class HttpRequest:
    """An HTTP request as Synapse (or a client) sees it.

    ``target`` is the raw request target (path and query, percent-encoding
    kept), byte for byte: X-Matrix signatures cover it.

    ``value``: the JSON value of ``body`` where the codec decoded one on the way (what
    ``json.loads(body)`` gives, the same types; None otherwise), so that the in-process
    dispatcher can hand it to Synapse instead of Synapse parsing the text again. Not
    part of the request's equality or hash (``body`` is); whoever is handed it may
    change it, so it is handed over once (``synapse_coap.synapse.channel``).
    """

    method: str
    target: bytes
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_headers)
    body: bytes = b""
    value: Any = attrs.field(default=None, eq=False, repr=False)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def is_long_poll(self) -> bool:
        """True for a GET whose ``timeout`` query parameter asks the server to wait
        (``/sync?timeout=30000``, ``/events``): its answer is not expected soon, so the
        CoAP server acknowledges it at once and answers separately (RFC 7252 §5.2.2),
        and the client takes the prompt empty ACK as an RTT sample."""
        if self.method != "GET":
            return False
        _, sep, query = self.target.partition(b"?")
        if not sep:
            return False
        for item in query.split(b"&"):
            name, _, value = item.partition(b"=")
            if name == b"timeout":
                try:
                    return float(value.decode("latin-1")) > 0
                except ValueError:
                    return False
        return False


@attrs.frozen
class HttpResponse:
    """An HTTP response: exact status, the headers that matter, the body bytes."""

    status: int
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_headers)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


__all__ = ["CoapMessage", "CoapOption", "HttpRequest", "HttpResponse"]
