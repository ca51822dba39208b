"""The gateway: CoAP+Noise -> HTTP, in front of a homeserver that does not load the module.

The transport's :class:`~synapse_coap.transport.server.CoapServer` decodes each
CoAP request into an :class:`HttpRequest` and hands it to a
:class:`~synapse_coap.mapping.dispatch.Dispatcher`. The module's dispatcher
calls into Synapse in-process; :class:`HttpDispatcher` here forwards it with
aiohttp to any homeserver's HTTP listener instead (Synapse, Dendrite,
Conduit...). It carries client-server and federation traffic alike:

- the exact target bytes are forwarded (X-Matrix signatures cover them), and
  the Authorization header (Bearer or X-Matrix) passes through untouched;
- ``X-Forwarded-For`` is set to the CoAP peer's address, so the homeserver
  can log and rate-limit the real client (enable ``x_forwarded: true`` on its
  listener) -- but only once the address is validated: a 0-RTT request from
  an address that has not yet proved it receives our datagrams (it may be
  spoofed) goes without one;
- upstream timeout -> 504, upstream unreachable -> 502, both with Matrix JSON
  error bodies; long-polls (``timeout`` query parameter) wait long enough.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import yarl

from synapse_coap.errors import ConfigValueError
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.common import (
    dump_request,
    dump_response,
    forwardable_headers,
    matrix_error,
    redact_target,
    request_timeout,
)

logger = logging.getLogger(__name__)

#: Response headers not worth carrying back over the link: the CoAP peer is not a
#: browser (the sidecar adds CORS locally) and Date/Server only cost bytes.
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "access-control-allow-origin",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-expose-headers",
        "date",
        "server",
        "synapse-trace-id",
        "x-content-type-options",
        "content-security-policy",
    }
)

#: Largest upstream response body accepted (a media download); larger is a 502.
DEFAULT_MAX_BODY = 50 * 1024 * 1024


def parse_http_target(text: str, path: str = "--http-target") -> yarl.URL:
    """The upstream base URL: ``http(s)://HOST[:PORT]`` (no path, query or fragment)."""
    try:
        url = yarl.URL(text)
    except (ValueError, TypeError) as e:
        raise ConfigValueError(path, f"not a URL: {text!r} ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigValueError(
            path, f"expected http://HOST[:PORT] or https://HOST[:PORT], got {text!r}"
        )
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ConfigValueError(path, f"give only scheme, host and port, got {text!r}")
    return url.with_path("")


class HttpDispatcher:
    """A :class:`~synapse_coap.mapping.dispatch.Dispatcher` that forwards over HTTP.

    Create it inside a running event loop; call :meth:`close` when done.
    """

    def __init__(
        self,
        target: str | yarl.URL,
        *,
        request_timeout: float = 120.0,
        long_poll_slack: float = 30.0,
        max_body_size: int = DEFAULT_MAX_BODY,
        dump_payloads: bool = False,
        verify_tls: bool = True,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = parse_http_target(str(target)) if isinstance(target, str) else target
        self._timeout = request_timeout
        self._slack = long_poll_slack
        self._max_body = max_body_size
        self._dump = dump_payloads
        self._clock = clock
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=verify_tls, limit=256),
            auto_decompress=True,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    @property
    def target(self) -> yarl.URL:
        return self._base

    async def close(self) -> None:
        if self._own_session:
            await self._session.close()

    def upstream_url(self, target: bytes) -> yarl.URL | None:
        """The URL for a raw target, byte for byte, or None if the target is not a valid origin-form."""
        if not target.startswith(b"/") or any(b < 0x21 or b > 0x7E for b in target):
            return None
        return yarl.URL(str(self._base) + target.decode("ascii"), encoded=True)

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        started = self._clock()
        response = await self._dispatch(request, peer)
        logger.info(
            "%s %s from %s -> %d (%d B in, %d B out, %.2f s)",
            request.method,
            redact_target(request.target),
            peer.host,
            response.status,
            len(request.body),
            len(response.body),
            self._clock() - started,
        )
        return response

    async def _dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        url = self.upstream_url(request.target)
        if url is None:
            return matrix_error(400, "M_UNRECOGNIZED", "Malformed request target")
        headers = [
            (k, v) for k, v in forwardable_headers(request.headers) if k != "x-forwarded-for"
        ]
        if peer.identity_host is not None:  # never a spoofable (unvalidated) address
            headers.append(("X-Forwarded-For", peer.identity_host))
        timeout = request_timeout(request.target, self._timeout, self._slack)
        if self._dump:
            dump_request("CoAP->gateway", request)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.body if request.body or request.method in ("POST", "PUT") else None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as upstream:
                body = await self._read_body(upstream)
                if body is None:
                    return matrix_error(
                        502, "M_TOO_LARGE", f"Upstream response is over {self._max_body} bytes"
                    )
                out_headers = tuple(
                    (k.lower(), v)
                    for k, v in upstream.headers.items()
                    if k.lower() not in DROPPED_RESPONSE_HEADERS
                )
                response = HttpResponse(
                    status=upstream.status, headers=forwardable_headers(out_headers), body=body
                )
        except asyncio.TimeoutError:
            logger.warning(
                "upstream timeout after %.0f s: %s %s",
                timeout,
                request.method,
                redact_target(request.target),
            )
            return matrix_error(
                504, "M_UNKNOWN", f"The homeserver did not answer in {timeout:.0f} s"
            )
        except aiohttp.ClientConnectionError as e:
            logger.warning("upstream %s unreachable: %s", self._base, e)
            return matrix_error(
                502, "M_UNKNOWN", "The homeserver behind the gateway is unreachable"
            )
        except aiohttp.ClientError as e:
            logger.warning("upstream error: %s", e)
            return matrix_error(
                502, "M_UNKNOWN", "Bad response from the homeserver behind the gateway"
            )
        if self._dump:
            dump_response("HTTP<-upstream", response)
        return response

    async def _read_body(self, upstream: aiohttp.ClientResponse) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        async for chunk in upstream.content.iter_chunked(65536):
            total += len(chunk)
            if total > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
