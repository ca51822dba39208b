"""The dispatcher interface: what a CoAP listener hands decoded requests to.

The module implements it in-process into Synapse's servlets
(``synapse_coap.synapse.dispatch``); the gateway implements it with an HTTP
client (``synapse_coap.proxy.gateway``). The transport's server calls
``dispatch`` on its asyncio loop; cancelling the awaiting task means the CoAP
exchange was abandoned and the implementation must cancel the request.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from synapse_coap.mapping.messages import HttpRequest, HttpResponse


@attrs.frozen
class PeerInfo:
    """Who sent a request: the real UDP address and, over Noise, the peer's static key."""

    host: str
    port: int
    static_key: bytes | None = None
    secure: bool = False


class Dispatcher(Protocol):
    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse: ...
