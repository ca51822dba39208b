"""Several listeners of one homeserver: the sidecar moves to another when its own goes quiet.

A homeserver in a worker deployment may run CoAP listeners on several
instances (docs/deployment.md, "Workers"), each of which serves every request
(in-process, or forwarded to the instance that serves it). The sidecar is given
all of them (``--homeserver`` repeated). :class:`FailoverSender` sends every
request to the current listener; when that listener stops answering (the CoAP
link reports it down, or an ordinary request gets no answer within
``failover_after`` seconds) the next listener becomes current, which costs one
new handshake there, and a request that is safe to repeat (GET, HEAD, or PUT
with a transaction id, which Synapse deduplicates) is sent again to it at once.
Other requests get the error and the client retries them, as it would after
any lost connection. Long-polls wait for their own timeout first.

Push registrations (``observe``) go to the current listener too. A registration
whose listener stops answering (its renewal, every 240 s with several listeners,
or its first request gets no answer) moves the sidecar to the next listener like
any request; and whenever the current listener changes, the ``on_failover``
callbacks run, so the push side registers again at the new listener at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from synapse_coap.errors import LinkDown, RequestTimeout
from synapse_coap.mapping.messages import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)

#: Default seconds an ordinary request waits on one listener before the next one is tried.
DEFAULT_FAILOVER_AFTER = 15.0


class FailoverSender:
    """A request sender over several endpoints of one homeserver (see the module doc).

    ``client``: the CoAP client (``request(endpoint, HttpRequest, timeout=...)``);
    ``endpoints``: the listeners, the first one current at start; ``replay_safe``:
    whether a request may be sent twice.
    """

    def __init__(
        self,
        client: Any,
        endpoints: Sequence[Any],
        *,
        replay_safe: Callable[[HttpRequest], bool],
        failover_after: float = DEFAULT_FAILOVER_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self._client = client
        self.endpoints = tuple(endpoints)
        self._replay_safe = replay_safe
        self.failover_after = failover_after
        self._clock = clock
        self._current = 0
        #: how many times the current listener changed
        self.failovers = 0
        #: listeners given up on since the last answer (all failed: >= len(endpoints))
        self.failures_in_a_row = 0
        #: called (no arguments) each time the current listener changes
        self.on_failover: list[Callable[[], None]] = []
        #: called (no arguments) each time the current listener is given up on, even
        #: when it is the only one (the address book looks for more then)
        self.on_give_up: list[Callable[[], None]] = []

    @property
    def on_new_session(self) -> list[Callable[[], None]] | None:
        """The client's new-session callbacks (a listener lost our session), if it has them."""
        hooks = getattr(self._client, "on_new_session", None)
        return hooks if isinstance(hooks, list) else None

    def add_endpoints(self, endpoints: Sequence[Any], *, switch: bool = False) -> None:
        """Listeners learned later (the address book); tried after those known, in order.
        ``switch``: the first new one becomes current (every known one failed)."""
        new = [e for e in dict.fromkeys(endpoints) if e not in self.endpoints]
        if not new:
            return
        self.endpoints = (*self.endpoints, *new)
        if switch:
            self._current = len(self.endpoints) - len(new)
            self.failures_in_a_row = 0
            self.failovers += 1
            logger.warning("every known listener failed; moving to %s", _name(self.current))
            _run(self.on_failover)

    @property
    def all_failed(self) -> bool:
        """Every known listener was given up on since the last answer."""
        return self.failures_in_a_row >= len(self.endpoints)

    @property
    def current(self) -> Any:
        return self.endpoints[self._current]

    def _give_up_on(self, endpoint: Any, error: Exception) -> None:
        if self.current is not endpoint:
            return  # another request already moved on
        self.failures_in_a_row += 1
        if len(self.endpoints) > 1:
            self._current = (self._current + 1) % len(self.endpoints)
            self.failovers += 1
            logger.warning(
                "homeserver listener %s stopped answering (%s); moving to %s",
                _name(endpoint),
                error,
                _name(self.current),
            )
            _run(self.on_failover)
        _run(self.on_give_up)

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        """Send ``request`` (``endpoint`` is ignored: the current listener is used)."""
        total = 120.0 if timeout is None else timeout
        started = self._clock()
        tries = len(self.endpoints)
        for attempt in range(tries):
            target = self.current
            remaining = total - (self._clock() - started)
            per_try = remaining
            if tries > 1 and not request.is_long_poll:
                per_try = min(remaining, self.failover_after)
            try:
                response: HttpResponse = await self._client.request(
                    target, request, timeout=per_try
                )
                if target is self.current:
                    self.failures_in_a_row = 0
                return response
            except (LinkDown, RequestTimeout) as e:
                self._give_up_on(target, e)
                left = total - (self._clock() - started)
                if attempt == tries - 1 or left <= 0 or not self._replay_safe(request):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def observe(self, endpoint: Any, request: HttpRequest) -> AsyncIterator[Any]:
        """Push registrations go to the current listener; one that fails there with a
        link error moves the sidecar on (the caller registers again)."""
        return self._observe(self.current, request)

    async def _observe(self, target: Any, request: HttpRequest) -> AsyncIterator[Any]:
        events: AsyncIterator[Any] = self._client.observe(target, request)
        try:
            async for event in events:
                yield event
        except (LinkDown, RequestTimeout) as e:
            self._give_up_on(target, e)
            raise
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    async def close(self) -> None:
        await self._client.close()


def _run(callbacks: list[Callable[[], None]]) -> None:
    for callback in list(callbacks):
        try:
            callback()
        except Exception:
            logger.exception("failover callback failed")


def _name(endpoint: Any) -> str:
    host = getattr(endpoint, "host", "?")
    port = getattr(endpoint, "port", "?")
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
