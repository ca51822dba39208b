"""Attack tools for the test suite and ``bench/attack.py`` (never for other people's servers).

:class:`RawPeer` is a Noise peer with no CoAP layer: it completes a real
handshake with a listener, then seals whatever plaintext it is given into
records (mutated CoAP messages, bombs, abandoned block transfers), and
returns what comes back. :func:`mutations` makes random and mutated
datagrams from seeds. :class:`Flood` sends raw datagrams from many source
ports or loopback addresses (127.0.x.y work without setup on Linux).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from synapse_coap.noise.endpoint import NoiseEndpoint, NoiseLimits
from synapse_coap.noise.events import ChannelEstablished, Received, Transmit
from synapse_coap.noise.trust import MemoryTrustStore, TrustPolicy

Address = tuple[str, int]


class _Sink(asyncio.DatagramProtocol):
    def __init__(self, peer: RawPeer) -> None:
        self.peer = peer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.peer._on_datagram(data, (str(addr[0]), int(addr[1])))


class RawPeer:
    """One UDP socket and one sans-I/O NoiseEndpoint, driven by hand."""

    def __init__(
        self, server: Address, *, bind: str = "127.0.0.1", static_key: bytes | None = None
    ):
        self.server = server
        self.bind = bind
        self.loop = asyncio.get_running_loop()
        self.endpoint = NoiseEndpoint(
            static_key or os.urandom(32),
            trust=TrustPolicy(store=MemoryTrustStore()),
            limits=NoiseLimits(max_sessions=32768),
            clock=self.loop.time,
        )
        self.channel: int | None = None
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.established = asyncio.Event()
        self.raw_in: list[bytes] = []
        self.raw_out: list[bytes] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def open(self) -> RawPeer:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _Sink(self), local_addr=(self.bind, 0), family=socket.AF_INET
        )
        self._transport = transport
        return self

    async def connect(
        self,
        *,
        peer_name: str = "server",
        peer_static: bytes | None = None,
        early_data: bytes | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Handshake (IK with 0-RTT ``early_data`` when ``peer_static`` is given, else XX)."""
        cid, events = self.endpoint.connect(
            self.server, peer_name=peer_name, peer_static=peer_static, early_data=early_data
        )
        self.channel = cid
        self._run(events)
        await asyncio.wait_for(self.established.wait(), timeout)

    def send(self, plaintext: bytes) -> None:
        """Seal one plaintext (anything: it need not be valid CoAP) into a record."""
        assert self.channel is not None
        self._run(self.endpoint.send(self.channel, plaintext))

    def send_raw(self, data: bytes, to: Address | None = None) -> None:
        assert self._transport is not None
        self._transport.sendto(data, to or self.server)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        self.raw_in.append(data)
        self._run(self.endpoint.datagram_received(data, addr))

    def _on_timer(self) -> None:
        self._timer = None
        self._run(self.endpoint.handle_timers())

    def _run(self, events: Sequence[Any]) -> None:
        for ev in events:
            if isinstance(ev, Transmit) and self._transport is not None:
                self.raw_out.append(ev.data)
                self._transport.sendto(ev.data, ev.addr)
            elif isinstance(ev, ChannelEstablished):
                self.established.set()
            elif isinstance(ev, Received):
                self.received.put_nowait(ev.plaintext)
        at = self.endpoint.next_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None:
            self._timer = self.loop.call_at(at, self._on_timer)


def coap_message(
    code: int,
    mid: int,
    token: bytes,
    options: Sequence[tuple[int, bytes]],
    payload: bytes = b"",
    mtype: int = 0,
) -> bytes:
    """Encode a CoAP message by hand (RFC 7252 §3), options sorted by number; no
    validation, so option values may be anything (bad UTF-8, oversized ...)."""
    out = bytearray([0x40 | (mtype << 4) | len(token), code]) + mid.to_bytes(2, "big") + token
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        delta, length = number - last, len(value)
        last = number
        head = bytearray([0])
        ext = bytearray()
        for shift, n in ((4, delta), (0, length)):
            if n < 13:
                head[0] |= n << shift
            elif n < 269:
                head[0] |= 13 << shift
                ext.append(n - 13)
            else:
                head[0] |= 14 << shift
                ext.extend((n - 269).to_bytes(2, "big"))
        out += head + ext + value
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One random mutation: bit flips, truncation, a random byte run, or duplication."""
    b = bytearray(data)
    kind = rnd.randrange(5)
    if kind == 0 and b:
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif kind == 1 and b:
        del b[rnd.randrange(len(b)) :]
    elif kind == 2:
        i = rnd.randrange(len(b) + 1)
        b[i:i] = rnd.randbytes(rnd.randint(1, 16))
    elif kind == 3 and b:
        i = rnd.randrange(len(b))
        b[i] = rnd.choice((0x00, 0xFF, 0x0D, 0x0E, 0xF0, 0xC0, 0x80))
    else:
        b += bytes(b[: rnd.randint(0, len(b))])
    return bytes(b)


def mutations(seeds: Sequence[bytes], count: int, rnd: random.Random) -> Iterator[bytes]:
    """``count`` datagrams: a quarter random bytes, the rest mutated seeds."""
    for i in range(count):
        if i % 4 == 0 or not seeds:
            yield rnd.randbytes(rnd.randint(0, 200))
        else:
            yield mutate(rnd.choice(seeds), rnd)


class Flood:
    """Raw UDP sockets bound on many loopback addresses and/or many ports."""

    def __init__(self, hosts: Sequence[str], ports_per_host: int) -> None:
        self.socks: list[socket.socket] = []
        for host in hosts:
            for _ in range(ports_per_host):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setblocking(False)
                s.bind((host, 0))
                self.socks.append(s)
        self.bytes_in: dict[Address, int] = {}

    def addresses(self) -> list[Address]:
        return [s.getsockname() for s in self.socks]

    def send(self, index: int, data: bytes, target: Address) -> None:
        try:
            self.socks[index % len(self.socks)].sendto(data, target)
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> dict[Address, int]:
        """Bytes received per flooding socket so far (reads what is waiting)."""
        for s in self.socks:
            while True:
                try:
                    data = s.recv(65535)
                except (BlockingIOError, OSError):
                    break
                addr = s.getsockname()
                self.bytes_in[addr] = self.bytes_in.get(addr, 0) + len(data)
        return self.bytes_in

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []
