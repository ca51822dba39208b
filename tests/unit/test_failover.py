"""FailoverSender: the sidecar moves to the next listener when its own stops answering."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from synapse_coap.errors import LinkDown, RequestTimeout
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.failover import FailoverSender
from synapse_coap.transport.convert import default_codec_factory
from synapse_coap.wire.context import WireContext

SAFE = default_codec_factory(0, WireContext()).is_replay_safe
OK = HttpResponse(200, (), b"{}")


class FakeClient:
    """Listeners by name; a dead one raises what the CoAP client raises."""

    def __init__(self, dead: set[str], error: type[Exception] = LinkDown) -> None:
        self.dead = dead
        self.error = error
        self.sent: list[tuple[str, str, float | None]] = []

    async def request(
        self, endpoint: str, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.sent.append((endpoint, request.method, timeout))
        if endpoint in self.dead:
            raise self.error(f"{endpoint} is gone")
        return OK

    async def observe(self, endpoint: str, request: HttpRequest) -> Any:
        self.sent.append((endpoint, "OBSERVE", None))
        if endpoint in self.dead:
            raise self.error(f"{endpoint} is gone")
        yield endpoint


def send(sender: FailoverSender, request: HttpRequest, timeout: float = 60.0) -> HttpResponse:
    return asyncio.run(sender.request("ignored", request, timeout=timeout))


PUT_TXN = HttpRequest(
    "PUT", b"/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1", (), b'{"body":"x"}'
)
POST = HttpRequest("POST", b"/_matrix/client/v3/createRoom", (), b"{}")
GET = HttpRequest("GET", b"/_matrix/client/versions")


@pytest.mark.parametrize("error", [LinkDown, RequestTimeout])
def test_a_repeatable_request_moves_to_the_next_listener_and_stays_there(
    error: type[Exception],
) -> None:
    client = FakeClient({"a"}, error)
    sender = FailoverSender(
        client, ["a", "b"], clock=lambda: 0.0, replay_safe=SAFE, failover_after=5.0
    )
    assert send(sender, PUT_TXN) is OK
    assert [e for e, _, _ in client.sent] == ["a", "b"]
    assert sender.current == "b" and sender.failovers == 1
    assert send(sender, GET) is OK
    assert client.sent[-1][0] == "b"  # no detour through the dead one


def test_a_request_that_is_not_safe_to_repeat_gets_the_error_but_the_next_one_moves() -> None:
    client = FakeClient({"a"})
    sender = FailoverSender(client, ["a", "b"], clock=lambda: 0.0, replay_safe=SAFE)
    with pytest.raises(LinkDown):
        send(sender, POST)
    assert [e for e, _, _ in client.sent] == ["a"]  # sent once, never twice
    assert send(sender, POST) is OK and client.sent[-1][0] == "b"


def test_ordinary_requests_wait_failover_after_on_one_listener_long_polls_their_own_time() -> None:
    client = FakeClient(set())
    sender = FailoverSender(
        client, ["a", "b"], clock=lambda: 0.0, replay_safe=SAFE, failover_after=7.0
    )
    send(sender, GET, timeout=120.0)
    send(sender, HttpRequest("GET", b"/_matrix/client/v3/sync?timeout=30000"), timeout=60.0)
    assert [t for _, _, t in client.sent] == [7.0, 60.0]


def test_all_listeners_down_is_an_error_after_trying_each_once() -> None:
    client = FakeClient({"a", "b", "c"})
    sender = FailoverSender(client, ["a", "b", "c"], clock=lambda: 0.0, replay_safe=SAFE)
    with pytest.raises(LinkDown):
        send(sender, GET)
    assert [e for e, _, _ in client.sent] == ["a", "b", "c"]


def test_one_listener_is_used_as_is() -> None:
    client = FakeClient({"a"})
    sender = FailoverSender(client, ["a"], clock=lambda: 0.0, replay_safe=SAFE, failover_after=1.0)
    with pytest.raises(LinkDown):
        send(sender, GET, timeout=30.0)
    assert client.sent == [("a", "GET", 30.0)] and sender.failovers == 0


@pytest.mark.parametrize("error", [LinkDown, RequestTimeout])
def test_a_push_registration_that_fails_moves_on_and_tells_the_push_side(
    error: type[Exception],
) -> None:
    """A registration at a listener that stopped answering moves the sidecar to the next
    listener, like a request; every change of listener runs the on_failover callbacks
    (the push side registers again at once), and the next registration goes there."""
    client = FakeClient({"a"}, error)
    sender = FailoverSender(client, ["a", "b"], clock=lambda: 0.0, replay_safe=SAFE)
    moved: list[str] = []
    sender.on_failover.append(lambda: moved.append(sender.current))
    sync = HttpRequest("GET", b"/_matrix/client/v3/sync?since=s1&timeout=30000")

    async def first_event() -> Any:
        async for event in sender.observe("ignored", sync):
            return event
        return None

    with pytest.raises(error):
        asyncio.run(first_event())
    assert sender.current == "b" and moved == ["b"]
    assert asyncio.run(first_event()) == "b"
    # a request that fails over runs the callbacks too
    client.dead = {"b"}
    send(sender, GET)
    assert moved == ["b", "a"] and sender.failovers == 2
