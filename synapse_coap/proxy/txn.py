"""Short transaction ids: the sidecar sends a client's long transaction ids as 8 characters.

matrix-nio names every send with a UUID (36 characters, 22 bytes on the wire even
packed); a transaction id only has to be unique per access token (Synapse
de-duplicates sends by token, room and id). The sidecar replaces every transaction
id in a request path (the route table's ``txn`` arguments: ``/send``,
``/sendToDevice``, ``/redact``, ...) by

    base64url(HMAC-SHA256(key=access token, "synapse-coap txn v1" 0x00 client id)[:6])

(8 characters, 48 bits). It is a pure function of (token, client id), so a retried
send maps to the same short id and Synapse still de-duplicates it, across sidecar
restarts too: no state is needed for idempotency. An id whose short form would not
be smaller on the wire (a short id such as ``m17.3``) is sent as it is.

Collisions: two different client ids of one token map to the same short id with
probability ``2**-48``; Synapse compares ids per device and room, for 24 hours at
most, so a device sending n messages a day into one room sees a collision (which
would make Synapse answer the second send with the first event's id) with
probability about ``n**2 / 2**49``: 2e-9 for n = 1000.

Responses: Synapse echoes the id in ``unsigned.transaction_id`` of the sender's own
events (clients match their local echo with it). The sidecar remembers the ids it
shortened (:data:`REMEMBERED`, most recent) and puts the client's own id back in
JSON responses; after a sidecar restart, events sent before it carry the short id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections import OrderedDict
from urllib.parse import unquote

from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.routes import RouteTable, encode_arg

#: Characters of a short id (6 bytes of the digest, base64url).
SHORT_LEN = 8
#: Short ids remembered for putting the client's id back into responses.
REMEMBERED = 4096
_DOMAIN = b"synapse-coap txn v1\x00"
_ECHO = re.compile(rb'"transaction_id"(\s*):(\s*)"([A-Za-z0-9_-]{%d})"' % SHORT_LEN)


def short_txn_id(access_token: str, txn_id: str) -> str:
    """The short id of ``txn_id`` under ``access_token`` (deterministic, 8 characters)."""
    digest = hmac.new(
        access_token.encode("utf-8"), _DOMAIN + txn_id.encode("utf-8"), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode("ascii")


def _wire_len(value: str) -> int:
    return len(encode_arg(value, "txn", WireContext(), ()).encode("utf-8", "surrogatepass"))


class TxnShortener:
    """Rewrites transaction ids in request paths; restores them in responses."""

    def __init__(self, routes: RouteTable) -> None:
        self._routes = routes
        self._originals: OrderedDict[str, str] = OrderedDict()

    def _txn_positions(self, segments: list[str]) -> list[int]:
        found = self._routes.match(segments)
        if found is None:
            return []
        route, _args = found
        return [
            i
            for i, seg in enumerate(route.segments)
            if not isinstance(seg, str) and seg.kind == "txn" and not seg.tail
        ]

    def shorten(self, request: HttpRequest) -> HttpRequest:
        """The request with its transaction id shortened (unchanged if it has none)."""
        if request.method != "PUT":
            return request
        auth = request.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return request
        path, sep, query = request.target.partition(b"?")
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            return request
        segments = text.split("/")[1:]
        positions = self._txn_positions(segments)
        if not positions:
            return request
        changed = False
        for i in positions:
            original = unquote(segments[i])
            short = short_txn_id(token, original)
            if _wire_len(short) >= _wire_len(original):
                continue
            segments[i] = short
            changed = True
            self._originals[short] = original
            self._originals.move_to_end(short)
            while len(self._originals) > REMEMBERED:
                self._originals.popitem(last=False)
        if not changed:
            return request
        target = ("/" + "/".join(segments)).encode("utf-8") + sep + query
        return HttpRequest(request.method, target, request.headers, request.body)

    def restore(self, response: HttpResponse) -> HttpResponse:
        """The response with the client's own ids back in ``transaction_id`` fields."""
        body = response.body
        if not self._originals or b'"transaction_id"' not in body:
            return response

        def put_back(m: re.Match[bytes]) -> bytes:
            original = self._originals.get(m.group(3).decode("ascii"))
            if original is None:
                return m.group(0)
            value = json.dumps(original, ensure_ascii=False).encode("utf-8")
            return b'"transaction_id"' + m.group(1) + b":" + m.group(2) + value

        new = _ECHO.sub(put_back, body)
        if new == body:
            return response
        headers = tuple((k, v) for k, v in response.headers if k != "content-length")
        return HttpResponse(response.status, headers, new)


__all__ = ["REMEMBERED", "SHORT_LEN", "TxnShortener", "short_txn_id"]
