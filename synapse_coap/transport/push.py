"""Server push of ``/sync`` over CoAP Observe (RFC 7641), for the module and the gateway alike.

A GET of ``/sync`` with ``Observe: 0`` is a *registration*. The server then
issues ``/sync`` itself through the listener's dispatcher (in-process into
Synapse for the module, HTTP to the homeserver for the gateway), starting at
the registration's ``since`` and continuing at each response's
``next_batch``. A result with something in it (see
:func:`synapse_coap.mapping.push.sync_has_updates`) is *pushed*: a
Confirmable notification whose payload is exactly that ``/sync`` response in
the session's compact body codec, with the Observe option counting up. Empty
results are not sent; the server simply polls on from their ``next_batch``
(the long-poll stays local, on the homeserver's side of the link).

* **Lossless.** The next ``/sync`` is issued only once the previous
  notification was acknowledged (and, when it was larger than one block,
  fully fetched), so a client that re-registers with the ``next_batch`` of the
  last notification it got resumes with nothing lost and nothing repeated.
* **Relative** (:mod:`synapse_coap.wire.push_base`): a notification may be
  compressed relative to the last one that was delivered (its base, named by
  the difference of their Observe numbers); re-sends name the same base, so
  they decode the same; a client that lost its bases registers again.
* **Blockwise** (RFC 7641 §4 with RFC 7959): a notification larger than one
  block carries its first block, ``Block2`` and an ``ETag``; the client
  fetches the other blocks with GETs of the registration request (without
  Observe) and is served from the very representation that was pushed.
* **Parked, not dropped, while the link is down.** A notification whose
  retransmissions run out (the link's ``max_retransmit``) ends only its own
  exchange (not the peer's other requests) and is *parked*: sent again, with
  the next Observe number, as soon as anything authentic is heard from the
  peer (a request or a Noise keep-alive), else after ``park_retry`` seconds
  (doubling up to ten times that). So a client whose link dropped for a while
  gets what it missed when the link returns, without re-registering and
  without anything crossing the link in between.
* **Dropped and freed** when a notification stays parked past
  ``park_timeout``, when it is rejected (RST: the client forgot the
  registration), when the peer abandons it, when its session closes (a Noise
  session closes after ``idle_timeout`` without a keep-alive), and when the
  homeserver answers ``/sync`` with a client error (e.g. 401 after a logout:
  that response ends the observation, without Observe).
* **Keyed** by (access token, CoAP token) within a session (the peer's channel,
  which outlives re-handshakes); a new registration
  from the same session with the same token and the same parameters (filter,
  ``set_presence``, ...) replaces the older one (the client moved on),
  silently. ``max_per_session`` and ``max_per_source`` bound the rest: more
  are refused with 4.29 (HTTP 429, ``M_LIMIT_EXCEEDED``).
* **Semantics.** The client's query is kept (filter, ``set_presence``,
  lazy-loading, ...); ``full_state`` applies to the first ``/sync`` only, as
  it would for a client that long-polls. Because the server keeps a
  ``/sync`` outstanding with the client's ``set_presence`` the whole time, the
  homeserver keeps the user's presence as if the client were long-polling.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from aiocoap.message import Message
from aiocoap.numbers.codes import Code

from synapse_coap.mapping.dispatch import Dispatcher, PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.push import (
    PushConfig,
    SyncQuery,
    only_own_echoes,
    parse_sync_body,
    sync_counters,
    sync_has_updates,
)
from synapse_coap.transport.aiocoap_compat import extract_block
from synapse_coap.transport.convert import Codec, to_aiocoap
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.manager import LinkTuning
from synapse_coap.wire.push_base import Kept, ServerBase

logger = logging.getLogger(__name__)

#: Observe option values are 24-bit (RFC 7641 §4.4).
OBSERVE_MODULUS = 1 << 24

#: No-Response value suppressing every response class (RFC 7967): ends a pipe silently.
_SILENT = 26


def push_metric(metrics: Any, event: str) -> None:
    """Count a push event (``registered``, ``refused_session``, ``refused_source``,
    ``notification``, ``parked``, ``unparked``, ``dropped``, ``replaced``, ``ended``,
    ``echo_held``, ``echo_merged``, ``echo_released``) if the metrics object
    implements ``push(event)``; the active count goes to ``push_registrations(n)``."""
    fn = getattr(metrics, "push", None)
    if fn is not None:
        try:
            fn(event)
        except Exception:
            logger.debug("push metric failed", exc_info=True)


def _gauge(metrics: Any, count: int) -> None:
    fn = getattr(metrics, "push_registrations", None)
    if fn is not None:
        try:
            fn(count)
        except Exception:
            logger.debug("push metric failed", exc_info=True)


def _same(a: object, b: object) -> bool:
    """The same peer: one Noise channel (compared by identity), or equal plain CoAP
    remotes (aiocoap compares those by address; never across kinds, whose __eq__ fails)."""
    return a is b or (type(a) is type(b) and a == b)


@attrs.define(eq=False)
class Registration:
    session: object
    source: str
    auth: str
    token: bytes
    observed: tuple[tuple[str, str], ...]
    pipe: Any
    ended: bool = False

    def end_silently(self) -> None:
        """Finish the observation without sending anything (the pipe's task is cancelled)."""
        if self.ended:
            return
        self.ended = True
        m = Message(code=Code.CONTENT)
        m.opt.no_response = _SILENT
        try:
            self.pipe.add_response(m, is_last=True)
        except Exception:
            logger.debug("ending an observation failed", exc_info=True)


class Registrations:
    """The live registrations of one server: limits, replacement, counts."""

    def __init__(self, config: PushConfig, metrics: Any) -> None:
        self.config = config
        self.metrics = metrics
        self._live: list[Registration] = []
        self._per_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, reg: Registration) -> str | None:
        """Add ``reg``; None when admitted, else the refusal reason (``session`` / ``source``)."""
        for old in list(self._live):
            if (
                _same(old.session, reg.session)
                and old.auth == reg.auth
                and old.observed == reg.observed
            ):
                self.release(old)
                push_metric(self.metrics, "replaced")
                old.end_silently()
        per_session = sum(1 for r in self._live if _same(r.session, reg.session))
        if per_session >= self.config.max_per_session:
            push_metric(self.metrics, "refused_session")
            return "session"
        if self._per_source[reg.source] >= self.config.max_per_source:
            push_metric(self.metrics, "refused_source")
            return "source"
        self._live.append(reg)
        self._per_source[reg.source] += 1
        push_metric(self.metrics, "registered")
        _gauge(self.metrics, len(self._live))
        return None

    def release(self, reg: Registration) -> None:
        if reg in self._live:
            self._live.remove(reg)
            self._per_source[reg.source] -= 1
            if self._per_source[reg.source] <= 0:
                del self._per_source[reg.source]
            _gauge(self.metrics, len(self._live))


class Observation:
    """Serves one admitted registration until it ends (runs in the exchange's task)."""

    def __init__(
        self,
        reg: Registration,
        *,
        request: HttpRequest,
        query: SyncQuery,
        peer: PeerInfo,
        codec: Codec,
        want_json: bool,
        dispatcher: Dispatcher,
        config: PushConfig,
        link: LinkParameters,
        metrics: Any,
        block_size_exp: int,
        store_blocks: Callable[[Message, Callable[[], None]], None],
        sleep: Callable[[float], Any] = asyncio.sleep,
        heard: Callable[[], asyncio.Event] | None = None,
        strings: Any = None,
    ) -> None:
        """``heard()``: an event set the next time the peer is heard from (None: the
        transport cannot tell; parked notifications then wait ``park_retry``).
        ``strings``: the session string table (a notification may reference what the
        client sent; None: plain CoAP)."""
        self.reg = reg
        self.request = request
        self.query = query
        self.peer = peer
        self.codec = codec
        self.want_json = want_json
        self.dispatcher = dispatcher
        self.config = config
        self.link = link
        self.metrics = metrics
        self.block_size_exp = block_size_exp
        self._store_blocks = store_blocks
        self._sleep = sleep
        self._heard = heard
        self._strings = strings
        self.seq = 0
        #: the last delivered notification: the next ones are sent relative to it
        self._base = ServerBase(codec.notification_template(request.target))

    async def run(self) -> None:
        since = self.query.since
        first = True
        counters: dict[str, Any] | None = None
        delay = self.config.retry_delay
        headers = self.request.headers
        # echo hold (PushConfig.echo_hold): the position before the first held
        # result, and when the hold ends; ``merge`` = fetch from there now, and push
        held_since: str | None = None
        held_until = 0.0
        merge = False
        while True:
            timeout_ms = (
                min(self.query.timeout_ms, int(self.config.poll_timeout * 1000))
                if first
                else int(self.config.poll_timeout * 1000)
            )
            if merge:
                timeout_ms = 0
            elif held_since is not None:
                left = held_until - self._now()
                if left <= 0:
                    # the hold ran out: push what was held (with anything since)
                    since, held_since, merge, timeout_ms = held_since, None, True, 0
                    push_metric(self.metrics, "echo_released")
                else:
                    timeout_ms = min(timeout_ms, max(1, int(left * 1000)))
            target = self.query.target(
                since=since, timeout_ms=timeout_ms, full_state=first and self.query.full_state
            )
            try:
                resp = await self.dispatcher.dispatch(
                    HttpRequest("GET", target, headers), self.peer
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("push: /sync for %s failed: %s", self.peer.host, e)
                resp = HttpResponse(502)
            if resp.status >= 500 or resp.status == 429:
                # the homeserver is restarting or overloaded: keep the registration, retry
                await self._sleep(delay)
                delay = min(delay * 2, self.config.max_retry_delay)
                continue
            delay = self.config.retry_delay
            body = parse_sync_body(resp.body) if resp.status == 200 else None
            if body is None:
                # a client error (401 after logout, 400 bad filter...): end with that response
                self._final(resp)
                push_metric(self.metrics, "ended")
                return
            if sync_has_updates(body, counters):
                if not merge and not first and self._hold(body, counters):
                    if held_since is None:
                        held_since, held_until = since, self._now() + self.config.echo_hold
                        push_metric(self.metrics, "echo_held")
                    since = body["next_batch"]
                    continue
                if held_since is not None:
                    # something else came: issue /sync again from before the held
                    # result, so that one notification carries both
                    since, held_since, merge = held_since, None, True
                    push_metric(self.metrics, "echo_merged")
                    continue
                merge = False
                try:
                    delivered = await self._deliver(resp)
                except asyncio.CancelledError:
                    # the exchange ended under an outstanding notification: the peer
                    # rejected it or stopped acknowledging (aiocoap stops the pipe)
                    if not self.reg.ended:
                        push_metric(self.metrics, "dropped")
                        logger.info(
                            "push: notification %d to %s not delivered: registration dropped",
                            self.seq,
                            self.peer.host,
                        )
                    raise
                if not delivered:
                    push_metric(self.metrics, "dropped")
                    logger.info(
                        "push: notification to %s parked for over %.0f s: registration dropped",
                        self.peer.host,
                        self.config.park_timeout,
                    )
                    self.reg.end_silently()
                    return
                counters = sync_counters(body)
            elif counters is None:
                counters = sync_counters(body)
            merge = False
            since = body["next_batch"]
            first = False

    def _hold(self, body: dict[str, Any], counters: dict[str, Any] | None) -> bool:
        """Whether to hold this result back (it holds only the client's own echoes)."""
        return self.config.echo_hold > 0 and only_own_echoes(body, counters)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def _deliver(self, resp: HttpResponse) -> bool:
        """Push ``resp`` until it is acknowledged; parked while the peer does not answer.
        False once it stayed parked past ``park_timeout``."""
        parked_at: float | None = None
        wait = self.config.park_retry
        while True:
            if await self._notify(resp):
                if parked_at is not None:
                    push_metric(self.metrics, "unparked")
                    logger.info(
                        "push: parked notification delivered to %s after %.0f s",
                        self.peer.host,
                        self._now() - parked_at,
                    )
                return True
            now = self._now()
            if parked_at is None:
                parked_at = now
                push_metric(self.metrics, "parked")
                logger.info(
                    "push: notification to %s not acknowledged: parked until it is heard from",
                    self.peer.host,
                )
            left = parked_at + self.config.park_timeout - now
            if left <= 0:
                return False
            await self._park(min(wait, left))
            if self._now() - parked_at >= self.config.park_timeout:
                return False  # (not heard from in all that time: no last try)
            wait = min(wait * 2, 10 * self.config.park_retry)

    async def _park(self, timeout: float) -> None:
        """Wait until the peer is heard from, or ``timeout`` seconds."""
        if self._heard is None:
            await self._sleep(timeout)
            return
        try:
            await asyncio.wait_for(self._heard().wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _final(self, resp: HttpResponse) -> None:
        if self.reg.ended:
            return
        self.reg.ended = True
        self.reg.pipe.add_response(self._encode(resp)[0], is_last=True)

    def _encode(
        self, resp: HttpResponse, *, references: bool = False, seq: int | None = None
    ) -> tuple[Message, Kept]:
        """``references``: a notification numbered ``seq`` (it may reference what the
        client sent, and be relative to the last delivered notification); with what
        the client keeps of it (a possible base)."""
        base = self._base.for_notification(seq) if seq is not None else None
        cm = self.codec.encode_response(
            resp,
            want_json=self.want_json,
            references=self._strings if references else None,
            base=base,
        )
        kept = self.codec.notification_kept(cm, base) if seq is not None else Kept(None)
        return to_aiocoap(cm), kept

    async def _notify(self, resp: HttpResponse) -> bool:
        """Push one notification; True once it was acknowledged (and fully fetched)."""
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[bool] = loop.create_future()

        def on_ack(ok: bool) -> None:
            if not acked.done():
                acked.set_result(ok)

        seq = (self.seq + 1) % OBSERVE_MODULUS
        full, kept = self._encode(resp, references=True, seq=seq)
        self.seq = seq
        size = 2 ** (self.block_size_exp + 4)
        fetched: asyncio.Future[None] | None = None
        if len(full.payload) > size:
            fetched = loop.create_future()
            full.opt.etag = zlib.crc32(full.payload).to_bytes(4, "big")

            def on_fetched(fut: asyncio.Future[None] = fetched) -> None:
                if not fut.done():
                    fut.set_result(None)

            self._store_blocks(full, on_fetched)
            message = extract_block(full, 0, self.block_size_exp, size)
        else:
            message = full
        message.opt.observe = self.seq
        # Confirmable even for a NON registration: the next /sync waits for this ACK
        message.transport_tuning = LinkTuning(
            self.link, on_acknowledged=on_ack, confirmable=True, keep_on_timeout=True
        )
        self.reg.pipe.add_response(message, is_last=False)
        push_metric(self.metrics, "notification")
        if not await acked:
            return False
        if fetched is not None:
            try:
                await asyncio.wait_for(fetched, self.config.fetch_timeout)
            except asyncio.TimeoutError:
                return False
        self._base.delivered(seq, kept)
        return True


__all__ = ["OBSERVE_MODULUS", "Observation", "Registration", "Registrations", "push_metric"]
