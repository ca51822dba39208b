"""Worker deployments: each CoAP request is served by the instance that serves it over HTTP.

A listener instance runs a request in-process when the operator's routing
(``workers.routes``, Synapse's worker routing as a reverse proxy states it)
sends its path to this instance; otherwise it forwards the request over HTTP
to that instance's listener (``workers.instances.<name>.http``), as the
reverse proxy would. The exact request target, method, headers and body go
unchanged, plus ``X-Forwarded-For`` (the CoAP peer's address: the target's
listener needs ``x_forwarded: true`` to log and rate-limit it).

When the target instance cannot be reached the client gets what a reverse
proxy in front of Synapse gives, with a Matrix JSON body: 502 when the
connection fails, 504 when no response came within ``forward_timeout``. A
forwarded request never hangs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from synapse.logging.context import make_deferred_yieldable
from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer  # type: ignore[import-untyped]

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.synapse.bridge import Bridge
from synapse_coap.synapse.config import WorkersConfig

logger = logging.getLogger(__name__)

#: Not forwarded either way (hop-by-hop, or set from the body).
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)


def matrix_error(status: int, error: str) -> HttpResponse:
    """A Matrix error response (``M_UNKNOWN``), as Synapse's own errors look."""
    body = json.dumps({"errcode": "M_UNKNOWN", "error": error}).encode()
    return HttpResponse(status, (("content-type", "application/json"),), body)


@implementer(IBodyProducer)
class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class HttpForwarder:
    """Sends a request to another instance's HTTP listener (on the reactor thread)."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        pool.maxPersistentPerHost = 16
        self._agent = Agent(  # type: ignore[no-untyped-call]
            reactor, pool=pool, connectTimeout=min(timeout, 10.0)
        )

    async def forward(
        self, instance: str, base_url: str, request: HttpRequest, peer: PeerInfo
    ) -> HttpResponse:
        headers = Headers()
        for name, value in request.headers:
            if name.lower() in _HOP_HEADERS:
                continue
            headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        headers.addRawHeader(b"X-Forwarded-For", peer.host.encode("ascii", "replace"))
        body: Any = (
            _Body(request.body) if request.body or request.method in ("POST", "PUT") else None
        )
        url = base_url.encode("ascii") + request.target
        d = self._agent.request(request.method.encode("ascii"), url, headers, body)

        async def response() -> HttpResponse:
            # (Twisted's deferreds know no logcontexts: await them as Synapse's rules say)
            resp = await make_deferred_yieldable(d)
            data = await make_deferred_yieldable(readBody(resp))
            out = []
            for name, values in resp.headers.getAllRawHeaders():
                text = name.decode("latin-1").lower()
                if text in _HOP_HEADERS:
                    continue
                out += [(text, v.decode("latin-1")) for v in values]
            return HttpResponse(resp.code, tuple(out), data)

        timed_out: list[bool] = []

        def on_timeout(result: Any, _timeout: float) -> Any:
            timed_out.append(True)
            return result

        whole = defer.ensureDeferred(response())
        whole.addTimeout(self._timeout, self._reactor, onTimeoutCancel=on_timeout)
        try:
            return await whole
        except Exception as e:
            if isinstance(e, defer.CancelledError) and not timed_out:
                raise  # the CoAP exchange was abandoned: cancel the forwarded request too
            if not timed_out and not isinstance(e, (defer.TimeoutError, TimeoutError)):
                return self._failed(instance, base_url, e)
            logger.warning(
                "forwarded %s to %s (%s): no response within %g s",
                request.method,
                instance,
                base_url,
                self._timeout,
            )
            return matrix_error(504, f"Timed out waiting for the {instance} instance")

    @staticmethod
    def _failed(instance: str, base_url: str, e: Exception) -> HttpResponse:
        if isinstance(e, (ConnectError, DNSLookupError)):
            logger.warning("cannot forward to %s (%s): %s", instance, base_url, e)
            return matrix_error(502, f"The {instance} instance is unreachable")
        # a broken connection mid-response
        logger.warning("forwarding to %s (%s) failed: %r", instance, base_url, e)
        return matrix_error(502, f"Bad response from the {instance} instance")


class RoutingDispatcher:
    """The listener's dispatcher in a worker deployment: local or forwarded by path."""

    def __init__(
        self,
        *,
        local: Any,
        workers: WorkersConfig,
        instance: str,
        bridge: Bridge,
        forwarder: HttpForwarder,
    ) -> None:
        self.local = local
        self.workers = workers
        self.instance = instance
        self._bridge = bridge
        self._forwarder = forwarder
        self.max_request_body_size = local.max_request_body_size

    def target_for(self, request: HttpRequest) -> str:
        path = request.target.split(b"?", 1)[0].decode("utf-8", "replace")
        return self.workers.instance_for(path, self.instance)

    def dispatch_now(
        self,
        request: HttpRequest,
        peer: PeerInfo,
        done: Callable[[HttpResponse | BaseException], None],
    ) -> Callable[[], None] | None:
        """A request served here starts at once (see mapping.dispatch.EagerDispatcher); a
        forwarded one goes through :meth:`dispatch`."""
        if self.target_for(request) != self.instance:
            return None
        dispatch_now = getattr(self.local, "dispatch_now", None)
        return None if dispatch_now is None else dispatch_now(request, peer, done)  # type: ignore[no-any-return]

    def answer_later(self, answer: Callable[[], None]) -> bool:
        """(see mapping.dispatch.EagerDispatcher) What the local dispatcher does with it:
        the requests this instance serves are its."""
        answer_later = getattr(self.local, "answer_later", None)
        return answer_later is not None and bool(answer_later(answer))

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        target = self.target_for(request)
        if target == self.instance:
            result: HttpResponse = await self.local.dispatch(request, peer)
            return result
        base = self.workers.instances[target].http
        if base is None:  # the config check makes this impossible
            return matrix_error(502, f"No HTTP address for the {target} instance")
        forwarder = self._forwarder
        return await self._bridge.call_synapse(
            "coap_forwarded_request", lambda: forwarder.forward(target, base, request, peer)
        )
