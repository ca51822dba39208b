#!/usr/bin/env python3
"""Session-layer benchmark: handshake time, exchanges/s (Noise vs plain CoAP), datagram bytes.

Runs a CoapServer and CoapClients over loopback UDP in one process:

* handshake time: XX (first contact) and IK (known key, request as 0-RTT)
  measured as time-to-first-response of a fresh client, and the pure CPU
  cost of each handshake (two sans-I/O NoiseEndpoints, no sockets);
* exchanges per second: sequential GETs on a warm session, Noise and plain
  CoAP measured side by side in the same run (interleaved rounds), printed
  as a ratio;
* the exact size of every kind of datagram (handshake messages, data record
  overhead, empty ACK) as seen on the wire (UDP payload bytes).

Usage: python bench/session.py [--exchanges N] [--csv PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import sys
import time
from typing import Any

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise.endpoint import NoiseEndpoint
from synapse_coap.noise.events import ChannelEstablished, Transmit
from synapse_coap.noise.keys import generate_private_key, public_key
from synapse_coap.noise.trust import MemoryTrustStore, TrustPolicy
from synapse_coap.transport.client import CoapClient, Endpoint
from synapse_coap.transport.link import LinkParameters
from synapse_coap.transport.metrics import CountingMetrics
from synapse_coap.transport.server import CoapServer, ServerConfig

LINK = LinkParameters(empty_ack_delay=0.2)
VERSIONS = b'{"versions":["v1.11","v1.12"],"unstable_features":{}}'


class Versions:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
        if request.target.startswith(b"/slow"):
            await asyncio.sleep(0.5)  # a slow handler, to provoke the empty ACK
        return HttpResponse(200, (("content-type", "application/json"),), VERSIONS)


REQ = HttpRequest("GET", b"/_matrix/client/versions")
SLOW = HttpRequest("GET", b"/slow")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def handshake_cpu(rounds: int = 200) -> dict[str, float]:
    """Milliseconds of CPU per complete handshake, both sides, no I/O (timers advanced at once)."""
    out: dict[str, float] = {}
    skey, ckey = generate_private_key(), generate_private_key()
    for mode in ("XX", "IK"):
        t0 = time.perf_counter()
        for _ in range(rounds):
            clock = _Clock()
            server = NoiseEndpoint(skey, trust=TrustPolicy(accept_any_initiator=True), clock=clock)
            store = MemoryTrustStore({"s": public_key(skey)} if mode == "IK" else {})
            client = NoiseEndpoint(ckey, trust=TrustPolicy(store=store), clock=clock)
            _ch, events = client.connect(("::1", 1), peer_name="s", peer_static=None)
            done = False
            for _hop in range(12):
                nxt: list[Any] = []
                for ev in events:
                    if isinstance(ev, Transmit):
                        target = server if ev.addr == ("::1", 1) else client
                        src = ("::1", 2) if target is server else ("::1", 1)
                        nxt += target.datagram_received(ev.data, src)
                    elif isinstance(ev, ChannelEstablished) and ev.initiator:
                        done = True
                if done:
                    break
                if not nxt:
                    timers = [
                        t for t in (server.next_timer(), client.next_timer()) if t is not None
                    ]
                    if not timers:
                        break
                    clock.t = min(timers)
                    nxt = server.handle_timers() + client.handle_timers()
                events = nxt
            if not done:
                raise RuntimeError(f"{mode} handshake did not complete")
        out[mode] = (time.perf_counter() - t0) * 1000 / rounds
    return out


async def first_response(
    server: CoapServer, store: MemoryTrustStore
) -> tuple[float, CountingMetrics]:
    metrics = CountingMetrics()
    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(store=store),
        link=LINK,
        metrics=metrics,
    )
    try:
        t0 = time.perf_counter()
        await client.request(Endpoint("::1", server.secure_addresses[0][1], "bench.test"), REQ)
        return (time.perf_counter() - t0) * 1000, metrics
    finally:
        await client.close()


async def run(exchanges: int, csv_path: str | None) -> int:
    server_metrics = CountingMetrics()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("::1", 0),),
            plain_listen=(("::1", 0),),
            static_key=generate_private_key(),
            link=LINK,
            server_name="bench.test",
        ),
        Versions(),
        metrics=server_metrics,
    )
    rows: list[tuple[str, str, str]] = []
    try:
        # --- handshakes over loopback
        xx_times, ik_times = [], []
        xx_metrics = ik_metrics = None
        for _ in range(10):
            store = MemoryTrustStore()
            t, xx_metrics = await first_response(server, store)
            xx_times.append(t)
            t, ik_metrics = await first_response(server, store)
            ik_times.append(t)
        cpu = handshake_cpu()
        rows += [
            (
                "handshake",
                "XX first contact, time to first response (ms, median)",
                f"{statistics.median(xx_times):.2f}",
            ),
            (
                "handshake",
                "IK + 0-RTT request, time to first response (ms, median)",
                f"{statistics.median(ik_times):.2f}",
            ),
            ("handshake", "XX CPU per handshake, both sides (ms)", f"{cpu['XX']:.2f}"),
            ("handshake", "IK CPU per handshake, both sides (ms)", f"{cpu['IK']:.2f}"),
        ]
        assert xx_metrics is not None and ik_metrics is not None
        # --- datagram sizes (UDP payload bytes)
        xx_out = xx_metrics.sizes.get(("out", "handshake"), [])
        xx_in = xx_metrics.sizes.get(("in", "handshake"), [])
        ik_out = ik_metrics.sizes.get(("out", "handshake"), [])
        ik_in = ik_metrics.sizes.get(("in", "handshake"), []) + ik_metrics.sizes.get(
            ("in", "record"), []
        )
        rows += [
            ("bytes", "XX message 1", str(xx_out[0]) if xx_out else "?"),
            ("bytes", "XX message 2", str(xx_in[0]) if xx_in else "?"),
            (
                "bytes",
                "XX message 3 (carrying the GET)",
                str(xx_out[1]) if len(xx_out) > 1 else "?",
            ),
            (
                "bytes",
                "IK message 1 (carrying the GET as 0-RTT)",
                str(ik_out[0]) if ik_out else "?",
            ),
            ("bytes", "IK reply datagrams (message 2 [+ response])", "+".join(map(str, ik_in))),
        ]
        # warm session: record overhead and an empty ACK
        metrics = CountingMetrics()
        client = await CoapClient.create(
            static_key=generate_private_key(),
            trust=TrustPolicy(store=MemoryTrustStore()),
            link=LINK,
            metrics=metrics,
        )
        secure = Endpoint("::1", server.secure_addresses[0][1], "bench.test")
        plain = Endpoint("::1", server.plain_addresses[0][1], "bench.test", secure=False)
        try:
            await client.request(secure, REQ)
            await client.request(plain, REQ)
            n_out = len(metrics.sizes.get(("out", "record"), []))
            n_in = len(metrics.sizes.get(("in", "record"), []))
            await client.request(secure, REQ)
            req_record = metrics.sizes[("out", "record")][n_out]
            resp_record = metrics.sizes[("in", "record")][n_in]
            n_in = len(metrics.sizes[("in", "record")])
            await client.request(secure, SLOW)
            slow_in = metrics.sizes[("in", "record")][n_in:]
            # the CoAP message inside: the plain request of the same GET (same codec, profile 0
            # for plain vs negotiated profile for Noise: identical for a bodyless GET)
            coap_len = await plain_request_size(server, client, plain)
            rows += [
                ("bytes", "GET /versions request record (warm)", str(req_record)),
                ("bytes", "same GET as plain CoAP", str(coap_len)),
                (
                    "bytes",
                    "data record overhead (record - CoAP message)",
                    str(req_record - coap_len),
                ),
                ("bytes", "response record (piggybacked ACK, 2.05 + JSON)", str(resp_record)),
                ("bytes", "empty ACK record (slow handler)", str(min(slow_in)) if slow_in else "?"),
            ]
            # --- exchanges per second, interleaved rounds
            rates: dict[str, list[float]] = {"noise": [], "plain": []}
            per_round = max(1, exchanges // 5)
            for _round in range(5):
                for name, endpoint in (("noise", secure), ("plain", plain)):
                    t0 = time.perf_counter()
                    for _ in range(per_round):
                        await client.request(endpoint, REQ)
                    rates[name].append(per_round / (time.perf_counter() - t0))
            noise_rate = statistics.median(rates["noise"])
            plain_rate = statistics.median(rates["plain"])
            rows += [
                ("rate", "sequential exchanges/s, Noise", f"{noise_rate:.0f}"),
                ("rate", "sequential exchanges/s, plain CoAP", f"{plain_rate:.0f}"),
                ("rate", "Noise / plain ratio", f"{noise_rate / plain_rate:.2f}"),
            ]
        finally:
            await client.close()
    finally:
        await server.close()

    width = max(len(r[1]) for r in rows)
    print(f"{'group':<10} {'measure':<{width}} value")
    for group, name, value in rows:
        print(f"{group:<10} {name:<{width}} {value}")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["group", "measure", "value"])
            w.writerows(rows)
        print(f"wrote {csv_path}")
    return 0


async def plain_request_size(server: CoapServer, client: CoapClient, plain: Endpoint) -> int:
    """Bytes of the plain CoAP datagram for REQ, as received by the server."""
    metrics: Any = server.metrics
    before = len(metrics.sizes.get(("in", "plain"), [])) if hasattr(metrics, "sizes") else 0
    await client.request(plain, REQ)
    sizes = metrics.sizes.get(("in", "plain"), []) if hasattr(metrics, "sizes") else []
    return int(sizes[before]) if len(sizes) > before else -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=1000)
    parser.add_argument("--csv", default=None, help="write the table as CSV to this path")
    args = parser.parse_args(argv)
    return asyncio.run(run(args.exchanges, args.csv))


if __name__ == "__main__":
    sys.exit(main())
