"""The server's fast path (synapse_coap/transport/fastpath.py) over real loopback UDP and Noise.

Raw CoAP datagrams go out on an established client channel
(``NoiseMessageInterface.send_datagram``) and the server's answers are caught
raw (the client interface's ``fast_request`` hook takes every incoming message),
so types, Message IDs, tokens and bytes are checked as sent. Each test states
whether the fast path took the request (``FastPath.taken``) or aiocoap did.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import CoapMessage, CoapOption, HttpRequest, HttpResponse
from synapse_coap.noise.keys import generate_private_key
from synapse_coap.transport.server import CoapServer, ServerConfig
from tests.integration.test_transport import (
    FAST,
    STATUS_OPTION,
    Dispatcher,
    codec_factory,
    echo,
    ep,
    make_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST = 1, 2
CONTENT = 69


class Wire:
    """Raw CoAP on the client's Noise channel to the server."""

    def __init__(self, client: Any, server: CoapServer) -> None:
        self.iface = client.noise_interface
        self.remote = self.iface.client_remote(
            ("::1", server.addresses[0][1]), peer_name="hs.test", expected_static=None
        )
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.iface.fast_request = self._take

    def _take(self, _remote: Any, data: bytes) -> bool:
        self.got.put_nowait(data)
        return True

    def send(self, data: bytes) -> None:
        self.iface.send_datagram(self.remote, data)

    async def answer(self) -> bytes:
        return await asyncio.wait_for(self.got.get(), 10)

    async def nothing(self, wait: float = 0.3) -> None:
        """No datagram within ``wait`` seconds (only to check silence; never to sync)."""
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(self.got.get(), wait)


class EagerDispatcher(Dispatcher):
    """The test dispatcher with ``dispatch_now`` (mapping.dispatch.EagerDispatcher), as
    the module's in-process one: most requests are answered before it returns;
    ``/later/...`` on the loop's next turn, ``/slow`` and ``/forever`` when released; ``/raise`` is an error; ``/task``
    is one it cannot start at once (the server then awaits ``dispatch``)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.declined = 0

    def dispatch_now(
        self,
        request: HttpRequest,
        peer: PeerInfo,
        done: Callable[[HttpResponse | BaseException], None],
    ) -> Callable[[], None] | None:
        if request.target == b"/task":
            self.declined += 1
            return None
        self.now += 1
        if request.target == b"/raise":
            self.peers.append(peer)
            done(RuntimeError("the dispatcher failed"))
            return lambda: None
        if request.target in (b"/slow", b"/forever"):
            task = asyncio.get_running_loop().create_task(self.dispatch(request, peer))

            def finished(t: asyncio.Task[HttpResponse]) -> None:
                if not t.cancelled():
                    error = t.exception()
                    done(error if error is not None else t.result())

            task.add_done_callback(finished)
            return task.cancel
        self.peers.append(peer)
        response = echo(request)
        if request.target.startswith(b"/later/"):  # answered on the loop's next turn
            return asyncio.get_running_loop().call_soon(done, response).cancel
        done(response)
        return lambda: None


@contextlib.asynccontextmanager
async def pair(
    *, fast_path: bool = True, real_codec: bool = False, eager: bool = False
) -> AsyncIterator[tuple[CoapServer, Dispatcher, Wire]]:
    d = EagerDispatcher() if eager else Dispatcher()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("::", 0),),
            static_key=generate_private_key(),
            link=FAST,
            server_name="hs.test",
            fast_path=fast_path,
        ),
        d,
        codec_factory=None if real_codec else codec_factory,
    )
    client = await make_client()
    try:
        # the session: a first request through the client as usual
        await client.request(ep(server), HttpRequest("GET", b"/warmup"))
        for fast in server.fast_paths:  # (the warm-up took the fast path)
            fast.taken = fast.answered = 0
        yield server, d, Wire(client, server)
    finally:
        await client.close()
        await server.close()


def request(
    mtype: int, mid: int, token: bytes, *options: tuple[int, bytes], code: int = GET
) -> bytes:
    opts = tuple(CoapOption(num, value) for num, value in options)
    return encode_coap(CoapMessage(code, opts, b""), mtype=mtype, mid=mid, token=token)


def taken(server: CoapServer) -> int:
    return sum(f.taken for f in server.fast_paths)


def aio(fn: Any) -> Any:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_a_con_request_is_taken_and_answered_on_its_ack(eager: bool) -> None:
    async with pair(eager=eager) as (server, d, wire):
        before = len(d.peers)
        wire.send(request(CON, 0x1234, b"tk", (11, b"x"), (11, b"y")))
        mtype, mid, token, msg = decode_coap(await wire.answer())
        assert (mtype, mid, token, msg.code) == (ACK, 0x1234, b"tk", CONTENT)
        assert msg.payload == b"GET /x/y\n"
        assert taken(server) == 1 and server.fast_paths[0].answered == 1
        assert len(d.peers) == before + 1


@aio
async def test_the_answer_is_the_bytes_aiocoap_sends() -> None:
    sent = request(CON, 0x0102, b"\x01\x02\x03", (11, b"echo"), (15, b"a=1"))
    answers = []
    for fast_path in (False, True):
        async with pair(fast_path=fast_path) as (server, _d, wire):
            wire.send(sent)
            answers.append(await wire.answer())
            assert taken(server) == int(fast_path)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_a_duplicate_con_is_answered_from_the_store_byte_for_byte(eager: bool) -> None:
    async with pair(eager=eager) as (server, d, wire):
        datagram = request(CON, 0x0BAD, b"dup", (11, b"once"))
        wire.send(datagram)
        first = await wire.answer()
        dispatched = len(d.peers)
        wire.send(datagram)
        assert await wire.answer() == first
        assert len(d.peers) == dispatched  # not dispatched again
        assert taken(server) == 1


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_a_non_request_is_answered_non(eager: bool) -> None:
    async with pair(eager=eager) as (server, d, wire):
        datagram = request(NON, 0x0777, b"nn", (11, b"non"))
        wire.send(datagram)
        mtype, _mid, token, msg = decode_coap(await wire.answer())
        assert (mtype, token, msg.code, msg.payload) == (NON, b"nn", CONTENT, b"GET /non\n")
        assert taken(server) == 1
        dispatched = len(d.peers)
        wire.send(datagram)  # a duplicate NON: ignored (RFC 7252 4.5)
        await wire.nothing()
        assert len(d.peers) == dispatched


@aio
async def test_observe_block_and_unknown_options_go_through_aiocoap() -> None:
    async with pair() as (server, _d, wire):
        for mid, option in enumerate(
            [(6, b""), (23, b"\x06"), (27, b"\x06"), (60, b""), (3, b"hs.test"), (65009, b"x")]
        ):
            wire.send(request(CON, 0x2000 + mid, b"o%d" % mid, option, (11, b"old")))
            mtype, got_mid, _token, _msg = decode_coap(await wire.answer())
            assert (mtype, got_mid) == (ACK, 0x2000 + mid)
        assert taken(server) == 0
        wire.send(request(CON, 0x3000, b"wk", (11, b".well-known"), (11, b"core")))
        assert decode_coap(await wire.answer())[3].code == CONTENT
        assert taken(server) == 0


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_a_large_answer_is_cut_in_blocks_by_aiocoap(eager: bool) -> None:
    async with pair(eager=eager) as (server, _d, wire):
        wire.send(request(CON, 0x4000, b"big", (11, b"x" * 1100)))
        mtype, mid, _token, msg = decode_coap(await wire.answer())
        assert (mtype, mid, msg.code) == (ACK, 0x4000, CONTENT)
        assert msg.first(23) is not None and len(msg.payload) == 1024  # Block2, block 0
        assert taken(server) == 1 and server.fast_paths[0].answered == 0


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_a_reused_token_cancels_the_dispatch(eager: bool) -> None:
    async with pair(eager=eager) as (server, d, wire):
        wire.send(request(CON, 0x5000, b"re", (11, b"forever"), code=POST))
        await asyncio.wait_for(d.started.wait(), 10)
        assert decode_coap(await wire.answer())[0] == ACK  # the empty ACK (slow handler)
        wire.send(request(CON, 0x5001, b"re", (11, b"next")))
        await asyncio.wait_for(d.cancelled.wait(), 10)
        mtype, mid, token, msg = decode_coap(await wire.answer())
        assert (mtype, mid, token, msg.payload) == (ACK, 0x5001, b"re", b"GET /next\n")
        assert taken(server) == 2


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_a_slow_answer_goes_separately_after_an_empty_ack(eager: bool) -> None:
    async with pair(eager=eager) as (server, d, wire):
        wire.send(request(CON, 0x6000, b"sl", (11, b"slow"), code=POST))
        await asyncio.wait_for(d.started.wait(), 10)
        assert decode_coap(await wire.answer())[:3] == (ACK, 0x6000, b"")
        d.release.set()
        mtype, _mid, token, msg = decode_coap(await wire.answer())
        assert (mtype, token, msg.payload) == (CON, b"sl", b"POST /slow\n")
        assert taken(server) == 1 and server.fast_paths[0].answered == 0


@pytest.mark.parametrize("eager", [False, True], ids=["task", "eager"])
@aio
async def test_unknown_critical_option_4_02_or_reset_for_non(eager: bool) -> None:
    async with pair(real_codec=True, eager=eager) as (server, _d, wire):
        critical = (65009, b"x")
        wire.send(request(CON, 0x7000, b"c1", (11, b"_matrix"), critical))
        mtype, mid, _token, msg = decode_coap(await wire.answer())
        assert (mtype, mid, msg.code) == (ACK, 0x7000, 130)  # 4.02 Bad Option
        wire.send(request(NON, 0x7001, b"c2", (11, b"_matrix"), critical))
        mtype, mid, _token, msg = decode_coap(await wire.answer())
        assert (mtype, mid, msg.code) == (RST, 0x7001, 0)
        assert taken(server) == 0


@aio
async def test_an_eager_dispatcher_answers_without_a_task() -> None:
    """With ``dispatch_now`` a request needs no asyncio task: none is created for it,
    whether the answer comes at once or later; one the dispatcher declines, or an
    error, is still answered."""
    async with pair(eager=True) as (server, d, wire):
        assert isinstance(d, EagerDispatcher)
        d.now = 0  # (the warm-up request)
        loop = asyncio.get_running_loop()
        names: list[str] = []  # what each task created runs
        factory = loop.get_task_factory()

        def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
            names.append(getattr(coro, "__qualname__", type(coro).__name__))
            return asyncio.Task(coro, loop=loop, **kw)

        def exchanges() -> list[str]:
            return [n for n in names if "_exchange" in n or "_serve" in n or "respond" in n]

        loop.set_task_factory(counting)
        try:
            for i in range(5):
                wire.send(request(CON, 0x8000 + i, b"e%d" % i, (11, b"now%d" % i)))
                mtype, mid, _token, msg = decode_coap(await wire.answer())
                assert (mtype, mid, msg.payload) == (ACK, 0x8000 + i, b"GET /now%d\n" % i)
            assert exchanges() == []
            assert d.now == 5 and server.fast_paths[0].answered == 5

            wire.send(request(CON, 0x8100, b"ts", (11, b"task")))
            assert decode_coap(await wire.answer())[3].payload == b"GET /task\n"
            assert d.declined == 1 and len(exchanges()) == 1  # CoapServer._serve

            wire.send(request(CON, 0x8200, b"rz", (11, b"raise")))
            mtype, mid, _token, msg = decode_coap(await wire.answer())
            assert (mtype, mid) == (ACK, 0x8200)
            assert msg.first(STATUS_OPTION) == (500).to_bytes(2, "big")
            assert b"internal server error" in msg.payload
        finally:
            loop.set_task_factory(factory)
        assert not server.fast_paths[0]._tasks  # nothing left in flight
