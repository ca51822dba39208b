"""The asyncio loop driven from a Twisted reactor's thread (synapse_coap/synapse/guestloop.py).

A fake reactor records the reader and runs timers on a ``twisted.internet.task.Clock``;
the loop's own clock is the same fake clock, so timers are tested without sleeping.
Readiness of real file descriptors (a UDP socket, the self-pipe written by another
thread) is what the real reactor would see: the test asks ``select`` about the
descriptor the driver registered, then calls ``doRead`` as the reactor would.
"""

from __future__ import annotations

import asyncio
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from synapse_coap.synapse import asyncio_compat, guestloop
from synapse_coap.synapse.bridge import _cancel_all
from synapse_coap.synapse.guestloop import GuestLoop
from synapse_coap.transport.batch import BatchReader
from synapse_coap.transport.noise_udp import _read_directly


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)

    def due(self) -> list[float]:
        return sorted(c.getTime() for c in self.getDelayedCalls())


@pytest.fixture
def driven() -> Iterator[tuple[GuestLoop, FakeReactor]]:
    reactor = FakeReactor()
    guest = GuestLoop(reactor)
    guest.loop.time = reactor.seconds  # type: ignore[method-assign]
    guest.start()
    try:
        yield guest, reactor
    finally:
        guest.close(_cancel_all)


def readable(guest: GuestLoop, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([guest.fileno()], [], [], timeout)
    return bool(r)


def datagram_endpoint(
    guest: GuestLoop, reactor: FakeReactor, protocol: Callable[[], Any], **kwargs: Any
) -> Any:
    """A datagram endpoint opened on the driven loop (the reactor turning until it is)."""
    task = guest.loop.create_task(guest.loop.create_datagram_endpoint(protocol, **kwargs))
    while not task.done():
        reactor.advance(0)
    return task.result()[0]


def test_this_python_can_drive_its_loop_as_a_guest() -> None:
    assert asyncio_compat.check() is None


def test_the_selector_is_registered_as_a_reader(driven: tuple[GuestLoop, FakeReactor]) -> None:
    guest, reactor = driven
    assert reactor.readers == [guest]
    assert guest.fileno() == guest.loop._selector.fileno()  # type: ignore[attr-defined]


def test_a_task_started_from_the_reactor_runs_on_the_next_turns(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    steps: list[str] = []

    async def work() -> str:
        steps.append("started")
        await asyncio.sleep(0)
        steps.append("resumed")
        return "done"

    task = guest.loop.create_task(work())
    assert steps == []  # nothing runs inside the reactor's own call
    assert reactor.due() == [0.0]  # a wake-up at once was armed
    guest_iterations = guest.iterations
    reactor.advance(0)  # (the Clock also runs the wake-ups armed while it advances)
    assert steps == ["started", "resumed"]
    assert task.done() and task.result() == "done"
    assert guest.iterations - guest_iterations == 2  # one turn each: start, resume
    assert reactor.due() == []  # nothing left to do: no timer armed


def test_an_asyncio_timer_becomes_a_reactor_timer(driven: tuple[GuestLoop, FakeReactor]) -> None:
    guest, reactor = driven
    fired: list[float] = []
    guest.loop.call_later(2.5, lambda: fired.append(reactor.seconds()))
    assert reactor.due() == [2.5]
    reactor.advance(2.4)
    assert fired == []
    reactor.advance(0.1)
    assert fired == [2.5]
    assert reactor.due() == []


def test_the_earliest_timer_wins_and_a_cancelled_one_costs_one_early_turn(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    late = guest.loop.call_later(10, lambda: None)
    fired: list[str] = []
    guest.loop.call_later(3, lambda: fired.append("3"))
    assert reactor.due() == [3.0]
    reactor.advance(3)
    assert fired == ["3"]
    assert reactor.due() == [10.0]
    late.cancel()
    reactor.advance(10)
    assert reactor.due() == []
    iterations = guest.iterations
    reactor.advance(100)
    assert guest.iterations == iterations  # idle: never woken again


def test_sleep_inside_a_task(driven: tuple[GuestLoop, FakeReactor]) -> None:
    guest, reactor = driven

    async def nap() -> float:
        await asyncio.sleep(7)
        return reactor.seconds()

    task = guest.loop.create_task(nap())
    reactor.advance(0)
    assert reactor.due() == [7.0]
    reactor.advance(7)
    reactor.advance(0)
    assert task.result() == 7.0


def test_a_datagram_wakes_the_reader_and_is_received(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    got: list[bytes] = []

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            got.append(data)

    transport = datagram_endpoint(guest, reactor, Proto, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello", ("127.0.0.1", port))
    assert readable(guest)  # what the reactor's epoll sees
    reactor.readers[0].doRead()
    assert got == [b"hello"]
    transport.close()


def test_call_soon_threadsafe_from_another_thread_wakes_the_reader(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, _reactor = driven
    ran: list[str] = []
    t = threading.Thread(target=lambda: guest.loop.call_soon_threadsafe(ran.append, "x"))
    t.start()
    t.join()
    assert readable(guest)
    guest.doRead()
    assert ran == ["x"]


def test_never_re_entered(driven: tuple[GuestLoop, FakeReactor]) -> None:
    guest, reactor = driven
    inner: list[int] = []

    def nested() -> None:
        before = guest.iterations
        guest.run_once()  # e.g. the reactor's reader fired from inside a callback
        inner.append(guest.iterations - before)

    guest.loop.call_soon(nested)
    reactor.advance(0)
    assert inner == [0]


def test_close_cancels_tasks_and_stops_driving(driven: tuple[GuestLoop, FakeReactor]) -> None:
    guest, reactor = driven
    cancelled: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    guest.loop.create_task(forever())
    reactor.advance(0)
    assert reactor.due() == [3600.0]
    guest.close(_cancel_all)
    assert cancelled == [True]
    assert reactor.readers == []
    assert reactor.due() == []
    assert guest.loop.is_closed()
    guest.run_once()  # a late reactor call does nothing
    guest.close(_cancel_all)  # twice is fine


def test_a_wake_up_runs_ready_callbacks_for_a_bounded_number_of_turns(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    turns: list[int] = []

    async def spin() -> None:
        for i in range(3 * guestloop.TURNS_PER_WAKE):
            turns.append(i)
            await asyncio.sleep(0)

    reactor.advance(0)  # (nothing pending yet)
    guest.loop.create_task(spin())
    assert reactor.due() == [0.0]
    guest._cancel_timer()  # (the wake-up armed by create_task: run by hand instead)
    before = guest.iterations
    guest.run_once()
    assert guest.iterations - before == guestloop.TURNS_PER_WAKE
    assert turns == list(range(guestloop.TURNS_PER_WAKE))
    assert reactor.due() == [0.0]  # still ready: the reactor's turn, then more
    reactor.advance(0)
    assert len(turns) == 3 * guestloop.TURNS_PER_WAKE


def test_inside_an_iteration_the_loop_is_the_running_loop_and_outside_it_is_not(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    seen: list[object] = []

    async def agen():  # type: ignore[no-untyped-def]
        yield 1
        yield 2

    async def probe() -> None:
        seen.append(asyncio.get_running_loop())
        seen.append(guest.loop.is_running())
        async for _ in agen():
            break  # left unfinished: the loop's async generator hooks finalize it

    guest.loop.create_task(probe())
    reactor.advance(0)
    assert seen == [guest.loop, True]
    assert not guest.loop.is_running()
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    assert sys.get_asyncgen_hooks() == (None, None)  # this thread's hooks given back


def test_a_direct_reader_is_read_by_the_reactor_without_an_iteration(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    seen: list[object] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)

        def on_readable() -> None:
            seen.append(sock.recv(100))
            seen.append(asyncio.get_running_loop())  # futures and tasks find the loop
            guest.loop.call_later(1.0, seen.append, "timer")

        remove = guest.loop.add_direct_reader(sock.fileno(), on_readable)
        assert remove is not None
        direct = reactor.readers[-1]
        assert direct is not guest and direct.fileno() == sock.fileno()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", sock.getsockname())
        assert select.select([sock], [], [], 5.0)[0]
        iterations = guest.iterations
        direct.doRead()  # as the reactor's poll calls it
        assert seen == [b"hello", guest.loop]
        assert guest.iterations == iterations  # no asyncio iteration ran for it
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # only during the call
        assert reactor.due() == [1.0]  # what it scheduled armed the reactor's timer
        reactor.advance(1.0)
        assert seen[-1] == "timer"
        remove()
        remove()  # twice is fine
        assert reactor.readers == [guest]


def test_a_direct_reader_that_raises_is_logged_and_close_removes_the_rest(
    driven: tuple[GuestLoop, FakeReactor], caplog: pytest.LogCaptureFixture
) -> None:
    guest, reactor = driven

    def broken() -> None:
        raise ValueError("a bug")

    assert guest.loop.add_direct_reader(7, broken) is not None
    reactor.readers[-1].doRead()  # logged, not raised into the reactor
    assert "failed (bug)" in caplog.text
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # put back after the exception too
    guest.close(_cancel_all)
    assert reactor.readers == []


def test_a_loop_not_driven_by_a_reactor_reads_for_itself() -> None:
    loop = guestloop._Loop()
    try:
        assert loop.add_direct_reader(7, lambda: None) is None
    finally:
        loop.close()


def test_the_listeners_socket_is_read_by_the_reactor_and_not_by_the_loop(
    driven: tuple[GuestLoop, FakeReactor],
) -> None:
    guest, reactor = driven
    got: list[bytes] = []
    reader = BatchReader(lambda data, addr: got.append(data), guest.loop, lambda reason: None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    transport = datagram_endpoint(guest, reactor, lambda: reader, sock=sock)
    reader.sock = sock
    unread = _read_directly(guest.loop, transport, sock, reader)
    assert unread is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in (b"one", b"two"):
            s.sendto(data, sock.getsockname())
    assert select.select([sock], [], [], 5.0)[0]
    assert not readable(guest, 0.1)  # the loop's selector no longer waits for it
    iterations = guest.iterations
    reactor.readers[-1].doRead()
    assert got == [b"one", b"two"]  # the first read, then the socket drained
    assert guest.iterations == iterations
    reactor.readers[-1].doRead()  # nothing waiting: nothing happens
    assert got == [b"one", b"two"]
    unread()
    assert reactor.readers == [guest]
    transport.close()
    reactor.advance(0)


def test_a_loop_that_reads_for_itself_keeps_reading_the_listeners_socket() -> None:
    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        arrived = loop.create_future()

        def handle(data: bytes, addr: Any) -> None:
            got.append(data)
            arrived.set_result(None)

        reader = BatchReader(handle, loop, lambda reason: None)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: reader, local_addr=("127.0.0.1", 0)
        )
        assert _read_directly(loop, transport, transport.get_extra_info("socket"), reader) is None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", transport.get_extra_info("sockname"))
        await asyncio.wait_for(arrived, 5.0)
        transport.close()
        return got

    assert asyncio.run(main()) == [b"hello"]


def test_a_python_without_the_running_loop_hook_is_named_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(asyncio.events, "_set_running_loop")
    reason = asyncio_compat.check()
    assert reason is not None and "asyncio.events._set_running_loop" in reason
    assert sys.version.split()[0] in reason
    monkeypatch.setattr(asyncio_compat, "_set_running_loop", None)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError):
            asyncio_compat.call_as_running(loop, lambda: None)
    finally:
        loop.close()
