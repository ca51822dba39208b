#!/usr/bin/env python3
"""Inbound throughput: the module's CoAP listener vs Synapse's own HTTP listener.

Starts one real Synapse (SQLite, temp dir, loopback only) that has both an
HTTP listener and the CoAP module, registers a user, then for each endpoint
runs the same number of requests at the same concurrency through

* CoAP + Noise: the transport's CoapClient (one Noise session, multiplexed),
* plain CoAP (the module's loopback plain listener),
* HTTP/1.1: aiohttp with keep-alive (one connection per concurrent worker),

and prints requests per second side by side, with the CoAP/HTTP ratio.
Both paths end in the same servlets of the same process, so the difference is
the listener: UDP + Noise + CoAP + the asyncio<->Twisted bridge against
Twisted's HTTP channel.

Usage::

    python bench/inbound.py [--requests 300] [--concurrency 8] [--nstart N] [--max-nstart M]
                            [--asyncio-reactor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synapse_coap.mapping.messages import HttpRequest
from tests.harness.synapse_proc import SynapseProcess, free_port

SERVER_NAME = "bench.test"

ENDPOINTS: list[tuple[str, str, bool]] = [
    # (label, target, needs the access token)
    ("client versions", "/_matrix/client/versions", False),
    ("federation version", "/_matrix/federation/v1/version", False),
    ("server keys", "/_matrix/key/v2/server", False),
    ("whoami (auth)", "/_matrix/client/v3/account/whoami", True),
]


async def measure(n: int, concurrency: int, one: Callable[[], Awaitable[int]]) -> float:
    """Requests per second for ``n`` calls of ``one`` with ``concurrency`` in flight."""
    for _ in range(min(5, n)):  # warm-up (sessions, caches)
        await one()
    remaining = n
    errors = 0

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            if await one() != 200:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if errors:
        print(f"  warning: {errors} non-200 responses", file=sys.stderr)
    return n / elapsed


async def measure_or_nan(
    args: argparse.Namespace, one: Callable[[], Awaitable[int]], what: str
) -> float:
    try:
        return await measure(args.requests, args.concurrency, one)
    except Exception as e:
        print(f"  {what} failed: {e!r}", file=sys.stderr)
        return float("nan")


async def run(args: argparse.Namespace) -> None:
    import aiohttp

    from synapse_coap.noise.keys import generate_private_key, public_key, read_key_file
    from synapse_coap.noise.trust import TrustPolicy
    from synapse_coap.transport.client import CoapClient, Endpoint

    workdir = Path(tempfile.mkdtemp(prefix="bench-inbound-"))
    http_port, coap_port, plain_port = free_port(), free_port("udp"), free_port("udp")
    key_path = workdir / "coap.key"
    proc = SynapseProcess(
        workdir,
        SERVER_NAME,
        http_port=http_port,
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [f"127.0.0.1:{coap_port}"],
                    "plain_listen": [f"127.0.0.1:{plain_port}"],
                    "private_key_path": str(key_path),
                },
            }
        ],
        env={"SYNAPSE_ASYNC_IO_REACTOR": "1"} if args.asyncio_reactor else {},
    )
    proc.start(ready_log_pattern=r"CoAP listener ready")
    try:
        server_key = public_key(read_key_file(key_path))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency)
        ) as http:
            reg = await http.post(
                f"{proc.base_url}/_matrix/client/v3/register",
                json={
                    "username": "bench",
                    "password": "bench-password",
                    "auth": {"type": "m.login.dummy"},
                },
            )
            token = (await reg.json())["access_token"]

            from synapse_coap.transport.link import LinkParameters

            link = LinkParameters(nstart=args.nstart, max_nstart=args.max_nstart)
            coap = await CoapClient.create(
                link=link,
                static_key=generate_private_key(),
                trust=TrustPolicy(pinned={SERVER_NAME: server_key}),
                bind=("127.0.0.1", 0),
            )
            plain = await CoapClient.create(
                link=link, static_key=None, trust=TrustPolicy(), bind=("127.0.0.1", 0)
            )
            secure_ep = Endpoint("127.0.0.1", coap_port, SERVER_NAME, server_key, True)
            plain_ep = Endpoint("127.0.0.1", plain_port, SERVER_NAME, None, False)
            rows: list[tuple[str, float, float, float]] = []
            try:
                for label, target, auth in ENDPOINTS:
                    headers: tuple[tuple[str, str], ...] = (
                        (("authorization", f"Bearer {token}"),) if auth else ()
                    )

                    async def via_coap(
                        client: Any = coap,
                        ep: Any = secure_ep,
                        target: str = target,
                        headers: Any = headers,
                    ) -> int:
                        r = await client.request(ep, HttpRequest("GET", target.encode(), headers))
                        return int(r.status)

                    async def via_plain() -> int:
                        return await via_coap(plain, plain_ep)

                    async def via_http(target: str = target, headers: Any = headers) -> int:
                        async with http.get(proc.base_url + target, headers=dict(headers)) as r:
                            await r.read()
                            return r.status

                    noise_rps = await measure_or_nan(args, via_coap, f"{label} over CoAP+Noise")
                    plain_rps = await measure_or_nan(args, via_plain, f"{label} over plain CoAP")
                    http_rps = await measure_or_nan(args, via_http, f"{label} over HTTP")
                    rows.append((label, noise_rps, plain_rps, http_rps))
            finally:
                await coap.close()
                await plain.close()
    finally:
        proc.stop()

    mode = "asyncio (shared loop)" if args.asyncio_reactor else "default (loop in a thread)"
    nstart = (
        str(args.nstart)
        if args.max_nstart == args.nstart
        else f"{args.nstart}..{args.max_nstart} (adaptive)"
    )
    print(
        f"\nInbound requests/s, {args.requests} requests per cell, CoAP NSTART {nstart}, "
        f"concurrency {args.concurrency}, reactor {mode}"
    )
    print(f"{'endpoint':<22}{'CoAP+Noise':>12}{'plain CoAP':>12}{'HTTP/1.1':>12}{'Noise/HTTP':>12}")
    for label, noise_rps, plain_rps, http_rps in rows:
        print(
            f"{label:<22}{noise_rps:>12.0f}{plain_rps:>12.0f}{http_rps:>12.0f}"
            f"{noise_rps / http_rps:>11.2f}x"
        )
    if args.json:
        print(json.dumps({"rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--asyncio-reactor", action="store_true", help="run Synapse with SYNAPSE_ASYNC_IO_REACTOR=1"
    )
    parser.add_argument(
        "--nstart",
        type=int,
        default=None,
        help="the CoAP clients' NSTART (confirmable requests in flight per peer; RFC 7252: 1): "
        "sets link.nstart, the floor, and unless --max-nstart is given also link.max_nstart, "
        "the ceiling, so the window is fixed at N. Default: the concurrency, so CoAP gets as "
        "many requests in flight as HTTP gets connections (with 1, the workers queue behind "
        "each other and the table measures round-trip latency rather than the listener's "
        "throughput)",
    )
    parser.add_argument(
        "--max-nstart",
        type=int,
        default=None,
        help="link.max_nstart, the ceiling of the adaptive per-peer NSTART (default: the same "
        "as --nstart, i.e. fixed). E.g. --nstart 1 --max-nstart 4 measures the defaults' "
        "adaptive window (docs/link-tuning.md)",
    )
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON on stdout")
    args = parser.parse_args()
    if args.nstart is None:
        args.nstart = args.concurrency
    if args.max_nstart is None:
        args.max_nstart = args.nstart
    if args.max_nstart < args.nstart:
        parser.error("--max-nstart must not be below --nstart")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
