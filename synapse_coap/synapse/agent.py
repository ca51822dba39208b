"""The outbound federation seam: a Twisted ``IAgent`` that carries Synapse's requests over CoAP.

:func:`install_federation_agent` replaces ``hs.get_federation_http_client().agent``
(DESIGN.md, "Outbound seam") with a :class:`CoapFederationAgent`. Synapse keeps
doing everything above the agent: it signs each request (X-Matrix), applies
its timeouts (by cancelling the Deferred we return), retries and backs off per
destination (on any exception we raise). The agent only changes how the bytes
travel:

* ``request(method, b"matrix-federation://dest/path?q", headers, bodyProducer)``
  is split into the destination and the *exact* request target bytes Synapse
  signed;
* the destination is resolved by :class:`~synapse_coap.synapse.discovery.Discovery`
  (static peers map, cache, DNS SRV, probe);
* for a CoAP destination the body is read from the producer and the request
  goes out through the shared CoapClient on the bridge's asyncio loop (one
  client for all destinations, so the transport's per-peer NSTART limit holds);
  the reply comes back as a Twisted ``IResponse``;
* a destination without CoAP goes to the original agent unchanged
  (``fallback: https``) or fails like an unreachable server (``fallback: never``).

Errors map onto what Synapse's ``MatrixFederationHttpClient`` expects:
LinkDown (and a refused key) -> ``twisted.internet.error.ConnectError``,
RequestTimeout -> ``twisted.internet.defer.TimeoutError``; both become a
retryable ``RequestSendFailed`` upstream, so per-destination backoff works.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IClientRequest, IResponse
from zope.interface import implementer  # type: ignore[import-untyped]

from synapse_coap.errors import LinkDown, RequestTimeout, TransportError, TrustError
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse import compat
from synapse_coap.synapse.agent_http import (
    classify_route,
    flatten_headers,
    parse_federation_uri,
    read_body,
    to_twisted_headers,
)
from synapse_coap.synapse.discovery import (
    CoapTarget,
    Discovery,
    FederationConfig,
    Resolution,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The request a discovery probe sends (any CoAP answer, even an error, means "speaks CoAP").
PROBE_TARGET = b"/_matrix/federation/v1/version"


# ---------------------------------------------------------------------------------------
# what the agent needs from its collaborators


class FederationClient(Protocol):
    """The part of ``synapse_coap.transport.client.CoapClient`` the agent uses."""

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse: ...


class LoopBridge(Protocol):
    """The part of ``synapse_coap.synapse.bridge.Bridge`` the agent uses."""

    def submit(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> defer.Deferred[T]: ...


#: Builds the transport's Endpoint for (server_name, target).
EndpointFactory = Callable[[str, CoapTarget], Any]


def transport_endpoint(server_name: str, target: CoapTarget) -> Any:
    """The transport's ``Endpoint`` (Noise, peer name = the Matrix server name)."""
    from synapse_coap.transport.client import Endpoint

    return Endpoint(
        host=target.host,
        port=target.port,
        peer_name=server_name,
        static_key=target.static_key,
        secure=True,
    )


# ---------------------------------------------------------------------------------------
# pure helpers


# ---------------------------------------------------------------------------------------
# body producer -> bytes; bytes -> IResponse


class _NoTransport:
    """What a body-reading protocol may call on its transport; there is nothing to abort."""

    disconnecting = False

    def abortConnection(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None


@implementer(IClientRequest)
@attrs.frozen
class RequestInfo:
    method: bytes
    absoluteURI: bytes
    headers: Headers


@implementer(IResponse)
class CoapResponse:
    """An ``IResponse`` over a complete CoAP reply (the transport reassembles blocks)."""

    version = (b"HTTP", 1, 1)

    def __init__(self, response: HttpResponse, request: Any = None) -> None:
        self.code = response.status
        self.phrase = RESPONSES.get(response.status, b"Unknown Status")
        self.headers = to_twisted_headers(response.headers)
        self.length = len(response.body)
        self.request = request
        self.previousResponse: Any = None
        self._body = response.body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_NoTransport())
        if self._body:
            protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))  # type: ignore[no-untyped-call]

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


# ---------------------------------------------------------------------------------------
# metrics


def _make_prometheus_counter(name: str, doc: str, labels: list[str]) -> Any:
    try:
        from prometheus_client import Counter
    except ImportError:  # pragma: no cover - Synapse always has it
        return None
    try:
        return Counter(name, doc, labels)
    except ValueError:  # registered twice (module reloaded): use the existing one
        return compat.registered_collector(name)


#: Every request Synapse handed to the agent, counted on entry (compare with Synapse's
#: own ``synapse_http_matrixfederationclient_requests_total``: they must be equal).
_PROM_ENTERED = _make_prometheus_counter(
    "synapse_coap_federation_outbound",
    "Outbound federation requests handed to the synapse-coap agent",
    ["route"],
)
#: How each finished: via coap / https / refused, and the outcome.
_PROM_REQUESTS = _make_prometheus_counter(
    "synapse_coap_federation_requests",
    "Outbound federation requests by transport and outcome (synapse-coap agent)",
    ["route", "via", "outcome"],
)


@attrs.define
class AgentStats:
    """In-memory counters (for tests and the debug log); mirrored in Prometheus.

    ``entered[route]``: every ``matrix-federation://`` request Synapse handed over.
    ``requests[(route, via)]``: via is "coap", "https" (fallback) or "refused".
    ``outcomes[outcome]``: "ok", "link_down", "timeout", "refused", "cancelled", "error"
    (CoAP requests only). ``bytes_in``/``bytes_out``: HTTP body bytes over CoAP.
    """

    entered: collections.Counter[str] = attrs.field(factory=collections.Counter)
    requests: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter)
    outcomes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    body_bytes_out: int = 0
    body_bytes_in: int = 0

    def total(self, via: str) -> int:
        return sum(n for (_, v), n in self.requests.items() if v == via)

    def by_route(self, via: str) -> dict[str, int]:
        return {r: n for (r, v), n in self.requests.items() if v == via}


# ---------------------------------------------------------------------------------------
# the agent


def _connect_error(message: str) -> ConnectError:
    """What Synapse sees when a destination cannot be reached (retryable, backs off)."""
    return ConnectError(string=message)  # type: ignore[no-untyped-call]


@implementer(IAgent)
class CoapFederationAgent:
    """An ``IAgent`` sending ``matrix-federation://`` requests over CoAP, HTTPS as fallback.

    Call ``request`` on the reactor thread (Synapse does). ``client`` is a
    ready CoapClient living on the bridge's loop, or ``client_factory`` an
    async factory run once on that loop at the first CoAP request.
    """

    def __init__(
        self,
        *,
        fallback: Any,
        bridge: LoopBridge,
        resolver: Discovery,
        policy: str = "https",
        client: FederationClient | None = None,
        client_factory: Callable[[], Awaitable[FederationClient]] | None = None,
        endpoint_factory: EndpointFactory = transport_endpoint,
        request_timeout: float | None = None,
    ) -> None:
        if policy not in ("https", "never"):
            raise ValueError(f"policy must be 'https' or 'never', not {policy!r}")
        if client is None and client_factory is None:
            raise ValueError("give a client or a client_factory")
        self.fallback = fallback
        self.bridge = bridge
        self.resolver = resolver
        self.policy = policy
        self._client = client
        self._client_factory = client_factory
        self._client_task: asyncio.Future[FederationClient] | None = None
        self._endpoint = endpoint_factory
        self._timeout = request_timeout
        self.stats = AgentStats()

    # -- IAgent ------------------------------------------------------------------------

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        try:
            dest, target = parse_federation_uri(uri)
        except (ValueError, UnicodeDecodeError):
            # Not a federation request (Synapse never sends one through this agent, but
            # the fallback knows what to do with anything else).
            return self.fallback.request(method, uri, headers, bodyProducer)  # type: ignore[no-any-return]
        route = classify_route(target)
        self.stats.entered[route] += 1
        if _PROM_ENTERED is not None:
            _PROM_ENTERED.labels(route=route).inc()
        known = self.resolver.peek(dest)
        if known is not None:
            # The usual case: answered synchronously, so a fallback request starts in
            # the caller's logcontext exactly as if we were not here.
            return self._dispatch(known, method, uri, dest, target, route, headers, bodyProducer)
        d = self.resolver.resolve(dest)
        d.addCallback(
            lambda res: self._dispatch(res, method, uri, dest, target, route, headers, bodyProducer)
        )
        return d  # type: ignore[return-value]

    # -- internals ---------------------------------------------------------------------

    def _count(self, route: str, via: str, outcome: str | None = None) -> None:
        if outcome is None:
            self.stats.requests[(route, via)] += 1
        else:
            self.stats.outcomes[outcome] += 1
        if _PROM_REQUESTS is not None and outcome is not None:
            _PROM_REQUESTS.labels(route=route, via=via, outcome=outcome).inc()

    def _dispatch(
        self,
        res: Resolution,
        method: bytes,
        uri: bytes,
        dest: str,
        target: bytes,
        route: str,
        headers: Headers | None,
        producer: Any,
    ) -> defer.Deferred[Any]:
        if not res.speaks_coap:
            if self.policy == "https":
                self._count(route, "https")
                self._count(route, "https", "delegated")
                logger.debug("federation %s %s -> %s: no CoAP, HTTPS", method, route, dest)
                return self.fallback.request(method, uri, headers, producer)  # type: ignore[no-any-return]
            self._count(route, "refused")
            self._count(route, "refused", "refused")
            return defer.fail(
                _connect_error(
                    f"{dest} has no CoAP endpoint and the HTTPS fallback is off "
                    "(federation.fallback: never)"
                )
            )
        self._count(route, "coap")
        request_info = RequestInfo(method, uri, headers if headers is not None else Headers())
        return defer.Deferred.fromCoroutine(
            self._send_coap(res, method, dest, target, route, headers, producer, request_info)
        )

    async def _client_on_loop(self) -> FederationClient:
        """The shared client (created once, on the asyncio loop)."""
        if self._client is not None:
            return self._client
        if self._client_task is None:
            if self._client_factory is None:  # pragma: no cover - checked in __init__
                raise LinkDown("no CoAP client")
            self._client_task = asyncio.ensure_future(self._client_factory())
        client = await asyncio.shield(self._client_task)
        self._client = client
        return client

    async def _on_loop(
        self, endpoint: Any, req: HttpRequest, timeout: float | None
    ) -> HttpResponse:
        client = await self._client_on_loop()
        return await client.request(endpoint, req, timeout=timeout)

    def _loop_call(
        self, endpoint: Any, req: HttpRequest
    ) -> Callable[[], Coroutine[Any, Any, HttpResponse]]:
        return lambda: self._on_loop(endpoint, req, self._timeout)

    async def _send_coap(
        self,
        res: Resolution,
        method: bytes,
        dest: str,
        target: bytes,
        route: str,
        headers: Headers | None,
        producer: Any,
        request_info: RequestInfo,
    ) -> Any:
        try:
            body = await read_body(producer)
            req = HttpRequest(
                method=method.decode("ascii"),
                target=target,
                headers=flatten_headers(headers),
                body=body,
            )
            last: Exception | None = None
            for t in res.targets:
                endpoint = self._endpoint(dest, t)
                try:
                    resp = await self.bridge.submit(self._loop_call(endpoint, req))
                except LinkDown as e:
                    if isinstance(e.__cause__, TrustError):
                        raise e.__cause__ from e
                    logger.info("federation over CoAP to %s at %s: link down: %s", dest, t, e)
                    last = e
                    continue
                self.stats.body_bytes_out += len(body)
                self.stats.body_bytes_in += len(resp.body)
                self._count(route, "coap", "ok")
                logger.debug(
                    "federation %s %s -> %s over CoAP: %d (%d B out, %d B in)",
                    req.method,
                    route,
                    dest,
                    resp.status,
                    len(body),
                    len(resp.body),
                )
                return CoapResponse(resp, request_info)
            if res.source in ("srv", "probe"):
                self.resolver.forget(dest)  # rediscover next time (maybe it moved or left)
            self._count(route, "coap", "link_down")
            raise _connect_error(f"no CoAP endpoint of {dest} answered: {last}")
        except RequestTimeout as e:
            self._count(route, "coap", "timeout")
            raise defer.TimeoutError(f"CoAP request to {dest} timed out: {e}") from e
        except TrustError as e:
            self._count(route, "coap", "refused")
            logger.error("federation over CoAP to %s refused: %s", dest, e)
            raise _connect_error(str(e)) from e
        except TransportError as e:
            self._count(route, "coap", "link_down")
            raise _connect_error(f"CoAP to {dest}: {e}") from e
        except defer.CancelledError:
            self._count(route, "coap", "cancelled")
            raise
        except ConnectError:
            raise
        except Exception:
            self._count(route, "coap", "error")
            raise


# ---------------------------------------------------------------------------------------
# probing and installation


def make_probe(
    bridge: LoopBridge,
    agent_client: Callable[[], Awaitable[FederationClient]],
    timeout: float,
    endpoint_factory: EndpointFactory = transport_endpoint,
) -> Callable[[str, CoapTarget], defer.Deferred[bool]]:
    """A discovery probe: ``GET /_matrix/federation/v1/version`` over CoAP; any answer = True."""

    def probe(server_name: str, target: CoapTarget) -> defer.Deferred[bool]:
        endpoint = endpoint_factory(server_name, target)

        async def on_loop() -> bool:
            client = await agent_client()
            try:
                await client.request(
                    endpoint, HttpRequest(method="GET", target=PROBE_TARGET), timeout=timeout
                )
            except (TransportError, TrustError) as e:
                logger.debug("CoAP probe of %s at %s: %s", server_name, target, e)
                return False
            return True

        return bridge.submit(on_loop)

    return probe


def _address_filter(hs: Any) -> Callable[[str], bool] | None:
    """Synapse's federation IP allow/block lists as a predicate on IP literals."""
    server_cfg = hs.config.server
    block = getattr(server_cfg, "federation_ip_range_blocklist", None)
    allow = getattr(server_cfg, "federation_ip_range_allowlist", None)
    if block is None:
        return None

    def allowed(ip: str) -> bool:
        if allow is not None and ip in allow:
            return True
        return ip not in block

    return allowed


def install_federation_agent(
    api: Any,
    *,
    bridge: LoopBridge,
    config: FederationConfig,
    client: FederationClient | None = None,
    client_factory: Callable[[], Awaitable[FederationClient]] | None = None,
    endpoint_factory: EndpointFactory = transport_endpoint,
) -> CoapFederationAgent:
    """Put a :class:`CoapFederationAgent` under Synapse's federation HTTP client.

    Call once, on the reactor thread, from the module's ``__init__`` (only in the
    process that sends federation traffic). ``client`` is a CoapClient on the
    bridge's loop, or ``client_factory`` an async factory run there at first use.
    The old agent stays as the HTTPS fallback. Returns the agent (its ``stats``
    count requests by route).
    """
    hs = compat.homeserver(api)
    http_client = compat.federation_http_client(hs)
    old = http_client.agent
    if isinstance(old, CoapFederationAgent):
        logger.warning("synapse-coap: federation agent already installed; keeping it")
        return old
    clock = hs.get_clock()

    def now() -> float:
        return float(clock.time())

    holder: list[CoapFederationAgent] = []

    async def shared_client() -> FederationClient:
        return await holder[0]._client_on_loop()

    discovery = Discovery(
        config,
        clock=now,
        probe=make_probe(bridge, shared_client, config.probe_timeout, endpoint_factory),
        address_allowed=_address_filter(hs),
        own_server_name=hs.hostname,
    )
    agent = CoapFederationAgent(
        fallback=old,
        bridge=bridge,
        resolver=discovery,
        policy=config.fallback,
        client=client,
        client_factory=client_factory,
        endpoint_factory=endpoint_factory,
        request_timeout=config.request_timeout,
    )
    holder.append(agent)
    http_client.agent = agent
    logger.info(
        "synapse-coap: federation over CoAP installed (%d static peers, discovery %s, fallback %s)",
        len(config.peers),
        "on" if config.discovery else "off",
        config.fallback,
    )
    return agent
