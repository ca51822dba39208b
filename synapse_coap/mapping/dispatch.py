"""The dispatcher interface: what a CoAP listener hands decoded requests to.

The module implements it in-process into Synapse's servlets
(``synapse_coap.synapse.dispatch``); the gateway implements it with an HTTP
client (``synapse_coap.proxy.gateway``). The transport's server calls
``dispatch`` on its asyncio loop; cancelling the awaiting task means the CoAP
exchange was abandoned and the implementation must cancel the request.
"""

from __future__ import annotations

from collections.abc import Callable
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


class EagerDispatcher(Dispatcher, Protocol):
    """A dispatcher that can also start a request without a task awaiting it.

    The server's fast path calls ``dispatch_now`` where the dispatcher has it: it
    starts the request at once, on the loop's thread, and calls ``done`` with the
    response or the error (``asyncio.CancelledError`` if the request was given up
    upstream) when it is there, possibly before returning, on that same thread. It
    returns the function that abandons the request (the CoAP exchange was given up:
    ``done`` is then never called), or None, having done nothing, when it cannot
    start this request at once (the caller then awaits ``dispatch``).  The module's
    in-process dispatcher has it (Synapse runs on the loop's thread); the gateway's
    HTTP client does not.

    It may also have ``answer_later(answer) -> bool``: given what answers a request
    whose response came after its start (``answer``, no arguments), run it later on
    the loop's thread, with the others that come in the same turn of its event loop,
    and return True; or return False (the caller runs it at once). The module's
    in-process dispatcher has it: Synapse's responses that come from reactor
    callbacks (a database result, its Rust runtime) are answered together, after the
    callbacks of that reactor turn, instead of one answer's encoding between each
    callback and the next."""

    def dispatch_now(
        self,
        request: HttpRequest,
        peer: PeerInfo,
        done: Callable[[HttpResponse | BaseException], None],
    ) -> Callable[[], None] | None: ...
