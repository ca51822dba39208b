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
    """Who sent a request: the real UDP address and, over Noise, the peer's static key.

    ``address_validated`` is False while the address has not proved it receives
    our datagrams (a 0-RTT request from a new address; a session that just
    moved): it may be spoofed, so it must not be passed upstream as the
    client's identity (:attr:`identity_host` is then None)."""

    host: str
    port: int
    static_key: bytes | None = None
    secure: bool = False
    address_validated: bool = True

    @property
    def identity_host(self) -> str | None:
        """The host to give upstream as the client's address, or None if unvalidated."""
        return self.host if self.address_validated else None


class Dispatcher(Protocol):
    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse: ...
