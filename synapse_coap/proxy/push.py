"""The sidecar's side of push: one Observe registration per access token, long-polls answered locally.

An unmodified client long-polls ``/sync?since=S&timeout=30000`` again and
again. Instead of carrying each poll over the link, the sidecar holds one
Observe registration of ``/sync`` per access token at the homeserver (the
module or a gateway, :mod:`synapse_coap.transport.push`) and answers the
client's polls from what is pushed:

* a poll whose ``since`` is the start of a pushed response gets that response
  at once (the pushed responses form a chain: each one's ``next_batch`` is
  the next one's ``since``; the last few are kept, so a client that lost an
  answer and asks again gets the same one);
* a poll at the head of the chain waits for the next push, up to the client's
  own ``timeout``; when it runs out the client gets a valid empty response
  whose ``next_batch`` is its own ``since`` (the one-time key counts of the
  last real response included), so its next poll resumes at the same place;
* nothing crosses the link for either.

A poll the push cannot answer goes over the link as before: no ``since``
(initial sync), ``full_state=true``, or other parameters (filter,
``set_presence``...) than the registration's while that registration is in
use. A poll with the registration's parameters but a ``since`` the sidecar
does not hold (the first incremental sync, or after the client went back)
starts a new registration at that ``since``; a poll with other parameters
takes the registration over once the old parameters went unused for
``switch_after`` seconds.

A registration is not renewed on a timer: nothing crosses the link for it
while nothing happens. It is made again (from the head, which the server
treats as replacing the old one) when the server cannot hold it any more:

* the homeserver listener lost our Noise session (it restarted, or expired
  the session): its answer to our next keep-alive is an unknown-session hint,
  the client re-handshakes, and the new session registers again at once
  (``CoapClient.on_new_session``);
* the sidecar moved to another listener (``FailoverSender.on_failover``);
* a registration attempt failed with a link error: retried with back-off.

With several listeners (``--homeserver`` repeated) the registration is also
renewed every :data:`MULTI_LISTENER_REFRESH` seconds without a notification: a
listener that died (a killed worker) answers nothing at all, and the renewal
is what finds out, so the sidecar moves to the next listener.

While the link is down the server *parks* an unacknowledged notification
and sends it again when the link is back (see transport/push.py), so an
outage loses nothing and costs no renewal. ``refresh`` (``--push-refresh``)
still renews after that many seconds without a notification, for a link
without keep-alives. A final answer from
the server (an error such as 401 after a logout) is handed to the client's
waiting poll; a server without push (a normal response without Observe, or
4.29 when it is over its limit) turns push off for that token and polls go
over the link as before, until push is tried again: after ``refused_retry``
seconds for a 4.29, doubled on each refusal in a row up to ``unsupported_retry``,
and after ``unsupported_retry`` seconds for a server that answered without
Observe (it may be upgraded, or the poll may reach another listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs

from synapse_coap.errors import ConfigValueError, SynapseCoapError
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.push import (
    SyncQuery,
    empty_sync_body,
    parse_sync_body,
    sync_counters,
)

logger = logging.getLogger(__name__)

#: How the sidecar registers: ``observe(request)`` yields PushEvent-like objects
#: (``.response``, ``.final``), as ``CoapClient.observe`` bound to the homeserver does.
Observer = Callable[[HttpRequest], AsyncIterator[Any]]


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigValueError(f"push.{attribute.name}", f"must be a number > 0, got {value!r}")


@attrs.frozen
class PushOptions:
    """How the sidecar uses push (``--no-push``, ``--push-refresh``)."""

    enabled: bool = True
    #: Seconds without a notification after which the registration is renewed
    #: (None: never; see the module docstring for what re-registers instead).
    refresh: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    #: First wait (s) after a failed registration; doubles up to ``max_retry``.
    retry: float = attrs.field(default=5.0, validator=_positive)
    max_retry: float = attrs.field(default=60.0, validator=_positive)
    #: First wait (s) before push is tried again for a token the server refused (4.29);
    #: doubled on each refusal in a row, up to ``unsupported_retry``.
    refused_retry: float = attrs.field(default=60.0, validator=_positive)
    #: Wait (s) before push is tried again after the server answered without Observe.
    unsupported_retry: float = attrs.field(default=3600.0, validator=_positive)
    #: Seconds a registration's parameters must go unused before another set takes over.
    switch_after: float = attrs.field(default=90.0, validator=_positive)
    #: Pushed responses kept per token for polls that ask again.
    keep: int = 8
    #: The ``timeout`` (ms) the registration asks the server to long-poll with.
    server_timeout_ms: int = 30000


#: The renewal interval (s) when the sidecar knows several listeners: a listener that
#: died answers nothing, not even a hint, so an idle sidecar would not notice it otherwise.
MULTI_LISTENER_REFRESH = 240.0


def push_refresh(value: float | None, listeners: int) -> float | None:
    """``--push-refresh``: None (unset) -> never with one listener, MULTI_LISTENER_REFRESH
    with several; 0 -> never; else that many seconds (> 0)."""
    if value is None:
        return MULTI_LISTENER_REFRESH if listeners > 1 else None
    if value == 0:
        return None
    if not value > 0:
        raise ConfigValueError("--push-refresh", f"must be a number of seconds >= 0, got {value!r}")
    return float(value)


class _Feed:
    """The push state of one access token."""

    def __init__(self, auth: str, query: SyncQuery, since: str, headers: Any, now: float) -> None:
        self.auth = auth
        self.query = query
        self.observed = query.observed
        self.headers = headers
        self.head = since
        self.chain: OrderedDict[str, HttpResponse] = OrderedDict()
        self.counters: dict[str, Any] = {}
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.last_used = now
        #: the server does not push for us: polls go over the link (until ``retry_at``)
        self.unsupported = False
        self.retry_at = float("inf")
        #: a final error answer for the poll at ``head`` (the feed is over)
        self.final: HttpResponse | None = None
        self.registered = 0
        #: the last registration attempt failed (link down): polls go over the link
        self.failing = False

    def holds(self, since: str) -> bool:
        return since in self.chain or since == self.head

    def pushed(self, response: HttpResponse, next_batch: str, keep: int) -> None:
        self.chain[self.head] = response
        while len(self.chain) > keep:
            self.chain.popitem(last=False)
        self.head = next_batch
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class PushSync:
    """Answers ``/sync`` long-polls from push registrations (see the module docstring)."""

    def __init__(
        self,
        observe: Observer,
        options: PushOptions = PushOptions(),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._observe = observe
        self.options = options
        self._clock = clock
        self._feeds: dict[str, _Feed] = {}
        #: per token: the wait before push is tried again after the last refusal
        self._refused_wait: dict[str, float] = {}
        #: counts for tests and logs: registrations made, polls answered locally
        self.registrations = 0
        self.answered = 0

    # -- the long-poll side ---------------------------------------------------------------

    async def answer(self, request: HttpRequest) -> HttpResponse | None:
        """The response to a client's ``/sync``, or None when it must go over the link."""
        if request.method != "GET":
            return None
        query = SyncQuery.parse(request.target)
        auth = request.header("authorization")
        if query is None or auth is None or query.full_state:
            return None
        since = query.since
        if since is None:
            return None
        now = self._clock()
        feed = self._feeds.get(auth)
        if feed is not None and feed.observed != query.observed:
            if now - feed.last_used < self.options.switch_after:
                return None  # another filter while the registration is in use
            self._drop(feed)
            feed = None
        if feed is not None and feed.unsupported and now >= feed.retry_at:
            logger.info("push: trying push again for a token the server did not push to")
            self._drop(feed)
            feed = None
        if feed is not None and (feed.unsupported or (feed.failing and since == feed.head)):
            return None  # (while the link is down the client sees what it saw before push)
        if feed is None or not feed.holds(since):
            if feed is not None:
                self._drop(feed)
            feed = self._start(auth, query, since, request.headers, now)
        feed.last_used = now
        pushed = feed.chain.get(since)
        if pushed is None and since == feed.head and feed.final is None:
            changed = feed.changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), query.timeout_ms / 1000)
            feed.last_used = self._clock()
            pushed = feed.chain.get(since)
        if pushed is not None:
            self.answered += 1
            return pushed
        if feed.final is not None and since == feed.head:
            final = feed.final
            self._drop(feed)
            return final
        if feed.unsupported:
            return None
        self.answered += 1
        return HttpResponse(
            200,
            (("content-type", "application/json"),),
            empty_sync_body(since, feed.counters),
        )

    # -- the registration side --------------------------------------------------------------

    def _start(self, auth: str, query: SyncQuery, since: str, headers: Any, now: float) -> _Feed:
        feed = _Feed(auth, query, since, headers, now)
        self._feeds[auth] = feed
        feed.task = asyncio.ensure_future(self._run(feed))
        return feed

    def reregister(self) -> None:
        """Register every token again now, from where its feed stands (the homeserver
        listener changed: the old registration is gone with it)."""
        for feed in list(self._feeds.values()):
            if feed.unsupported or feed.final is not None:
                continue
            if feed.task is not None:
                feed.task.cancel()
            feed.failing = False
            feed.task = asyncio.ensure_future(self._run(feed))
        if self._feeds:
            logger.info("push: registering again at once (%d tokens)", len(self._feeds))

    def _drop(self, feed: _Feed) -> None:
        if self._feeds.get(feed.auth) is feed:
            del self._feeds[feed.auth]
        if feed.task is not None:
            feed.task.cancel()
        feed._wake()

    async def _run(self, feed: _Feed) -> None:
        delay = self.options.retry
        while True:
            target = feed.query.target(since=feed.head, timeout_ms=self.options.server_timeout_ms)
            request = HttpRequest("GET", target, feed.headers)
            events = self._observe(request)
            self.registrations += 1
            feed.registered += 1
            logger.info("push: registering /sync (registration %d)", feed.registered)
            try:
                while True:
                    event = await asyncio.wait_for(events.__anext__(), self.options.refresh)
                    delay = self.options.retry
                    feed.failing = False
                    if event.response is None or not event.final:
                        self._refused_wait.pop(feed.auth, None)  # registered: push works
                    if event.response is None:
                        continue  # the server has the registration
                    if not event.final:
                        self._on_push(feed, event.response)
                        continue
                    self._on_final(feed, event.response)
                    return
            except StopAsyncIteration:
                pass
            except asyncio.TimeoutError:
                logger.info("push: nothing pushed for %.0f s: renewing", self.options.refresh or 0)
                continue
            except SynapseCoapError as e:
                logger.warning("push: registration failed (%s); again in %.0f s", e, delay)
                feed.failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.max_retry)
            finally:
                with contextlib.suppress(Exception):
                    await events.aclose()  # type: ignore[attr-defined]

    def _on_push(self, feed: _Feed, response: HttpResponse) -> None:
        body = parse_sync_body(response.body) if response.status == 200 else None
        if body is None:
            logger.warning("push: a notification is not a /sync response; ignored")
            return
        feed.counters = sync_counters(body)
        feed.pushed(response, body["next_batch"], self.options.keep)

    def _on_final(self, feed: _Feed, response: HttpResponse) -> None:
        body = parse_sync_body(response.body) if response.status == 200 else None
        if body is not None or response.status == 429:
            # no push here (a normal long-poll answer) or no room for us: as before
            if response.status == 429:
                wait = self._refused_wait.get(feed.auth, self.options.refused_retry / 2) * 2
                wait = min(wait, self.options.unsupported_retry)
                self._refused_wait[feed.auth] = wait
            else:
                wait = self.options.unsupported_retry
            logger.info(
                "push: the homeserver does not push to us (%d); trying again in %.0f s",
                response.status,
                wait,
            )
            feed.unsupported = True
            feed.retry_at = self._clock() + wait
            if body is not None:
                feed.counters = sync_counters(body)
                feed.pushed(response, body["next_batch"], self.options.keep)
            else:
                feed._wake()
            return
        logger.info("push: registration ended by the homeserver (%d)", response.status)
        feed.final = response
        feed._wake()

    async def close(self) -> None:
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        for feed in list(self._feeds.values()):
            self._drop(feed)
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


__all__ = ["MULTI_LISTENER_REFRESH", "Observer", "PushOptions", "PushSync", "push_refresh"]
