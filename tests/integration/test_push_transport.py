"""Observe push of /sync between a real CoapServer and CoapClient (loopback UDP, Noise, WireCodec).

The dispatcher is a small in-memory /sync (a list of events, ``since`` = an
index, long-polls wake on a new event): what the server does with it is what
is tested. No sleeps for synchronisation; timeouts only bound a failing test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from synapse_coap.lab.model import PROFILES
from synapse_coap.lab.relay import Relay, RelayConfig
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.push import LOW_BANDWIDTH_KEY, PushConfig
from synapse_coap.noise.keys import generate_private_key
from synapse_coap.noise.trust import MemoryTrustStore, TrustPolicy
from synapse_coap.transport.client import CoapClient, Endpoint, PushEvent
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.server import CoapServer, ServerConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = LinkParameters(ack_timeout=0.3, min_rto=0.2, empty_ack_delay=0.05, max_retransmit=2)
AUTH = (("authorization", "Bearer syt_push_test_token"),)


class PushMetrics(CountingMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.push_events: dict[str, int] = {}
        self.live = 0
        self.changed = asyncio.Event()

    def push(self, event: str) -> None:
        self.push_events[event] = self.push_events.get(event, 0) + 1
        self.changed.set()

    def push_registrations(self, count: int) -> None:
        self.live = count
        self.changed.set()

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 20)


class FakeSync:
    """/sync over a list of events; ``since`` is the index; a long-poll waits for news."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.news = asyncio.Condition()
        self.targets: list[bytes] = []

    async def add(self, event: dict[str, Any]) -> None:
        async with self.news:
            self.events.append(event)
            self.news.notify_all()

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        path, _, query = request.target.partition(b"?")
        if path == b"/_matrix/client/versions":
            return HttpResponse(200, (("content-type", "application/json"),), b'{"versions":[]}')
        if not path.endswith(b"/sync"):
            return HttpResponse(404, (("content-type", "application/json"),), b"{}")
        self.targets.append(request.target)
        params = dict(urllib.parse.parse_qsl(query.decode()))
        since = int(params.get("since", "0"))
        timeout = int(params.get("timeout", "0")) / 1000
        async with self.news:
            if len(self.events) <= since and timeout:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self.news.wait_for(lambda: len(self.events) > since), timeout
                    )
        new = self.events[since:]
        body: dict[str, Any] = {"next_batch": str(len(self.events))}
        if new:
            body["rooms"] = {"join": {"!r:hs.test": {"timeline": {"events": new}}}}
        return HttpResponse(200, (("content-type", "application/json"),), json.dumps(body).encode())


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@contextlib.asynccontextmanager
async def pair(
    push: PushConfig = PushConfig(poll_timeout=5.0),
) -> AsyncIterator[tuple[FakeSync, CoapClient, Endpoint, PushMetrics]]:
    sync = FakeSync()
    metrics = PushMetrics()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("::1", 0),),
            static_key=generate_private_key(),
            link=FAST,
            server_name="hs.test",
            push=push,
        ),
        sync,
        metrics=metrics,
    )
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=MemoryTrustStore()),
        link=FAST,
        bind=("::1", 0),
    )
    endpoint = Endpoint("::1", server.addresses[0][1], "hs.test")
    try:
        yield sync, client, endpoint, metrics
    finally:
        await client.close()
        await server.close()


def sync_request(since: str, **extra: str) -> HttpRequest:
    query = urllib.parse.urlencode({"since": since, "timeout": "30000", **extra})
    return HttpRequest("GET", f"/_matrix/client/v3/sync?{query}".encode(), AUTH)


async def next_event(it: AsyncIterator[PushEvent]) -> PushEvent:
    """The next response (skipping the event that says the registration was acknowledged)."""
    while True:
        ev = await asyncio.wait_for(it.__anext__(), 20)
        if ev.response is not None:
            return ev


@aio
async def test_notifications_are_sync_responses_pushed_in_order_and_resumable() -> None:
    async with pair() as (sync, client, endpoint, metrics):
        it = client.observe(endpoint, sync_request("0", filter="7", set_presence="online"))
        first = asyncio.ensure_future(next_event(it))
        await metrics.until(lambda: metrics.live == 1)
        await sync.add({"event_id": "$1", "body": "one"})
        ev = await first
        assert not ev.final and ev.response.status == 200
        body = json.loads(ev.response.body)
        assert body["next_batch"] == "1"
        assert body["rooms"]["join"]["!r:hs.test"]["timeline"]["events"] == [
            {"event_id": "$1", "body": "one"}
        ]
        # the filter and set_presence of the registration stay on every /sync it issues
        assert all(b"filter=7" in t and b"set_presence=online" in t for t in sync.targets)
        await sync.add({"event_id": "$2"})
        await sync.add({"event_id": "$3"})
        seen: list[str] = []
        while len(seen) < 2:
            ev = await next_event(it)
            seen += [
                e["event_id"]
                for e in json.loads(ev.response.body)["rooms"]["join"]["!r:hs.test"]["timeline"][
                    "events"
                ]
            ]
        assert seen == ["$2", "$3"]
        last = json.loads(ev.response.body)["next_batch"]
        await it.aclose()
        # re-registering from the last next_batch: nothing repeated, the next event arrives
        it2 = client.observe(endpoint, sync_request(last))
        pending = asyncio.ensure_future(next_event(it2))
        await sync.add({"event_id": "$4"})
        ev = await pending
        events = json.loads(ev.response.body)["rooms"]["join"]["!r:hs.test"]["timeline"]["events"]
        assert [e["event_id"] for e in events] == ["$4"]
        # the new registration (same session, token and parameters) replaced the old one
        await metrics.until(lambda: metrics.live == 1)
        await it2.aclose()


def _timeline_ids(ev: PushEvent) -> list[str]:
    assert ev.response is not None
    events = json.loads(ev.response.body)["rooms"]["join"]["!r:hs.test"]["timeline"]["events"]
    return [e["event_id"] for e in events]


def _echo(event_id: str) -> dict[str, Any]:
    """An event as /sync shows it to the device that sent it."""
    return {"event_id": event_id, "unsigned": {"transaction_id": "t" + event_id}}


@contextlib.asynccontextmanager
async def _registered(
    echo_hold: float,
) -> AsyncIterator[tuple[FakeSync, AsyncIterator[PushEvent], PushMetrics]]:
    """A registration with ``push.echo_hold``, past its first notification ($1)."""
    async with pair(PushConfig(poll_timeout=5.0, echo_hold=echo_hold)) as (
        sync,
        client,
        endpoint,
        metrics,
    ):
        it = client.observe(endpoint, sync_request("0"))
        pending = asyncio.ensure_future(next_event(it))
        await metrics.until(lambda: metrics.live == 1)
        await sync.add({"event_id": "$1"})
        assert _timeline_ids(await pending) == ["$1"]
        yield sync, it, metrics
        await it.aclose()


@aio
async def test_own_echoes_are_held_and_ride_with_the_next_notification() -> None:
    async with _registered(echo_hold=60.0) as (sync, it, metrics):
        pending = asyncio.ensure_future(next_event(it))
        await sync.add(_echo("$mine"))
        await metrics.until(lambda: metrics.push_events.get("echo_held") == 1)
        await sync.add(_echo("$mine2"))
        await sync.add({"event_id": "$2"})
        # one notification: the held echoes and the news, as /sync from before them gives
        ev = await pending
        assert _timeline_ids(ev) == ["$mine", "$mine2", "$2"]
        assert json.loads(ev.response.body)["next_batch"] == "4"
        assert metrics.push_events["echo_merged"] == 1
        assert metrics.push_events["notification"] == 2


@aio
async def test_a_held_echo_is_pushed_alone_when_the_hold_runs_out() -> None:
    async with _registered(echo_hold=0.3) as (sync, it, metrics):
        await sync.add(_echo("$mine"))
        assert _timeline_ids(await next_event(it)) == ["$mine"]
        assert metrics.push_events["echo_held"] == 1
        assert metrics.push_events["echo_released"] == 1


@aio
async def test_with_echo_hold_zero_an_echo_is_pushed_at_once() -> None:
    async with _registered(echo_hold=0) as (sync, it, metrics):
        await sync.add(_echo("$mine"))
        assert _timeline_ids(await next_event(it)) == ["$mine"]
        assert "echo_held" not in metrics.push_events


@aio
async def test_large_notification_goes_blockwise_with_etag() -> None:
    async with pair() as (sync, client, endpoint, metrics):
        it = client.observe(endpoint, sync_request("0"))
        pending = asyncio.ensure_future(next_event(it))
        await metrics.until(lambda: metrics.live == 1)
        # incompressible text: several 1 KiB blocks even after DEFLATE
        big = {
            "event_id": "$big",
            "body": "".join(hashlib.sha256(bytes([i])).hexdigest() for i in range(100)),
        }
        before = metrics.datagrams[("out", "record")]
        await sync.add(big)
        ev = await pending
        assert metrics.datagrams[("out", "record")] - before >= 3
        events = json.loads(ev.response.body)["rooms"]["join"]["!r:hs.test"]["timeline"]["events"]
        assert events == [big]
        # the next one still arrives: the server waited for the last block to be fetched
        pending = asyncio.ensure_future(next_event(it))
        await sync.add({"event_id": "$after"})
        ev = await pending
        assert b"$after" in ev.response.body
        await it.aclose()


@aio
async def test_observe_on_a_resource_that_is_not_observable_gets_a_normal_response() -> None:
    async with pair() as (_sync, client, endpoint, metrics):
        req = HttpRequest("GET", b"/_matrix/client/versions", AUTH)
        events = [ev async for ev in client.observe(endpoint, req) if ev.response is not None]
        assert len(events) == 1 and events[0].final and events[0].response.status == 200
        # and /versions advertises push as MSC3079 does
        assert json.loads(events[0].response.body)[LOW_BANDWIDTH_KEY] == {"observe": 1}
        assert metrics.live == 0 and "registered" not in metrics.push_events


@aio
async def test_too_many_registrations_per_session_are_refused_and_counted() -> None:
    async with pair(PushConfig(max_per_session=1, poll_timeout=5.0)) as (
        _sync,
        client,
        endpoint,
        metrics,
    ):
        first = client.observe(endpoint, sync_request("0", filter="a"))
        pending = asyncio.ensure_future(next_event(first))
        await metrics.until(lambda: metrics.live == 1)
        second = client.observe(endpoint, sync_request("0", filter="b"))
        ev = await next_event(second)
        assert ev.final and ev.response.status == 429
        error = json.loads(ev.response.body)
        assert error["errcode"] == "M_LIMIT_EXCEEDED"
        assert "per-session" not in error["error"] and "session (limit 1)" in error["error"]
        assert metrics.push_events["refused_session"] == 1
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        await first.aclose()


@aio
async def test_a_notification_parked_past_park_timeout_drops_the_registration() -> None:
    async with pair(PushConfig(poll_timeout=5.0, park_retry=0.3, park_timeout=1.5)) as (
        sync,
        client,
        endpoint,
        metrics,
    ):
        it = client.observe(endpoint, sync_request("0"))
        pending = asyncio.ensure_future(next_event(it))
        await metrics.until(lambda: metrics.live == 1)
        await sync.add({"event_id": "$got"})
        assert b"$got" in (await pending).response.body
        # the client goes away without a word: the next notification is never acknowledged
        await client.close()
        await sync.add({"event_id": "$lost"})
        await metrics.until(lambda: metrics.live == 0)
        # parked first (resent every park_retry), then dropped and freed at park_timeout
        assert metrics.push_events.get("parked") == 1
        assert metrics.push_events.get("dropped") == 1
        assert "unparked" not in metrics.push_events
        assert metrics.push_events["notification"] >= 3
        assert metrics.retransmissions >= FAST.max_retransmit


@aio
async def test_a_parked_notification_goes_out_as_soon_as_the_client_is_heard_again() -> None:
    # park_retry is far beyond the test's bounds: only hearing the client can resend
    async with (
        pair(PushConfig(poll_timeout=5.0, park_retry=600.0)) as (
            sync,
            client,
            endpoint,
            metrics,
        ),
        await Relay.start(RelayConfig(listen=("::1", 0), upstream=("::1", endpoint.port))) as relay,
    ):
        via = Endpoint("::1", relay.address[1], "hs.test")
        it = client.observe(via, sync_request("0"))
        pending = asyncio.ensure_future(next_event(it))
        await metrics.until(lambda: metrics.live == 1)
        await sync.add({"event_id": "$before"})
        assert b"$before" in (await pending).response.body
        relay.set_profile(PROFILES["lan"].with_changes(loss=1.0))  # the link drops
        pending = asyncio.ensure_future(next_event(it))
        await sync.add({"event_id": "$during"})
        await metrics.until(lambda: metrics.push_events.get("parked", 0) == 1)
        relay.set_profile(PROFILES["lan"])  # back; the client asks for something
        await client.request(via, HttpRequest("GET", b"/_matrix/client/versions", AUTH))
        got = (await pending).response
        assert b"$during" in got.body and b"$before" not in got.body
        assert metrics.push_events.get("unparked") == 1
        assert "dropped" not in metrics.push_events
        assert metrics.live == 1  # the registration lived on: nothing to renew
        pending.cancel()
        await it.aclose()  # type: ignore[attr-defined]


@aio
async def test_too_many_registrations_per_source_are_refused_and_counted() -> None:
    async with pair(PushConfig(max_per_source=1, poll_timeout=5.0)) as (
        _sync,
        client,
        endpoint,
        metrics,
    ):
        first = client.observe(endpoint, sync_request("0"))
        pending = asyncio.ensure_future(next_event(first))
        await metrics.until(lambda: metrics.live == 1)
        # another session (another client) from the same address
        other = await CoapClient.create(
            static_key=generate_private_key(),
            trust=TrustPolicy(store=MemoryTrustStore()),
            link=FAST,
            bind=("::1", 0),
        )
        try:
            ev = await next_event(other.observe(endpoint, sync_request("0")))
        finally:
            await other.close()
        assert ev.final and ev.response.status == 429
        assert "source (limit 1)" in json.loads(ev.response.body)["error"]
        assert metrics.push_events["refused_source"] == 1
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        await first.aclose()


async def _restart_found_by_a_keepalive(
    keepalive: float, requests: int, spacing: float, within: float
) -> None:
    """A client with this keep-alive interval sends ``requests`` requests, each followed
    by ``spacing`` seconds of quiet; then the server restarts (same key and port, every session lost) and
    nothing is asked: only the idle client's next keep-alive can get the unknown-session
    hint. The client must re-handshake within ``within`` seconds, running its
    ``on_new_session`` callbacks (the sidecar registers push again there), and be served."""
    key = generate_private_key()
    sync = FakeSync()

    async def start(port: int) -> CoapServer:
        return await CoapServer.start(
            ServerConfig(listen=(("::1", port),), static_key=key, link=FAST, server_name="hs.test"),
            sync,
        )

    server = await start(0)
    port = server.addresses[0][1]
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=MemoryTrustStore()),
        link=FAST,
        bind=("::1", 0),
        keepalive_interval=keepalive,
    )
    new_session = asyncio.Event()
    client.on_new_session.append(new_session.set)
    endpoint = Endpoint("::1", port, "hs.test")
    versions = HttpRequest("GET", b"/_matrix/client/versions", AUTH)
    try:
        for _ in range(requests):
            assert (await client.request(endpoint, versions)).status == 200
            await asyncio.sleep(spacing)
        await server.close()
        server = await start(port)
        await asyncio.wait_for(new_session.wait(), within)
        assert (await client.request(endpoint, versions, timeout=10)).status == 200
    finally:
        await client.close()
        await server.close()


@aio
async def test_a_restarted_server_is_found_by_the_next_keepalive_and_the_client_hears_of_it() -> (
    None
):
    """The server loses every session; the idle client's next keep-alive finds out."""
    await _restart_found_by_a_keepalive(keepalive=0.5, requests=1, spacing=0.0, within=20)


@aio
async def test_keepalives_go_on_after_traffic_moved_their_deadline() -> None:
    """The transport's timer is armed for the keep-alive, then traffic moves the keep-alive
    later (traffic only delays deadlines, so the armed timer is left as it is) and the
    timer wakes early with nothing to do: it must be armed again, or the idle client
    never sends another keep-alive and never finds a restarted server (this stopped the
    sidecar's catch-up after a homeserver restart in test_push_nio)."""
    # requests closer together than the keep-alive interval: each moves it later
    await _restart_found_by_a_keepalive(keepalive=2.0, requests=6, spacing=0.7, within=10)
