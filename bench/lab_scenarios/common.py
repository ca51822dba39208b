"""Shared pieces of the lab: the result record, link tuning per profile, counting helpers."""

from __future__ import annotations

import re
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from synapse_coap.lab.capture import Packet, summarize
from synapse_coap.lab.model import LinkProfile, TraceRecord
from synapse_coap.lab.relay import Relay

STACKS = ("coap", "https")

_T0 = time.monotonic()


def progress(text: str) -> None:
    """A progress line on stderr, with the seconds since the lab started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


@attrs.frozen
class ScenarioResult:
    """One scenario run on one stack at one link profile.

    ``seconds``: completion time. For CoAP it is measured through the relay at
    the profile. HTTPS runs on unimpaired loopback; at a profile other than
    ``lan`` its time is *modelled* from its measured bytes and round trips
    (``time_method`` says which): ``8 * bytes / rate + round_trips * 2 *
    latency``, a lower bound (no TCP slow start, no loss).
    """

    scenario: str
    stack: str  # "coap" or "https"
    profile: str
    ip_bytes: int
    packets: int
    round_trips: int
    seconds: float
    retransmissions: int = 0
    method: str = "relay"  # "relay", "tshark" or "estimate"
    ok: bool = True
    note: str = ""
    up_bytes: int = 0
    down_bytes: int = 0
    time_method: str = "measured"  # "measured" or "model"
    server: str = ""  # what served the CoAP side ("module" or "gateway")


# -- link tuning -----------------------------------------------------------------------


def link_config(profile: LinkProfile) -> dict[str, Any]:
    """``LinkParameters`` settings for a profile, as docs/link-tuning.md recommends.

    What an operator would configure knowing the link: the bit rate (size-aware
    first waits), a first RTO above the worst round trip of a small exchange,
    smaller blocks on slow links, more retries on lossy ones.
    """
    up = profile.uplink
    if up.rate is None and up.latency == 0 and up.loss == 0 and up.jitter_seconds == 0:
        return {}
    cfg: dict[str, Any] = {"max_rto": 300.0, "max_latency": 300.0, "request_timeout": 1800.0}
    rtt = 2 * (up.latency + up.jitter_seconds)
    # the serialization of a small request and its response (2 x 150 IP bytes)
    small = 2 * 8 * 150 / up.rate if up.rate else 0.0
    cfg["ack_timeout"] = round(min(300.0, max(2.0, 1.5 * (rtt + small))), 3)
    if up.rate is not None:
        cfg["bandwidth_bps"] = float(up.rate)
        if up.rate < 1000:
            cfg["min_rto"] = 5.0
        # Smaller blocks lose less per lost datagram, but each block costs a round trip
        # (NSTART = 1): only worth it when datagrams are lost.
        if up.loss > 0 and up.rate < 1000:
            cfg["block_size_exp"] = 2
        elif up.loss > 0 and up.rate < 20000:
            cfg["block_size_exp"] = 4
    if up.loss > 0:
        # Every lost exchange doubles the RTO kept for the next one (Karn), and at 30% loss
        # each way half the exchanges lose a datagram: cap the backoff a few RTTs out.
        # A run of losses also makes the Noise layer re-handshake (first retransmission with
        # nothing heard): the span of retransmissions must outlast that handshake.
        cfg["max_retransmit"] = 20
        cfg["max_rto"] = round(max(5.0, 4 * (rtt + small)), 3)
    return cfg


def limits_config(profile: LinkProfile) -> dict[str, Any]:
    """``NoiseLimits`` settings for a profile: handshake timers that follow the link like
    the CoAP ones (a 300-byte IK message with 0-RTT data takes 24 s at 100 bit/s)."""
    link = link_config(profile)
    if not link:
        return {}
    first = float(link["ack_timeout"])
    cfg: dict[str, Any] = {
        "handshake_retransmit": round(max(2.0, 1.5 * first), 3),
        "handshake_timeout": round(min(3600.0, max(60.0, 12 * first)), 3),
    }
    if profile.uplink.loss > 0:
        # a re-handshake (started on a first retransmission) must survive a run of losses:
        # with retransmissions at 3, 6, 12, ... s, 300 s allows 7 attempts
        cfg["handshake_timeout"] = max(cfg["handshake_timeout"], 300.0)
    rate = profile.uplink.rate
    if rate is not None and rate < 1000:
        # hold IK message 2 for the first reply: cheaper than a datagram of its own
        cfg["reply_wait"] = 1.0
    return cfg


def synapse_config(profile: LinkProfile) -> dict[str, Any]:
    """Synapse's own settings for a slow link: its federation client gives up on a request
    after 60 s by default (a 600-byte transaction alone takes 50 s at 100 bit/s)."""
    link = link_config(profile)
    if not link:
        return {}
    timeout = int(link["request_timeout"])
    return {"federation": {"client_timeout": f"{timeout}s"}}


def modelled_seconds(profile: LinkProfile, up_bytes: int, down_bytes: int, turns: int) -> float:
    """Lower-bound completion time of a TCP exchange at ``profile`` (no loss, no slow start)."""
    up, down = profile.uplink, profile.downlink
    t = up.serialization_time(up_bytes) + down.serialization_time(down_bytes)
    return t + max(1, turns) * (up.latency + down.latency)


# -- counting -----------------------------------------------------------------------------


@attrs.frozen
class RelaySnapshot:
    """Counters of one or more relays at one moment (differences give a window)."""

    at: float
    up_bytes: int
    down_bytes: int
    packets: int
    lost: int
    up_trace: int
    down_trace: int

    def __sub__(self, other: RelaySnapshot) -> RelaySnapshot:
        return RelaySnapshot(
            self.at - other.at,
            self.up_bytes - other.up_bytes,
            self.down_bytes - other.down_bytes,
            self.packets - other.packets,
            self.lost - other.lost,
            self.up_trace - other.up_trace,
            self.down_trace - other.down_trace,
        )


def relay_snapshot(relays: Sequence[Relay], now: float) -> RelaySnapshot:
    """What crossed the links so far: every datagram admitted by the queue (lost ones too:
    they were sent), IP and UDP headers included; duplicates are made beyond the
    bottleneck and not counted."""
    up = down = packets = lost = up_t = down_t = 0
    for relay in relays:
        s = relay.stats
        up += s.uplink.transmitted_ip_bytes
        down += s.downlink.transmitted_ip_bytes
        packets += sum(
            d.offered_datagrams - d.queue_dropped_datagrams for d in (s.uplink, s.downlink)
        )
        lost += s.uplink.lost_datagrams + s.downlink.lost_datagrams
        up_t += len(relay.model.uplink.trace or [])
        down_t += len(relay.model.downlink.trace or [])
    return RelaySnapshot(now, up, down, packets, lost, up_t, down_t)


def round_trips(uplink: Iterable[TraceRecord], downlink: Iterable[TraceRecord]) -> int:
    """Request/response turns: each switch from uplink to downlink traffic (in order of
    offering) is one round trip."""
    events = sorted([(r.offered_at, 0) for r in uplink] + [(r.offered_at, 1) for r in downlink])
    turns = 0
    previous = None
    for _, direction in events:
        if previous == 0 and direction == 1:
            turns += 1
        previous = direction
    return turns


def relay_round_trips(relays: Sequence[Relay], start: RelaySnapshot, end: RelaySnapshot) -> int:
    """Round trips in the window between two snapshots (relays started with ``trace=True``)."""
    total = 0
    # Snapshots hold sums over relays; the window is by offering time instead.
    for relay in relays:
        up = [r for r in relay.model.uplink.trace or [] if start.at <= r.offered_at <= end.at]
        down = [r for r in relay.model.downlink.trace or [] if start.at <= r.offered_at <= end.at]
        total += round_trips(up, down)
    return total


def tcp_round_trips(packets: Sequence[Packet], server_port: int) -> int:
    """Turns from client data to server data (SYN and payload segments; ACK-only ignored)."""
    turns = 0
    previous: int | None = None
    for p in sorted(packets, key=lambda p: p.time):
        if p.proto != "tcp" or not (p.tcp_payload or p.syn):
            continue
        direction = 1 if p.src_port == server_port else 0
        if previous == 0 and direction == 1:
            turns += 1
        previous = direction
    return turns


def split_at_markers(packets: Sequence[Packet], marker_port: int) -> list[list[Packet]]:
    """TCP packets between consecutive marker datagrams (packets before the first dropped)."""
    out: list[list[Packet]] = []
    current: list[Packet] | None = None
    for p in sorted(packets, key=lambda p: p.time):
        if p.proto == "udp" and p.dst_port == marker_port:
            if current is not None:
                out.append(current)
            current = []
        elif current is not None and p.proto == "tcp":
            current.append(p)
    return out


def tcp_window(packets: Sequence[Packet], server_port: int) -> tuple[int, int, int, int, int]:
    """(ip_bytes, packets, to-server bytes, from-server bytes, round trips) of a window."""
    c = summarize(packets, server_port)
    return (
        c.ip_bytes,
        c.packets,
        c.to_server_ip_bytes,
        c.from_server_ip_bytes,
        tcp_round_trips(packets, server_port),
    )


_RETRANS = re.compile(r"^synapse_coap_retransmissions_total\{[^}]*\}\s+([0-9.e+]+)", re.M)


def scrape_retransmissions(metrics_port: int | None) -> int | None:
    """The module's ``synapse_coap_retransmissions_total`` from Synapse's metrics listener."""
    if metrics_port is None:
        return None
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/_synapse/metrics", timeout=5
        ) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    values = [float(v) for v in _RETRANS.findall(text)]
    return int(sum(values)) if values else 0
