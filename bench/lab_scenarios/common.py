"""Shared pieces of the lab: the result record, link tuning per profile, counting helpers."""

from __future__ import annotations

import re
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from synapse_coap.lab.model import LinkProfile, TraceRecord
from synapse_coap.lab.relay import Relay
from synapse_coap_lab.capture import Packet, summarize

#: "https-nginx": the tuned HTTPS baseline (client suite; skipped where nginx is missing)
STACKS = ("coap", "https", "https-nginx")

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
#
# The lab configures CoAP exactly as the "Recipes" section of docs/link-tuning.md tells an
# operator to, and nothing more, so that its figures are what a user would get. The two
# must agree: change a recipe there and here together.

#: Below this bit rate the "100 bit/s radio" recipe applies.
SLOW_LINK_BPS = 1000.0

#: docs/link-tuning.md, "100 bit/s radio (mesh, HF)" (with ``bandwidth_bps`` the link's rate).
SLOW_RADIO_RECIPE: dict[str, Any] = {
    "max_rto": 300.0,
    "min_rto": 5.0,
    "max_latency": 300.0,
    "request_timeout": 1800.0,
}

#: docs/link-tuning.md, "Lossy links" (the defaults work; these retry longer).
LOSSY_RECIPE: dict[str, Any] = {"max_retransmit": 8, "max_rto": 30.0}

#: docs/link-tuning.md, "Geostationary satellite": only when the RTT jitters a lot.
JITTERY_RECIPE: dict[str, Any] = {"min_rto": 1.5}


def _impaired(profile: LinkProfile) -> bool:
    up = profile.uplink
    return not (up.rate is None and up.latency == 0 and up.loss == 0 and up.jitter_seconds == 0)


def link_config(profile: LinkProfile) -> dict[str, Any]:
    """``LinkParameters`` settings for a profile: the recipe of docs/link-tuning.md for it.

    - no impairment (``lan``): the defaults;
    - a known bit rate: ``bandwidth_bps`` (size-aware first waits), as the docs advise for
      any link whose rate is known;
    - below 1 kbit/s (``100bps``): the "100 bit/s radio" recipe;
    - loss (``lossy``): the optional "Lossy links" recipe (``max_retransmit: 8``,
      ``max_rto: 30``);
    - a fast link whose RTT jitters (the "Geostationary satellite" note): ``min_rto: 1.5``;
      the lab's ``satellite`` profile has no jitter, so the defaults, as the docs say.
    """
    if not _impaired(profile):
        return {}
    up = profile.uplink
    cfg: dict[str, Any] = {}
    if up.rate is not None:
        cfg["bandwidth_bps"] = float(up.rate)
    slow = up.rate is not None and up.rate < SLOW_LINK_BPS
    if slow:
        cfg.update(SLOW_RADIO_RECIPE)
    if up.loss > 0:
        cfg.update(LOSSY_RECIPE)
        if slow:  # never shorten the slow link's bound
            cfg["max_rto"] = max(SLOW_RADIO_RECIPE["max_rto"], LOSSY_RECIPE["max_rto"])
    if up.jitter_seconds > 0 and not slow:
        cfg.update(JITTERY_RECIPE)
    return cfg


def limits_config(profile: LinkProfile) -> dict[str, Any]:
    """``NoiseLimits`` settings for a profile: none. No recipe of docs/link-tuning.md sets
    any (handshake messages are retransmitted after the link's RTO plus their
    serialization time, and ``handshake_timeout`` defaults to 300 s, enough for a full XX
    at 100 bit/s), so every profile runs Noise with its defaults."""
    del profile
    return {}


def synapse_config(profile: LinkProfile) -> dict[str, Any]:
    """Synapse's own settings for a profile, as the "100 bit/s radio" recipe of
    docs/link-tuning.md says: ``federation.client_timeout`` at least ``request_timeout``
    (Synapse gives up on a federation request after 60 s by default, less than a
    transaction takes at 100 bit/s). Other profiles keep Synapse's defaults."""
    timeout = link_config(profile).get("request_timeout")
    if timeout is None:
        return {}
    return {"federation": {"client_timeout": f"{int(timeout)}s"}}


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
