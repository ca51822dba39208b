#!/usr/bin/env python3
"""Bytes per client action: HTTP between client and sidecar vs CoAP+Noise on the link.

Runs a real stock Synapse (HTTP listener, no module) behind an in-process
gateway, or a Synapse loading the module (``--module``), and an in-process
sidecar in front of it. An unmodified matrix-nio client does each action; for
each one the table shows

- HTTP bytes: TCP payload bytes the client exchanged with the sidecar (request
  line, headers and bodies, both directions), counted by a byte-counting TCP
  relay between nio and the sidecar;
- CoAP bytes: UDP payload bytes the sidecar's CoAP client sent and received
  (Noise records and handshakes), from the transport's metrics hook.

Usage: .venv/bin/python bench/sidecar_bytes.py [--module] [--runs N]
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import nio

from synapse_coap.noise.keys import generate_private_key, public_key, write_key_file
from synapse_coap.proxy.runner import (
    GatewayConfig,
    HomeserverAddress,
    SidecarConfig,
    start_gateway,
    start_sidecar,
)
from synapse_coap.proxy.sidecar import SidecarOptions
from synapse_coap.transport.metrics import CountingMetrics
from tests.harness.synapse_proc import SynapseProcess, free_port


class CountingRelay:
    """A TCP relay 127.0.0.1:port -> target that counts payload bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = 0
        self.down = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.target)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await r.read(65536):
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(reader, uw, True), pump(ur, writer, False))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def coap_total(m: CountingMetrics) -> Counter[str]:
    out: Counter[str] = Counter()
    for (direction, kind), size in m.bytes.items():
        out[direction] += size
        out[f"{direction}:{kind}"] += size
    out["datagrams"] = sum(m.datagrams.values())
    return out


async def bench(module: bool, workdir: Path) -> list[tuple[str, int, int, int, int, int]]:
    coap_port = free_port("udp")
    key_path = workdir / "server.key"
    private = generate_private_key()
    write_key_file(key_path, private)
    pub = public_key(private)
    gateway = None
    if module:
        syn = SynapseProcess(
            workdir / "hs",
            "hs.test",
            modules=[
                {
                    "module": "synapse_coap.CoapModule",
                    "config": {
                        "listen": [f"127.0.0.1:{coap_port}"],
                        "private_key_path": str(key_path),
                    },
                }
            ],
        )
    else:
        syn = SynapseProcess(workdir / "hs", "hs.test", http_port=free_port())
    syn.start()
    rows: list[tuple[str, int, int, int, int, int]] = []
    try:
        if not module:
            gateway = await start_gateway(
                GatewayConfig(
                    listen=(("127.0.0.1", coap_port),),
                    http_target=syn.base_url,
                    key_path=key_path,
                    server_name="hs.test",
                )
            )
        metrics = CountingMetrics()
        sidecar = await start_sidecar(
            SidecarConfig(
                listen=("127.0.0.1", 0),
                homeserver=HomeserverAddress("127.0.0.1", coap_port, True),
                server_key=pub,
                state_dir=workdir / "state",
                server_name="hs.test",
                options=SidecarOptions(cache=False),
            ),
            metrics=metrics,
        )
        relay = CountingRelay(sidecar.address)
        url = f"http://127.0.0.1:{await relay.start()}"
        # bob talks to the homeserver through his own sidecar (not measured)
        bob_sidecar = await start_sidecar(
            SidecarConfig(
                listen=("127.0.0.1", 0),
                homeserver=HomeserverAddress("127.0.0.1", coap_port, True),
                server_key=pub,
                state_dir=workdir / "state-bob",
                server_name="hs.test",
            )
        )
        bob_url = f"http://127.0.0.1:{bob_sidecar.address[1]}"

        async def versions(base: str) -> None:
            async with (
                aiohttp.ClientSession() as http,
                http.get(base + "/_matrix/client/versions") as r,
            ):
                await r.read()

        await versions(bob_url)
        bob = nio.AsyncClient(bob_url, "bob")
        await bob.register("bob", "bob-password")

        alice = nio.AsyncClient(url, "alice")

        async def measure(name: str, action: Any) -> None:
            h0 = (relay.up, relay.down)
            c0 = coap_total(metrics)
            await action()
            await asyncio.sleep(0.2)
            c1 = coap_total(metrics)
            rows.append(
                (
                    name,
                    relay.up - h0[0],
                    relay.down - h0[1],
                    c1["out"] - c0["out"],
                    c1["in"] - c0["in"],
                    (c1["out:handshake"] + c1["in:handshake"])
                    - (c0["out:handshake"] + c0["in:handshake"]),
                )
            )

        await measure("GET /versions (first contact)", lambda: versions(url))
        setup = nio.AsyncClient(url, "alice")
        await setup.register("alice", "alice-password")
        room = await setup.room_create(invite=[bob.user_id])
        room_id = room.room_id
        await bob.join(room_id)
        await setup.close()
        await measure("login (password)", lambda: alice.login("alice-password"))
        await measure("initial sync", lambda: alice.sync(timeout=0, full_state=True))
        await measure(
            "send message",
            lambda: alice.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "hello over CoAP"}
            ),
        )
        await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi alice"})
        await measure("receive via sync (1 message)", lambda: alice.sync(timeout=0))
        await measure("empty sync", lambda: alice.sync(timeout=0))
        await alice.close()
        await bob.close()
        await relay.close()
        await sidecar.close()
        await bob_sidecar.close()
    finally:
        if gateway is not None:
            await gateway.close()
        syn.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module", action="store_true", help="Synapse loads the module (else: gateway)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-bytes-") as tmp:
        rows = asyncio.run(bench(args.module, Path(tmp)))
    via = "module" if args.module else "gateway -> stock Synapse"
    print(f"Bytes per client action (matrix-nio -> sidecar -> CoAP+Noise -> {via})")
    print(
        f"{'action':<32} {'HTTP up':>8} {'HTTP down':>10} {'HTTP total':>11} "
        f"{'CoAP up':>8} {'CoAP down':>10} {'CoAP total':>11} {'handshake':>10} {'ratio':>6}"
    )
    for name, hu, hd, cu, cd, hs in rows:
        ratio = (hu + hd) / (cu + cd) if cu + cd else float("inf")
        print(
            f"{name:<32} {hu:>8} {hd:>10} {hu + hd:>11} {cu:>8} {cd:>10} {cu + cd:>11} {hs:>10} {ratio:>5.1f}x"
        )
    print("HTTP = TCP payload between client and sidecar (no TLS); CoAP = UDP payload on the link.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
