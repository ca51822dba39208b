"""The HTTP pieces the CoAP federation agent converts between Twisted and the mapping layer:
federation URIs, route names for metrics, headers, and reading a Twisted body producer."""

from __future__ import annotations

import functools
import logging
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from synapse_coap.mapping.codec import WireCodec
from synapse_coap.wire.profile import supported_profiles

logger = logging.getLogger("synapse_coap.synapse.agent")

FEDERATION_SCHEME = b"matrix-federation"


def parse_federation_uri(uri: bytes) -> tuple[str, bytes]:
    """``matrix-federation://dest/path?q`` -> ("dest", b"/path?q"), target bytes untouched.

    Raises ValueError for another scheme or a malformed URI.
    """
    prefix = FEDERATION_SCHEME + b"://"
    if not uri.startswith(prefix):
        raise ValueError("not a matrix-federation URI")
    rest = uri[len(prefix) :]
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    dest = rest[:cut]
    target = rest[cut:]
    if not dest:
        raise ValueError("no destination in URI")
    if not target.startswith(b"/"):
        target = b"/" + target
    return dest.decode("ascii"), target


@functools.cache
def _route_namer() -> WireCodec:
    """A codec for the profile the CoAP client offers first (the highest installed one)."""
    return WireCodec(supported_profiles()[0])


def classify_route(target: bytes) -> str:
    """The metrics name of a federation request target: the receiving listener's name.

    The name comes from the profile's route table, exactly as the peer's CoAP
    listener names the same request (``synapse_coap_requests_total{route}``), so
    the two ends' metrics join on ``route``:
    ``/_matrix/federation/v1/send/txn`` -> "federation.v1.send.1",
    ``/_matrix/key/v2/server`` -> "key.v2.server.0",
    ``/_matrix/federation/v1/query/profile?user_id=...`` -> "federation.v1.query".
    A target the route table cannot carry is "literal". Arguments (room, user,
    event and transaction ids) never enter the name; "unknown" if naming fails
    (a request is never refused for its metrics label).
    """
    try:
        return _route_namer().route_name_for_target(target)
    except Exception:  # e.g. an unreadable maps directory: the listener says "unknown" too
        logger.debug("cannot name federation route", exc_info=True)
        return "unknown"


def flatten_headers(headers: Headers | None) -> tuple[tuple[str, str], ...]:
    """Twisted Headers -> ((lower-name, value), ...), order of names kept."""
    if headers is None:
        return ()
    out: list[tuple[str, str]] = []
    for name, values in headers.getAllRawHeaders():
        lname = name.decode("latin-1").lower()
        for v in values:
            out.append((lname, v.decode("latin-1")))
    return tuple(out)


def to_twisted_headers(headers: tuple[tuple[str, str], ...]) -> Headers:
    h = Headers()
    for name, value in headers:
        h.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    return h


class _Collector:
    """An IConsumer that keeps what a body producer writes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def read_body(producer: Any) -> defer.Deferred[bytes]:
    """Drive a body producer (Synapse's QuieterFileBodyProducer) and collect its bytes.

    Cancelling the result stops the producer.
    """
    if producer is None:
        return defer.succeed(b"")
    collector = _Collector()

    def cancel(_: defer.Deferred[bytes]) -> None:
        try:
            producer.stopProducing()
        except Exception:  # already finished or stopped: nothing to stop
            pass

    out: defer.Deferred[bytes] = defer.Deferred(cancel)
    inner: defer.Deferred[None] = producer.startProducing(collector)

    def done(_: object) -> None:
        if not out.called:
            out.callback(b"".join(collector.chunks))

    def failed(f: Failure) -> None:
        if not out.called:
            out.errback(f)

    inner.addCallbacks(done, failed)
    return out
