#!/usr/bin/env python3
"""Session-layer benchmark: handshake time, exchanges/s (Noise vs plain CoAP), datagram bytes.

Runs a CoapServer and CoapClients over loopback UDP in one process (no Synapse):

* handshake time: XX (first contact) and IK (known key, request as 0-RTT)
  measured as time-to-first-response of a fresh client, and the CPU cost of
  each handshake (two sans-I/O NoiseEndpoints, no sockets, ``time.process_time``);
* exchanges per second: sequential GETs on a warm session, Noise and plain
  CoAP measured side by side in the same run (interleaved rounds), with the
  ratio taken round by round;
* the exact size of every kind of datagram (handshake messages, data record
  overhead, empty ACK) as seen on the wire (UDP payload bytes).

Every sample goes to ``bench/results/session.csv`` (one row per sample, with the
command, commit, machine and time of the run as ``# key: value`` lines), and
the README's session block is rendered from that file only: time figures as
median, min and max of n >= 5 samples.

Usage::

    python bench/session.py [--exchanges N] [--rounds R] [--readme]
    python bench/session.py --render     # rewrite the README block from the CSV, no run
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_store import (  # noqa: E402
    provenance,
    read_dict_rows,
    replace_block,
    write_dict_rows,
)

from synapse_coap.mapping.dispatch import PeerInfo  # noqa: E402
from synapse_coap.mapping.messages import HttpRequest, HttpResponse  # noqa: E402
from synapse_coap.noise.endpoint import NoiseEndpoint  # noqa: E402
from synapse_coap.noise.events import ChannelEstablished, Transmit  # noqa: E402
from synapse_coap.noise.keys import generate_private_key, public_key  # noqa: E402
from synapse_coap.noise.trust import MemoryTrustStore, TrustPolicy  # noqa: E402
from synapse_coap.transport.client import CoapClient, Endpoint  # noqa: E402
from synapse_coap.transport.link import LinkParameters  # noqa: E402
from synapse_coap.transport.metrics import CountingMetrics  # noqa: E402
from synapse_coap.transport.server import CoapServer, ServerConfig  # noqa: E402

RESULTS_CSV = ROOT / "bench" / "results" / "session.csv"
README = ROOT / "README.md"
WRITER = "bench/session.py from bench/results/session.csv"
MIN_ROUNDS = 5

#: measure id -> (label in the README, unit); the order is the README's
MEASURES: dict[str, tuple[str, str]] = {
    "xx_msg1": ("XX first contact: message 1", "B"),
    "xx_msg2": ("XX first contact: message 2", "B"),
    "xx_msg3": ("XX first contact: message 3 (carries the GET)", "B"),
    "ik_msg1": ("IK message 1 with a 0-RTT GET", "B"),
    "ik_reply": ("IK reply (message 2 + the response)", "B"),
    "ik_reply_datagrams": ("IK reply datagrams", "datagrams"),
    "get_record": ("GET /versions request record, warm session", "B"),
    "get_plain": ("the same GET as plain CoAP", "B"),
    "record_overhead": ("data record overhead (record - CoAP message)", "B"),
    "response_record": ("response record (piggybacked ACK, 2.05 + JSON)", "B"),
    "empty_ack": ("empty ACK record (slow handler)", "B"),
    "xx_first_ms": ("XX first contact: time to first response", "ms"),
    "ik_first_ms": ("IK + 0-RTT GET: time to first response", "ms"),
    "xx_cpu_ms": ("XX handshake CPU, both sides", "ms"),
    "ik_cpu_ms": ("IK handshake CPU, both sides", "ms"),
    "noise_rate": ("sequential exchanges per second, Noise", "1/s"),
    "plain_rate": ("sequential exchanges per second, plain CoAP", "1/s"),
    "rate_ratio": ("exchanges per second, Noise / plain (per round)", "ratio"),
}

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


def one_handshake(mode: str, skey: bytes, ckey: bytes) -> None:
    """One complete XX or IK handshake between two sans-I/O endpoints (timers advanced at once)."""
    clock = _Clock()
    server = NoiseEndpoint(skey, trust=TrustPolicy(accept_any_initiator=True), clock=clock)
    store = MemoryTrustStore({"s": public_key(skey)} if mode == "IK" else {})
    client = NoiseEndpoint(ckey, trust=TrustPolicy(store=store), clock=clock)
    _ch, events = client.connect(("::1", 1), peer_name="s", peer_static=None)
    for _hop in range(12):
        nxt: list[Any] = []
        for ev in events:
            if isinstance(ev, Transmit):
                target = server if ev.addr == ("::1", 1) else client
                src = ("::1", 2) if target is server else ("::1", 1)
                nxt += target.datagram_received(ev.data, src)
            elif isinstance(ev, ChannelEstablished) and ev.initiator:
                return
        if not nxt:
            timers = [t for t in (server.next_timer(), client.next_timer()) if t is not None]
            if not timers:
                break
            clock.t = min(timers)
            nxt = server.handle_timers() + client.handle_timers()
        events = nxt
    raise RuntimeError(f"{mode} handshake did not complete")


def handshake_cpu(rounds: int, per_round: int) -> dict[str, list[float]]:
    """CPU milliseconds per complete handshake, both sides, no I/O: one sample per round
    (the mean of ``per_round`` handshakes), XX and IK taking turns."""
    out: dict[str, list[float]] = {"XX": [], "IK": []}
    skey, ckey = generate_private_key(), generate_private_key()
    for _ in range(rounds):
        for mode in ("XX", "IK"):
            t0 = time.process_time()
            for _ in range(per_round):
                one_handshake(mode, skey, ckey)
            out[mode].append((time.process_time() - t0) * 1000 / per_round)
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


async def measure(exchanges: int, rounds: int, handshakes: int) -> list[dict[str, Any]]:
    """Every sample of the run, as rows ``{measure, unit, sample, value}``."""
    samples: dict[str, list[float]] = {k: [] for k in MEASURES}
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
    try:
        # --- handshakes over loopback: time to the first response, and their datagrams
        for _ in range(rounds):
            store = MemoryTrustStore()
            t, xx = await first_response(server, store)
            samples["xx_first_ms"].append(t)
            t, ik = await first_response(server, store)
            samples["ik_first_ms"].append(t)
            xx_out = xx.sizes.get(("out", "handshake"), [])
            xx_in = xx.sizes.get(("in", "handshake"), [])
            ik_out = ik.sizes.get(("out", "handshake"), [])
            ik_in = ik.sizes.get(("in", "handshake"), []) + ik.sizes.get(("in", "record"), [])
            if len(xx_out) < 2 or not xx_in or not ik_out or not ik_in:
                raise RuntimeError(f"unexpected handshake datagrams: {xx.sizes} / {ik.sizes}")
            samples["xx_msg1"].append(xx_out[0])
            samples["xx_msg2"].append(xx_in[0])
            samples["xx_msg3"].append(xx_out[1])
            samples["ik_msg1"].append(ik_out[0])
            samples["ik_reply"].append(sum(ik_in))
            samples["ik_reply_datagrams"].append(len(ik_in))
        cpu = handshake_cpu(rounds, handshakes)
        samples["xx_cpu_ms"] = cpu["XX"]
        samples["ik_cpu_ms"] = cpu["IK"]
        # --- warm session: record overhead and an empty ACK
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
            samples["get_record"].append(req_record)
            samples["get_plain"].append(coap_len)
            samples["record_overhead"].append(req_record - coap_len)
            samples["response_record"].append(resp_record)
            if slow_in:
                samples["empty_ack"].append(min(slow_in))
            # --- exchanges per second, interleaved rounds
            per_round = max(1, exchanges // rounds)
            for _round in range(rounds):
                rate: dict[str, float] = {}
                for name, endpoint in (("noise_rate", secure), ("plain_rate", plain)):
                    t0 = time.perf_counter()
                    for _ in range(per_round):
                        await client.request(endpoint, REQ)
                    rate[name] = per_round / (time.perf_counter() - t0)
                    samples[name].append(rate[name])
                samples["rate_ratio"].append(rate["noise_rate"] / rate["plain_rate"])
        finally:
            await client.close()
    finally:
        await server.close()
    return [
        {"measure": key, "unit": MEASURES[key][1], "sample": i, "value": round(v, 4)}
        for key, values in samples.items()
        for i, v in enumerate(values)
    ]


async def plain_request_size(server: CoapServer, client: CoapClient, plain: Endpoint) -> int:
    """Bytes of the plain CoAP datagram for REQ, as received by the server."""
    metrics: Any = server.metrics
    before = len(metrics.sizes.get(("in", "plain"), [])) if hasattr(metrics, "sizes") else 0
    await client.request(plain, REQ)
    sizes = metrics.sizes.get(("in", "plain"), []) if hasattr(metrics, "sizes") else []
    return int(sizes[before]) if len(sizes) > before else -1


def _by_measure(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(str(r["measure"]), []).append(float(r["value"]))
    return out


def _fmt(v: float, unit: str) -> str:
    if unit in ("B", "datagrams"):
        return f"{v:,.0f}"
    if unit == "1/s":
        return f"{v:,.0f}"
    if unit == "ratio":
        return f"{v:.2f}"
    return f"{v:.2f}"


def readme_block(
    meta: dict[str, str], rows: Sequence[dict[str, Any]], source: str = "bench/results/session.csv"
) -> str:
    """The README's session block, from the rows and provenance of one run only."""
    values = _by_measure(rows)
    sizes = [k for k, (_l, u) in MEASURES.items() if u in ("B", "datagrams") and k in values]
    timed = [k for k, (_l, u) in MEASURES.items() if u not in ("B", "datagrams") and k in values]
    lines = [
        "Datagrams as UDP payload bytes; a size that varied between samples shows "
        "median (min-max).",
        "",
        "| datagram | size | n |",
        "|---|--:|--:|",
    ]
    for k in sizes:
        label, unit = MEASURES[k]
        v = values[k]
        shown = _fmt(v[0], unit)
        if min(v) != max(v):
            shown = (
                f"{_fmt(statistics.median(v), unit)} ({_fmt(min(v), unit)}-{_fmt(max(v), unit)})"
            )
        lines.append(f"| {label} | {shown}{'' if unit == 'datagrams' else ' B'} | {len(v)} |")
    lines += [
        "",
        "Loopback, client and server in one process; each time figure is the median, "
        "min and max of n samples (time to first response: one fresh client each; "
        "handshake CPU: the mean of a batch each; exchanges: one round of sequential "
        "GETs each, the two listeners taking turns).",
        "",
        "| measure | unit | median | min | max | n |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for k in timed:
        label, unit = MEASURES[k]
        v = values[k]
        if len(v) < MIN_ROUNDS:
            raise SystemExit(f"{k}: {len(v)} samples, fewer than {MIN_ROUNDS}")
        lines.append(
            f"| {label} | {unit} | {_fmt(statistics.median(v), unit)} | "
            f"{_fmt(min(v), unit)} | {_fmt(max(v), unit)} | {len(v)} |"
        )
    lines += [
        "",
        f"_`{meta.get('command', '?')}`, commit `{meta.get('commit', '?')}`, "
        f"{meta.get('time', '?')}, {meta.get('machine', '?')}, Python "
        f"{meta.get('python', '?')}"
        + (f" ({meta['note']})" if meta.get("note") else "")
        + f"; every sample in `{source}`._",
    ]
    return "\n".join(lines)


def render(path: Path) -> None:
    meta, rows = read_dict_rows(path)
    source = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    replace_block(README, "session", readme_block(meta, rows, str(source)), WRITER)
    print(f"updated {README} from {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--exchanges", type=int, default=1000, help="GETs per listener, over all rounds"
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help=f"samples of each time figure (>= {MIN_ROUNDS})"
    )
    parser.add_argument(
        "--handshakes", type=int, default=40, help="handshakes per CPU sample (per round)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS_CSV, help="the results CSV")
    parser.add_argument(
        "--readme", action="store_true", help="rewrite the README's block after the run"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the README's block from --results"
    )
    args = parser.parse_args(argv)
    results: Path = args.results.resolve()
    if args.render:
        render(results)
        return 0
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    meta = provenance("python bench/session.py " + " ".join(sys.argv[1:] if argv is None else argv))
    meta["note"] = "one process on loopback; the machine may be shared with other work"
    rows = asyncio.run(measure(args.exchanges, args.rounds, args.handshakes))
    values = _by_measure(rows)
    width = max(len(label) for label, _u in MEASURES.values())
    for k, (label, unit) in MEASURES.items():
        v = values.get(k, [])
        if v:
            print(
                f"{label:<{width}} {_fmt(statistics.median(v), unit):>9} {unit:<9} "
                f"(min {_fmt(min(v), unit)}, max {_fmt(max(v), unit)}, n {len(v)})"
            )
    write_dict_rows(results, rows, meta)
    print(f"wrote {results}")
    if args.readme:
        render(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
