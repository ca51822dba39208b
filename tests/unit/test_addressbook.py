"""The sidecar's address book: listeners learned from /.well-known/matrix/client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from synapse_coap.errors import LinkDown
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.addressbook import (
    MAX_LEARNED,
    WELL_KNOWN_KEY,
    learn_listeners,
    listeners_from_well_known,
)
from synapse_coap.proxy.failover import FailoverSender
from synapse_coap.proxy.runner import HomeserverAddress

A = HomeserverAddress("192.0.2.1", 5683, True)
B = HomeserverAddress("192.0.2.2", 6000, True)
C = HomeserverAddress("2001:db8::3", 5683, True)


def doc(listeners: Any) -> bytes:
    return json.dumps(
        {"m.homeserver": {"base_url": "https://x"}, WELL_KNOWN_KEY: {"listeners": listeners}}
    ).encode()


def test_listeners_in_order_defaults_and_ipv6() -> None:
    body = doc(["coap://192.0.2.2:6000", "coap://192.0.2.1", "coap://[2001:db8::3]"])
    assert listeners_from_well_known(body) == [B, A, C]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"m.homeserver": {}}).encode(),
        json.dumps({WELL_KNOWN_KEY: ["coap://192.0.2.1"]}).encode(),
        doc("coap://192.0.2.1"),
    ],
)
def test_no_listeners_from_a_document_without_them(body: bytes) -> None:
    assert listeners_from_well_known(body) == []


def test_bad_plain_and_repeated_entries_are_skipped_and_the_list_is_bounded() -> None:
    body = doc(
        [
            7,
            "http://192.0.2.1",
            "coap+plain://192.0.2.1:5683",  # never a downgrade to no encryption
            "coap://192.0.2.1/path",
            "coap://192.0.2.1",
            "coap://192.0.2.1:5683",
        ]
    )
    assert listeners_from_well_known(body) == [A]
    many = doc([f"coap://192.0.2.{i}" for i in range(1, 100)])
    assert len(listeners_from_well_known(many)) == MAX_LEARNED


class Client:
    """Listeners by address: ``A`` serves the well-known document; the dead raise."""

    def __init__(self, body: bytes, status: int = 200, dead: tuple[Any, ...] = (B, C)) -> None:
        self.body, self.status = body, status
        self.dead = set(dead)
        self.asked: list[tuple[Any, bytes]] = []

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.asked.append((endpoint, request.target))
        if endpoint in self.dead:
            raise LinkDown(f"{endpoint} is gone")
        return HttpResponse(self.status, (), self.body)


def never(_: HttpRequest) -> bool:
    return True


def test_learned_listeners_are_added_after_the_known_and_used_on_failover() -> None:
    client = Client(doc(["coap://192.0.2.1", "coap://192.0.2.2:6000"]))
    sender = FailoverSender(client, [A], replay_safe=never, clock=lambda: 0.0)
    new = asyncio.run(learn_listeners(sender, [A], lambda a: a))
    assert new == [B]
    assert sender.endpoints == (A, B)
    assert client.asked == [(A, b"/.well-known/matrix/client")]
    sender.add_endpoints([B])  # a known one again changes nothing
    assert sender.endpoints == (A, B)
    # the listener that published them dies: the learned one takes over
    client.dead = {A}
    got = asyncio.run(sender.request(None, HttpRequest("GET", b"/_matrix/client/versions")))
    assert got.status == 200
    assert sender.current == B
    assert client.asked[-2:] == [(A, b"/_matrix/client/versions"), (B, b"/_matrix/client/versions")]


@pytest.mark.parametrize("status", [404, 502])
def test_no_document_learns_nothing(status: int) -> None:
    sender = FailoverSender(Client(b"{}", status), [A], replay_safe=never, clock=lambda: 0.0)
    assert asyncio.run(learn_listeners(sender, [A], lambda a: a)) == []
    assert sender.endpoints == (A,)


def test_an_unanswered_request_learns_nothing() -> None:
    sender = FailoverSender(Client(doc(["coap://192.0.2.2"])), [B], replay_safe=never)
    assert asyncio.run(learn_listeners(sender, [B], lambda a: a, timeout=1.0)) == []
    assert sender.endpoints == (B,)
