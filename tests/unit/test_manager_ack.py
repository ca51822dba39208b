"""ACK and RTT-sample handling of LinkMessageManager, sans-I/O (fake loop, injected clock).

The head-of-line problem this guards against: a server that holds the empty ACK of
a long-poll for its piggyback window keeps the client's only NSTART slot busy (the
next request waits in the backlog), and the client, sampling the RTT at that late
ACK, learns the server's think time instead of the link's, so NSTART never grows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiocoap.message import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import ACK, CON

from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.manager import LinkMessageManager, LinkTuning


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Handle:
    def __init__(self, at: float, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.at, self.fn, self.args, self.cancelled = at, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """call_later on virtual time; run_until() fires what is due, in order."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.clock.now

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> Handle:
        h = Handle(self.clock.now + delay, fn, args)
        self.handles.append(h)
        return h

    def run_until(self, t: float) -> None:
        while True:
            due = [h for h in self.handles if not h.cancelled and h.at <= t]
            if not due:
                break
            h = min(due, key=lambda x: x.at)
            self.handles.remove(h)
            self.clock.now = max(self.clock.now, h.at)
            h.fn(*h.args)
        self.clock.now = max(self.clock.now, t)


class Remote:
    is_multicast = False
    is_multicast_locally = False

    def as_response_address(self) -> Remote:
        return self


class TokenManager:
    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.log = logging.getLogger("test.manager")
        self.requests: list[Message] = []
        self.responses: list[Message] = []

    def process_request(self, request: Message) -> None:
        self.requests.append(request)

    def process_response(self, response: Message) -> bool:
        self.responses.append(response)
        return True

    def dispatch_error(self, error: Exception, remote: Any) -> None:
        pass


class Wire:
    """The message interface: records (time, message) of everything sent."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, Message]] = []

    def send(self, message: Message) -> None:
        self.sent.append((self.clock.now, message))


def make(params: LinkParameters = LinkParameters()) -> tuple[LinkMessageManager, FakeLoop, Wire]:
    clock = Clock()
    loop = FakeLoop(clock)
    mman = LinkMessageManager(TokenManager(loop), params, clock=clock)  # type: ignore[arg-type]
    wire = Wire(clock)
    mman.message_interface = wire
    return mman, loop, wire


def incoming_request(remote: Remote, mid: int, token: bytes) -> Message:
    m = Message(code=Code.GET, _mtype=CON, _mid=mid, _token=token)  # as decoded off the wire
    m.remote = remote
    return m


def outgoing(remote: Remote, *, prompt_ack: bool = False, path: str = "x") -> Message:
    m = Message(code=Code.GET, uri_path=[path])
    m.remote = remote
    m.transport_tuning = LinkTuning(LinkParameters(), prompt_ack=prompt_ack)
    return m


def ack_for(sent: Message, code: Code = Code.EMPTY, payload: bytes = b"") -> Message:
    m = Message(
        code=code, _mtype=ACK, _mid=sent.mid, _token=b"" if code is Code.EMPTY else sent.token
    )
    m.payload = payload
    m.remote = sent.remote
    return m


# -- server side: a long-poll is acknowledged at once ------------------------------------------


def test_acknowledge_now_sends_the_empty_ack_at_once_and_the_response_goes_separately() -> None:
    mman, loop, wire = make()
    peer = Remote()
    mman.dispatch_message(incoming_request(peer, 7, b"tk"))
    assert wire.sent == []  # held, hoping to piggyback
    assert mman.acknowledge_now(peer, b"tk") is True
    ((at, ack),) = wire.sent
    assert at == 1000.0 and ack.mtype == ACK and ack.code == Code.EMPTY and ack.mid == 7
    # the hold timer is gone: nothing more is sent when it would have fired
    loop.run_until(1010.0)
    assert len(wire.sent) == 1
    # the response is a separate confirmable message, not a piggyback on mid 7
    res = Message(code=Code.CONTENT, _token=b"tk", payload=b"{}")
    res.remote = peer
    mman.send_message(res, lambda: None)
    _, sep = wire.sent[-1]
    assert sep.mtype == CON and sep.mid != 7
    # a second call has nothing left to acknowledge
    assert mman.acknowledge_now(peer, b"tk") is False


def test_without_acknowledge_now_the_ack_is_held_for_the_piggyback_window() -> None:
    mman, loop, wire = make(LinkParameters(empty_ack_delay=0.4))
    peer = Remote()
    mman.dispatch_message(incoming_request(peer, 9, b"tk"))
    loop.run_until(1000.39)
    assert wire.sent == []
    loop.run_until(1000.41)
    ((at, ack),) = wire.sent
    assert ack.code == Code.EMPTY and at == 1000.4


# -- client side: samples only where the ACK's timing is the link's ----------------------------


def test_held_empty_ack_gives_no_rtt_sample() -> None:
    mman, loop, _wire = make()
    peer = Remote()
    req = outgoing(peer)
    mman.send_message(req, lambda: None)
    loop.run_until(1000.45)  # the server held the ACK 0.45 s, then answered separately
    mman.dispatch_message(ack_for(req))
    est = mman.estimator(peer)
    assert est.samples == 0 and est.unmeasured == 1 and est.srtt is None


def test_prompt_empty_ack_of_a_long_poll_is_a_sample() -> None:
    mman, loop, _wire = make()
    peer = Remote()
    req = outgoing(peer, prompt_ack=True)
    mman.send_message(req, lambda: None)
    loop.run_until(1000.002)
    mman.dispatch_message(ack_for(req))
    est = mman.estimator(peer)
    assert est.samples == 1 and est.srtt is not None and abs(est.srtt - 0.002) < 1e-9


def test_piggybacked_response_is_a_sample() -> None:
    mman, loop, _wire = make()
    peer = Remote()
    req = outgoing(peer)
    mman.send_message(req, lambda: None)
    loop.run_until(1000.03)
    mman.dispatch_message(ack_for(req, Code.CONTENT, b"{}"))
    est = mman.estimator(peer)
    assert est.samples == 1 and est.srtt is not None and abs(est.srtt - 0.03) < 1e-9


def test_a_held_ack_never_keeps_nstart_at_one_on_a_fast_link() -> None:
    """Loopback-like peer: 2 ms round trips, one exchange in four answered by a held
    empty ACK (0.45 s). Before the fix every held ACK fed a 0.45 s sample; now NSTART
    reaches its ceiling and the SRTT stays the link's."""
    mman, loop, _wire = make()
    peer = Remote()
    for i in range(16):
        req = outgoing(peer, path=f"r{i}")
        mman.send_message(req, lambda: None)
        if i % 4 == 3:
            loop.run_until(loop.time() + 0.45)
            mman.dispatch_message(ack_for(req))
        else:
            loop.run_until(loop.time() + 0.002)
            mman.dispatch_message(ack_for(req, Code.CONTENT, b"x" * 300))
    est = mman.estimator(peer)
    assert est.srtt is not None and est.srtt < 0.003
    assert est.unmeasured == 4
    assert mman.allowed_outstanding(peer) == LinkParameters().max_nstart


def test_next_request_leaves_as_soon_as_the_long_poll_is_acknowledged() -> None:
    """NSTART 1: the second request waits in the backlog only until the long-poll's
    (prompt) empty ACK, not until its response."""
    mman, loop, wire = make(LinkParameters(max_nstart=1))
    peer = Remote()
    poll = outgoing(peer, prompt_ack=True, path="sync")
    mman.send_message(poll, lambda: None)
    send = outgoing(peer, path="send")
    mman.send_message(send, lambda: None)
    assert [m.opt.uri_path for _, m in wire.sent] == [("sync",)]  # backlogged
    loop.run_until(1000.001)
    mman.dispatch_message(ack_for(poll))
    assert [m.opt.uri_path for _, m in wire.sent] == [("sync",), ("send",)]
    assert wire.sent[-1][0] == 1000.001


def test_is_long_poll_is_a_get_with_a_positive_timeout() -> None:
    from synapse_coap.mapping.messages import HttpRequest

    def lp(method: str, target: bytes) -> bool:
        return HttpRequest(method, target).is_long_poll

    assert lp("GET", b"/_matrix/client/v3/sync?since=s1&timeout=30000")
    assert lp("GET", b"/_matrix/client/v3/events?timeout=5.5")
    assert not lp("GET", b"/_matrix/client/v3/sync?timeout=0")
    assert not lp("GET", b"/_matrix/client/v3/sync")
    assert not lp("GET", b"/_matrix/client/v3/sync?timeout=abc")
    assert not lp("GET", b"/_matrix/client/v3/sync?timeout=nan")
    assert not lp("PUT", b"/x?timeout=30000")


# -- duplicate detection: one expiry heap, the stored answer is its datagram --------------------


def test_a_duplicate_request_gets_the_stored_answer_again_until_exchange_lifetime() -> None:
    from synapse_coap.transport.aiocoap_compat import StoredResponse

    params = LinkParameters()
    mman, loop, wire = make(params)
    peer = Remote()
    first = incoming_request(peer, 7, b"tk")
    mman.dispatch_message(first)
    mman.dispatch_message(incoming_request(peer, 8, b"tl"))
    tm = mman.token_manager
    assert len(tm.requests) == 2  # type: ignore[attr-defined]
    answer = Message(code=Code.CONTENT, payload=b"hello")
    answer.remote, answer.token, answer.request = peer, b"tk", first
    mman.send_message(answer, None)
    assert answer.mtype == ACK and answer.mid == 7  # piggybacked
    datagram = answer.encode()
    stored = mman._recent_messages[(peer, 7)]
    assert isinstance(stored, StoredResponse) and stored.encode() == datagram
    # a duplicate within EXCHANGE_LIFETIME: answered again, byte for byte, not processed again
    loop.run_until(loop.time() + params.exchange_lifetime - 1)
    sent = len(wire.sent)
    mman.dispatch_message(incoming_request(peer, 7, b"tk"))
    assert len(tm.requests) == 2  # type: ignore[attr-defined]
    assert [m.encode() for _t, m in wire.sent[sent:]] == [datagram]
    # past it both entries are gone, by one timer: the same MID is a new request
    loop.run_until(loop.time() + 2)
    assert (peer, 7) not in mman._recent_messages
    assert (peer, 8) not in mman._recent_messages
    assert sum(not h.cancelled for h in loop.handles) <= 1
    mman.dispatch_message(incoming_request(peer, 7, b"tk"))
    assert len(tm.requests) == 3  # type: ignore[attr-defined]


# -- the server's fast path: the same duplicate store and piggyback window as aiocoap ------------


def test_fast_exchange_holds_the_ack_and_keeps_its_answer_for_duplicates() -> None:
    from aiocoap.numbers.codes import EMPTY

    from synapse_coap.transport.aiocoap_compat import FastExchanges

    params = LinkParameters()
    mman, loop, wire = make(params)
    fast = FastExchanges(mman)
    peer = Remote()
    delay, lifetime = mman.answer_delays(peer)
    assert (delay, lifetime) == (
        mman.tuning_for(peer).EMPTY_ACK_DELAY,
        mman.tuning_for(peer).EXCHANGE_LIFETIME,
    )
    assert not fast.is_duplicate(peer, 7)
    fast.accept(peer, 7, b"tk", True, delay, lifetime)
    assert fast.is_duplicate(peer, 7)
    assert fast.take_piggyback(peer, b"tk") == 7
    assert fast.take_piggyback(peer, b"tk") is None
    datagram = bytes([0x62, 0x45, 0x00, 0x07]) + b"tk\xffhello"  # ACK 2.05, MID 7
    fast.sent(peer, 7, True, datagram)
    # a duplicate goes aiocoap's way: answered with the stored datagram, not processed again
    mman.dispatch_message(incoming_request(peer, 7, b"tk"))
    assert wire.sent[-1][1].encode() == datagram
    assert mman.token_manager.requests == []  # type: ignore[attr-defined]
    # an answer not ready within the window: the empty ACK goes then, as aiocoap sends it
    fast.accept(peer, 8, b"tl", True, delay, lifetime)
    sent = len(wire.sent)
    loop.run_until(loop.time() + delay + 0.001)
    (_t, ack), *_ = wire.sent[sent:]
    assert (ack.mtype, ack.mid, ack.code) == (ACK, 8, EMPTY)
    assert fast.take_piggyback(peer, b"tl") is None  # the answer goes as a separate CON
    # a NON request: no ACK held; duplicates expire after EXCHANGE_LIFETIME
    fast.accept(peer, 9, b"tn", False, delay, lifetime)
    assert fast.take_piggyback(peer, b"tn") is None
    loop.run_until(loop.time() + lifetime + 1)
    assert not any(fast.is_duplicate(peer, mid) for mid in (7, 8, 9))


def test_a_missing_fast_path_piece_stops_the_start(monkeypatch: Any) -> None:
    import aiocoap.messagemanager
    import pytest

    from synapse_coap.errors import LibraryVersionError
    from synapse_coap.transport import aiocoap_compat

    aiocoap_compat.check()
    monkeypatch.delattr(aiocoap.messagemanager.MessageManager, "_next_message_id")
    with pytest.raises(LibraryVersionError, match="_next_message_id"):
        aiocoap_compat.check()


# -- the fast path's held ACKs ------------------------------------------------------------------


def test_fast_path_held_acks_share_one_timer_and_only_the_unanswered_get_an_empty_ack() -> None:
    from synapse_coap.transport.aiocoap_compat import FastExchanges

    mman, loop, wire = make(LinkParameters(empty_ack_delay=0.4))
    exchanges = FastExchanges(mman)
    peer = Remote()
    for i in range(3):
        exchanges.accept(peer, 10 + i, bytes([i]), True, 0.4, 100.0)

    def held_timers() -> list[Handle]:
        # (the duplicate store's timer wakes after the 100 s lifetime; these within 0.4 s)
        return [h for h in loop.handles if not h.cancelled and h.at <= loop.time() + 50]

    assert len(held_timers()) == 1  # one timer for every held ACK, not one per request
    assert exchanges.take_piggyback(peer, b"\x00") == 10  # answered: piggybacked
    assert exchanges.take_piggyback(peer, b"\x02") == 12
    loop.run_until(loop.time() + 0.3)
    assert not [m for _t, m in wire.sent if m.code == Code.EMPTY]  # not yet
    loop.run_until(loop.time() + 0.2)
    empties = [m for _t, m in wire.sent if m.code == Code.EMPTY and m.mtype == ACK]
    assert [m.mid for m in empties] == [11]  # only the unanswered one, once
    assert exchanges.take_piggyback(peer, b"\x01") is None  # its answer goes separately
    # aiocoap's own path cancels a held ACK through the same dictionary
    exchanges.accept(peer, 20, b"\x09", True, 0.4, 100.0)
    _mid, held = mman._piggyback_opportunities.pop((peer, b"\x09"))
    held.cancel()
    loop.run_until(loop.time() + 1.0)
    assert [m.mid for _t, m in wire.sent if m.code == Code.EMPTY] == [11]
    assert not held_timers()


# -- the duplicate store and the held ACKs: bookkeeping paid as it goes --------------------------


def test_duplicate_store_entries_leave_in_arrival_order_late_never_early() -> None:
    """(aiocoap_compat.HookedMessageManager.remember) an entry whose lifetime ends before
    that of an older one waits behind it (kept longer), and none leaves before its time."""
    mman, loop, _wire = make()
    peer = Remote()
    recent = mman._recent_messages
    mman.remember(peer, 1, 10.0)  # until 1010
    mman.remember(peer, 2, 1.0)  # until 1001, behind the first
    loop.run_until(1005.0)
    assert (peer, 1) in recent and (peer, 2) in recent
    loop.run_until(1009.9)
    assert (peer, 1) in recent
    loop.run_until(1010.0)
    assert (peer, 1) not in recent and (peer, 2) not in recent
    assert not mman._dedup_queue


def test_a_busy_listener_expires_duplicates_as_it_remembers_new_messages() -> None:
    """Entries whose time is up leave when the next message is remembered, without
    waiting for the timer (which then finds nothing to do)."""
    mman, loop, _wire = make()
    peer = Remote()
    recent = mman._recent_messages
    for mid in range(5):
        mman.remember(peer, mid, 5.0)  # until 1005
    loop.clock.now = 1006.0  # (the timer has not run)
    mman.remember(peer, 99, 5.0)
    assert [k[1] for k in recent] == [99]
    assert [k[1] for _at, k in mman._dedup_queue] == [99]


def test_held_acks_of_answered_requests_leave_the_heap_when_answered() -> None:
    """(aiocoap_compat.FastExchanges) the heap of held ACKs holds the requests in
    progress, not every request of the piggyback window: an answered one at the top
    leaves at once, one answered out of order when those before it are answered; an
    unanswered one still gets its empty ACK at its deadline."""
    from synapse_coap.transport.aiocoap_compat import FastExchanges

    mman, loop, wire = make()
    fx = FastExchanges(mman)
    peer = Remote()
    for i in range(3):
        fx.accept(peer, 10 + i, bytes([i]), True, 2.0, 100.0)
    assert len(fx._held) == 3
    assert fx.take_piggyback(peer, b"\x00") == 10  # in order: gone at once
    assert len(fx._held) == 2
    assert fx.take_piggyback(peer, b"\x02") == 12  # out of order: waits behind mid 11
    assert len(fx._held) == 2
    assert fx.take_piggyback(peer, b"\x01") == 11  # both leave now
    assert fx._held == []
    fx.accept(peer, 20, b"late", True, 2.0, 100.0)
    loop.run_until(1001.9)
    assert not [m for _t, m in wire.sent if m.mid == 20]
    loop.run_until(1002.0)
    assert [(m.mtype, m.code) for _t, m in wire.sent if m.mid == 20] == [(ACK, Code.EMPTY)]
    assert fx.take_piggyback(peer, b"late") is None  # (the answer then goes separately)


def test_a_message_id_remembered_again_after_its_lifetime_is_kept() -> None:
    """A Message ID seen again once its first entry's time is up is a new message: the
    expired entry leaving (as the new one is remembered) does not take the new one."""
    mman, loop, _wire = make()
    peer = Remote()
    mman.remember(peer, 7, 5.0)  # until 1005
    loop.clock.now = 1006.0  # (the timer has not run)
    mman.remember(peer, 7, 5.0)
    assert (peer, 7) in mman._recent_messages
    assert [k[1] for _at, k in mman._dedup_queue] == [7]
