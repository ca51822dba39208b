"""The client sidecar: HTTP on localhost -> CoAP+Noise across the constrained link.

An unmodified Matrix client (Element, matrix-nio, curl) points its homeserver
URL at the sidecar. Every client-server request (anything under ``/_matrix/``,
``/_synapse/client/`` and the ``/.well-known/matrix/*`` lookups) becomes an
:class:`HttpRequest` with the exact raw target, goes over one multiplexed
CoAP+Noise client to the homeserver's module (or a gateway), and the
:class:`HttpResponse` comes back as the HTTP answer.

What a client sees instead of a hang:

- the link is down (no session, peer stopped answering): 502 with a Matrix JSON error;
- the response did not arrive in time: 504 with a Matrix JSON error;
- the sidecar is shutting down: 503.

Long-poll requests (``/sync?timeout=30000``) get their own timeout plus a slack.
Cacheable GETs are answered from :class:`~synapse_coap.proxy.cache.ResponseCache`.
The access token in the Authorization header is passed through; the transport
sends it once per session and refers to it afterwards. A token in the
``access_token`` query parameter is moved into the header (so it can be bound
once and never shows in a logged target).

Browser clients (Element Web) need CORS: the sidecar answers preflight
``OPTIONS`` itself and adds the CORS headers locally, so they never cross the link.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from aiohttp import web

from synapse_coap.errors import (
    KeyChangedError,
    LinkDown,
    LocalProtocolError,
    RemoteProtocolError,
    RequestTimeout,
    SynapseCoapError,
    TrustError,
)
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.cache import ResponseCache
from synapse_coap.proxy.common import (
    dump_request,
    dump_response,
    forwardable_headers,
    matrix_error,
    redact_target,
    request_timeout,
)
from synapse_coap.proxy.push import PushOptions, PushSync
from synapse_coap.proxy.txn import TxnShortener

logger = logging.getLogger(__name__)


class RequestSender(Protocol):
    """What the sidecar needs from the CoAP client (``synapse_coap.transport.client.CoapClient``)."""

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse: ...


#: Path prefixes the sidecar forwards; anything else is answered 404 locally.
FORWARDED_PREFIXES: tuple[str, ...] = ("/_matrix/", "/_synapse/client/", "/.well-known/matrix/")

#: Request headers worth carrying across the link. Everything else a client
#: sends (User-Agent, Accept, Accept-Language, Origin, cookies...) only costs bytes.
FORWARDED_REQUEST_HEADERS = frozenset(
    {"authorization", "content-type", "content-disposition", "if-none-match", "range"}
)

#: Response headers the sidecar never passes back (it recomputes or supplies them).
DROPPED_RESPONSE_HEADERS = frozenset(
    {"access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers"}
)

CORS_HEADERS: tuple[tuple[str, str], ...] = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    (
        "Access-Control-Allow-Headers",
        "X-Requested-With, Content-Type, Authorization, Date",
    ),
    ("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server, ETag"),
)


@attrs.frozen
class SidecarOptions:
    """Behaviour of the HTTP side (independent of how the CoAP client is built)."""

    #: Seconds to wait for an ordinary response.
    request_timeout: float = 120.0
    #: Extra seconds on top of a long-poll's own ``timeout`` query parameter.
    long_poll_slack: float = 30.0
    #: Largest request body accepted from the client (media uploads).
    max_body_size: int = 50 * 1024 * 1024
    #: Answer cacheable GETs from the response cache.
    cache: bool = True
    #: Log every message before and after translation, bodies included.
    dump_payloads: bool = False
    #: Seconds in-flight requests get to finish at shutdown before they are failed with 503.
    shutdown_grace: float = 5.0
    #: Send long transaction ids (nio's UUIDs) as 8-character digests of (access token,
    #: id); see :mod:`synapse_coap.proxy.txn`.
    short_txn_ids: bool = True
    #: Seconds an idempotent exchange whose asker went away is kept for a retry to join.
    rejoin_grace: float = 10.0
    #: Answer /sync long-polls from push registrations (see ``synapse_coap.proxy.push``).
    push: PushOptions = attrs.field(factory=PushOptions)


@attrs.define
class _Shared:
    """One exchange over the link and how many local requests wait for it."""

    task: asyncio.Task[HttpResponse]
    waiters: int = 0
    abandon: asyncio.TimerHandle | None = None


def _move_query_token(target: bytes, headers: list[tuple[str, str]]) -> bytes:
    """Move ``access_token=`` from the query into an Authorization header (if there is none yet)."""
    path, sep, query = target.partition(b"?")
    if not sep or b"access_token=" not in query:
        return target
    kept: list[bytes] = []
    token: str | None = None
    for item in query.split(b"&"):
        name, _, value = item.partition(b"=")
        if name == b"access_token":
            if token is None:
                token = urllib.parse.unquote_plus(value.decode("latin-1"))
            continue
        kept.append(item)
    if token is None:
        return target
    if not any(k == "authorization" for k, _ in headers):
        headers.append(("authorization", f"Bearer {token}"))
    return path + (b"?" + b"&".join(kept) if kept else b"")


class Sidecar:
    """The HTTP -> CoAP translation, served by an aiohttp application.

    ``client`` is the CoAP client (anything with ``async request(endpoint,
    HttpRequest, timeout=...)``), ``endpoint`` where the homeserver is.
    """

    def __init__(
        self,
        client: RequestSender,
        endpoint: Any,
        *,
        options: SidecarOptions = SidecarOptions(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._options = options
        self._clock = clock
        self.cache: ResponseCache | None = ResponseCache(clock) if options.cache else None
        self._inflight: set[asyncio.Task[HttpResponse]] = set()
        self._shutting_down = False
        #: Identical idempotent requests in flight over the link, shared by their askers.
        self._pending: dict[object, _Shared] = {}
        observe = getattr(client, "observe", None)
        #: Answers /sync long-polls from push registrations (None: push off).
        self.push: PushSync | None = (
            PushSync(lambda req: observe(endpoint, req), options.push, clock=clock)
            if options.push.enabled and observe is not None
            else None
        )
        if self.push is not None:
            # a new listener, or a listener that lost our session (it restarted), holds
            # no registration for us: register again at once
            for name in ("on_failover", "on_new_session"):
                hooks = getattr(client, name, None)
                if isinstance(hooks, list):
                    hooks.append(self.push.reregister)
        self._txn: TxnShortener | None = None
        if options.short_txn_ids:
            from synapse_coap.wire.profile import load_profile

            self._txn = TxnShortener(load_profile(0).routes)

    # -- aiohttp glue ---------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self._options.max_body_size)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read() if request.can_read_body else b""
        except web.HTTPRequestEntityTooLarge:
            return self.to_web_response(
                matrix_error(
                    413,
                    "M_TOO_LARGE",
                    f"Request body is over the sidecar's limit of {self._options.max_body_size} bytes",
                )
            )
        raw_target = request.raw_path.encode("latin-1", "replace")
        raw_headers = [(k.lower(), v) for k, v in request.headers.items()]
        if request.method == "OPTIONS":
            # CORS preflight: answered locally, never crosses the link.
            return web.Response(status=204, headers=dict(CORS_HEADERS))
        http_req = self.translate_request(request.method, raw_target, raw_headers, body)
        if http_req is None:
            resp = matrix_error(404, "M_UNRECOGNIZED", "Unrecognized request")
        else:
            if self._options.dump_payloads:
                dump_request(
                    "HTTP<-client",
                    HttpRequest(request.method, raw_target, tuple(raw_headers), body),
                )
            resp = await self.forward(http_req)
        return self.to_web_response(resp)

    def to_web_response(self, resp: HttpResponse) -> web.Response:
        out = web.Response(status=resp.status, body=resp.body)
        # The response's own Content-Type wins over any default.
        out.headers.popall("Content-Type", None)
        for name, value in resp.headers:
            if name in DROPPED_RESPONSE_HEADERS or name in ("content-length",):
                continue
            out.headers.add(name.title(), value)
        for name, value in CORS_HEADERS:
            out.headers[name] = value
        return out

    # -- translation (no aiohttp below this line) -----------------------------------------

    @staticmethod
    def translate_request(
        method: str, raw_target: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> HttpRequest | None:
        """The :class:`HttpRequest` to send for a client request, or None if it is not forwarded."""
        path = raw_target.partition(b"?")[0].decode("latin-1")
        if not path.startswith(FORWARDED_PREFIXES):
            return None
        kept = [(k, v) for k, v in forwardable_headers(headers) if k in FORWARDED_REQUEST_HEADERS]
        target = _move_query_token(raw_target, kept)
        return HttpRequest(method=method.upper(), target=target, headers=tuple(kept), body=body)

    async def forward(self, request: HttpRequest) -> HttpResponse:
        """Send one request across the link (or answer from the push or the cache); never raises for link trouble."""
        if self._txn is None:
            return await self._forward(request)
        response = await self._forward(self._txn.shorten(request))
        return self._txn.restore(response)

    async def _forward(self, request: HttpRequest) -> HttpResponse:
        started = self._clock()
        if self.push is not None:
            pushed = await self.push.answer(request)
            if pushed is not None:
                self._log(request, pushed, started, "push")
                return pushed
        cache = self.cache
        cached = cache.lookup(request) if cache is not None else None
        if cached is not None:
            self._log(request, cached, started, "cache")
            return cached
        if request.method in ("GET", "HEAD") and not request.body:
            response, via = await self._shared(request)
        else:
            response = await self._send_and_store(request)
            via = "link"
        self._log(request, response, started, via)
        return response

    async def _shared(self, request: HttpRequest) -> tuple[HttpResponse, str]:
        """Identical idempotent requests share one exchange over the link.

        When its last asker goes away the exchange is abandoned only after
        ``rejoin_grace`` seconds: a client that timed out and asks again joins
        it instead of sending the request over the link a second time.
        """
        key = (request.method, request.target, request.header("authorization"))
        shared = self._pending.get(key)
        via = "shared"
        if shared is None:
            via = "link"
            shared = _Shared(asyncio.ensure_future(self._send_and_store(request)))
            self._pending[key] = shared
            shared.task.add_done_callback(functools.partial(self._exchange_done, key, shared))
        if shared.abandon is not None:
            shared.abandon.cancel()
            shared.abandon = None
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task), via
        except asyncio.CancelledError:
            if not shared.task.done() and shared.waiters == 1:
                grace = self._options.rejoin_grace
                if grace > 0:
                    loop = asyncio.get_running_loop()
                    shared.abandon = loop.call_later(grace, shared.task.cancel)
                else:
                    shared.task.cancel()
            raise
        finally:
            shared.waiters -= 1

    def _exchange_done(
        self, key: object, shared: _Shared, task: asyncio.Task[HttpResponse]
    ) -> None:
        if self._pending.get(key) is shared:
            del self._pending[key]
        if shared.abandon is not None:
            shared.abandon.cancel()
        if not task.cancelled():
            task.exception()  # (retrieved: every asker already got the answer)

    async def _send_and_store(self, request: HttpRequest) -> HttpResponse:
        response = await self._send(request)
        cache = self.cache
        if cache is not None:
            if 200 <= response.status < 300:
                cache.invalidate(request)
            cache.store(request, response)
        return response

    async def _send(self, request: HttpRequest) -> HttpResponse:
        if self._shutting_down:
            return matrix_error(503, "M_UNKNOWN", "The sidecar is shutting down")
        timeout = request_timeout(
            request.target, self._options.request_timeout, self._options.long_poll_slack
        )
        if self._options.dump_payloads:
            dump_request("CoAP->homeserver", request)
        task = asyncio.ensure_future(self._client.request(self._endpoint, request, timeout=timeout))
        self._inflight.add(task)
        try:
            response = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._shutting_down:
                return matrix_error(503, "M_UNKNOWN", "The sidecar is shutting down")
            # The client went away (or we are being cancelled): abandon the exchange.
            task.cancel()
            raise
        except LinkDown as e:
            logger.warning("link down for %s %s: %s", request.method, _path(request), e)
            return matrix_error(
                502, "M_UNKNOWN", f"The homeserver cannot be reached over the CoAP link: {e}"
            )
        except RequestTimeout as e:
            logger.warning(
                "timeout for %s %s after %.0f s", request.method, _path(request), timeout
            )
            return matrix_error(
                504, "M_UNKNOWN", f"No response from the homeserver in {timeout:.0f} s: {e}"
            )
        except (KeyChangedError, TrustError) as e:
            logger.error("refusing the homeserver's key: %s", e)
            return matrix_error(502, "M_UNKNOWN", str(e))
        except RemoteProtocolError as e:
            logger.warning("bad response for %s %s: %s", request.method, _path(request), e)
            return matrix_error(502, "M_UNKNOWN", f"Bad response over the CoAP link: {e}")
        except LocalProtocolError as e:
            logger.warning("cannot send %s %s: %s", request.method, _path(request), e)
            return matrix_error(500, "M_UNKNOWN", f"The sidecar cannot send this request: {e}")
        except SynapseCoapError as e:
            logger.warning("error for %s %s: %s", request.method, _path(request), e)
            return matrix_error(502, "M_UNKNOWN", f"CoAP link error: {e}")
        except Exception:
            logger.exception("unexpected error for %s %s", request.method, _path(request))
            return matrix_error(500, "M_UNKNOWN", "Internal error in the sidecar")
        finally:
            if task.done():
                self._inflight.discard(task)
            else:
                task.add_done_callback(self._inflight.discard)
        if self._options.dump_payloads:
            dump_response("CoAP<-homeserver", response)
        return response

    def _log(self, request: HttpRequest, response: HttpResponse, started: float, via: str) -> None:
        logger.info(
            "%s %s -> %d (%d B in, %d B out, %.2f s, %s)",
            request.method,
            redact_target(request.target),
            response.status,
            len(request.body),
            len(response.body),
            self._clock() - started,
            via,
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def drain(self) -> None:
        """Graceful shutdown: new requests get 503; in-flight ones get ``shutdown_grace`` seconds, then 503."""
        self._shutting_down = True
        if self.push is not None:
            await self.push.close()
        pending = set(self._inflight)
        if pending:
            logger.info(
                "waiting up to %.1f s for %d request(s)", self._options.shutdown_grace, len(pending)
            )
            _, still = await asyncio.wait(pending, timeout=self._options.shutdown_grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)


def _path(request: HttpRequest) -> str:
    return request.target.partition(b"?")[0].decode("latin-1")
