"""Large decodes off the event loop (issue 14): transport/offload.py and the listener's
per-session decode order. No sleeps: the decoder stub is gated by events."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import CoapMessage, HttpRequest
from synapse_coap.transport.metrics import NullMetrics
from synapse_coap.transport.offload import INLINE_DECODE_MAX, DecodePool
from synapse_coap.transport.server import CoapServer, ServerConfig, _ServerSession

BIG = CoapMessage(2, (), b"x" * (INLINE_DECODE_MAX + 1))
SMALL = CoapMessage(1, (), b"")


class GatedCodec:
    """decode_request: records the order and the thread; a large body waits for ``release``."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[tuple[int, bool]] = []

    def decode_request(self, msg: CoapMessage, tokens: Any = None) -> HttpRequest:
        self.calls.append((len(msg.payload), threading.current_thread() is threading.main_thread()))
        if len(msg.payload) > INLINE_DECODE_MAX:
            self.started.set()
            if not self.release.wait(20):
                raise AssertionError("never released")
        return HttpRequest("POST" if msg.payload else "GET", b"/", (), msg.payload)


def _server_and_session(codec: GatedCodec) -> tuple[CoapServer, _ServerSession]:
    server = CoapServer(ServerConfig(listen=()), None, NullMetrics(), lambda p, c: codec)  # type: ignore[arg-type]
    session = _ServerSession(codec, None, PeerInfo("::1", 1, None, secure=False))  # type: ignore[arg-type]
    return server, session


def test_small_payloads_decode_inline_and_large_ones_on_a_worker() -> None:
    pool = DecodePool()

    async def main() -> None:
        here = threading.get_ident()
        assert await pool.run(INLINE_DECODE_MAX, threading.get_ident) == here
        assert await pool.run(INLINE_DECODE_MAX + 1, threading.get_ident) != here
        pool.close()
        assert await pool.run(INLINE_DECODE_MAX + 1, threading.get_ident) == here

    asyncio.run(main())


def test_a_request_waits_for_the_sessions_large_decode_and_keeps_its_place() -> None:
    codec = GatedCodec()
    server, session = _server_and_session(codec)

    async def main() -> None:
        big = asyncio.ensure_future(server._decode_request(session, BIG))
        assert await asyncio.to_thread(codec.started.wait, 20)
        small = asyncio.ensure_future(server._decode_request(session, SMALL))
        await asyncio.sleep(0)  # let it reach the session's lock (no time passes)
        assert not small.done() and codec.calls == [(len(BIG.payload), False)]
        codec.release.set()
        assert (await big).body == BIG.payload
        assert (await small).method == "GET"
        assert codec.calls == [(len(BIG.payload), False), (0, True)]

    try:
        asyncio.run(main())
    finally:
        codec.release.set()
        server._decoder.close()


def test_an_abandoned_large_decode_holds_the_session_until_its_thread_is_done() -> None:
    codec = GatedCodec()
    server, session = _server_and_session(codec)

    async def main() -> None:
        big = asyncio.ensure_future(server._decode_request(session, BIG))
        assert await asyncio.to_thread(codec.started.wait, 20)
        big.cancel()  # the peer abandoned the exchange
        await asyncio.gather(big, return_exceptions=True)
        assert big.cancelled()
        assert session.decode_lock.locked()  # the thread still works on the session's tables
        codec.release.set()
        await asyncio.wait_for(server._decode_request(session, SMALL), 20)
        assert not session.decode_lock.locked()

    try:
        asyncio.run(main())
    finally:
        codec.release.set()
        server._decoder.close()
