"""The listener under a handshake flood (issue 14): the order in which datagrams read
ahead are handled (transport/batch.py) and the loop-lag probe (transport/looplag.py).
Sans-I/O: no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from synapse_coap.transport.batch import (
    HELD_HANDSHAKES,
    BatchHold,
    BatchReader,
    order_batch,
    recvfrom_batch,
    split_batch,
)
from synapse_coap.transport.looplag import LoopLagProbe

HANDSHAKE = b"\x80hello"  # first two bits 10
RECORD = b"\xc0record"  # 11
PLAIN = b"\x40coap"  # 01


def host(addr: tuple[str, int]) -> str:
    return addr[0]


def test_a_single_datagram_is_handled_as_it_came() -> None:
    assert order_batch([(HANDSHAKE, ("10.0.0.1", 1))], host) == ([(HANDSHAKE, ("10.0.0.1", 1))], 0)


def test_established_sessions_go_before_a_flood_and_the_flood_is_capped() -> None:
    # issue 14: under the /24 flood the kernel dropped the honest client's record
    # behind hundreds of handshake messages (each validated one costs DH work)
    flood = [(HANDSHAKE, (f"127.0.2.{i % 256}", 5000 + i)) for i in range(200)]
    honest = (RECORD, ("127.0.0.1", 4000))
    ordered, dropped = order_batch([*flood[:100], honest, *flood[100:]], host)
    assert ordered[0] == honest
    assert sum(1 for d, _ in ordered if d == HANDSHAKE) == HELD_HANDSHAKES
    assert dropped == 200 - HELD_HANDSHAKES
    # a burst within the budget (clients reconnecting after a restart) is kept whole
    assert order_batch([*flood[:60], honest], host) == ([honest, *flood[:60]], 0)


def test_a_new_client_elsewhere_is_not_crowded_out_by_one_prefix() -> None:
    flood = [(HANDSHAKE, (f"127.0.2.{i}", 5000)) for i in range(100)]
    newcomer = (HANDSHAKE, ("192.0.2.7", 6000))
    ordered, _dropped = order_batch([*flood, newcomer], host)
    # round robin over prefixes: the newcomer's /24 gets the second slot
    assert ordered.index(newcomer) == 1


def test_a_sources_datagrams_keep_their_order_behind_its_handshake() -> None:
    # a client's last handshake message and its first record, read in one batch:
    # the record must not overtake the handshake that establishes its session
    src = ("198.51.100.1", 7000)
    other = (RECORD, ("203.0.113.9", 1))
    ordered, dropped = order_batch([(HANDSHAKE, src), (RECORD, src), other, (PLAIN, src)], host)
    assert dropped == 0
    assert ordered == [other, (HANDSHAKE, src), (RECORD, src), (PLAIN, src)]


def test_records_are_split_from_the_handshakes_that_wait() -> None:
    src = ("198.51.100.1", 7000)
    other = (RECORD, ("203.0.113.9", 1))
    hs = (HANDSHAKE, ("192.0.2.7", 6000))
    now, later, dropped = split_batch([hs, (HANDSHAKE, src), (RECORD, src), other], host)
    assert (now, later, dropped) == ([other], [hs, (HANDSHAKE, src), (RECORD, src)], 0)
    assert split_batch([hs], host) == ([], [hs], 0)
    assert split_batch([other], host) == ([other], [], 0)


class _Socket:
    def __init__(self, waiting: list[tuple[bytes, Any]]) -> None:
        self.waiting = waiting

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.waiting:
            raise BlockingIOError
        return self.waiting.pop(0)


class _Loop:
    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)


def test_a_batch_of_records_is_handled_at_once_handshakes_one_per_iteration() -> None:
    handled: list[tuple[bytes, Any]] = []
    loop = _Loop()

    def handle(data: bytes, addr: Any) -> None:
        handled.append((data, addr))
        if data == b"\xc0bug":
            raise RuntimeError("a bug in one datagram's handling")

    reader = BatchReader(handle, loop, lambda reason: None)  # type: ignore[arg-type]
    a, b, c = ("192.0.2.1", 1), ("192.0.2.2", 2), ("192.0.2.3", 3)
    hs1, hs2 = (HANDSHAKE, ("203.0.113.1", 9)), (HANDSHAKE, ("203.0.113.2", 9))
    reader.sock = _Socket([hs1, (b"\xc0bug", b), hs2, (RECORD, c)])  # type: ignore[assignment]
    reader.read_batch = recvfrom_batch
    reader.datagram_received(RECORD, a)
    # the three records in arrival order in this call (one failing does not stop the
    # rest); the two handshake messages wait for the loop's next iterations
    assert handled == [(RECORD, a), (b"\xc0bug", b), (RECORD, c)]
    assert len(loop.soon) == 1
    loop.soon.pop()()
    assert handled[3:] == [hs1]
    loop.soon.pop()()
    assert handled[4:] == [hs2]
    assert not loop.soon and len(handled) == 5


class _Request:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.name == "bug":
            raise RuntimeError("a bug in one request's start")


def test_the_hold_starts_a_batchs_requests_once_the_batch_is_read() -> None:
    log: list[str] = []
    hold = BatchHold()
    assert not hold.hold(_Request("alone", log))  # outside a batch: the caller starts it
    hold.begin()
    hold.begin()  # (a second socket's reader: nested)
    for name in ("a", "bug", "b"):
        assert hold.hold(_Request(name, log))
    hold.release()
    assert log == []  # the outer batch is still being read
    hold.release()
    # in order; one that fails does not stop the rest
    assert log == ["start a", "start bug", "start b"]
    assert not hold.hold(_Request("after", log))


def test_a_batchs_records_are_decoded_before_any_of_their_requests_starts() -> None:
    """The reader brackets a batch of records with the hold: each record's request is
    kept while the rest are read, then all start in arrival order (also when handling
    one record failed); a single datagram is handled with no hold."""
    log: list[str] = []
    hold = BatchHold()

    def handle(data: bytes, addr: Any) -> None:
        log.append(f"read {addr[1]}")
        if data == b"\xc0bug":
            raise RuntimeError("a bug in one datagram's handling")
        request = _Request(str(addr[1]), log)
        if not hold.hold(request):
            request.start()

    reader = BatchReader(handle, _Loop(), lambda reason: None)  # type: ignore[arg-type]
    reader.hold = hold
    reader.sock = _Socket([(b"\xc0bug", ("192.0.2.2", 2)), (RECORD, ("192.0.2.3", 3))])  # type: ignore[assignment]
    reader.read_batch = recvfrom_batch
    reader.datagram_received(RECORD, ("192.0.2.1", 1))
    assert log == ["read 1", "read 2", "read 3", "start 1", "start 3"]
    log.clear()
    reader.datagram_received(RECORD, ("192.0.2.4", 4))  # nothing else waiting
    assert log == ["read 4", "start 4"]


def _exchange_and_server() -> tuple[Any, Any]:
    """A real exchange and server for ``_Now`` (the native build checks their types)."""
    from synapse_coap.mapping.dispatch import PeerInfo
    from synapse_coap.mapping.messages import CoapMessage
    from synapse_coap.transport.metrics import NullMetrics
    from synapse_coap.transport.server import CoapServer, ServerConfig, _Exchange, _ServerSession

    server = CoapServer(ServerConfig(listen=()), None, NullMetrics(), lambda p, c: None)  # type: ignore[arg-type]
    session = _ServerSession(None, None, PeerInfo("192.0.2.1", 5683))  # type: ignore[arg-type]
    return _Exchange(None, b"t", CoapMessage(1), False, 0.0, None, session, "route"), server


def test_a_request_abandoned_while_its_batch_is_read_never_starts() -> None:
    """(transport/server.py) an in-process exchange held by the batch and cancelled
    before the batch is read (its token reused, say) is not handed to the dispatcher."""
    from synapse_coap.transport.server import _Now

    dispatched: list[Any] = []
    answered: list[Any] = []

    def dispatch_now(request: Any, peer: Any, done: Any) -> None:
        dispatched.append(request)

    ex, server = _exchange_and_server()
    now = _Now(None, answered.append, ex, server, "request", dispatch_now)  # type: ignore[arg-type]
    now.cancel()
    now.start()
    assert dispatched == [] and answered == []


def test_a_held_request_whose_dispatcher_raises_is_answered_with_the_error() -> None:
    """(transport/server.py) started from its batch's release, a request the dispatcher
    fails to take (a bug) gets the error as its answer, as when the error came out of
    respond_now itself: never left unanswered."""
    from synapse_coap.transport.server import _Now

    answered: list[Any] = []
    bug = RuntimeError("a bug in the dispatcher")

    def dispatch_now(request: Any, peer: Any, done: Any) -> None:
        raise bug

    ex, server = _exchange_and_server()
    now = _Now(None, answered.append, ex, server, "request", dispatch_now)  # type: ignore[arg-type]
    hold = BatchHold()
    hold.begin()
    assert hold.hold(now)
    hold.release()
    assert answered == [bug] and now.over


def test_answers_of_a_batch_go_once_every_request_of_it_is_started() -> None:
    """Requests the homeserver answers as they start (inside their start): their answers
    are kept until the batch's last request has started, then go in order (one that
    fails does not stop the rest); outside a batch's starts an answer goes at once."""
    log: list[str] = []
    hold = BatchHold()

    class Answering:
        def __init__(self, name: str) -> None:
            self.name = name

        def start(self) -> None:
            log.append(f"start {self.name}")
            if not hold.later(self.answer):
                self.answer()

        def answer(self) -> None:
            log.append(f"answer {self.name}")
            if self.name == "bug":
                raise RuntimeError("a bug in one answer")

    assert not hold.later(lambda: None)  # no batch: the caller answers now
    hold.begin()
    for name in ("a", "bug", "b"):
        assert hold.hold(Answering(name))
    assert not hold.later(lambda: None)  # a batch being read, not started: now too
    hold.release()
    assert log == ["start a", "start bug", "start b", "answer a", "answer bug", "answer b"]
    log.clear()
    Answering("alone").start()
    assert log == ["start alone", "answer alone"]


def _server_and_session() -> tuple[Any, Any]:
    """A real server and a session with the profile's codec, for ``_Now``'s answers."""
    from synapse_coap.mapping.codec import WireCodec
    from synapse_coap.mapping.dispatch import PeerInfo
    from synapse_coap.transport.metrics import NullMetrics
    from synapse_coap.transport.server import CoapServer, ServerConfig, _ServerSession
    from synapse_coap.wire.context import WireContext
    from synapse_coap.wire.profile import load_profile

    server = CoapServer(ServerConfig(listen=()), None, NullMetrics(), lambda p, c: None)  # type: ignore[arg-type]
    codec = WireCodec(load_profile(1), WireContext())
    return server, _ServerSession(codec, None, PeerInfo("192.0.2.1", 5683))


def test_a_batchs_in_process_answers_wait_for_its_last_request_and_an_abandoned_one_is_dropped() -> (
    None
):
    """(transport/server.py) two in-process exchanges of one batch, each answered by the
    dispatcher as it starts: neither answer goes before both have started; one abandoned
    while its answer waits (its token reused by the next request, say) gets none."""
    from synapse_coap.mapping.messages import CoapMessage, HttpRequest, HttpResponse
    from synapse_coap.transport.server import _Exchange, _Now

    server, session = _server_and_session()
    request = HttpRequest("GET", b"/_matrix/key/v2/server")
    response = HttpResponse(200, (("content-type", "application/json"),), b'{"a":1}')
    log: list[str] = []
    nows: dict[str, Any] = {}

    def exchange(name: str) -> Any:
        def dispatch_now(req: Any, peer: Any, done: Callable[[Any], None]) -> Callable[[], None]:
            log.append(f"dispatch {name}")
            if name == "c":
                nows["b"].cancel()  # (abandons b, whose answer waits)
            done(response)
            return lambda: log.append(f"abandon {name}")

        def answered(out: Any) -> None:
            assert isinstance(out, CoapMessage) and out.code == 69  # 2.05
            log.append(f"answer {name}")

        ex = _Exchange(None, name.encode(), CoapMessage(1), False, 0.0, None, session, "r")
        now = nows[name] = _Now(None, answered, ex, server, request, dispatch_now)  # type: ignore[arg-type]
        return now

    hold = server.batch
    hold.begin()
    for name in ("a", "b", "c"):
        assert hold.hold(exchange(name))
    hold.release()
    # (b's abandon function is called: the module's channel ignores it for a request
    # Synapse has answered already)
    assert log == ["dispatch a", "dispatch b", "dispatch c", "abandon b", "answer a", "answer c"]
    assert all(now.over for now in nows.values())
    log.clear()
    exchange("d").start()  # not in a batch: answered at once
    assert log == ["dispatch d", "answer d"]


def test_an_answer_that_comes_after_its_start_goes_through_the_dispatchers_answer_later() -> None:
    """(transport/server.py) a response that comes after the request's start (from a
    reactor callback) is handed to the dispatcher's ``answer_later`` where it has one
    (which runs it with the others of that reactor turn) while another exchange is in
    progress, and answered at once when it is the only one (nothing can join it); one
    that comes inside the start is answered at once (or with its batch), never through
    it."""
    from synapse_coap.mapping.messages import CoapMessage, HttpRequest, HttpResponse
    from synapse_coap.transport.server import _Exchange, _Now

    server, session = _server_and_session()
    kept: list[Callable[[], None]] = []

    def answer_later(answer: Callable[[], None]) -> bool:
        kept.append(answer)
        return True

    server.answer_later = answer_later
    response = HttpResponse(200, (("content-type", "application/json"),), b'{"a":1}')
    answered: list[Any] = []
    dones: list[Callable[[Any], None]] = []

    def later(req: Any, peer: Any, done: Callable[[Any], None]) -> Callable[[], None]:
        dones.append(done)  # (answered after the start returns)
        return lambda: None

    def at_once(req: Any, peer: Any, done: Callable[[Any], None]) -> Callable[[], None]:
        done(response)
        return lambda: None

    def now(dispatch_now: Any) -> Any:
        ex = _Exchange(None, b"t", CoapMessage(1), False, 0.0, None, session, "r")
        return _Now(None, answered.append, ex, server, HttpRequest("GET", b"/x"), dispatch_now)  # type: ignore[arg-type]

    now(at_once).start()
    assert len(answered) == 1 and kept == [] and server.now_live == 0
    # two in progress: each late answer waits for the reactor turn's group, in order
    now(later).start()
    now(later).start()
    assert server.now_live == 2
    dones[0](response)
    dones[1](response)
    assert len(answered) == 1 and len(kept) == 2
    for answer in kept:
        answer()
    assert len(answered) == 3 and all(isinstance(a, CoapMessage) for a in answered[1:])
    assert server.now_live == 0
    # the only one in progress: its late answer goes at once
    now(later).start()
    dones[2](response)
    assert len(answered) == 4 and len(kept) == 2 and server.now_live == 0
    # abandoned while its answer waited: the count drops once, the answer is dropped
    first, second = now(later), now(later)
    first.start()
    second.start()
    dones[3](response)
    assert len(kept) == 3 and server.now_live == 2
    first.cancel()
    assert server.now_live == 1
    kept[-1]()
    assert len(answered) == 4
    second.cancel()
    assert server.now_live == 0


def test_loop_lag_probe_reports_how_late_it_woke() -> None:
    now = [0.0]
    stalls = iter([0.0, 0.2, 0.003])
    armed: list[tuple[float, Callable[[], None]]] = []
    seen: list[float] = []
    probe = LoopLagProbe(
        seen.append,
        call_later=lambda delay, fn: armed.append((delay, fn)),
        interval=0.01,
        clock=lambda: now[0],
    )
    probe.start(count=3)
    while armed:
        delay, fn = armed.pop()
        now[0] += delay + next(stalls)  # the thread held up this much longer
        fn()
    assert [round(x, 6) for x in seen] == [0.0, 0.2, 0.003]
    assert probe.samples == 3


def test_a_rendering_cancelled_before_it_starts_leaves_no_unawaited_coroutine() -> None:
    # a batch is handled in one loop turn: a request whose token the next datagram
    # reuses is cancelled before its rendering task's first step
    import gc
    import warnings

    from synapse_coap.transport.root import AwaitLater

    rendered: list[str] = []

    async def render(pipe: str) -> str:
        rendered.append(pipe)
        return f"done {pipe}"

    async def drive(coroutine: object) -> None:
        await coroutine  # type: ignore[misc]

    def cancelled_before_start(awaitable: object) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loop = asyncio.new_event_loop()
            try:
                task = loop.create_task(drive(awaitable))
                task.cancel()
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.close()
            del task, awaitable
            gc.collect()
        return [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]

    # made up front, the coroutine is dropped unawaited and Python warns
    assert any("never awaited" in m for m in cancelled_before_start(render("a")))
    assert cancelled_before_start(AwaitLater(render, "b")) == []
    assert rendered == []
    # awaited, it runs and gives its result
    assert asyncio.run(_await(AwaitLater(render, "c"))) == "done c"
    assert rendered == ["c"]


async def _await(awaitable: object) -> object:
    return await awaitable  # type: ignore[misc]
