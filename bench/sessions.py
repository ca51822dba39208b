#!/usr/bin/env python3
"""10,000 concurrent Noise sessions against one listener (issue 13).

A listener (a :class:`~synapse_coap.transport.server.CoapServer` answering
``GET /_matrix/client/versions``, default limits except ``max_sessions``) runs in
a child process. This process:

1. measures request latency (median, p99) of one client (the real
   :class:`~synapse_coap.transport.client.CoapClient`) with only its own session
   open: ``--rounds`` rounds of ``--requests`` sequential requests;
2. opens ``--sessions`` Noise sessions from ``--sources`` loopback source
   addresses (127.1.x.y; sans-I/O :class:`NoiseEndpoint` initiators, IK, each
   handshake carrying one request as 0-RTT data, so the listener also builds its
   per-session request state), at most ``--window`` handshakes in flight;
   reports handshakes per second and the listener's CPU per handshake;
3. reads the listener's resident memory (``VmRSS``) before and after and
   reports the delta per session;
4. measures the same client's latency again while all sessions sit idle, in
   the same number of rounds, and prints the p99 ratio (idle-N / one session).

The machine may be shared: the latency figures are rounds of n requests with
their spread; the ratio compares rounds taken in the same run.

Usage: python bench/sessions.py [--sessions 10000] [--sources 100] [--rounds 5]
                                [--requests 200] [--max-sessions 12000] [--write]
``--write`` records the figures in docs/benchmarks.md (section "Sessions").
Diagnostics of the listener: ``SESSIONS_BENCH_PROFILE=PATH`` (cProfile) and
``SESSIONS_BENCH_TRACEMALLOC=PATH`` (with ``PYTHONTRACEMALLOC=8``: the largest
allocation sites at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from results_store import cpu_seconds  # noqa: E402

REQ_TARGET = b"/_matrix/client/versions"
VERSIONS = b'{"versions":["v1.11","v1.12"],"unstable_features":{}}'


# -- the listener (child process) ---------------------------------------------------


async def _listener(port: int, max_sessions: int) -> None:
    from synapse_coap.mapping.dispatch import PeerInfo
    from synapse_coap.mapping.messages import HttpRequest, HttpResponse
    from synapse_coap.noise.endpoint import NoiseLimits
    from synapse_coap.noise.keys import generate_private_key, public_key
    from synapse_coap.transport.server import CoapServer, ServerConfig

    class Versions:
        async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
            return HttpResponse(200, (("content-type", "application/json"),), VERSIONS)

    key = generate_private_key()
    server = await CoapServer.start(
        ServerConfig(
            listen=(("127.0.0.1", port),),
            static_key=key,
            limits=NoiseLimits(max_sessions=max_sessions),
            server_name="bench.test",
        ),
        Versions(),
    )
    port = server.secure_addresses[0][1]

    def trim() -> None:  # SIGUSR1: collect, and give freed heap pages back (for VmRSS)
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, trim)
    trim()
    print(f"READY {port} {public_key(key).hex()}", flush=True)
    # stdin closes when the bench is done
    await loop.run_in_executor(None, sys.stdin.read)
    if os.environ.get("SESSIONS_BENCH_TRACEMALLOC"):
        import tracemalloc

        snap = tracemalloc.take_snapshot()
        groups: dict[str, list[int]] = {}
        for stat in snap.statistics("traceback"):
            frames = list(stat.traceback)
            ours = [f for f in frames if "synapse_coap" in f.filename]
            where = ours[-1] if ours else frames[-1]
            inner = frames[-1]
            key = f"{where.filename}:{where.lineno} <- {inner.filename}:{inner.lineno}"
            g = groups.setdefault(key, [0, 0])
            g[0] += stat.size
            g[1] += stat.count
        with open(os.environ["SESSIONS_BENCH_TRACEMALLOC"], "w") as f:
            for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:40]:
                f.write(f"{size / 1024:8.0f} KiB {count:7d} {key}\n")
    await server.close()


# -- measurements --------------------------------------------------------------------


async def settled_rss(pid: int) -> int:
    """The listener's VmRSS after it collected garbage and trimmed its heap."""
    os.kill(pid, signal.SIGUSR1)
    await asyncio.sleep(0.5)
    return rss_bytes(pid)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def latency_rounds(
    client: Any, endpoint: Any, rounds: int, n: int
) -> list[tuple[float, float]]:
    """(median ms, p99 ms) per round of ``n`` sequential requests."""
    from synapse_coap.mapping.messages import HttpRequest

    req = HttpRequest("GET", REQ_TARGET)
    out = []
    for _ in range(rounds):
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            resp = await client.request(endpoint, req)
            samples.append((time.perf_counter() - t0) * 1000)
            if resp.status != 200:
                raise RuntimeError(f"unexpected status {resp.status}")
        out.append((statistics.median(samples), pct(samples, 99)))
    return out


class _Source(asyncio.DatagramProtocol):
    """One source address: a UDP socket and a sans-I/O NoiseEndpoint of initiators."""

    def __init__(self, bench: _Opener, host: str) -> None:
        from synapse_coap.noise.endpoint import NoiseEndpoint
        from synapse_coap.noise.keys import generate_private_key
        from synapse_coap.noise.trust import TrustPolicy

        self.bench = bench
        self.host = host
        loop = asyncio.get_running_loop()
        self.endpoint = NoiseEndpoint(generate_private_key(), trust=TrustPolicy(), clock=loop.time)
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[int] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.process(self.endpoint.datagram_received(data, (addr[0], addr[1])))

    def process(self, events: list[Any]) -> None:
        from synapse_coap.noise.events import (
            ChannelEstablished,
            HandshakeFailed,
            Received,
            Transmit,
        )

        for ev in events:
            if isinstance(ev, Transmit):
                assert self.transport is not None
                self.transport.sendto(ev.data, ev.addr)
            elif isinstance(ev, ChannelEstablished):
                self.bench.established += 1
                if not self.bench.requests and ev.channel in self.pending:
                    self.pending.discard(ev.channel)
                    self.bench.answered += 1
                    self.bench.slots.release()
            elif isinstance(ev, Received):
                if ev.channel in self.pending:
                    self.pending.discard(ev.channel)
                    self.bench.answered += 1
                    self.bench.slots.release()
            elif isinstance(ev, HandshakeFailed):
                self.bench.failed += 1
                if ev.channel in self.pending:
                    self.pending.discard(ev.channel)
                    self.bench.slots.release()

    def open(self, addr: tuple[str, int], server_key: bytes, early: bytes | None) -> None:
        cid, events = self.endpoint.connect(
            addr, peer_name="bench.test", peer_static=server_key, early_data=early
        )
        self.pending.add(cid)
        self.process(events)


class _Opener:
    def __init__(self, window: int, requests: bool) -> None:
        self.requests = requests
        self.slots = asyncio.Semaphore(window)
        self.established = 0
        self.answered = 0
        self.failed = 0


def early_request(i: int) -> bytes:
    from aiocoap.numbers.types import Type

    from synapse_coap.mapping.messages import HttpRequest
    from synapse_coap.transport.convert import default_codec_factory, to_aiocoap
    from synapse_coap.wire.context import WireContext

    cm = default_codec_factory(0, WireContext()).encode_request(HttpRequest("GET", REQ_TARGET))
    msg = to_aiocoap(cm)
    msg.mtype = Type.CON
    msg.mid = i & 0xFFFF
    msg.token = i.to_bytes(4, "big")
    return bytes(msg.encode())


async def open_sessions(
    port: int, server_key: bytes, n: int, sources: int, window: int, requests: bool = True
) -> tuple[_Opener, list[_Source], float]:
    loop = asyncio.get_running_loop()
    opener = _Opener(window, requests)
    srcs: list[_Source] = []
    for k in range(sources):
        host = f"127.1.{k // 250}.{k % 250 + 1}"
        src = _Source(opener, host)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, 0))
        await loop.create_datagram_endpoint(lambda src=src: src, sock=sock)
        srcs.append(src)

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.05)
            for src in srcs:
                t = src.endpoint.next_timer()
                if t is not None and t <= loop.time():
                    src.process(src.endpoint.handle_timers())

    ticker = asyncio.create_task(tick())
    addr = ("127.0.0.1", port)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            await opener.slots.acquire()
            srcs[i % sources].open(addr, server_key, early_request(i) if requests else None)
        while opener.answered + opener.failed < n:
            await asyncio.sleep(0.01)
    finally:
        ticker.cancel()
    return opener, srcs, time.perf_counter() - t0


def _fmt_rounds(rounds: list[tuple[float, float]], idx: int) -> str:
    vals = [r[idx] for r in rounds]
    return f"{statistics.median(vals):.2f} ms (rounds {min(vals):.2f}-{max(vals):.2f})"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from synapse_coap.noise.keys import generate_private_key
    from synapse_coap.noise.trust import TrustPolicy
    from synapse_coap.transport.client import CoapClient, Endpoint

    child = subprocess.Popen(
        [sys.executable, __file__, "--listener", "--max-sessions", str(args.max_sessions)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError("listener did not start")
        port, server_key = int(line[1]), bytes.fromhex(line[2])
        client = await CoapClient.create(static_key=generate_private_key(), trust=TrustPolicy())
        endpoint = Endpoint("127.0.0.1", port, "bench.test", static_key=server_key)
        try:
            await latency_rounds(client, endpoint, 1, 50)  # warm up
            one = await latency_rounds(client, endpoint, args.rounds, args.requests)
            rss0 = await settled_rss(child.pid)
            cpu0 = cpu_seconds(child.pid)
            opener, srcs, elapsed = await open_sessions(
                port, server_key, args.sessions, args.sources, args.window, not args.no_request
            )
            cpu1 = cpu_seconds(child.pid)
            await asyncio.sleep(1.0)
            rss1 = await settled_rss(child.pid)
            many = await latency_rounds(client, endpoint, args.rounds, args.requests)
            rss2 = await settled_rss(child.pid)
        finally:
            await client.close()
        for src in srcs:
            if src.transport is not None:
                src.transport.close()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(120)
        except subprocess.TimeoutExpired:
            child.kill()
    ok = opener.answered
    return {
        "sessions": args.sessions,
        "what": "handshake only" if args.no_request else "0-RTT request each",
        "opened": ok,
        "failed": opener.failed,
        "sources": args.sources,
        "handshakes_per_s": ok / elapsed,
        "cpu_ms_per_handshake": (cpu1 - cpu0) * 1000 / max(1, ok),
        "rss_before": rss0,
        "rss_after": max(rss1, rss2),
        "per_session": (max(rss1, rss2) - rss0) / max(1, ok),
        "one": one,
        "many": many,
        "p99_ratio": statistics.median(r[1] for r in many) / statistics.median(r[1] for r in one),
        "median_ratio": statistics.median(r[0] for r in many)
        / statistics.median(r[0] for r in one),
        "rounds": args.rounds,
        "requests": args.requests,
    }


def report(r: dict[str, Any]) -> str:
    n = r["sessions"]
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| sessions opened (IK, {r['what']}) | {r['opened']:,} of {n:,} "
        f"({r['failed']} failed), from {r['sources']} source addresses |",
        f"| handshakes per second (both ends on one shared 2-core machine) | "
        f"{r['handshakes_per_s']:,.0f} |",
        f"| listener CPU per handshake + first request | {r['cpu_ms_per_handshake']:.2f} ms |",
        f"| listener RSS before / after | {r['rss_before'] / 2**20:.1f} MiB / "
        f"{r['rss_after'] / 2**20:.1f} MiB |",
        f"| listener memory for the sessions | {(r['rss_after'] - r['rss_before']) / 2**20:.1f}"
        f" MiB, **{r['per_session'] / 1024:.2f} KiB per session** |",
        f"| request latency, one session: median / p99 | {_fmt_rounds(r['one'], 0)} / "
        f"{_fmt_rounds(r['one'], 1)} |",
        f"| request latency, {n:,} idle sessions: median / p99 | "
        f"{_fmt_rounds(r['many'], 0)} / {_fmt_rounds(r['many'], 1)} |",
        f"| ratio {n:,} idle / one session: median / p99 | {r['median_ratio']:.2f}x / "
        f"**{r['p99_ratio']:.2f}x** |",
    ]
    foot = (
        f"\n{r['rounds']} rounds of {r['requests']} sequential requests each, before and after "
        "the sessions were opened; figures are the median over rounds (spread in brackets)."
    )
    return "\n".join(lines) + foot


def write_doc(text: str, handshake_only: bool) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text()
    tag = "sessions-handshake-only" if handshake_only else "sessions"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = f"{begin}\n<!-- written by bench/sessions.py --write; do not edit by hand -->\n{text}\n{end}"
    if begin in doc:
        head, rest = doc.split(begin, 1)
        tail = rest.split(end, 1)[1]
        doc = head + block + tail
    else:
        title = (
            "### The session layer alone: handshakes, no request"
            if handshake_only
            else "## Sessions: 10,000 on one listener"
        )
        doc = doc.rstrip("\n") + f"\n\n{title}\n\n" + block + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--sources", type=int, default=100, help="source addresses (127.1.x.y)")
    ap.add_argument("--window", type=int, default=64, help="handshakes in flight at most")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="requests per latency round")
    ap.add_argument("--max-sessions", type=int, default=12_000, help="the listener's limit")
    ap.add_argument(
        "--no-request",
        action="store_true",
        help="handshakes only (no 0-RTT request): the session layer's own cost",
    )
    ap.add_argument("--write", action="store_true", help="record in docs/benchmarks.md")
    ap.add_argument("--listener", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.listener:
        profile = os.environ.get("SESSIONS_BENCH_PROFILE")
        if profile:  # cProfile of the listener, written to that path on exit
            import cProfile

            cProfile.runctx(
                "asyncio.run(_listener(0, n))", globals(), {"n": args.max_sessions}, profile
            )
        else:
            asyncio.run(_listener(0, args.max_sessions))
        return 0
    r = asyncio.run(run(args))
    text = report(r)
    print(text)
    if args.write:
        write_doc(text, args.no_request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
