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

    def endpoint_send(self, plaintext: bytes) -> None:
        assert self.channel is not None
        for ev in self.endpoint.send(self.channel, plaintext):
            if isinstance(ev, Transmit) and self._transport is not None:
                self._transport.sendto(ev.data, ev.addr)

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
                pt = ev.plaintext
                if len(pt) >= 4 and pt[0] >> 4 == 0x4 and pt[1] >= 64 and self.channel is not None:
                    # a confirmable (separate) response: acknowledge it, as a CoAP client would
                    self.endpoint_send(bytes([0x60, 0]) + pt[2:4])
                self.received.put_nowait(pt)
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


# --------------------------------------------------------------------------- campaigns


def process_rss(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")  # pragma: no cover


def handshake_seeds(server_public: bytes, count: int = 8) -> list[bytes]:
    """Real first handshake messages (XX1, IK1 with and without 0-RTT data) for mutation."""
    ep = NoiseEndpoint(
        os.urandom(32),
        trust=TrustPolicy(store=MemoryTrustStore()),
        limits=NoiseLimits(max_sessions=32768),
        clock=lambda: 0.0,
    )
    out: list[bytes] = []
    for i in range(count):
        key = server_public if i % 2 else None
        early = coap_message(1, i, b"\x01", [(11, b"x")]) if i % 4 == 3 else None
        _cid, events = ep.connect(
            ("192.0.2.1", 5683), peer_name="s", peer_static=key, early_data=early
        )
        out += [e.data for e in events if isinstance(e, Transmit)]
    return out


def record_seeds(count: int = 8) -> list[bytes]:
    """Header-valid transport records (random session ids and contents)."""
    rnd = random.Random(7)
    return [
        bytes([0xC4 | (i & 0x22)]) + rnd.randbytes(2) + rnd.randbytes(2) + rnd.randbytes(40)
        for i in range(count)
    ]


async def blast(
    target: Address,
    datagrams: Iterator[bytes],
    *,
    bind: str = "127.0.0.1",
    rate: float = 20_000.0,
) -> tuple[int, int]:
    """Send every datagram to ``target`` at about ``rate`` per second from one socket
    (replies are read and discarded). Returns (datagrams, bytes) sent."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((bind, 0))
    sent = nbytes = 0
    started = loop.time()
    try:
        for data in datagrams:
            while True:
                try:
                    sock.sendto(data, target)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            sent += 1
            nbytes += len(data)
            if sent % 200 == 0:
                try:
                    while True:
                        sock.recv(65535)
                except (BlockingIOError, OSError):
                    pass
                ahead = sent / rate - (loop.time() - started)
                await asyncio.sleep(max(0.0, ahead))
    finally:
        sock.close()
    return sent, nbytes


class HandshakeFlood:
    """First handshake messages (XX1) from many sockets; a socket answers the retry
    cookies it gets (it owns its address) when ``answer_retry``. Per source address:
    bytes sent and bytes received, for the amplification factor."""

    def __init__(self, target: Address, flood: Flood, *, answer_retry: bool = True) -> None:
        self.target = target
        self.flood = flood
        self.answer_retry = answer_retry
        self.ep = NoiseEndpoint(
            os.urandom(32),
            trust=TrustPolicy(store=MemoryTrustStore()),
            limits=NoiseLimits(max_sessions=32768),
            clock=lambda: 0.0,
        )
        self.sent: dict[Address, int] = {}
        self.received: dict[Address, int] = {}
        self.messages = 0

    def _xx1(self) -> bytes:
        if len(self.ep._sessions) > 30000:
            self.ep = NoiseEndpoint(
                os.urandom(32),
                trust=TrustPolicy(store=MemoryTrustStore()),
                limits=NoiseLimits(max_sessions=32768),
                clock=lambda: 0.0,
            )
        _cid, events = self.ep.connect(self.target, peer_name="s", peer_static=None)
        return next(e.data for e in events if isinstance(e, Transmit))

    async def run(self, rounds: int, *, rate: float = 5000.0) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(rounds):
            for sock in self.flood.socks:
                addr = sock.getsockname()
                data = self._xx1()
                self._send(sock, data, addr)
                self.messages += 1
                if self.messages % 100 == 0:
                    self._answer()
                    ahead = self.messages / rate - (loop.time() - started)
                    await asyncio.sleep(max(0.0, ahead))
        await asyncio.sleep(0.2)
        self._answer()

    def _send(self, sock: socket.socket, data: bytes, addr: Address) -> None:
        try:
            sock.sendto(data, self.target)
            self.sent[addr] = self.sent.get(addr, 0) + len(data)
        except (BlockingIOError, OSError):
            pass

    def _answer(self) -> None:
        for sock in self.flood.socks:
            addr = sock.getsockname()
            while True:
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, OSError):
                    break
                self.received[addr] = self.received.get(addr, 0) + len(data)
                if self.answer_retry and data[:1] == b"\x86":
                    events = self.ep.datagram_received(data, self.target)
                    for ev in events:
                        if isinstance(ev, Transmit):
                            self._send(sock, ev.data, addr)

    def amplification(self) -> float:
        """The largest bytes-received / bytes-sent ratio over the source addresses."""
        by_host_in: dict[str, int] = {}
        by_host_out: dict[str, int] = {}
        for (host, _port), n in self.sent.items():
            by_host_out[host] = by_host_out.get(host, 0) + n
        for (host, _port), n in self.received.items():
            by_host_in[host] = by_host_in.get(host, 0) + n
        return max((by_host_in.get(h, 0) / n for h, n in by_host_out.items() if n), default=0.0)
