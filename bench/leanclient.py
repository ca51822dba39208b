"""A lean CoAP (+ Noise) load client for the inbound bench: the project's sans-I/O layers
on a bare asyncio datagram socket, no aiocoap.

Why: ``bench/inbound.py`` measures the *server's* CPU per request. Its first client was
the product's own :class:`~synapse_coap.transport.client.CoapClient` (aiocoap underneath,
pure Python), which on the other core could not always keep Synapse busy: HTTP cells ran
Synapse at a utilisation (CPU seconds / wall seconds) of 1.0-1.1, CoAP+Noise cells often
at 0.84-0.97, and a server that idles between requests pays more per request (a wake-up
per datagram instead of a batch, colder caches). A cheaper client lets both listeners
run saturated, so the comparison is between servers, not between clients.

What it does, per request, exactly as the product's client puts it on the wire: the
session codec's ``encode_request`` (token bindings and the session string table on a
Noise session, literal ``Authorization`` on plain CoAP), one confirmable CoAP message
(``encode_coap``), sealed by a :class:`~synapse_coap.noise.endpoint.NoiseEndpoint` for
Noise; the answer opened, a piggybacked or separate response matched by token (a
separate response's CON is acknowledged), and decoded by ``decode_response`` into an
:class:`~synapse_coap.mapping.messages.HttpResponse`. A request unanswered for
:data:`RETRANSMIT` seconds is sent again with the same message id (RFC 7252 deduplication
on the server), up to :data:`MAX_TRIES` times. No blockwise transfer: a response must fit
one datagram (the bench's responses do; a larger one is an error).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from synapse_coap.mapping import numbers as n
from synapse_coap.mapping.coap import decode_coap, encode_coap
from synapse_coap.mapping.codec import request_seq
from synapse_coap.mapping.messages import CoapMessage, HttpRequest, HttpResponse
from synapse_coap.mapping.tokens import SenderTokens
from synapse_coap.noise.endpoint import (
    ChannelClosed,
    ChannelEstablished,
    HandshakeFailed,
    NoiseEndpoint,
    Received,
    Transmit,
)
from synapse_coap.noise.trust import TrustPolicy
from synapse_coap.transport.convert import (
    default_codec_factory,
    parse_server_name,
    session_context,
    supported_profile_offers,
)
from synapse_coap.wire.context import WireContext
from synapse_coap.wire.strings import SenderStrings

#: Seconds before an unanswered request is sent again (loopback: only a lost datagram).
RETRANSMIT = 2.0
#: Transmissions of one request before it fails.
MAX_TRIES = 4


class LeanError(Exception):
    """The lean client could not complete a request or a handshake."""


class _Pending:
    __slots__ = ("acked", "future", "plaintext", "timer", "tries")

    def __init__(self, future: asyncio.Future[CoapMessage], plaintext: bytes) -> None:
        self.future = future
        self.plaintext = plaintext
        self.tries = 1
        self.acked = False
        self.timer: asyncio.TimerHandle | None = None


class LeanClient(asyncio.DatagramProtocol):
    """One CoAP session to one server: over Noise when ``server_key`` is given, else plain.

    Create with :meth:`connect`; :meth:`request` may be called concurrently.
    """

    def __init__(
        self,
        addr: tuple[str, int],
        server_name: str,
        server_key: bytes | None,
        static_key: bytes | None,
    ) -> None:
        self.addr = addr
        self.server_name = server_name
        self.secure = server_key is not None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._mid = int.from_bytes(static_key[:2], "big") if static_key else 1
        self._token = 0
        self._established: asyncio.Future[None] = self._loop.create_future()
        self._noise: NoiseEndpoint | None = None
        self._channel = 0
        self._timer: asyncio.TimerHandle | None = None
        self.codec: Any = default_codec_factory(0, WireContext())
        self.tokens: SenderTokens | None = None
        if server_key is not None:
            assert static_key is not None, "a Noise session needs a static key"
            self._noise = NoiseEndpoint(
                static_key,
                trust=TrustPolicy(pinned={server_name: server_key}),
                profiles=supported_profile_offers(),
                clock=time.monotonic,
            )
            self.tokens = SenderTokens(strings=SenderStrings())
        #: datagrams sent and received, and requests sent again
        self.stats = {"sent": 0, "received": 0, "retransmitted": 0}

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        server_name: str,
        server_key: bytes | None = None,
        static_key: bytes | None = None,
        *,
        timeout: float = 10.0,
    ) -> LeanClient:
        """A client bound to an ephemeral loopback port; for Noise, once the handshake is done."""
        loop = asyncio.get_running_loop()
        addr = (host, port)
        _transport, client = await loop.create_datagram_endpoint(
            lambda: cls(addr, server_name, server_key, static_key), remote_addr=addr
        )
        if client._noise is None:
            client._established.set_result(None)
        else:
            client._channel, events = client._noise.connect(
                addr, peer_name=server_name, peer_static=server_key
            )
            client._events(events)
        try:
            await asyncio.wait_for(asyncio.shield(client._established), timeout)
        except asyncio.TimeoutError:
            client.close()
            raise LeanError(f"no Noise session with {host}:{port} within {timeout:g} s") from None
        return client

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.stats["received"] += 1
        if self._noise is None:
            self._coap_received(data)
        else:
            self._events(self._noise.datagram_received(data, addr[:2]))

    def error_received(self, exc: Exception) -> None:
        self._fail_all(LeanError(f"socket error: {exc}"))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._fail_all(LeanError("client closed"))
        if self._transport is not None:
            self._transport.close()

    # ------------------------------------------------------------------ Noise
    def _events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Transmit):
                self._send_datagram(ev.data)
            elif isinstance(ev, Received):
                self._coap_received(ev.plaintext)
            elif isinstance(ev, ChannelEstablished):
                peer = parse_server_name(ev.peer_app_payload)
                self.codec = default_codec_factory(ev.profile_id, session_context(peer, None))
                if not self._established.done():
                    self._established.set_result(None)
            elif isinstance(ev, (HandshakeFailed, ChannelClosed)):
                err = LeanError(f"Noise session lost: {ev.reason}")
                if not self._established.done():
                    self._established.set_exception(err)
                self._fail_all(err)
        self._arm_timer()

    def _arm_timer(self) -> None:
        assert self._noise is not None
        when = self._noise.next_timer()
        if self._timer is not None:
            if when is not None and abs(self._timer.when() - when) < 1e-3:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self._loop.call_at(
                self._loop.time() + max(0.0, when - time.monotonic()), self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        assert self._noise is not None
        self._events(self._noise.handle_timers())

    def _send_datagram(self, data: bytes) -> None:
        if self._transport is not None:
            self.stats["sent"] += 1
            self._transport.sendto(data)

    def _send_plaintext(self, plaintext: bytes) -> None:
        if self._noise is None:
            self._send_datagram(plaintext)
        else:
            self._events(self._noise.send(self._channel, plaintext))

    # ------------------------------------------------------------------ CoAP
    def _coap_received(self, plaintext: bytes) -> None:
        try:
            mtype, mid, token, msg = decode_coap(plaintext)
        except Exception:
            return  # (not CoAP: dropped, as a server would)
        if mtype == n.CON:
            # a separate response (or a request, which we do not serve): acknowledge it
            self._send_plaintext(encode_coap(CoapMessage(n.EMPTY), mtype=n.ACK, mid=mid))
        if msg.code == n.EMPTY:
            if mtype == n.ACK:
                for p in self._pending.values():
                    if p.plaintext[2:4] == plaintext[2:4]:
                        p.acked = True  # the response follows separately
            return
        pending = self._pending.pop(token, None)
        if pending is None:
            return  # a duplicate, or a late answer to a request given up
        if pending.timer is not None:
            pending.timer.cancel()
        if not pending.future.done():
            pending.future.set_result(msg)

    def _retransmit(self, token: bytes) -> None:
        pending = self._pending.get(token)
        if pending is None:
            return
        if pending.acked:
            pending.timer = self._loop.call_later(RETRANSMIT * 4, self._retransmit, token)
            pending.acked = False
            return
        if pending.tries >= MAX_TRIES:
            del self._pending[token]
            pending.future.set_exception(LeanError(f"no answer after {MAX_TRIES} transmissions"))
            return
        pending.tries += 1
        self.stats["retransmitted"] += 1
        pending.timer = self._loop.call_later(RETRANSMIT, self._retransmit, token)
        self._send_plaintext(pending.plaintext)

    def _fail_all(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.timer is not None:
                p.timer.cancel()
            if not p.future.done():
                p.future.set_exception(err)

    async def exchange(self, cm: CoapMessage) -> CoapMessage:
        """Send ``cm`` as a confirmable request; the response message."""
        self._mid = (self._mid + 1) & 0xFFFF
        self._token += 1
        token = self._token.to_bytes(4, "big")
        plaintext = encode_coap(cm, mtype=n.CON, mid=self._mid, token=token)
        pending = _Pending(self._loop.create_future(), plaintext)
        self._pending[token] = pending
        pending.timer = self._loop.call_later(RETRANSMIT, self._retransmit, token)
        self._send_plaintext(plaintext)
        return await pending.future

    async def request(self, request: HttpRequest) -> HttpResponse:
        """``request`` encoded as the product's client would, and its decoded response."""
        for _attempt in range(2):
            tokens = self.tokens
            cm = self.codec.encode_request(request, tokens)
            resp = await self.exchange(cm)
            if tokens is not None and tokens.on_response(cm, resp):
                continue  # the server lost our bindings: once more, with them literal
            return self.codec.decode_response(  # type: ignore[no-any-return]
                resp,
                method=cm.code,
                strings=tokens.strings if tokens is not None else None,
                seq=request_seq(cm),
            )
        raise LeanError("the server lost our session state twice in a row")


class LeanAdapter:
    """A :class:`LeanClient` behind the ``request(endpoint, request)`` and ``close()`` of
    the product's ``CoapClient`` (one session: the endpoint is fixed), so that a bench
    can take either."""

    def __init__(self, client: LeanClient) -> None:
        self.client = client

    async def request(self, _endpoint: Any, request: HttpRequest) -> HttpResponse:
        return await self.client.request(request)

    async def close(self) -> None:
        self.client.close()


async def load_client(
    kind: str,
    host: str,
    port: int,
    server_name: str,
    server_key: bytes | None,
    concurrency: int,
) -> Any:
    """A bench's CoAP load client with ``request(endpoint, request)`` and ``close()``:
    ``kind`` ``lean`` (a :class:`LeanClient` to ``host:port``, over Noise when
    ``server_key`` is given) or ``aiocoap`` (the product's ``CoapClient``, which serves
    any endpoint: ``host:port`` is then only where its requests go)."""
    from synapse_coap.noise.keys import generate_private_key

    if kind == "lean":
        static = generate_private_key() if server_key is not None else None
        return LeanAdapter(await LeanClient.connect(host, port, server_name, server_key, static))
    from synapse_coap.transport.client import CoapClient
    from synapse_coap.transport.link import LinkParameters

    link = LinkParameters(nstart=concurrency, max_nstart=concurrency)
    if server_key is None:
        return await CoapClient.create(
            link=link, static_key=None, trust=TrustPolicy(), bind=("127.0.0.1", 0)
        )
    return await CoapClient.create(
        link=link,
        static_key=generate_private_key(),
        trust=TrustPolicy(pinned={server_name: server_key}),
        bind=("127.0.0.1", 0),
    )
