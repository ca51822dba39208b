"""The CoAP server's one aiocoap resource: every request passes here, through the per-session
request limit, Block1 reassembly, push registrations and Block2 responses, to the server's
rendering (:class:`~synapse_coap.transport.server.CoapServer`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

from aiocoap import interfaces
from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.protocol import Context

from synapse_coap.transport.aiocoap_compat import untie_when_done
from synapse_coap.transport.blocks import (
    Block1Assembler,
    Block2Responses,
    _Block1Reply,
)
from synapse_coap.transport.convert import (
    ABANDON_OPTION,
)
from synapse_coap.transport.transfers import TransferStore

if TYPE_CHECKING:
    from synapse_coap.transport.server import CoapServer


class RootContext(Context):  # type: ignore[misc]
    """aiocoap's Context for the server, whose ``render_to_pipe`` is aiocoap's own but
    for the rendering task's name (aiocoap formats ``"Rendering for %r"`` of every
    request, its options and payload, only to name the task: about 10 µs a request
    under cProfile) and for untying the token layer's cycle once the request is done
    (:func:`~synapse_coap.transport.aiocoap_compat.untie_when_done`)."""

    def render_to_pipe(self, pipe: Any) -> None:
        untie_when_done(pipe)
        run_driving_pipe(
            error_to_message(pipe, self.log),
            AwaitLater(self.serversite.render_to_pipe, pipe),
            name="synapse-coap render",
        )


class AwaitLater:
    """``fn(arg)`` made when awaited, not before.

    aiocoap starts a request's rendering as a task and cancels that task when a later
    request reuses the token. The listener handles every datagram of a batch in one
    loop turn, so the cancel can come before the task's first step; a coroutine made
    up front would then be dropped without ever running, and Python warns about it
    (``RuntimeWarning: coroutine ... was never awaited``). Made here, there is none."""

    __slots__ = ("arg", "fn")

    def __init__(self, fn: Callable[[Any], Awaitable[Any]], arg: Any) -> None:
        self.fn = fn
        self.arg = arg

    def __await__(self) -> Generator[Any, None, Any]:
        return self.fn(self.arg).__await__()


class _Root(interfaces.Resource):  # type: ignore[misc]
    """The single aiocoap resource: every request goes through here."""

    def __init__(self, server: CoapServer) -> None:
        super().__init__()
        self._server = server
        config = server.config
        limits = config.transfers
        timeout = limits.timeout
        if timeout is None:
            timeout = max(config.link.exchange_lifetime, 120.0)
        self.transfers = TransferStore(limits.budget, limits.per_session, timeout)
        self._block1 = Block1Assembler(config.max_body_size, self.transfers)
        self._block2 = Block2Responses(self.transfers)
        self._in_flight: dict[Any, int] = {}

    async def render(self, request: Any) -> Any:  # pragma: no cover - not used
        raise NotImplementedError

    async def needs_blockwise_assembly(self, request: Any) -> bool:  # pragma: no cover
        return False

    async def render_to_pipe(self, pipe: Any) -> None:
        req = pipe.request
        if req.opt.get_option(ABANDON_OPTION):
            # the token layer already cancelled the previous request on this token
            res = Message(code=Code.CHANGED)
            res.opt.no_response = 26
            pipe.add_response(res, is_last=True)
            return
        session = req.remote.blockwise_key
        if not self.enter(session):
            # RFC 7252 5.03 with Max-Age: come back later
            self._server.metrics.dropped("session_request_limit")
            res = Message(code=Code.SERVICE_UNAVAILABLE, payload=b"too many requests in flight")
            res.opt.max_age = 1
            pipe.add_response(res, is_last=True)
            return
        try:
            await self._render_to_pipe(pipe, req)
        finally:
            self.leave(session)

    def enter(self, session: Any) -> bool:
        """Count one more request in flight on ``session`` (its ``blockwise_key``);
        False, counting nothing, when the session is at its limit."""
        in_flight = self._in_flight.get(session, 0)
        if in_flight >= self._server.config.transfers.requests_per_session:
            return False
        self._in_flight[session] = in_flight + 1
        return True

    def leave(self, session: Any) -> None:
        left = self._in_flight[session] - 1
        if left:
            self._in_flight[session] = left
        else:
            del self._in_flight[session]

    @property
    def block2(self) -> Block2Responses:
        """Block2 responses kept for the blocks after block 0."""
        return self._block2

    async def _render_to_pipe(self, pipe: Any, req: Any) -> None:
        evicted = sum(self.transfers.evictions.values())
        try:
            try:
                assembled = self._block1.feed(req)
            except _Block1Reply as reply:
                pipe.add_response(reply.message, is_last=True)
                return
            if (
                assembled.opt.observe == 0
                and assembled.opt.block2 is None
                and self._server.config.push.enabled
                and await self._server._observe(assembled, pipe, self._block2)
            ):
                return

            async def build() -> Message:
                full: Message = await self._server._render(assembled)
                if assembled.opt.size2 is not None and full.payload:
                    # RFC 7959 4: Size2 asked for (usually 0): say the whole size (every block)
                    full.opt.size2 = len(full.payload)
                return full

            res = await self._block2.extract_or_insert(assembled, build)
        finally:
            if sum(self.transfers.evictions.values()) != evicted:
                self._server._count_evictions()
        if assembled.opt.block1 is not None:
            res.opt.block1 = assembled.opt.block1
        pipe.add_response(res, is_last=True)

    def expire(self) -> None:
        """Forget stalled transfers (a timer calls this)."""
        if self.transfers.expire():
            self._server._count_evictions()
