"""The in-memory HTTP channel of one CoAP request (:class:`CoapChannel`).

What a SynapseRequest sees as its connection: it collects the response (status,
headers, body, including bodies streamed by a producer) in memory, and says when the
request is over, either through a Deferred (``done``: the dispatcher's ``dispatch``,
across the bridge) or, on the direct path (``dispatch_now``), by calling ``notify``
with the response from Synapse's own ``finish``, in the logcontext that runs in.
:mod:`synapse_coap.synapse.dispatch` builds the requests that use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from synapse.http.site import SynapseSite
from synapse.logging.context import SENTINEL_CONTEXT, set_current_context
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer  # type: ignore[import-untyped]

try:  # Twisted's interfaces, for zope's benefit only
    from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport

    _INTERFACES: tuple[Any, ...] = (ITransport, IConsumer, IPushProducer)
except ImportError:  # pragma: no cover
    _INTERFACES = ()

from synapse_coap.mapping.codec import SIGNIFICANT_HEADERS
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpResponse

logger = logging.getLogger("synapse_coap.synapse.dispatch")

#: A response header's raw name (as Synapse wrote it) -> its lower-case name if the
#: wire carries it, else None (bounded: names come from Synapse and its modules)
_SIGNIFICANT_RAW: dict[bytes, str | None] = {}
_SIGNIFICANT_RAW_MAX = 256
_UNSEEN: Any = object()
_SIGNIFICANT = frozenset(SIGNIFICANT_HEADERS)


def _significant_name(raw: bytes) -> str | None:
    lower = raw.decode("latin-1").lower()
    name = lower if lower in _SIGNIFICANT else None
    if len(_SIGNIFICANT_RAW) < _SIGNIFICANT_RAW_MAX:
        _SIGNIFICANT_RAW[raw] = name
    return name


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


#: The client address Synapse sees for a request from an address not yet validated
#: (0-RTT from a new address): no one's identity.
UNVALIDATED_HOST = "0.0.0.0"


#: (host, port) -> the Twisted address of a peer (immutable, shared by its requests;
#: bounded: cleared when full)
_ADDRESSES: dict[tuple[str, int], IPv4Address | IPv6Address] = {}
_ADDRESSES_MAX = 4096


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    key = (host, port)
    found = _ADDRESSES.get(key)
    if found is None:
        if len(_ADDRESSES) >= _ADDRESSES_MAX:
            _ADDRESSES.clear()
        found = _ADDRESSES[key] = (
            IPv6Address("UDP", host, port) if ":" in host else IPv4Address("UDP", host, port)
        )
    return found


def write_json_at_once(
    request: Any, json_encoder: Callable[[Any], bytes], json_object: Any
) -> bool:
    """(:func:`compat.write_json_first <synapse_coap.synapse.compat.write_json_first>`)
    A CoAP request's JSON answer: encoded with the encoder Synapse chose and written to
    its channel at once, and the request finished, as Synapse's own writer ends up
    doing, without its thread pool hop (a Deferred, a coroutine and the logcontext
    switches around them; for a CoAP request the pool runs the encoding on the
    reactor thread anyway, :class:`~synapse_coap.synapse.dispatch._InlinePool`) and
    its byte producer (the channel buffers the body: nothing to pace). False for any
    other request (an HTTP listener's), which Synapse's writer takes as before."""
    if type(request.channel) is not CoapChannel:
        return False
    request.write(json_encoder(json_object))
    request.finish()
    return True


#: :func:`take_json_value`'s "no value here"
NO_VALUE = object()


def take_json_value(request: Any) -> Any:
    """(:func:`compat.parse_json_first <synapse_coap.synapse.compat.parse_json_first>`)
    A CoAP request's JSON body as the codec decoded it (:attr:`CoapChannel.json_value`),
    handed over once, in place of Synapse's parse of the same text (``json.loads`` of
    what the codec wrote from this value: the same value, and for Synapse one parse
    less a request). The body's text stays in ``request.content``, which is left at
    its end as Synapse's own read leaves it. :data:`NO_VALUE` for any other request,
    a second parse, or a body read already: Synapse's function then reads the
    content as it would."""
    channel = request.channel
    if type(channel) is not CoapChannel:
        return NO_VALUE
    value = channel.json_value
    if value is None:
        return NO_VALUE
    channel.json_value = None
    content = request.content
    if content is None or content.tell() != 0:
        return NO_VALUE
    content.seek(0, 2)
    return value


@implementer(*_INTERFACES)
class CoapChannel:
    """What a SynapseRequest sees as its HTTP channel and transport.

    Collects the response in memory. When the response is complete or the request
    ends by "losing the connection" (Synapse does that after some errors), ``notify``
    gets :meth:`result` (the direct path), or else ``done`` (a Deferred) fires, both
    on the reactor thread.
    """

    def __init__(
        self,
        site: SynapseSite,
        reactor: Any,
        peer: PeerInfo,
        local: IPv4Address | IPv6Address,
        notify: Callable[[HttpResponse | BaseException], None] | None = None,
    ):
        self.site = site
        self.factory = site
        self._reactor = reactor
        # an unvalidated (possibly spoofed) address is not the client's identity
        self._peer = (
            _address(peer.host, peer.port)
            if peer.identity_host is not None
            else _address(UNVALIDATED_HOST, 0)
        )
        self._host = local
        self._secure = peer.secure
        #: the direct path's receiver of the result (:meth:`InProcessDispatcher.dispatch_now`):
        #: with it there is no Deferred, ``done`` is None
        self._notify = notify
        self._peer_host = peer.host
        self._method = ""  # (the request's, for the log line of an abandoned one)
        self.done: defer.Deferred[None] | None = None if notify is not None else defer.Deferred()
        self.code: int | None = None
        #: the response headers the wire carries (lower-case name, Latin-1 value)
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.finished = False
        self.disconnecting = False
        self.request: Any = None
        self.producer: Any = None
        self._producer_streaming = False
        self._completing = False
        #: the request body's JSON value, for :func:`take_json_value` (None: none)
        self.json_value: Any = None

    @property
    def transport(self) -> CoapChannel:
        # (a property, not ``self.transport = self``: a reference cycle would keep every
        # request's channel, SynapseRequest, headers and Deferreds alive until Synapse's
        # next garbage collection, which it then pays for in proportion)
        return self

    # -- the HTTPChannel side ------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        # only the headers the wire carries (the codec drops the rest), named once each,
        # values decoded as Latin-1: kept in one pass over what Synapse wrote
        self.code = int(code)
        names = _SIGNIFICANT_RAW
        kept = self.headers
        pairs = (
            ((name, value) for name, values in headers.getAllRawHeaders() for value in values)
            if isinstance(headers, Headers)
            else headers  # older Twisted passes a list of pairs
        )
        for raw, value in pairs:
            name = names.get(raw, _UNSEEN)
            if name is _UNSEEN:
                name = _significant_name(bytes(raw))
            if name is not None:
                kept.append((name, bytes(value).decode("latin-1")))

    def write(self, data: bytes) -> None:
        self.body += data

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def requestDone(self, request: Any) -> None:
        # The response is complete: fire now. What waits on ``done`` only hands the
        # response to the asyncio side (no logcontext switch inside Synapse's call).
        self.finished = True
        if not self._completing:
            self._completing = True
            self._fire_done()

    def loseConnection(self) -> None:
        # Synapse loses the connection after writing an early error response.
        self.disconnecting = True
        self._stop_producer()
        self._complete()

    def abortConnection(self) -> None:
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self.loseConnection()

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self._peer

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._host

    def isSecure(self) -> bool:
        return self._secure

    def getPeerCertificate(self) -> None:
        return None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    # -- producers (media downloads stream through these) --------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        self._producer_streaming = streaming
        if not streaming:
            self._reactor.callLater(0, self._pull)

    def _pull(self) -> None:
        # A pull producer writes one chunk per resumeProducing call.
        producer = self.producer
        if producer is None or self.disconnecting:
            return
        producer.resumeProducing()
        if self.producer is producer:
            self._reactor.callLater(0, self._pull)

    def unregisterProducer(self) -> None:
        self.producer = None

    def _stop_producer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                logger.debug("producer.stopProducing failed", exc_info=True)

    # IPushProducer for the request (we never apply back-pressure: the body is buffered)
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def _complete(self) -> None:
        # A lost connection: fire from the reactor, never synchronously inside
        # Synapse's own call, since what waits on ``done`` then lets the request
        # clean up (connectionLost) and Synapse is still in the middle of writing.
        if not self._completing:
            self._completing = True
            self._reactor.callLater(0, self._fire_done)

    def _fire_done(self) -> None:
        notify = self._notify
        if notify is not None:
            self._notify = None
            self._deliver(notify)
        elif self.done is not None and not self.done.called:
            self.done.callback(None)

    # -- the request's end (notify or done), abandoning it -------------------------------

    def result(self) -> HttpResponse:
        """The response, once Synapse is done with the request (or lost the connection)."""
        req = self.request
        if not self.finished and req is not None and getattr(req, "channel", None) is not None:
            # Synapse lost the connection itself (after an early error response):
            # let the request clean up as a real connection would.
            req.connectionLost(_failure(ConnectionDone("response complete")))
        # Twisted drops the request's reference to its channel once it is done;
        # drop ours to the request too, so that neither waits for the cycle collector
        self.request = None
        return self.response()

    def _deliver(self, notify: Callable[[HttpResponse | BaseException], None]) -> None:
        """``notify`` the result, in the logcontext it is called in: inside Synapse's own
        ``finish``, the request's (so what the answer's encoding costs counts in the
        request's CPU, and what it logs carries the request's name, unless the server
        keeps the answer until its batch's other requests have started:
        ``transport.batch.BatchHold.later``; Twisted's HTTP channel too sends the
        response's bytes after the request, from the reactor). No switch to the
        sentinel and back: with Synapse 1.163 each switch is a ``getrusage`` system call
        and the contexts' accounting, two a request that Twisted's channel does not make
        (``strace``). ``notify`` changes no logcontext (a request it starts,
        :meth:`InProcessDispatcher.dispatch_now`, puts back the one it found); what it
        raises is logged, never raised into Synapse."""
        try:
            try:
                result: HttpResponse | BaseException = self.result()
            except Exception as e:
                result = e
            notify(result)
        except Exception:
            logger.exception("synapse-coap: answering a request failed")

    def fail(self, error: BaseException) -> None:
        """The request could not be started: ``notify`` gets ``error`` (once)."""
        notify, self._notify = self._notify, None
        self.request = None
        if notify is not None:
            notify(error)

    def abandon(self) -> None:
        """The CoAP exchange was given up before the answer: the request is dropped in
        Synapse, and ``notify`` is not called (both paths' abandon function; a
        request answered already, or abandoned, is left alone)."""
        over = self._notify is None if self.done is None else self.done.called
        if over or self.finished:
            return
        self._notify = None
        req = self.request
        self.request = None
        previous = set_current_context(SENTINEL_CONTEXT)
        try:
            if req is not None:
                logger.info(
                    "CoAP exchange abandoned by %s; dropping %s %s",
                    self._peer_host,
                    self._method,
                    req.get_redacted_uri(),
                )
            self.disconnecting = True
            self._stop_producer()
            if req is not None:
                req.connectionLost(_failure(ConnectionLost("CoAP exchange abandoned")))
        except Exception:
            logger.exception("synapse-coap: abandoning a request failed")
        finally:
            set_current_context(previous)

    # -- results ---------------------------------------------------------------------------

    def response(self) -> HttpResponse:
        if self.code is None:
            # The connection was dropped before any response was written.
            return HttpResponse(
                502,
                (("content-type", "application/json"),),
                b'{"errcode":"M_UNKNOWN","error":"Synapse closed the request without a response"}',
            )
        return HttpResponse(self.code, tuple(self.headers), bytes(self.body))
