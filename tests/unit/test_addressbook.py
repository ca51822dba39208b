"""The sidecar's address book: listeners learned from /.well-known/matrix/client and SRV,
at start and again when a listener stops answering."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import attrs
import pytest

from synapse_coap.errors import LinkDown
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.addressbook import (
    MAX_LEARNED,
    WELL_KNOWN_KEY,
    AddressBook,
    listeners_from_well_known,
)
from synapse_coap.proxy.failover import FailoverSender
from synapse_coap.proxy.resolver import Listeners
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
    """Listeners by address: each live one serves ``docs[address]`` (or ``body``); the
    dead raise."""

    def __init__(self, body: bytes, status: int = 200, dead: tuple[Any, ...] = (B, C)) -> None:
        self.body, self.status = body, status
        self.docs: dict[Any, bytes] = {}
        self.dead = set(dead)
        self.asked: list[tuple[Any, bytes]] = []

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        self.asked.append((endpoint, request.target))
        if endpoint in self.dead:
            raise LinkDown(f"{endpoint} is gone")
        return HttpResponse(self.status, (), self.docs.get(endpoint, self.body))


def never(_: HttpRequest) -> bool:
    return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book_for(
    client: Client, known: list[Any], *, srv: Any = (), well_known: bool = True
) -> tuple[FailoverSender, AddressBook, Clock]:
    clock = Clock()
    sender = FailoverSender(client, known, replay_safe=never, clock=clock)
    book = AddressBook(
        sender,
        known,
        lambda a: a,
        well_known=well_known,
        srv=srv,
        min_interval=15.0,
        clock=clock,
    )
    return sender, book, clock


VERSIONS = HttpRequest("GET", b"/_matrix/client/versions")


def test_learned_listeners_are_added_after_the_known_and_used_on_failover() -> None:
    client = Client(doc(["coap://192.0.2.1", "coap://192.0.2.2:6000"]))
    sender, book, _ = book_for(client, [A])
    asyncio.run(book.start())
    assert sender.endpoints == (A, B)
    assert book.learned == 1
    assert client.asked == [(A, b"/.well-known/matrix/client")]
    assert book.add([B], "test") == []  # a known one again changes nothing
    assert sender.endpoints == (A, B)
    # the listener that published them dies: the learned one takes over
    client.dead = {A}
    got = asyncio.run(sender.request(None, VERSIONS))
    assert got.status == 200
    assert sender.current == B
    assert client.asked[-2:] == [(A, b"/_matrix/client/versions"), (B, b"/_matrix/client/versions")]


@pytest.mark.parametrize("status", [404, 502])
def test_no_document_learns_nothing(status: int) -> None:
    sender, book, _ = book_for(Client(b"{}", status), [A])
    asyncio.run(book.start())
    assert sender.endpoints == (A,)


def test_an_unanswered_request_learns_nothing() -> None:
    sender, book, _ = book_for(Client(doc(["coap://192.0.2.2"])), [B])
    asyncio.run(book.start())
    assert sender.endpoints == (B,)


def test_after_a_failover_the_new_listener_is_asked_again_and_a_later_one_is_found() -> None:
    client = Client(doc(["coap://192.0.2.2:6000"]), dead=())
    sender, book, clock = book_for(client, [A])

    async def scenario() -> None:
        await book.start()
        assert sender.endpoints == (A, B)
        # later: a third listener is published, and A stops answering
        client.docs[B] = doc(["coap://192.0.2.1", "coap://192.0.2.2:6000", "coap://[2001:db8::3]"])
        client.dead = {A}
        clock.now += 20
        assert (await sender.request(None, VERSIONS)).status == 200
        assert sender.current == B
        assert book.task is not None
        await book.task

    asyncio.run(scenario())
    assert sender.endpoints == (A, B, C)
    assert book.relearns == 1
    assert client.asked[-1] == (B, b"/.well-known/matrix/client")


def test_lookups_after_a_failover_are_rate_limited_and_one_at_a_time() -> None:
    client = Client(doc([]), dead=(A,))
    sender, book, clock = book_for(client, [A, B])

    async def scenario() -> None:
        await book.start()  # at t=1000
        await sender.request(None, VERSIONS)  # A fails at once: too soon to look again
        assert book.task is None
        clock.now += 16
        client.dead = {B}
        await sender.request(None, VERSIONS)
        first = book.task
        assert first is not None
        book.on_give_up()  # while one runs, no second
        assert book.task is first
        await first

    asyncio.run(scenario())
    assert book.relearns == 1


@attrs.define
class FakeSrv:
    host: str
    answers: list[list[tuple[str, int]]]
    expired: bool = False
    resolved: int = 0

    async def resolve(self) -> Listeners:
        self.resolved += 1
        return Listeners(tuple(self.answers.pop(0)), 60.0, "srv")


def test_srv_is_resolved_again_when_its_ttl_ran_out() -> None:
    client = Client(b"{}", dead=(A,))
    srv = FakeSrv("hs.test", [[("192.0.2.1", 5683), ("192.0.2.2", 6000)]])
    sender, book, clock = book_for(client, [A, B], srv=[(srv, True)], well_known=False)

    async def scenario() -> None:
        await book.start()
        clock.now += 20
        await sender.request(None, VERSIONS)  # A fails; the answer is still fresh
        assert book.task is not None
        await book.task
        assert srv.resolved == 0
        srv.expired = True
        client.dead = {B}
        clock.now += 20
        await sender.request(None, VERSIONS)
        assert book.task is not None
        await book.task

    asyncio.run(scenario())
    assert srv.resolved == 1
    assert sender.endpoints == (A, B)  # nothing new was published


def test_when_every_listener_failed_srv_is_asked_again_and_its_new_target_used_at_once() -> None:
    client = Client(b"{}", dead=(A, B))
    srv = FakeSrv("hs.test", [[("2001:db8::3", 5683), ("192.0.2.2", 6000)]])
    sender, book, clock = book_for(client, [A, B], srv=[(srv, True)], well_known=False)
    moved: list[Any] = []
    sender.on_failover.append(lambda: moved.append(sender.current))

    async def scenario() -> None:
        await book.start()
        clock.now += 20
        with pytest.raises(LinkDown):
            await sender.request(None, VERSIONS)  # A, then B: both failed
        assert sender.all_failed
        assert book.task is not None
        await book.task
        assert sender.current == C  # the new target, not the dead A again
        assert (await sender.request(None, VERSIONS)).status == 200

    asyncio.run(scenario())
    assert srv.resolved == 1
    assert sender.endpoints == (A, B, C)
    assert not sender.all_failed
    assert moved == [B, A, C]  # (the push side registers again at C)


def test_at_most_max_learned_listeners_are_ever_learned() -> None:
    sender, book, _ = book_for(Client(b"{}", dead=()), [A])
    first = [HomeserverAddress(f"198.51.100.{i}", 5683, True) for i in range(10)]
    second = [HomeserverAddress(f"203.0.113.{i}", 5683, True) for i in range(10)]
    assert len(book.add(first, "one")) == 10
    assert len(book.add(second, "two")) == MAX_LEARNED - 10
    assert book.add([HomeserverAddress("192.0.2.99", 1, True)], "three") == []
    assert len(sender.endpoints) == 1 + MAX_LEARNED
