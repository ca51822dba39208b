"""The relay's IP-level accounting agrees byte for byte with a tshark capture on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, cast

import pytest

from synapse_coap.lab.model import Impairment, LinkProfile
from synapse_coap.lab.relay import Relay, RelayConfig
from synapse_coap_lab.capture import CaptureError, LoopbackCapture, estimate_tcp, tshark_path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(tshark_path() is None, reason="tshark not installed"),
]


def _capture_or_skip(capture_filter: str) -> LoopbackCapture:
    cap = LoopbackCapture(capture_filter)
    try:
        cap.start()
    except CaptureError as exc:
        cap.cleanup()
        pytest.skip(f"cannot capture on loopback here: {exc}")
    return cap


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1
        if self.transport is not None:
            self.transport.sendto(data * 2, addr)


def test_relay_udp_accounting_matches_the_capture() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        server_t, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
        server_port = server_t.get_extra_info("sockname")[1]
        relay = await Relay.start(
            RelayConfig(
                listen=("127.0.0.1", 0),
                upstream=("127.0.0.1", server_port),
                profile=LinkProfile.symmetric("t", "t", Impairment(loss=0.25)),
                seed=3,
            )
        )
        cap = await asyncio.to_thread(_capture_or_skip, f"udp port {server_port}")
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(40):
                client.sendto(b"m" * (10 + i), relay.address)
                await asyncio.sleep(0.002)
            while relay.stats.pending or echo.count < relay.stats.uplink.delivered_datagrams:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            await asyncio.to_thread(cap.stop)
            counts = await asyncio.to_thread(cap.counts, server_port)
            stats = relay.stats
            # relay -> server: what the uplink delivered; server -> relay: what the downlink was offered
            assert counts.to_server_packets == stats.uplink.delivered_datagrams
            assert counts.to_server_ip_bytes == stats.uplink.delivered_ip_bytes
            assert counts.from_server_packets == stats.downlink.offered_datagrams
            assert counts.from_server_ip_bytes == stats.downlink.offered_ip_bytes
            assert 0 < stats.uplink.lost_datagrams < 40
        finally:
            client.close()
            cap.cleanup()
            await relay.close()
            server_t.close()

    asyncio.run(run())


def test_tcp_capture_counts_handshake_and_ack_only_segments() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while len(data) < 3000:
                data += conn.recv(65536)
            conn.sendall(data[:1000])

    cap = _capture_or_skip(f"tcp port {port}")
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"q" * 3000)
            got = b""
            while len(got) < 1000:
                got += c.recv(65536)
        thread.join(10)
        cap.stop()
        packets = cap.packets()
        counts = cap.counts(server_port=port)
    finally:
        cap.cleanup()
        srv.close()
    assert sum(p.tcp_payload or 0 for p in packets) == 4000
    assert counts.tcp_handshake == 2  # SYN and SYN-ACK
    assert counts.tcp_ack_only >= 1
    # every segment carries at least a 20-byte IPv4 and a 20-byte TCP header
    assert counts.ip_bytes >= 4000 + 40 * counts.tcp_segments
    assert counts.to_server_ip_bytes + counts.from_server_ip_bytes == counts.ip_bytes
    # the no-capture fallback estimate is close (delayed ACKs vary by a segment or two)
    est = estimate_tcp(to_server_bytes=3000, from_server_bytes=1000, mss=65483)
    assert abs(est.ip_bytes - counts.ip_bytes) <= 2 * 52, (est, counts)
