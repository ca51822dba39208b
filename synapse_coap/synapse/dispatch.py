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
from synapse.logging.context import SENTINEL_CONTEXT, set_current_context
from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse import compat
from synapse_coap.synapse.bridge import Bridge
from synapse_coap.synapse.channel import (
    NO_VALUE,
    CoapChannel,
    _address,
    take_json_value,
    write_json_at_once,
)

logger = logging.getLogger(__name__)


def _utf8(body: bytes) -> bool:
    """``body`` is valid UTF-8 (as Synapse's parse requires before the JSON)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: Headers the dispatcher sets itself; any copy from the peer is dropped.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

#: The access-log logger name, so operators can route CoAP requests separately.
ACCESS_LOGGER = "synapse.access.coap"


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


def _nothing() -> None:
    pass


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
        if not compat.parse_json_first(take_json_value, NO_VALUE):
            logger.info(
                "synapse-coap: Synapse %s has no JSON body parser we know: Synapse parses "
                "CoAP requests' JSON bodies from their text",
                compat.SYNAPSE_VERSION,
            )
        if not compat.write_json_first(write_json_at_once):
            logger.info(
                "synapse-coap: Synapse %s has no JSON answer writer we know: CoAP requests' "
                "JSON answers go through its thread pool hop and byte producer",
                compat.SYNAPSE_VERSION,
            )
        self._site: SynapseSite | None = None
        self._reactor = hs.get_reactor()
        self._later: list[Callable[[], None]] = []
        self._later_call: Any = None

    def answer_later(self, answer: Callable[[], None]) -> bool:
        """(see CoapServer.answer_later) An answer whose response came after its
        request's start (from a reactor callback: a database result, Synapse's Rust
        runtime): kept, with the others that come before the reactor's timed calls
        run (in the same reactor turn when they come from its thread calls), then run
        in order; True. False where the loop is not on the reactor's thread."""
        if not self._bridge.same_thread:
            return False
        self._later.append(answer)
        if self._later_call is None:
            self._later_call = self._reactor.callLater(0, self._answer_kept)
        return True

    def _answer_kept(self) -> None:
        self._later_call = None
        answers, self._later = self._later, []
        for answer in answers:
            try:
                answer()
            except Exception:
                logger.exception("synapse-coap: answering a request failed")

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
        """(see mapping.dispatch.EagerDispatcher) With the loop on the reactor thread the
        request starts now, in the sentinel logcontext, with no Deferred between Synapse
        and ``done``: its channel calls ``done`` when Synapse finishes the response
        (possibly before this returns), in the logcontext Synapse finishes it in (the
        request's, or the sentinel), which ``done`` must leave as it found it. None in
        thread mode."""
        if not self._bridge.same_thread:
            return None
        channel = CoapChannel(self.site, self._reactor, peer, self._local, notify=done)
        previous = set_current_context(SENTINEL_CONTEXT)
        try:
            self._begin(channel, request)
        except Exception as e:
            channel.fail(e)
            return _nothing
        finally:
            set_current_context(previous)
        return channel.abandon

    def start_in_reactor(
        self, request: HttpRequest, peer: PeerInfo
    ) -> tuple[defer.Deferred[HttpResponse], Callable[[], None]]:
        """Start one request in Synapse; must be called on the reactor thread, in the
        sentinel logcontext (as Twisted's HTTP channel calls ``requestReceived``).

        Returns the Deferred of the response (fired on the reactor thread) and the
        function that abandons the request (the CoAP exchange was given up).
        """
        channel = CoapChannel(self.site, self._reactor, peer, self._local)
        self._begin(channel, request)
        done = channel.done
        assert done is not None  # (a channel without ``notify`` has its Deferred)
        return done.addCallback(lambda _: channel.result()), channel.abandon

    def _begin(self, channel: CoapChannel, request: HttpRequest) -> None:
        """Build the SynapseRequest of ``request`` on ``channel`` and hand it to Synapse
        (``requestReceived``, as Twisted's HTTP channel does)."""
        req = compat.make_request(
            self.site,
            cast(Any, channel),
            server_name=self._homeserver.hostname,
            max_request_body_size=self.max_request_body_size,
        )
        channel.request = req
        channel._method = request.method
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
        value = request.value
        if value is not None and (request.body.isascii() or _utf8(request.body)):
            # (Synapse decodes the text as UTF-8 first: a lone surrogate the codec
            # carried is refused there, so such a body is left to Synapse's parse)
            channel.json_value = value
        req.requestReceived(request.method.encode("ascii"), request.target, b"1.1")
