"""The sidecar's push side (PushSync) and the sans-I/O helpers of mapping/push.py.

The homeserver is a scripted observer: each registration is a queue the test
fills with events. No sleeps: waits are bounded by the client's own
``timeout`` parameter (0 where the test wants the empty answer at once).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from synapse_coap.errors import ConfigValueError, LinkDown
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.mapping.push import (
    LOW_BANDWIDTH_KEY,
    PushConfig,
    SyncQuery,
    advertise_observe,
    is_observable,
    only_own_echoes,
    sync_has_updates,
)
from synapse_coap.proxy.push import PushOptions, PushSync
from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions

AUTH = ("authorization", "Bearer tok")


@attrs.frozen
class Ev:
    response: HttpResponse | None
    final: bool = False


def sync_response(next_batch: str, **extra: Any) -> HttpResponse:
    body = {"next_batch": next_batch, **extra}
    return HttpResponse(200, (("content-type", "application/json"),), json.dumps(body).encode())


class Homeserver:
    """Records registrations; each one is fed from its own queue."""

    def __init__(self) -> None:
        self.registrations: list[tuple[HttpRequest, asyncio.Queue[Any]]] = []
        self.registered = asyncio.Event()

    def observe(self, request: HttpRequest) -> AsyncIterator[Ev]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.registrations.append((request, queue))
        self.registered.set()

        async def events() -> AsyncIterator[Ev]:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.final:
                    return

        return events()

    async def push(self, ev: Ev, index: int = -1) -> None:
        await self.registrations[index][1].put(ev)


def poll(since: str | None, timeout: int = 30000, **extra: str) -> HttpRequest:
    params = ([f"since={since}"] if since else []) + [f"timeout={timeout}"]
    params += [f"{k}={v}" for k, v in extra.items()]
    return HttpRequest("GET", b"/_matrix/client/v3/sync?" + "&".join(params).encode(), (AUTH,))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_sync_query_keeps_parameters_and_moves_the_position() -> None:
    q = SyncQuery.parse(
        b"/_matrix/client/v3/sync?filter=%7B%7D&since=s1&timeout=30000&full_state=true"
    )
    assert q is not None and q.since == "s1" and q.timeout_ms == 30000 and q.full_state
    assert q.observed == (("filter", "%7B%7D"), ("full_state", "true"))
    assert (
        q.target(since="s2", timeout_ms=0)
        == b"/_matrix/client/v3/sync?filter=%7B%7D&since=s2&timeout=0"
    )
    assert SyncQuery.parse(b"/_matrix/client/v3/rooms/x/messages") is None
    assert is_observable("GET", b"/_matrix/client/r0/sync") and not is_observable(
        "POST", b"/_matrix/client/v3/sync"
    )


def test_empty_results_are_not_worth_pushing_but_key_count_changes_are() -> None:
    counts = {"device_one_time_keys_count": {"signed_curve25519": 50}}
    empty = {"next_batch": "s2", "rooms": {"join": {}}, "device_lists": {"changed": []}, **counts}
    assert not sync_has_updates(empty, counts)
    assert sync_has_updates(
        {**empty, "device_one_time_keys_count": {"signed_curve25519": 49}}, counts
    )
    assert sync_has_updates({**empty, "to_device": {"events": [{"type": "m"}]}}, counts)


def _joined(*events: dict[str, Any], **room: Any) -> dict[str, Any]:
    timeline = {"events": list(events), "prev_batch": "s1", "limited": False}
    return {"rooms": {"join": {"!r:hs": {"timeline": timeline, **room}}}}


ECHO = {"event_id": "$e", "type": "m.room.message", "unsigned": {"transaction_id": "t1"}}
OTHER = {"event_id": "$o", "type": "m.room.message", "unsigned": {"age": 3}}


def test_only_the_devices_own_echoes_may_be_held() -> None:
    counts = {"device_one_time_keys_count": {"signed_curve25519": 50}}
    base = {"next_batch": "s2", **counts}
    quiet_room = {
        "state": {"events": []},
        "ephemeral": {"events": []},
        "account_data": {"events": []},
        "unread_notifications": {"notification_count": 4, "highlight_count": 0},
        "summary": {},
    }
    echo_only = {**base, **_joined(ECHO, dict(ECHO, event_id="$f"), **quiet_room)}
    assert only_own_echoes(echo_only, counts)
    # anything else is pushed at once
    assert not only_own_echoes({**base, **_joined(ECHO, OTHER)}, counts)
    assert not only_own_echoes({**base, **_joined(ECHO, state={"events": [OTHER]})}, counts)
    assert not only_own_echoes({**base, **_joined(ECHO, ephemeral={"events": [OTHER]})}, counts)
    gapped = _joined(ECHO)
    gapped["rooms"]["join"]["!r:hs"]["timeline"]["limited"] = True
    assert not only_own_echoes({**base, **gapped}, counts)
    assert not only_own_echoes({**echo_only, "presence": {"events": [OTHER]}}, counts)
    assert not only_own_echoes({**echo_only, "to_device": {"events": [OTHER]}}, counts)
    invited = {
        **echo_only,
        "rooms": {**echo_only["rooms"], "invite": {"!i:hs": {"invite_state": {"events": [OTHER]}}}},
    }
    assert not only_own_echoes(invited, counts)
    # changed key counts, or none known yet
    assert not only_own_echoes(
        {**echo_only, "device_one_time_keys_count": {"signed_curve25519": 49}}, counts
    )
    assert not only_own_echoes(echo_only, None)
    # nothing at all is not "only echoes" (it is not pushed in the first place)
    assert not only_own_echoes(base, counts)
    assert not only_own_echoes({**base, **_joined()}, counts)


def test_versions_advertises_observe_and_config_errors_name_the_field() -> None:
    body = advertise_observe(b'{"versions":["v1.11"],"unstable_features":{}}')
    assert body is not None and json.loads(body)[LOW_BANDWIDTH_KEY] == {"observe": 1}
    assert advertise_observe(b"[]") is None
    with pytest.raises(ConfigValueError, match=r"push\.max_per_source"):
        PushConfig.from_config({"max_per_source": -1})
    with pytest.raises(ConfigValueError, match=r"push\.echo_hold: must be a number"):
        PushConfig.from_config({"echo_hold": -1})
    assert PushConfig.from_config({"echo_hold": 0}).echo_hold == 0
    with pytest.raises(ConfigValueError, match=r"push\.bogus: unknown setting"):
        PushConfig.from_config({"bogus": 1})


def test_long_polls_are_answered_from_the_push_chain() -> None:
    async def scenario() -> None:
        hs = Homeserver()
        push = PushSync(hs.observe)
        # the first incremental poll registers at its since and waits for a push
        first = asyncio.ensure_future(push.answer(poll("s1", filter="7")))
        await hs.registered.wait()
        reg = SyncQuery.parse(hs.registrations[0][0].target)
        assert reg is not None and reg.since == "s1" and reg.get("filter") == "7"
        await hs.push(Ev(None))  # acknowledged
        await hs.push(Ev(sync_response("s2", rooms={"join": {"!r": {}}})))
        assert json.loads((await first).body)["next_batch"] == "s2"
        # the next poll at the head times out with a valid empty response at the same since
        empty = await push.answer(poll("s2", timeout=0, filter="7"))
        assert empty is not None and json.loads(empty.body) == {"next_batch": "s2"}
        # a repeated poll (the client lost the answer) gets the same pushed response
        again = await push.answer(poll("s1", timeout=0, filter="7"))
        assert again is not None and json.loads(again.body)["next_batch"] == "s2"
        # nothing of this crossed the link: still one registration
        assert len(hs.registrations) == 1 and push.answered == 3
        # another filter while this one is in use, full_state, and initial syncs go over the link
        assert await push.answer(poll("s2", filter="8")) is None
        assert await push.answer(poll("s2", full_state="true", filter="7")) is None
        assert await push.answer(poll(None, filter="7")) is None
        await push.close()

    run(scenario())


def test_a_since_it_does_not_hold_registers_again_and_errors_reach_the_client() -> None:
    async def scenario() -> None:
        hs = Homeserver()
        push = PushSync(hs.observe)
        task = asyncio.ensure_future(push.answer(poll("s1")))
        await hs.registered.wait()
        await hs.push(Ev(sync_response("s2", presence={"events": [{}]})))
        await task
        hs.registered.clear()
        other = asyncio.ensure_future(push.answer(poll("s9")))
        await hs.registered.wait()
        assert len(hs.registrations) == 2
        assert b"since=s9" in hs.registrations[1][0].target
        # the token was logged out: the server's final answer goes to the waiting poll
        error = HttpResponse(
            401, (("content-type", "application/json"),), b'{"errcode":"M_UNKNOWN_TOKEN"}'
        )
        await hs.push(Ev(error, final=True))
        assert (await other).status == 401
        await push.close()

    run(scenario())


def test_link_failure_sends_polls_over_the_link_until_registered_again() -> None:
    async def scenario() -> None:
        hs = Homeserver()
        push = PushSync(hs.observe, PushOptions(retry=0.001))
        task = asyncio.ensure_future(push.answer(poll("s1", timeout=0)))
        await hs.registered.wait()
        assert (await task) is not None
        hs.registered.clear()
        await hs.push(LinkDown("gone"))
        await hs.registered.wait()  # retried
        assert await push.answer(poll("s1", timeout=0)) is None  # as before push: over the link
        await hs.push(Ev(None))
        while (await push.answer(poll("s1", timeout=0))) is None:
            await asyncio.sleep(0)
        await push.close()

    run(scenario())


def test_a_server_without_push_turns_it_off_for_the_token() -> None:
    async def scenario() -> None:
        hs = Homeserver()
        push = PushSync(hs.observe)
        task = asyncio.ensure_future(push.answer(poll("s1")))
        await hs.registered.wait()
        await hs.push(Ev(sync_response("s2", rooms={"join": {"!r": {}}}), final=True))
        assert json.loads((await task).body)["next_batch"] == "s2"
        assert await push.answer(poll("s2")) is None
        await push.close()

    run(scenario())


def test_a_refusing_server_is_asked_again_after_a_back_off() -> None:
    """A 4.29 turns push off for the token, not for good: after ``refused_retry`` seconds
    the next poll registers again (doubling on refusals in a row); a registration that
    works resets the wait; a server without push is asked again after an hour."""

    async def scenario() -> None:
        now = [1000.0]
        hs = Homeserver()
        push = PushSync(hs.observe, PushOptions(refused_retry=60.0), clock=lambda: now[0])
        refused = HttpResponse(429, (("content-type", "application/json"),), b"{}")

        async def refuse(since: str) -> None:
            hs.registered.clear()
            task = asyncio.ensure_future(push.answer(poll(since)))
            await hs.registered.wait()
            await hs.push(Ev(refused, final=True))
            assert await task is None  # over the link, as before push

        await refuse("s1")
        assert len(hs.registrations) == 1
        now[0] += 59.0
        assert await push.answer(poll("s1", timeout=0)) is None
        assert len(hs.registrations) == 1  # still refused: no new registration yet
        now[0] += 1.0
        await refuse("s1")  # 60 s later: asked again, refused again
        assert len(hs.registrations) == 2
        now[0] += 119.0
        assert await push.answer(poll("s1", timeout=0)) is None
        assert len(hs.registrations) == 2  # the wait doubled to 120 s
        now[0] += 1.0
        hs.registered.clear()
        task = asyncio.ensure_future(push.answer(poll("s1")))
        await hs.registered.wait()
        assert len(hs.registrations) == 3
        await hs.push(Ev(sync_response("s2", rooms={"join": {"!r": {}}})))
        assert json.loads((await task).body)["next_batch"] == "s2"  # push works again
        assert push._refused_wait == {}
        await push.close()

        plain = PushSync(hs.observe, clock=lambda: now[0])
        hs.registered.clear()
        task = asyncio.ensure_future(plain.answer(poll("t1")))
        await hs.registered.wait()
        await hs.push(Ev(sync_response("t2", rooms={"join": {"!r": {}}}), final=True))
        await task
        count = len(hs.registrations)
        now[0] += 3599.0
        assert await plain.answer(poll("t2", timeout=0)) is None
        assert len(hs.registrations) == count
        now[0] += 1.0
        hs.registered.clear()
        task = asyncio.ensure_future(plain.answer(poll("t2")))
        await hs.registered.wait()
        assert len(hs.registrations) == count + 1  # an hour later: push is tried again
        await hs.push(Ev(sync_response("t3"), final=True), index=-1)
        await task
        await plain.close()

    run(scenario())


def test_a_new_listener_gets_every_registration_again_at_once() -> None:
    """When the sidecar moves to another listener (FailoverSender.on_failover), each
    token registers again right away, from where its feed stands, not at its renewal."""

    async def scenario() -> None:
        hs = Homeserver()
        push = PushSync(hs.observe)
        task = asyncio.ensure_future(push.answer(poll("s1")))
        await hs.registered.wait()
        await hs.push(Ev(sync_response("s2", rooms={"join": {"!r": {}}})))
        assert json.loads((await task).body)["next_batch"] == "s2"
        hs.registered.clear()
        push.reregister()
        await hs.registered.wait()
        assert len(hs.registrations) == 2
        assert b"since=s2" in hs.registrations[-1][0].target
        waiting = asyncio.ensure_future(push.answer(poll("s2")))
        await asyncio.sleep(0)
        await hs.push(Ev(sync_response("s3", rooms={"join": {"!r": {}}})))
        assert json.loads((await waiting).body)["next_batch"] == "s3"
        await push.close()

    run(scenario())


class SlowLink:
    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.calls += 1
        await self.gate.wait()
        return sync_response("s2")


def test_a_client_that_timed_out_and_asks_again_joins_the_exchange() -> None:
    async def scenario() -> tuple[int, HttpResponse]:
        link = SlowLink()
        sidecar = Sidecar(link, None, options=SidecarOptions(cache=False))
        req = poll(None, timeout=0, full_state="true")
        first = asyncio.ensure_future(sidecar.forward(req))
        while not link.calls:
            await asyncio.sleep(0)
        first.cancel()  # the client's own timeout ran out
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(sidecar.forward(req))
        await asyncio.sleep(0)
        link.gate.set()
        return link.calls, await second

    calls, response = run(scenario())
    assert calls == 1 and response.status == 200


def test_well_known_core_lists_sync_as_observable() -> None:
    from synapse_coap.transport.linkformat import OBSERVABLE_SYNC, _link_format

    doc = _link_format(("/_matrix/client",), None, (OBSERVABLE_SYNC,)).decode()
    assert '</_matrix/client/v3/sync>;rt="matrix.client.v3.sync";obs' in doc.split(",")
    assert ";obs" not in _link_format(("/_matrix/client",)).decode()


class HookedLink:
    """A CoAP client double with the hooks the sidecar wires push into."""

    def __init__(self) -> None:
        self.on_new_session: list[Any] = []
        self.on_failover: list[Any] = []

    def observe(self, endpoint: Any, request: HttpRequest) -> AsyncIterator[Ev]:
        raise AssertionError("not used")


def test_the_sidecar_registers_again_on_a_new_session_and_after_a_failover() -> None:
    async def scenario() -> None:
        link = HookedLink()
        sidecar = Sidecar(link, None, options=SidecarOptions(cache=False))
        assert sidecar.push is not None
        assert link.on_new_session == [sidecar.push.reregister]
        assert link.on_failover == [sidecar.push.reregister]
        off = Sidecar(HookedLink(), None, options=SidecarOptions(push=PushOptions(enabled=False)))
        assert off.push is None

    run(scenario())


def test_the_failover_sender_hands_out_the_clients_new_session_hooks() -> None:
    from synapse_coap.proxy.failover import FailoverSender

    link = HookedLink()
    sender = FailoverSender(link, ["a", "b"], replay_safe=lambda r: True)
    assert sender.on_new_session is link.on_new_session
    assert FailoverSender(object(), ["a"], replay_safe=lambda r: True).on_new_session is None


def test_a_registration_is_not_renewed_on_a_timer_by_default() -> None:
    """Nothing crosses the link while nothing happens: the registration stays until the
    server goes (new session, failover) or ends it; ``refresh`` is opt-in."""
    assert PushOptions().refresh is None

    async def scenario() -> int:
        hs = Homeserver()
        push = PushSync(hs.observe, PushOptions(refresh=0.05))
        task = asyncio.ensure_future(push.answer(poll("s1", timeout=200)))
        await hs.registered.wait()
        await task  # the client's 0.2 s ran out: an empty answer
        await push.close()
        return len(hs.registrations)

    assert run(scenario()) >= 2  # opted in: renewed every 0.05 s

    async def quiet() -> int:
        hs = Homeserver()
        push = PushSync(hs.observe)
        await push.answer(poll("s1", timeout=200))
        await push.close()
        return len(hs.registrations)

    assert run(quiet()) == 1


def test_push_refresh_must_be_positive() -> None:
    with pytest.raises(ConfigValueError) as e:
        PushOptions(refresh=0)
    assert "push.refresh" in str(e.value)


def test_renewal_is_off_with_one_listener_and_on_with_several() -> None:
    from synapse_coap.proxy.push import MULTI_LISTENER_REFRESH, push_refresh

    assert push_refresh(None, 1) is None  # the keep-alive's hint covers a restart
    assert push_refresh(None, 2) == MULTI_LISTENER_REFRESH  # a dead listener says nothing
    assert push_refresh(0, 3) is None
    assert push_refresh(30, 1) == 30.0
    with pytest.raises(ConfigValueError) as e:
        push_refresh(-1, 1)
    assert "--push-refresh" in str(e.value)


def test_advertise_observe_remembers_only_the_same_body() -> None:
    a = b'{"versions":["v1.11"],"unstable_features":{}}'
    b = b'{"versions":["v1.12"]}'
    first = advertise_observe(a)
    assert advertise_observe(a) == first
    other = advertise_observe(b)
    assert other is not None and json.loads(other)["versions"] == ["v1.12"]
    assert advertise_observe(b"[]") is None
    assert advertise_observe(a) == first
    # an equal body in a new bytes object (as every response's is) gets the kept answer
    assert advertise_observe(bytes(bytearray(a))) is advertise_observe(a)
    assert advertise_observe(b"") is None
