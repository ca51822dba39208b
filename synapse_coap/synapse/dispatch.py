"""In-process dispatch: a decoded CoAP request becomes a SynapseRequest.

No loopback HTTP is involved. :class:`InProcessDispatcher` builds its own
copy of Synapse's resource trees (client, federation, keys, media,
.well-known, plus anything modules registered) once, wraps them in a
:class:`~synapse.http.site.SynapseSite`, and feeds each request through a
:class:`CoapChannel`, an in-memory stand-in for the TCP connection:

* the exact request target is passed to ``requestReceived`` unmodified, so
  X-Matrix signatures over it verify;
* ``getPeer()`` is the real UDP peer, so Synapse logs and rate-limits the
  client's real IP (once validated: a 0-RTT request from an address that has
  not yet proved it receives our datagrams shows as ``0.0.0.0``);
* ``Content-Length`` is set from the body, and Synapse's own
  ``max_request_body_size`` check applies;
* the response (status, headers, body, including bodies streamed by a
  producer, such as media downloads) is collected in memory;
* if the awaiting asyncio task is cancelled (the CoAP exchange was
  abandoned), the request's connection is "lost", which cancels cancellable
  servlets such as long-poll ``/sync``.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

from synapse.http.site import SynapseSite
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
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse import compat
from synapse_coap.synapse.bridge import Bridge

logger = logging.getLogger(__name__)

#: Headers the dispatcher sets itself; any copy from the peer is dropped.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

#: The access-log logger name, so operators can route CoAP requests separately.
ACCESS_LOGGER = "synapse.access.coap"

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


def build_resource_tree(hs: Any) -> Any:
    """Synapse's client, federation, key, media and .well-known resources in one tree.

    Where a running HTTP listener of this process already serves ``client`` or
    ``federation`` (as ``sample_homeserver.yaml``'s does), its live resources
    are reused: building a second ``ClientRestResource`` would build a second
    copy of its servlets' caches, whose metrics Prometheus refuses to register
    twice (an ERROR at every start). A name no listener serves is built with
    :func:`compat.configure_named_resource` on the main process (exactly what an HTTP
    listener with that name gets) and the equivalent construction on a worker.
    """
    from synapse.rest.health import HealthResource
    from synapse.util.httpresourcetree import create_resource_tree
    from twisted.web.resource import Resource

    live_names, live = live_listener_resources(hs)
    wanted = [name for name in ("client", "federation") if name not in live_names]
    resources: dict[str, Resource] = {"/health": HealthResource()}  # type: ignore[no-untyped-call]
    configure = compat.configure_named_resource(hs)
    if configure is not None:
        for name in wanted:
            resources.update(configure(name, False))
    else:
        resources.update(_worker_resources(hs, wanted))
    resources.update(live)
    resources.update(compat.module_web_resources(hs))

    from synapse.http.server import OptionsResource

    return create_resource_tree(resources, OptionsResource())  # type: ignore[no-untyped-call]


#: Paths of a live listener's tree the CoAP listener may reuse (never replication,
#: metrics or anything else a listener may also carry).
_REUSABLE_PREFIXES = ("/_matrix/", "/.well-known", "/_synapse/admin", "/_synapse/client")


def live_listener_resources(hs: Any) -> tuple[set[str], dict[str, Any]]:
    """The resource names (of ``client``, ``federation``) the process's running HTTP
    listeners serve in full, and their resources by path (only under
    :data:`_REUSABLE_PREFIXES`)."""
    from synapse.http.server import UnrecognizedRequestResource
    from synapse.http.site import SynapseSite

    names_by_tag: dict[str, set[str] | None] = {}
    for listener in compat.listener_configs(hs):
        if listener.type != "http" or listener.http_options is None:
            continue
        names = {n for res in listener.http_options.resources for n in res.names}
        tag = listener.get_site_tag()
        # two listeners with one tag: only what both serve counts
        prev = names_by_tag.get(tag, names)
        names_by_tag[tag] = names & prev if prev is not None else names
    served: set[str] = set()
    found: dict[str, Any] = {}
    ports = compat.listening_services(hs)
    ports += [p for p in compat.reactor_listening_ports(hs) if p not in ports]
    seen_sites: set[int] = set()
    for port in ports:
        site = getattr(port, "factory", None)
        while site is not None and not isinstance(site, SynapseSite):
            site = getattr(site, "wrappedFactory", None)
        if site is None or id(site) in seen_sites:
            continue
        seen_sites.add(id(site))
        names = names_by_tag.get(site.site_tag) or set()
        full = {n for n in ("client", "federation") if n in names}
        if not full:
            continue
        served |= full

        def walk(node: Any, prefix: str) -> None:
            for seg, child in list(node.children.items()):
                path = prefix + "/" + seg.decode("utf-8", "replace")
                if type(child) is UnrecognizedRequestResource:
                    walk(child, path)
                elif path.startswith(_REUSABLE_PREFIXES):
                    found.setdefault(path, child)

        walk(site.resource, "")
    if served:
        logger.info(
            "synapse-coap: serving %s from the running HTTP listener's resources (%s)",
            "/".join(sorted(served)),
            ", ".join(sorted(found)),
        )
    return served, found


def _worker_resources(hs: Any, names: list[str]) -> dict[str, Any]:
    """Mirror of GenericWorkerServer._listen_http for ``names`` (of client, federation)."""
    from synapse.api.urls import (
        CLIENT_API_PREFIX,
        FEDERATION_PREFIX,
        LEGACY_MEDIA_PREFIX,
        MEDIA_R0_PREFIX,
        MEDIA_V3_PREFIX,
        SERVER_KEY_PREFIX,
    )
    from synapse.federation.transport.server import TransportLayerServer
    from synapse.http.server import JsonResource
    from synapse.rest import ClientRestResource, admin
    from synapse.rest.key.v2 import KeyResource
    from synapse.rest.synapse.client import build_synapse_client_resource_tree
    from synapse.rest.well_known import well_known_resource

    resources: dict[str, Any] = {}
    if "client" in names:
        admin_resource = JsonResource(hs, canonical_json=False)
        admin.register_servlets(hs, admin_resource)
        resources.update(
            {
                "/_synapse/admin": admin_resource,
                CLIENT_API_PREFIX: ClientRestResource(hs),
                "/.well-known": well_known_resource(hs),
            }
        )
        resources.update(build_synapse_client_resource_tree(hs))
    if "federation" in names:
        resources[FEDERATION_PREFIX] = TransportLayerServer(hs)
        resources[SERVER_KEY_PREFIX] = KeyResource(hs)
    if names and hs.config.media.can_load_media_repo:
        media_repo = hs.get_media_repository_resource()
        resources.update(
            {
                MEDIA_R0_PREFIX: media_repo,
                MEDIA_V3_PREFIX: media_repo,
                LEGACY_MEDIA_PREFIX: media_repo,
            }
        )
    return resources


class _InlinePool:
    """The thread pool a CoAP request's SynapseRequest sees: runs the call at once, on
    the calling (reactor) thread, and delivers its result there too.

    Synapse encodes a JSON response with ``defer_to_thread(request.reactor, ...)``:
    a hop to a pool thread and back through ``callFromThread`` (a waker write and
    one more reactor turn). JSON encoding holds the GIL throughout, so on the pool
    it runs no more in parallel than here, and the hop cost more CPU than the
    encoding of a small answer. (The CoAP answer is encoded from that JSON on the
    asyncio side anyway.)
    """

    def __init__(self, reactor: _RequestReactor) -> None:
        self._reactor = reactor

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        try:
            result = func(*args, **kw)
        except BaseException:
            ok, result = False, _failure_now()
        else:
            ok = True
        if onResult is not None:
            self._reactor.inline_delivery = True
            try:
                onResult(ok, result)
            finally:
                self._reactor.inline_delivery = False

    def callInThread(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.callInThreadWithCallback(None, func, *args, **kw)


class _RequestReactor:
    """The reactor a CoAP request's SynapseRequest sees: the real one, except for
    :meth:`getThreadPool` (:class:`_InlinePool`) and, while that pool delivers a
    result, :meth:`callFromThread` (called at once: it is already the reactor thread)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pool = _InlinePool(self)
        self.inline_delivery = False

    def getThreadPool(self) -> _InlinePool:
        return self._pool

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        if self.inline_delivery:
            f(*args, **kw)
        else:
            self._reactor.callFromThread(f, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _failure_now() -> Failure:
    return Failure()  # type: ignore[no-untyped-call]


def build_site(hs: Any, resource: Any, max_request_body_size: int) -> SynapseSite:
    from synapse.config.server import HttpListenerConfig, TCPListenerConfig

    listener = TCPListenerConfig(
        port=0,
        bind_addresses=[],
        type="http",
        tls=False,
        http_options=HttpListenerConfig(x_forwarded=False, tag="coap"),
    )
    return SynapseSite(
        logger_name=ACCESS_LOGGER,
        site_tag="coap",
        config=listener,
        resource=resource,
        server_version_string=hs.version_string,
        max_request_body_size=max_request_body_size,
        reactor=cast(Any, _RequestReactor(hs.get_reactor())),
        hs=hs,
    )


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)  # type: ignore[no-untyped-call]


#: The client address Synapse sees for a request from an address not yet validated
#: (0-RTT from a new address): no one's identity.
UNVALIDATED_HOST = "0.0.0.0"


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("UDP", host, port)
    return IPv4Address("UDP", host, port)


@implementer(*_INTERFACES)
class CoapChannel:
    """What a SynapseRequest sees as its HTTP channel and transport.

    Collects the response in memory; ``done`` (a Deferred, fired on the
    reactor thread) fires when the response is complete or the request ends
    by "losing the connection" (Synapse does that after some errors).
    """

    def __init__(
        self, site: SynapseSite, reactor: Any, peer: PeerInfo, local: IPv4Address | IPv6Address
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
        self.done: defer.Deferred[None] = defer.Deferred()
        self.code: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.finished = False
        self.disconnecting = False
        self.request: Any = None
        self.producer: Any = None
        self._producer_streaming = False
        self._completing = False

    @property
    def transport(self) -> CoapChannel:
        # (a property, not ``self.transport = self``: a reference cycle would keep every
        # request's channel, SynapseRequest, headers and Deferreds alive until Synapse's
        # next garbage collection, which it then pays for in proportion)
        return self

    # -- the HTTPChannel side ------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        self.code = int(code)
        if isinstance(headers, Headers):
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    self.headers.append((bytes(name), bytes(value)))
        else:  # older Twisted passes a list of pairs
            for name, value in headers:
                self.headers.append((bytes(name), bytes(value)))

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
        if not self.done.called:
            self.done.callback(None)

    # -- results ---------------------------------------------------------------------------

    def response(self) -> HttpResponse:
        if self.code is None:
            # The connection was dropped before any response was written.
            return HttpResponse(
                502,
                (("content-type", "application/json"),),
                b'{"errcode":"M_UNKNOWN","error":"Synapse closed the request without a response"}',
            )
        # only the headers the wire carries (the codec drops the rest), named once each
        names = _SIGNIFICANT_RAW
        headers = []
        for k, v in self.headers:
            name = names.get(k, _UNSEEN)
            if name is _UNSEEN:
                name = _significant_name(k)
            if name is not None:
                headers.append((name, v.decode("latin-1")))
        return HttpResponse(self.code, tuple(headers), bytes(self.body))


class InProcessDispatcher:
    """The module's :class:`~synapse_coap.mapping.dispatch.Dispatcher`.

    ``dispatch`` is called on the asyncio loop; the request starts on the
    reactor thread (via the bridge, :meth:`Bridge.call_reactor`) in the sentinel
    logcontext, exactly as from Twisted's HTTP channel, and Synapse gives it its
    own request logcontext and request metrics as usual.
    """

    def __init__(
        self,
        hs: Any,
        bridge: Bridge,
        *,
        max_request_body_size: int | None = None,
        local_address: tuple[str, int] = ("::", 0),
    ) -> None:
        self._homeserver = hs
        self._bridge = bridge
        self.max_request_body_size = (
            max_request_body_size
            if max_request_body_size is not None
            else compat.max_request_body_size(hs.config)
        )
        self._local = _address(*local_address)
        self._site: SynapseSite | None = None
        self._reactor = hs.get_reactor()

    @property
    def site(self) -> SynapseSite:
        """The SynapseSite (built on first use, on the reactor thread)."""
        if self._site is None:
            self._site = build_site(
                self._homeserver, build_resource_tree(self._homeserver), self.max_request_body_size
            )
        return self._site

    def dispatch(self, request: HttpRequest, peer: PeerInfo) -> Coroutine[Any, Any, HttpResponse]:
        # (the bridge's coroutine itself: no frame of ours around it on every request)
        return self._bridge.call_reactor(functools.partial(self.start_in_reactor, request, peer))

    def dispatch_now(
        self,
        request: HttpRequest,
        peer: PeerInfo,
        done: Callable[[HttpResponse | BaseException], None],
    ) -> Callable[[], None] | None:
        # (see mapping.dispatch.EagerDispatcher)
        return self._bridge.start_now(functools.partial(self.start_in_reactor, request, peer), done)

    def start_in_reactor(
        self, request: HttpRequest, peer: PeerInfo
    ) -> tuple[defer.Deferred[HttpResponse], Callable[[], None]]:
        """Start one request in Synapse; must be called on the reactor thread, in the
        sentinel logcontext (as Twisted's HTTP channel calls ``requestReceived``).

        Returns the Deferred of the response (fired on the reactor thread) and the
        function that abandons the request (the CoAP exchange was given up).
        """
        site = self.site
        channel = CoapChannel(site, self._reactor, peer, self._local)
        req = compat.make_request(
            site,
            cast(Any, channel),
            server_name=self._homeserver.hostname,
            max_request_body_size=self.max_request_body_size,
        )
        channel.request = req
        headers = req.requestHeaders
        for name, value in request.headers:
            if name in _OWN_HEADERS:
                continue
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        headers.setRawHeaders(b"Content-Length", [str(len(request.body)).encode()])
        # As if the channel had received the body: the position is at the end
        # (Synapse compares content.tell() with Content-Length; Twisted seeks
        # back to 0 in requestReceived).
        req.content = io.BytesIO()
        req.content.write(request.body)
        req.requestReceived(request.method.encode("ascii"), request.target, b"1.1")

        def done(_: None) -> HttpResponse:
            if not channel.finished and getattr(req, "channel", None) is not None:
                # Synapse lost the connection itself (after an early error response):
                # let the request clean up as a real connection would.
                req.connectionLost(_failure(ConnectionDone("response complete")))
            # Twisted drops the request's reference to its channel once it is done;
            # drop ours to the request too, so that neither waits for the cycle collector
            channel.request = None
            return channel.response()

        def abandon() -> None:
            if channel.finished or channel.done.called:
                return
            logger.info(
                "CoAP exchange abandoned by %s; dropping %s %s",
                peer.host,
                request.method,
                req.get_redacted_uri(),
            )
            channel.disconnecting = True
            channel._stop_producer()
            req.connectionLost(_failure(ConnectionLost("CoAP exchange abandoned")))

        return channel.done.addCallback(done), abandon
