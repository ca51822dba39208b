"""The impairment relay over real loopback UDP, with a trivial asyncio echo server.

Only lower bounds on delays are asserted (a relay never delivers *early*); the
exact timing is the sans-I/O model's and is asserted on its trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import attrs
import pytest

from synapse_coap.lab.model import PROFILES, Impairment, LinkModel, LinkProfile, RebindSchedule
from synapse_coap.lab.relay import Relay, RelayConfig

pytestmark = pytest.mark.integration


class Echo(asyncio.DatagramProtocol):
    """Echoes every datagram and remembers (arrival time, source, payload)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Any, bytes]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.echo = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append((asyncio.get_running_loop().time(), addr, data))
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((asyncio.get_running_loop().time(), data))

    def send(self, data: bytes) -> float:
        assert self.transport is not None
        self.transport.sendto(data)
        return asyncio.get_running_loop().time()


async def _echo_server(host: str = "127.0.0.1") -> tuple[asyncio.DatagramTransport, Echo]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Echo, local_addr=(host, 0))
    return transport, proto


async def _client(addr: tuple[str, int]) -> tuple[asyncio.DatagramTransport, Client]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Client, remote_addr=addr)
    return transport, proto


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _profile(**kw: Any) -> LinkProfile:
    return LinkProfile.symmetric("test", "test", Impairment(**kw))


@attrs.frozen
class Rig:
    """An echo server behind a relay, and clients sending to the relay."""

    server_t: asyncio.DatagramTransport
    echo: Echo
    relay: Relay
    clients: list[tuple[asyncio.DatagramTransport, Client]]

    @property
    def client(self) -> Client:
        return self.clients[0][1]

    @property
    def client_t(self) -> asyncio.DatagramTransport:
        return self.clients[0][0]


@contextlib.asynccontextmanager
async def _rig(
    profile: LinkProfile = PROFILES["lan"],
    *,
    seed: int = 0,
    trace: bool = False,
    host: str = "127.0.0.1",
    clients: int = 1,
) -> AsyncIterator[Rig]:
    """Start the echo server, the relay in front of it and ``clients`` clients; close all."""
    server_t, echo = await _echo_server(host)
    try:
        relay = await Relay.start(
            RelayConfig(
                listen=(host, 0),
                upstream=server_t.get_extra_info("sockname")[:2],
                profile=profile,
                seed=seed,
                trace=trace,
            )
        )
        conns: list[tuple[asyncio.DatagramTransport, Client]] = []
        try:
            for _ in range(clients):
                conns.append(await _client(relay.address))
            yield Rig(server_t, echo, relay, conns)
        finally:
            for t, _ in conns:
                t.close()
            await relay.close()
    finally:
        server_t.close()


def test_rate_limit_delays_a_100_byte_datagram_by_its_serialization_time() -> None:
    async def run() -> None:
        async with _rig(_profile(rate=800.0), trace=True) as rig:
            relay, echo, client = rig.relay, rig.echo, rig.client
            sent_at = client.send(b"p" * 100)
            await _until(lambda: len(client.received) == 1)
            # the model: (100 + 28) * 8 / 800 = 1.28 s each way
            [up] = relay.model.uplink.trace or []
            [down] = relay.model.downlink.trace or []
            assert up.deliver_at[0] - up.offered_at == pytest.approx(1.28, abs=1e-9)
            assert down.deliver_at[0] - down.offered_at == pytest.approx(1.28, abs=1e-9)
            # the real run: never earlier than the model says (generous bound)
            arrived_at_server = echo.seen[0][0]
            assert arrived_at_server - sent_at >= 1.2
            assert client.received[0][0] - sent_at >= 2.4
            assert client.received[0][1] == b"p" * 100
            stats = relay.stats
            assert stats.uplink.offered_ip_bytes == 128
            assert stats.uplink.busy_seconds == pytest.approx(1.28)
            assert (stats.sent_upstream, stats.sent_downstream, stats.pending) == (1, 1, 0)

    asyncio.run(run())


def test_loss_accounting_matches_the_model_exactly() -> None:
    seed = 7
    profile = _profile(loss=0.3, duplicate=0.05)
    n = 200

    # What the sans-I/O model predicts for this seed (timing plays no part
    # here: no rate, no latency, no queue pressure).
    predicted = LinkModel(profile, seed=seed)
    up_delivered = [d.datagram for i in range(n) for d in predicted.uplink.offer(0.0, b"%03d" % i)]
    down_delivered = [d.datagram for m in up_delivered for d in predicted.downlink.offer(0.0, m)]

    async def run() -> None:
        async with _rig(profile, seed=seed) as rig:
            echo, client = rig.echo, rig.client
            for i in range(n):
                client.send(b"%03d" % i)
                if i % 20 == 19:
                    await asyncio.sleep(0.005)  # stay far from socket buffer limits
            await _until(lambda: len(client.received) == len(down_delivered))
            await asyncio.sleep(0.1)  # nothing more may arrive
            stats = rig.relay.stats
            assert [m for _, _, m in echo.seen] == up_delivered
            assert [m for _, m in client.received] == down_delivered
            assert stats.uplink == predicted.uplink.stats
            assert stats.downlink == predicted.downlink.stats
            assert stats.uplink.offered_datagrams == n
            assert stats.uplink.lost_datagrams == n + stats.uplink.duplicated_datagrams - len(
                up_delivered
            )
            assert stats.sent_upstream == len(up_delivered)
            assert stats.sent_downstream == len(down_delivered)
            assert stats.uplink.offered_ip_bytes == n * (3 + 28)

    asyncio.run(run())


def test_nat_rebinding_gives_the_server_a_new_source_port() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        profile = _profile().with_rebind(RebindSchedule(times=(0.5,)))
        async with _rig(profile) as rig:
            relay, echo, client, client_t = rig.relay, rig.echo, rig.client, rig.client_t
            start = relay.model.start
            client.send(b"before")
            await _until(lambda: len(client.received) == 1)
            old_addr = echo.seen[0][1]
            assert relay.upstream_port(client_t.get_extra_info("sockname")) == old_addr[1]
            await asyncio.sleep(max(0.0, start + 0.6 - loop.time()))
            assert relay.stats.rebinds == 1
            # the old mapping is gone: the server's datagram to the old port is lost
            echo.transport.sendto(b"to old port", old_addr)  # type: ignore[union-attr]
            client.send(b"after")
            await _until(lambda: len(client.received) == 2)
            new_addr = echo.seen[1][1]
            assert echo.seen[1][2] == b"after"
            assert new_addr[1] != old_addr[1]
            assert relay.upstream_port(client_t.get_extra_info("sockname")) == new_addr[1]
            assert [m for _, m in client.received] == [b"before", b"after"]
            assert relay.stats.downlink.offered_datagrams == 2

    asyncio.run(run())


def test_several_clients_each_get_their_own_upstream_port() -> None:
    async def run() -> None:
        async with _rig(_profile(latency=0.05), clients=3) as rig:
            clients = rig.clients
            for i, (_, c) in enumerate(clients):
                c.send(b"client %d" % i)
            await _until(lambda: all(len(c.received) == 1 for _, c in clients))
            for i, (_, c) in enumerate(clients):
                assert c.received[0][1] == b"client %d" % i
            assert len({addr for _, addr, _ in rig.echo.seen}) == 3
            assert rig.relay.stats.clients == 3

    asyncio.run(run())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_counts_48_header_bytes() -> None:
    async def run() -> None:
        async with _rig(host="::1") as rig:
            rig.client.send(b"v6" * 26)
            await _until(lambda: len(rig.client.received) == 1)
            assert rig.relay.stats.uplink.offered_ip_bytes == 52 + 48
            assert rig.relay.stats.downlink.delivered_ip_bytes == 52 + 48

    asyncio.run(run())


def test_command_line_relays_and_prints_status_and_stats() -> None:
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(10)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "synapse_coap.lab",
            "--listen=127.0.0.1:0",
            f"--upstream=127.0.0.1:{upstream.getsockname()[1]}",
            "--profile=satellite",
            "--seed=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        status = proc.stdout.readline()
        assert "profile satellite" in status
        assert "seed 1" in status
        relay_port = int(status.split()[1].rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"hello", ("127.0.0.1", relay_port))
            data, _ = upstream.recvfrom(100)
        assert data == b"hello"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out.startswith("stats: up: offered 1 dgrams 5 B (33 B IP), delivered 1 dgrams")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        upstream.close()
