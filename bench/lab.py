#!/usr/bin/env python3
"""The constrained-link lab: Matrix over CoAP+Noise against stock HTTPS+JSON, same scenarios.

One command runs everything and writes the figures into docs/benchmarks.md::

    .venv/bin/python bench/lab.py            # the default run (about 20 minutes)
    .venv/bin/python bench/lab.py --full     # idle for 10 minutes, more sweep samples

Parts (``--suite``, repeatable; default: all of them):

- ``client``: log in, initial sync, send, receive, upload 10 KiB, idle with sync
  keep-alive. matrix-nio through the sidecar over CoAP+Noise through the relay
  at ``--profile``, and matrix-nio over HTTPS (TLS 1.3) to stock Synapse.
- ``federation``: first contact (key fetch, remote join), 1, 10 and 100
  messages, between two homeservers with the module and between two stock
  Synapses over HTTPS.
- ``deliver``: the must-show run: at 100 bit/s (``--deliver-profile``), a nio
  client sends a message through the sidecar, it crosses federation to the
  other homeserver and reaches bob; event id, every datagram, retransmissions.
- ``lossy``: at ``lossy`` (30% loss), N messages (``--lossy-messages``, 100)
  through the sidecar, all delivered exactly once and in order.
- ``sweep``: time to deliver a message against link rate (100 bit/s to 1
  Mbit/s) and against loss (0-40%), as PNG charts.

Bytes are counted at the IP level for both stacks (docs/benchmarks.md, docs/lab.md):
the relay's exact accounting for CoAP, a tshark capture on loopback for HTTPS.

Other uses::

    bench/lab.py --list
    bench/lab.py --suite client --profile 100bps --idle 60
    bench/lab.py --scenario udp-echo --profile 100bps     # relay self-test, no Matrix
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_scenarios.client import (
    CLIENT_SCENARIOS,
    CoapStack,
    Delivery,
    client_suite,
    deliver_messages,
    nginx_path,
)
from lab_scenarios.common import (
    STACKS,
    ScenarioResult,
    link_config,
    modelled_seconds,
    progress,
    round_trips,
    synapse_config,
)
from lab_scenarios.day import day_suite, day_table, idle_table
from lab_scenarios.federation import (
    FED_SCENARIOS,
    SlowDelivery,
    federation_suite,
    slow_federated_delivery,
)
from results_store import RESULTS, provenance, read_json, read_rows, write_json, write_rows

from synapse_coap.lab.model import PROFILES, LinkProfile, get_profile
from synapse_coap.lab.relay import Relay, RelayConfig
from synapse_coap_lab.capture import tshark_path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
README_START = (
    "<!-- lab-readme:start (written by bench/lab.py from bench/results/; do not edit by hand) -->"
)
README_END = "<!-- lab-readme:end -->"
#: the README's bandwidth table: (scenario, label), lan profile
README_ROWS = (
    ("login", "client login (fresh session)"),
    ("initial-sync", "initial sync"),
    ("send", "send a message"),
    ("receive", "receive a message (incremental sync)"),
    ("upload", "upload a 10 KiB PNG (incompressible)"),
    ("fed-first-contact", "federation: first contact + remote join"),
    ("fed-100", "federation: 100 messages"),
)
SHARED_NOTE = (
    "The machine (2 cores) was shared with other work during the run: byte counts are "
    "exact, times are noisy."
)
MARK_START = "<!-- lab-results:start (written by bench/lab.py; do not edit by hand) -->"
MARK_END = "<!-- lab-results:end -->"
SUITES = ("client", "federation", "deliver", "lossy", "sweep", "day")
#: what runs without --suite/--scenario ("day" takes an hour: asked for by name)
DEFAULT_SUITES = ("client", "federation", "deliver", "lossy", "sweep")

RATES = (100.0, 300.0, 1000.0, 9600.0, 64000.0, 1_000_000.0)
LOSSES = (0.0, 0.1, 0.2, 0.3, 0.4)

DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "login": ("client", "log in with a password (fresh connection/session)"),
    "initial-sync": ("client", "initial /sync (full state) of one room"),
    "send": ("client", "send one m.room.message and get its event id"),
    "receive": ("client", "receive one message by incremental long-poll /sync"),
    "upload": ("client", "upload a 10 KiB PNG"),
    "idle": ("client", "idle with sync keep-alive (--idle seconds; an hour with --full)"),
    "day": (
        "day",
        "log in, initial sync, 10 sent + 10 received over --day-seconds (an hour), idle "
        "otherwise; both stacks, with the ratio (--suite day)",
    ),
    "fed-first-contact": ("federation", "first contact: key fetch and a remote join"),
    "fed-1": ("federation", "one message delivered over federation"),
    "fed-10": ("federation", "10 messages over federation"),
    "fed-100": ("federation", "100 messages over federation, exactly once, in order"),
    "udp-echo": ("selftest", "80-byte request, 70-byte reply through the relay (no Matrix)"),
}


# -- the relay self-test ----------------------------------------------------------------------


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, reply_size: int) -> None:
        self.reply_size = reply_size
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(b"r" * self.reply_size, addr)


async def udp_echo(profile: LinkProfile, seed: int) -> ScenarioResult:
    """Stand-in for 'send a message' (coap-proxy's ~76 + ~70 bytes at the IP level)."""
    loop = asyncio.get_running_loop()
    server_t, _ = await loop.create_datagram_endpoint(
        lambda: _Echo(70 - 28), local_addr=("127.0.0.1", 0)
    )
    relay = await Relay.start(
        RelayConfig(
            listen=("127.0.0.1", 0),
            upstream=server_t.get_extra_info("sockname"),
            profile=profile,
            seed=seed,
            trace=True,
        )
    )
    got = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(loop.time())

    client_t, _ = await loop.create_datagram_endpoint(_Client, remote_addr=relay.address)
    start = loop.time()
    retransmissions = 0
    timeout = 2.0 + 2 * 8 * 200 / (profile.uplink.rate or 1e9) + 4 * profile.uplink.latency
    try:
        while True:
            client_t.sendto(b"q" * (80 - 28))
            try:
                done = await asyncio.wait_for(asyncio.shield(got), timeout)
                break
            except asyncio.TimeoutError:
                retransmissions += 1
                if retransmissions > 8:
                    done = float("nan")
                    break
        s = relay.stats
        return ScenarioResult(
            scenario="udp-echo",
            stack="coap",
            profile=profile.name,
            ip_bytes=s.uplink.transmitted_ip_bytes + s.downlink.transmitted_ip_bytes,
            packets=sum(
                d.offered_datagrams - d.queue_dropped_datagrams for d in (s.uplink, s.downlink)
            ),
            round_trips=round_trips(
                relay.model.uplink.trace or [], relay.model.downlink.trace or []
            ),
            seconds=done - start,
            retransmissions=retransmissions,
            ok=done == done,
        )
    finally:
        client_t.close()
        await relay.close()
        server_t.close()


# -- output --------------------------------------------------------------------------------------


def write_csv(results: Sequence[ScenarioResult], path: Path) -> None:
    fields = [f.name for f in attrs.fields(ScenarioResult)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow(attrs.asdict(r))


def _ratio(c: ScenarioResult | None, h: ScenarioResult | None) -> str:
    if c is None or h is None or not c.ok or not h.ok or c.ip_bytes <= 0:
        return "—"
    return f"{h.ip_bytes / c.ip_bytes:.1f}x"


def ratio_table(results: Sequence[ScenarioResult]) -> str:
    """A Markdown table per scenario and profile: bytes, packets, round trips and time for
    each stack (CoAP+Noise, stock HTTPS, HTTPS behind nginx), CoAP retransmissions, and the
    HTTPS/CoAP byte ratio for both HTTPS baselines."""
    rows = [
        "| scenario | profile | CoAP+Noise B | dgrams | RTs | s | retrans "
        "| HTTPS stock B | pkts | RTs | s | stock/CoAP "
        "| HTTPS nginx B | pkts | RTs | s | nginx/CoAP |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    keyed: dict[tuple[str, str], dict[str, ScenarioResult]] = {}
    for r in results:
        keyed.setdefault((r.scenario, r.profile), {})[r.stack] = r

    def cells(r: ScenarioResult | None, coap: bool) -> list[str]:
        if r is None:
            return ["—"] * (5 if coap else 4)
        if not r.ok and r.ip_bytes == 0:
            return ["failed"] + ["—"] * (4 if coap else 3)
        secs = f"{r.seconds:.2f}" + (" (model)" if r.time_method == "model" else "")
        rts = "—" if r.round_trips < 0 else str(r.round_trips)
        out = [f"{r.ip_bytes:,}" + ("" if r.ok else " (failed)"), str(r.packets), rts, secs]
        if coap:
            out.append(str(r.retransmissions))
        return out

    for (name, profile), by_stack in keyed.items():
        c, h, n = by_stack.get("coap"), by_stack.get("https"), by_stack.get("https-nginx")
        rows.append(
            "| "
            + " | ".join(
                [
                    name,
                    profile,
                    *cells(c, True),
                    *cells(h, False),
                    _ratio(c, h),
                    *cells(n, False),
                    _ratio(c, n),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bytes_per_transaction(results: Sequence[ScenarioResult], path: Path) -> None:
    plt = _pyplot()
    names: list[str] = []
    for r in results:
        if r.scenario not in names and r.scenario != "udp-echo":
            names.append(r.scenario)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    labels = {
        "coap": "CoAP+Noise (synapse-coap)",
        "https": "HTTPS+JSON (stock Synapse)",
        "https-nginx": "HTTPS+JSON (nginx: TLS 1.3, HTTP/2, gzip)",
    }
    for i, stack in enumerate(STACKS):
        values = [
            next((r.ip_bytes for r in results if r.scenario == n and r.stack == stack), 0)
            for n in names
        ]
        bars = ax.bar(
            [x + i * width for x in range(len(names))], values, width, label=labels[stack]
        )
        for b, v in zip(bars, values, strict=True):
            if v:
                ax.annotate(
                    f"{v:,}",
                    (b.get_x() + b.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks([x + width / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("bytes at the IP level (log)")
    ax.set_yscale("log")
    ax.set_title("Bytes per transaction (headers, handshakes and ACKs included)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_series(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", linestyle="--" if "model" in label else "-", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the sweeps ----------------------------------------------------------------------------------


@attrs.frozen
class SweepPoint:
    x: float
    mean_seconds: float
    samples: int
    retransmissions: int
    ip_bytes_per_message: float
    ok: bool
    median_seconds: float = float("nan")
    min_seconds: float = float("nan")
    max_seconds: float = float("nan")


def _rate_profile(rate: float) -> LinkProfile:
    return attrs.evolve(
        get_profile("lan").with_changes(rate=rate, latency=0.1), name=f"{rate:g}bps"
    )


def _loss_profile(loss: float) -> LinkProfile:
    return attrs.evolve(get_profile("lossy").with_changes(loss=loss), name=f"loss{loss:.0%}")


async def sweep(
    root: Path, seed: int, per_point: int, rates: Sequence[float], losses: Sequence[float]
) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """Time to deliver a message (alice's nio through the sidecar -> bob's /sync) against
    the link rate (100 ms one way, no loss) and against loss (9.6 kbit/s, 300 ms)."""
    profiles = [("rate", r, _rate_profile(r)) for r in rates] + [
        ("loss", loss, _loss_profile(loss)) for loss in losses
    ]
    stack = CoapStack(root / "sweep", profiles[0][2], seed)
    by_rate: list[SweepPoint] = []
    by_loss: list[SweepPoint] = []
    try:
        await stack.start()
        for kind, x, profile in profiles:
            if profile is not profiles[0][2]:
                await stack.reconfigure(profile)
            n = per_point
            progress(f"[sweep] {profile.name}: {profile.describe()}; {n} message(s)")
            try:
                d: Delivery = await deliver_messages(stack, n, f"sweep {profile.name} ")
                point = SweepPoint(
                    x,
                    sum(d.seconds) / len(d.seconds),
                    len(d.seconds),
                    d.retransmissions,
                    d.ip_bytes / max(1, d.sent),
                    d.in_order_exactly_once,
                    statistics.median(d.seconds),
                    min(d.seconds),
                    max(d.seconds),
                )
            except Exception as exc:
                progress(f"[sweep] {profile.name} FAILED: {type(exc).__name__}: {exc}")
                point = SweepPoint(x, float("nan"), 0, 0, 0.0, False)
            progress(
                f"[sweep] {profile.name}: median {point.median_seconds:.2f} s per message "
                f"({point.min_seconds:.2f}-{point.max_seconds:.2f}, n={point.samples}), "
                f"{point.ip_bytes_per_message:.0f} B/message, {point.retransmissions} retrans"
            )
            (by_rate if kind == "rate" else by_loss).append(point)
    finally:
        await stack.close()
        stack.kill()
    return by_rate, by_loss


# -- the run -------------------------------------------------------------------------------------


@attrs.frozen
class Run:
    results: tuple[ScenarioResult, ...] = ()
    deliver: SlowDelivery | None = None
    lossy: Delivery | None = None
    by_rate: tuple[SweepPoint, ...] = ()
    by_loss: tuple[SweepPoint, ...] = ()
    notes: tuple[str, ...] = ()


def _https_send(results: Sequence[ScenarioResult]) -> ScenarioResult | None:
    return next((r for r in results if r.scenario == "send" and r.stack == "https" and r.ok), None)


def charts(run: Run, out: Path) -> list[Path]:
    paths = []
    if run.results:
        p = out / "bytes-per-transaction.png"
        plot_bytes_per_transaction(run.results, p)
        paths.append(p)
    if run.by_rate:
        series = {
            "CoAP+Noise, measured (nio -> sidecar -> relay -> module -> bob)": [
                (p.x, p.mean_seconds) for p in run.by_rate if p.ok
            ]
        }
        h = _https_send(run.results)
        if h is not None:
            series["HTTPS, model from the measured send (lower bound)"] = [
                (
                    p.x,
                    modelled_seconds(_rate_profile(p.x), h.up_bytes, h.down_bytes, h.round_trips),
                )
                for p in run.by_rate
            ]
        p = out / "time-vs-rate.png"
        plot_series(
            series,
            p,
            xlabel="link rate (bit/s), 100 ms one way",
            ylabel="seconds to deliver one message",
            title="Time to deliver a message vs link rate (warm session)",
            logx=True,
            logy=True,
        )
        paths.append(p)
    if run.by_loss:
        p = out / "time-vs-loss.png"
        plot_series(
            {
                "CoAP+Noise, measured mean": [
                    (p.x * 100, p.mean_seconds) for p in run.by_loss if p.ok
                ]
            },
            p,
            xlabel="datagram loss each way (%)",
            ylabel="seconds to deliver one message",
            title="Time to deliver a message vs loss (9.6 kbit/s, 300 ms one way)",
        )
        paths.append(p)
    return paths


def _rate(rate: float) -> str:
    if rate >= 1_000_000:
        return f"{rate / 1_000_000:g} Mbit/s"
    if rate >= 1000:
        return f"{rate / 1000:g} kbit/s"
    return f"{rate:g} bit/s"


def report(run: Run) -> str:
    lines: list[str] = []
    if run.results:
        lines += [
            "Bytes at the IP level per transaction. CoAP: every datagram on the constrained "
            "link (relay accounting; the local nio <-> sidecar hop is not on the link). HTTPS: "
            "tshark capture on loopback (TCP and TLS handshakes, ACK-only segments included). "
            "RTs: round trips. s: completion time (CoAP measured through the relay at the "
            "profile; HTTPS measured on loopback at lan, else modelled as a lower bound). "
            "retrans: CoAP retransmissions (sidecar + homeservers). The s columns are one "
            "run of each scenario (a single sample, not a spread: byte counts are exact and "
            "repeatable, times on a shared machine are not); the sweep and lossy figures below "
            "give median, min and max over their messages.",
            "",
            ratio_table(run.results),
            "",
        ]
    if run.deliver is not None:
        lines += ["Must-show: one message at 100 bit/s, client -> sidecar -> federation -> client:"]
        lines += ["", "```", *run.deliver.lines(), "```", ""]
    if run.lossy is not None:
        d = run.lossy
        lines += [
            f"Must-show: {d.sent} messages at `{d.profile}` through the sidecar: "
            + (
                "**all delivered exactly once, in order**"
                if d.in_order_exactly_once
                else "**NOT all delivered exactly once in order**"
            )
            + f"; {d.ip_bytes:,} B in {d.packets} datagrams ({d.lost} lost by the link), "
            f"{d.retransmissions} retransmissions, "
            f"{d.client_retries} send(s) retried by the client after a 502/504 "
            "(same transaction id, as Element does), "
            f"{sum(d.seconds) / max(1, len(d.seconds)):.2f} s per message on average "
            f"(median {statistics.median(d.seconds or [0.0]):.2f} s, min "
            f"{min(d.seconds, default=0.0):.2f}, max {max(d.seconds, default=0.0):.2f}, "
            f"n={len(d.seconds)}).",
            "",
        ]
    if run.by_rate or run.by_loss:
        lines += [
            "Sweep: time from alice's send to bob's /sync seeing the message, per message "
            "(median, min-max, n messages at each point, one after the other on a warm session).",
            "",
            "| link | s per message: median (min-max) | n | mean s | B per message | retrans |",
            "|---|--:|--:|--:|--:|--:|",
        ]

        def spread(p: SweepPoint) -> str:
            if p.median_seconds != p.median_seconds:  # older results: mean only
                return "—"
            return f"{p.median_seconds:.2f} ({p.min_seconds:.2f}-{p.max_seconds:.2f})"

        for p in run.by_rate:
            lines.append(
                f"| {_rate(p.x)}, 100 ms | {spread(p)} | {p.samples} | {p.mean_seconds:.2f} "
                f"| {p.ip_bytes_per_message:.0f} | {p.retransmissions} |"
            )
        for p in run.by_loss:
            lines.append(
                f"| 9.6 kbit/s, 300 ms, {p.x:.0%} loss | {spread(p)} | {p.samples} "
                f"| {p.mean_seconds:.2f} | {p.ip_bytes_per_message:.0f} | {p.retransmissions} |"
            )
        lines += ["", monotonic_note(run.by_loss), ""]
    lines += list(run.notes)
    # issue 11: the day suite and the idle cost per minute (bench/lab_scenarios/day.py)
    lines += ["", t] if (t := day_table(run.results)) else []
    lines += ["", t] if (t := idle_table(run.results, dict(PROFILES))) else []
    return "\n".join(lines)


def _replace_block(path: Path, start: str, end: str, body: str) -> None:
    block = f"{start}\n\n{body.strip()}\n\n{end}"
    doc = path.read_text() if path.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start in doc and end in doc:
        head, _, rest = doc.partition(start)
        _, _, tail = rest.partition(end)
        doc = head + block + tail
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def stamp(meta: dict[str, str]) -> str:
    return (
        f"_Run {meta.get('time', '?')}, Synapse {meta.get('synapse', '?')}, commit "
        f"`{meta.get('commit', '?')}`, {meta.get('machine', '?')}; command "
        f"`{meta.get('command', '?')}`; results: `bench/results/lab.csv`, `lab.json`. "
        f"{meta.get('note', '')}_"
    )


def monotonic_note(points: Sequence[SweepPoint]) -> str:
    """Whether the loss sweep's time grows with loss within its spread, said plainly."""
    pts = [p for p in points if p.ok and p.median_seconds == p.median_seconds]
    if len(pts) < 2:
        return ""
    inversions = [(a, b) for a, b in itertools.pairwise(pts) if b.median_seconds < a.median_seconds]
    outside = [(a, b) for a, b in inversions if b.max_seconds < a.min_seconds]
    if not inversions:
        return "The loss sweep's medians grow with the loss rate (monotonic)."
    pairs = ", ".join(f"{a.x:.0%} -> {b.x:.0%}" for a, b in inversions)
    if not outside:
        return (
            f"The loss sweep's medians dip at {pairs}, within the spread of the points "
            "(their min-max ranges overlap): with this many messages per point the order of "
            "neighbouring loss rates is not resolved; a lost datagram costs a retransmission "
            "timeout (seconds), so per-message times are heavy-tailed."
        )
    return (
        f"The loss sweep is NOT monotonic beyond its spread at {pairs}: the ranges do not "
        "overlap; more messages per point (`--sweep-messages`) would be needed."
    )


def write_docs(path: Path, text: str, meta: dict[str, str]) -> None:
    """Replace the block between the markers in docs/benchmarks.md."""
    _replace_block(path, MARK_START, MARK_END, f"{stamp(meta)}\n\n{text.strip()}")


def readme_table(results: Sequence[ScenarioResult]) -> str:
    """The README's bandwidth table (lan profile), from the results: both HTTPS baselines."""
    by = {(r.scenario, r.stack): r for r in results if r.profile == "lan"}
    rows = [
        "| scenario (lan profile) | CoAP+Noise | HTTPS stock Synapse | HTTPS behind nginx "
        "| stock/CoAP | nginx/CoAP |",
        "|---|--:|--:|--:|--:|--:|",
    ]

    def cell(r: ScenarioResult | None) -> str:
        return "—" if r is None or not r.ok else f"{r.ip_bytes:,} B"

    for scenario, label in README_ROWS:
        c, h = by.get((scenario, "coap")), by.get((scenario, "https"))
        n = by.get((scenario, "https-nginx"))
        if c is None and h is None:
            continue
        rows.append(
            f"| {label} | {cell(c)} | {cell(h)} | {cell(n)} "
            f"| {_ratio(c, h).replace('x', '×')} | {_ratio(c, n).replace('x', '×')} |"
        )
    return "\n".join(rows)


def _ratio_range(results: Sequence[ScenarioResult], baseline: str) -> str:
    by = {(r.scenario, r.stack): r for r in results if r.profile == "lan" and r.ok}
    ratios = []
    for scenario, _ in README_ROWS:
        c, h = by.get((scenario, "coap")), by.get((scenario, baseline))
        if c is not None and h is not None and c.ip_bytes > 0 and scenario != "upload":
            ratios.append(h.ip_bytes / c.ip_bytes)
    if not ratios:
        return ""
    return f"{min(ratios):.1f}-{max(ratios):.1f}x"


def readme_summary(run: Run) -> str:
    """The README's prose figures, from the results (headline ratios name their baseline)."""
    out = []
    stock, front = _ratio_range(run.results, "https"), _ratio_range(run.results, "https-nginx")
    if stock:
        text = (
            f"Headline: CoAP+Noise sends **{stock} fewer IP bytes than stock Synapse over "
            "HTTPS** (TLS 1.3, HTTP/1.1 keep-alive, no compression: Synapse's defaults)"
        )
        if front:
            text += (
                f", and **{front} fewer than Synapse behind a tuned nginx front** (TLS 1.3, "
                "HTTP/2 on, gzip; client scenarios)"
            )
        out.append(text + " on the scenarios above except the incompressible upload.")
    if run.deliver is not None:
        d = run.deliver
        out.append(
            f"At `{d.profile}` a message sent by matrix-nio through the sidecar "
            + ("reached" if d.delivered else "did NOT reach")
            + " the other homeserver's client over federation; the sender had its event id "
            f"after {d.seconds_to_event_id:.1f} s and bob's /sync saw it after "
            f"{d.seconds_to_delivery:.1f} s ({d.client_link_bytes:,} B in "
            f"{d.client_link_datagrams} datagrams on the client link, "
            f"{d.federation_link_bytes:,} B on the federation link, "
            f"{d.sidecar_retransmissions} sidecar retransmissions; one run)."
        )
    if run.lossy is not None:
        lo = run.lossy
        out.append(
            f"At `{lo.profile}` {lo.sent} messages were "
            + (
                "all delivered exactly once and in order"
                if lo.in_order_exactly_once
                else "NOT all delivered exactly once in order"
            )
            + f" ({lo.ip_bytes:,} B, {lo.retransmissions} retransmissions, median "
            f"{statistics.median(lo.seconds or [0.0]):.1f} s per message, min "
            f"{min(lo.seconds, default=0.0):.1f}, max {max(lo.seconds, default=0.0):.1f})."
        )
    return "\n\n".join(out)


def write_readme(path: Path, run: Run, meta: dict[str, str]) -> None:
    if not path.exists():
        return
    body = f"{readme_table(run.results)}\n\n{readme_summary(run)}\n\n{stamp(meta)}"
    _replace_block(path, README_START, README_END, body)


def save_results(run: Run, meta: dict[str, str], directory: Path = RESULTS) -> None:
    """The run's figures into the committed results directory (CSV + JSON)."""
    write_rows(directory / "lab.csv", run.results, meta)
    write_json(directory / "lab.json", attrs.evolve(run, results=()), meta)


def load_results(directory: Path = RESULTS) -> tuple[Run, dict[str, str]]:
    meta, run = read_json(directory / "lab.json", Run)
    _, rows = read_rows(directory / "lab.csv", ScenarioResult)
    return attrs.evolve(run, results=tuple(rows)), meta


def _tuning(profile: LinkProfile) -> str:
    """What the lab configured at ``profile``: the link settings and Synapse's own."""
    text = f"{profile.name}: {link_config(profile) or 'defaults'}"
    synapse = synapse_config(profile)
    if synapse:
        text += f", homeserver.yaml {synapse}"
    return text


async def run_lab(args: argparse.Namespace) -> Run:
    work = Path(tempfile.mkdtemp(prefix="synapse-coap-lab-"))
    profile = get_profile(args.profile)
    notes: list[str] = []
    stacks = tuple(args.stack or STACKS)
    if "https-nginx" in stacks and nginx_path() is None:
        stacks = tuple(s for s in stacks if s != "https-nginx")
        notes.append(
            "The tuned HTTPS baseline was SKIPPED: nginx is not installed (scripts/setup "
            "installs Debian's nginx-light when run as root)."
        )
        progress(notes[-1])
    elif "https-nginx" in stacks:
        notes.append(
            "HTTPS behind nginx: Debian's nginx (TLS 1.3 only, HTTP/2 enabled, gzip level 6 "
            "for JSON) in front of the same stock Synapse's plain listener, started and stopped "
            "by the lab; client scenarios only (Synapse's own federation client speaks "
            "HTTP/1.1 without compression, so a front changes little there, and it was not "
            "measured). matrix-nio (aiohttp) offers only HTTP/1.1, so its requests use TLS 1.3 "
            "and gzip'd responses, not HTTP/2's header compression."
        )
    results: list[ScenarioResult] = []
    deliver: SlowDelivery | None = None
    lossy: Delivery | None = None
    by_rate: list[SweepPoint] = []
    by_loss: list[SweepPoint] = []
    suites = args.suite or ([] if args.scenario else list(DEFAULT_SUITES))
    if "day" in (args.scenario or []):
        suites = [*suites, "day"]
    try:
        for name in args.scenario or []:
            if name == "udp-echo":
                results.append(await udp_echo(profile, args.seed))
        client = tuple(s for s in args.scenario or CLIENT_SCENARIOS if s in CLIENT_SCENARIOS)
        fed = tuple(s for s in args.scenario or FED_SCENARIOS if s in FED_SCENARIOS)
        if ("client" in suites or (args.scenario and client)) and client:
            if args.idle < 3600 and "idle" in client:
                notes.append(f"The idle scenario ran for {args.idle:g} s (`--full` runs an hour).")
            progress(f"client scenarios at {profile.name}: {', '.join(client)}")
            results += await client_suite(
                work / "client", profile, args.seed, stacks, client, args.idle
            )
        if ("federation" in suites or (args.scenario and fed)) and fed:
            progress(f"federation scenarios at {profile.name}: {', '.join(fed)}")
            results += await federation_suite(work / "federation", profile, stacks, fed)
        if "day" in suites:
            if args.day_compress != 1:
                notes.append(
                    f"The day ran compressed {args.day_compress:g}x: {args.day_seconds:g} s in "
                    f"{args.day_seconds / args.day_compress:g} s, with nio's long-poll timeout "
                    "and the sidecar's keep-alive interval divided alike."
                )
            progress(f"day at {profile.name}: {args.day_seconds:g} s")
            results += await day_suite(
                work / "day", profile, args.seed, stacks, args.day_seconds, args.day_compress
            )
        if "deliver" in suites:
            progress(f"must-show: one message at {args.deliver_profile} across federation")
            try:
                deliver = await slow_federated_delivery(
                    work / "deliver", args.deliver_profile, args.seed
                )
                for line in deliver.lines():
                    progress(line)
            except Exception as exc:
                notes.append(f"The {args.deliver_profile} delivery run FAILED: {exc}")
                progress(notes[-1])
        if "lossy" in suites:
            lossy_profile = get_profile("lossy")
            progress(f"must-show: {args.lossy_messages} messages at lossy through the sidecar")
            stack = CoapStack(work / "lossy", lossy_profile, args.seed)
            try:
                await stack.start()
                step = max(1, args.lossy_messages // 10)
                lossy = await deliver_messages(
                    stack,
                    args.lossy_messages,
                    "lossy #",
                    on_progress=lambda i: (
                        progress(f"[lossy] {i}/{args.lossy_messages} delivered")
                        if i % step == 0
                        else None
                    ),
                )
                progress(
                    f"[lossy] exactly once in order: {lossy.in_order_exactly_once}; "
                    f"{lossy.retransmissions} retransmissions, {lossy.lost} datagrams lost, "
                    f"{lossy.client_retries} client retries; "
                    f"slowest message {max(lossy.seconds, default=0.0):.1f} s, median "
                    f"{statistics.median(lossy.seconds or [0.0]):.1f} s"
                )
            except Exception as exc:
                notes.append(f"The lossy run FAILED: {type(exc).__name__}: {exc}")
                progress(notes[-1])
            finally:
                await stack.close()
                stack.kill()
        if "sweep" in suites:
            progress("sweeps: time to deliver a message vs rate and vs loss")
            r, lo = await sweep(work, args.seed, args.sweep_messages, args.rates or RATES, LOSSES)
            by_rate, by_loss = list(r), list(lo)
    finally:
        if args.keep:
            progress(f"kept the working directory {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if tshark_path() is None:
        notes.append("tshark is missing: the HTTPS stack could not be counted.")
    used = [profile]
    if "deliver" in suites:
        used.append(get_profile(args.deliver_profile))
    if "lossy" in suites:
        used.append(get_profile("lossy"))
    notes.append(
        "CoAP tuning at each profile, the recipes of docs/link-tuning.md (module and sidecar "
        "`link:`; Noise limits at their defaults): "
        + "; ".join(_tuning(p) for p in dict.fromkeys(used))
    )
    return Run(tuple(results), deliver, lossy, tuple(by_rate), tuple(by_loss), tuple(notes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    parser.add_argument("--list", action="store_true", help="list scenarios and profiles")
    parser.add_argument("--suite", action="append", choices=SUITES, help="default: all")
    parser.add_argument("--scenario", action="append", choices=sorted(DESCRIPTIONS))
    parser.add_argument("--profile", default="lan", help=f"one of {', '.join(PROFILES)}")
    parser.add_argument("--stack", action="append", choices=STACKS, help="default: all three")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--idle", type=float, default=60.0, help="idle scenario, seconds")
    parser.add_argument(
        "--full", action="store_true", help="an hour idle, 9 messages per sweep point"
    )
    parser.add_argument(
        "--day-seconds",
        type=float,
        default=3600.0,
        help="the day suite's period (default: an hour)",
    )
    parser.add_argument(
        "--day-compress",
        type=float,
        default=1.0,
        metavar="K",
        help="run the day K times faster (long-poll timeout and keep-alive interval divided "
        "by K too; the report says so). Default 1: real time",
    )
    parser.add_argument("--deliver-profile", default="100bps")
    parser.add_argument("--lossy-messages", type=int, default=100)
    parser.add_argument(
        "--sweep-messages", type=int, default=5, help="messages per sweep point (at least 5)"
    )
    parser.add_argument("--rates", type=float, action="append", help="sweep rates (bit/s)")
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "synapse-coap-lab"
    )
    parser.add_argument("--docs", type=Path, default=DOCS, help="the Markdown file to update")
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="do not update bench/results/, docs/benchmarks.md or the README",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="run nothing: re-render docs/benchmarks.md and the README from bench/results/",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--readme", type=Path, default=README, help="the README to update")
    parser.add_argument("--keep", action="store_true", help="keep homeserver directories")
    args = parser.parse_args(argv)
    if args.full:
        args.idle = max(args.idle, 3600.0)
        args.sweep_messages = max(args.sweep_messages, 9)

    if args.list:
        for name, (kind, desc) in DESCRIPTIONS.items():
            print(f"{name:20} {kind:10} {desc}")
        print()
        for p in PROFILES.values():
            print(f"{p.name:12} {p.describe()}")
        print(f"\nHTTPS byte counting: {'tshark' if tshark_path() else 'unavailable (no tshark)'}")
        return 0
    if args.render:
        run, meta = load_results(args.results)
        write_docs(args.docs, report(run), meta)
        write_readme(args.readme, run, meta)
        print(
            f"rendered {args.docs} and {args.readme} from {args.results} (run {meta.get('time')})"
        )
        return 0
    get_profile(args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run = asyncio.run(run_lab(args))
    text = report(run)
    print()
    print(text)
    if run.results:
        write_csv(run.results, args.out / "results.csv")
        command = "python bench/lab.py " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "provenance.json").write_text(
            json.dumps(provenance(command.strip()), indent=1) + "\n"
        )
    pngs = charts(run, args.out)
    print(f"\nwritten: {args.out / 'results.csv'}; charts: {', '.join(str(p) for p in pngs)}")
    if not args.no_docs:
        command = "python bench/lab.py " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = provenance(command.strip())
        meta["note"] = SHARED_NOTE
        save_results(run, meta, args.results)
        run, meta = load_results(args.results)  # the docs come from the committed files only
        write_docs(args.docs, report(run), meta)
        write_readme(args.readme, run, meta)
        print(f"updated {args.results}, {args.docs} and {args.readme}")
    print(f"lab run took {time.monotonic() - t0:.0f} s")
    failed = [r for r in run.results if not r.ok]
    bad = (
        failed
        or (run.deliver is not None and not run.deliver.delivered)
        or (run.lossy is not None and not run.lossy.in_order_exactly_once)
    )
    return 1 if bad else 0


__all__ = ["ScenarioResult", "main", "ratio_table", "write_csv"]

if __name__ == "__main__":
    sys.exit(main())
