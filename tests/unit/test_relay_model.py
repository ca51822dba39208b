"""The sans-I/O link model behind the impairment relay: exact, no sleeps."""

from __future__ import annotations

import argparse
import math
import socket

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_coap.errors import ConfigValueError
from synapse_coap.lab.model import (
    IPV4_UDP_OVERHEAD,
    IPV6_UDP_OVERHEAD,
    PROFILES,
    Impairment,
    ImpairmentModel,
    LinkModel,
    LinkProfile,
    RebindSchedule,
    get_profile,
    header_overhead,
)
from synapse_coap.lab.relay import (
    RelayConfig,
    RelayStats,
)
from synapse_coap.lab.relay_cli import (
    add_relay_parser,
    config_from_args,
    parse_hostport,
)

# -- serialization delay ---------------------------------------------------------


def test_100_bytes_at_800_bps_takes_1_28_seconds_with_ipv4_headers() -> None:
    model = ImpairmentModel(Impairment(rate=800.0), overhead=IPV4_UDP_OVERHEAD)
    [d] = model.offer(10.0, b"x" * 100)
    # (100 payload + 20 IPv4 + 8 UDP) bytes * 8 bits / 800 bit/s
    assert d.deliver_at == pytest.approx(10.0 + 1.28, abs=1e-12)
    assert model.busy_until == pytest.approx(11.28, abs=1e-12)


def test_ipv6_overhead_is_48_bytes() -> None:
    assert header_overhead(socket.AF_INET) == 28
    assert header_overhead(socket.AF_INET6) == 48
    model = ImpairmentModel(Impairment(rate=100.0), overhead=IPV6_UDP_OVERHEAD)
    [d] = model.offer(0.0, b"x" * 52)
    assert d.deliver_at == pytest.approx(8.0, abs=1e-12)  # 100 bytes at 100 bit/s
    assert model.stats.offered_ip_bytes == 100


def test_back_to_back_datagrams_queue_behind_each_other_then_latency_is_added() -> None:
    model = ImpairmentModel(Impairment(rate=1000.0, latency=0.5), overhead=0)
    out = [model.offer(0.0, b"a" * 125)[0].deliver_at for _ in range(3)]
    # each takes exactly 1 s on the wire; propagation adds 0.5 s after the last bit
    assert out == pytest.approx([1.5, 2.5, 3.5], abs=1e-12)
    # the link is idle after t=3: a datagram offered at t=10 starts at once
    [late] = model.offer(10.0, b"a" * 125)
    assert late.deliver_at == pytest.approx(11.5, abs=1e-12)
    assert model.stats.busy_seconds == pytest.approx(4.0, abs=1e-12)


def test_no_rate_means_no_serialization_delay() -> None:
    model = ImpairmentModel(Impairment(latency=0.25))
    assert [model.offer(1.0, b"x" * 1400)[0].deliver_at for _ in range(3)] == [1.25] * 3


# -- queue -----------------------------------------------------------------------


def test_queue_packet_limit_tail_drops_and_counts() -> None:
    model = ImpairmentModel(Impairment(rate=800.0, queue_packets=2), overhead=0)
    results = [model.offer(0.0, b"x" * 100) for _ in range(5)]
    assert [len(r) for r in results] == [1, 1, 0, 0, 0]
    assert model.backlog(0.0) == (2, 200)
    # after the first has left the link (1 s), one place is free again
    assert len(model.offer(1.0, b"y" * 100)) == 1
    assert len(model.offer(1.0, b"y" * 100)) == 0
    s = model.stats
    assert (s.offered_datagrams, s.delivered_datagrams, s.queue_dropped_datagrams) == (7, 3, 4)
    assert s.queue_dropped_bytes == 400
    assert s.transmitted_ip_bytes == 300


def test_queue_byte_limit_counts_ip_bytes() -> None:
    model = ImpairmentModel(
        Impairment(rate=800.0, queue_packets=None, queue_bytes=300), overhead=28
    )
    outcomes = [len(model.offer(0.0, b"x" * 100)) for _ in range(3)]
    assert outcomes == [1, 1, 0]  # 128 + 128 fit in 300, a third 128 does not
    assert model.stats.queue_dropped_datagrams == 1


# -- latency and jitter ----------------------------------------------------------


def test_jitter_stays_within_bounds_and_fifo_is_kept() -> None:
    imp = Impairment(latency=1.0, jitter_fraction=0.4)
    assert imp.jitter_seconds == pytest.approx(0.4)
    # spaced 1 s apart: no datagram is held back by the one before it
    sparse = ImpairmentModel(imp, seed=3)
    delays = [sparse.offer(float(i), b"x")[0].deliver_at - i for i in range(2000)]
    assert all(0.6 - 1e-9 <= d <= 1.4 + 1e-9 for d in delays)
    assert min(delays) < 0.61  # the spread is real: some arrive early, some late
    assert max(delays) > 1.39
    # 10 ms apart: jitter would reorder them, FIFO holds the early ones back
    dense = ImpairmentModel(imp, seed=3)
    times = []
    for i in range(2000):
        [d] = dense.offer(i * 0.01, b"x")
        assert d.deliver_at - i * 0.01 >= 0.6 - 1e-9
        times.append(d.deliver_at)
    assert times == sorted(times)


def test_jitter_larger_than_latency_never_gives_negative_delay() -> None:
    model = ImpairmentModel(Impairment(latency=0.1, jitter=1.0), seed=1)
    for i in range(500):
        [d] = model.offer(float(i), b"x")
        assert d.deliver_at >= float(i)


# -- loss, duplication, reordering: exact for a seed --------------------------------


def _fates(loss: float, seed: int, n: int = 10_000) -> list[bool]:
    model = ImpairmentModel(Impairment(loss=loss), seed=seed)
    return [bool(model.offer(float(i), b"x" * 10)) for i in range(n)]


def test_loss_is_exact_for_a_seed_and_within_binomial_bounds() -> None:
    fates = _fates(0.3, seed=1)
    lost = fates.count(False)
    assert lost == LOST_AT_30_PERCENT_SEED_1
    n = len(fates)
    sigma = math.sqrt(n * 0.3 * 0.7)
    assert abs(lost - 0.3 * n) < 4 * sigma
    assert _fates(0.3, seed=1) == fates  # reproducible
    assert _fates(0.3, seed=2) != fates  # and the seed matters


LOST_AT_30_PERCENT_SEED_1 = 2922


def test_same_seed_loss_is_monotone_across_loss_rates() -> None:
    """The k-th datagram's draw does not depend on the rate: sweeps are comparable."""
    low, high = _fates(0.1, seed=5, n=2000), _fates(0.4, seed=5, n=2000)
    assert all(h <= lo for lo, h in zip(low, high, strict=True))  # lost at 10% -> lost at 40%


def test_zero_and_full_loss() -> None:
    assert all(_fates(0.0, seed=1, n=500))
    assert not any(_fates(1.0, seed=1, n=500))


def test_duplication_delivers_an_extra_copy_after_the_original() -> None:
    model = ImpairmentModel(Impairment(latency=0.2, jitter=0.1, duplicate=0.25), seed=7)
    n = 4000
    copies = 0
    last = -1.0
    for i in range(n):
        out = model.offer(i * 0.001, i.to_bytes(2, "big"))
        assert out[0].duplicate is False
        if len(out) == 2:
            copies += 1
            assert out[1].duplicate is True
            assert out[1].datagram == out[0].datagram
            assert out[1].deliver_at >= out[0].deliver_at
        for d in out:
            assert d.deliver_at >= last  # still FIFO
            last = d.deliver_at
    s = model.stats
    assert s.duplicated_datagrams == copies == DUPLICATED_AT_25_PERCENT_SEED_7
    assert abs(copies - 0.25 * n) < 4 * math.sqrt(n * 0.25 * 0.75)
    assert s.delivered_datagrams == n + copies
    assert s.delivered_bytes == 2 * (n + copies)
    assert s.transmitted_ip_bytes == n * (2 + 28)  # copies do not use the link again


DUPLICATED_AT_25_PERCENT_SEED_7 = 1050


def test_reordering_lets_datagrams_overtake_those_in_flight() -> None:
    model = ImpairmentModel(Impairment(latency=1.0, reorder=0.2), seed=11)
    deliveries = [(i, model.offer(i * 0.1, bytes([i]))[0]) for i in range(200)]
    arrival_order = [i for i, _ in sorted(deliveries, key=lambda x: x[1].deliver_at)]
    assert arrival_order != list(range(200))
    reordered = [i for i, d in deliveries if d.reordered]
    assert len(reordered) == model.stats.reordered_datagrams == REORDERED_AT_20_PERCENT_SEED_11
    for i, d in deliveries:  # a reordered datagram skips the 1 s propagation delay
        assert d.deliver_at == pytest.approx(i * 0.1 + (0.0 if d.reordered else 1.0))
    # the others keep their relative order
    normal = [d.deliver_at for _, d in deliveries if not d.reordered]
    assert normal == sorted(normal)


REORDERED_AT_20_PERCENT_SEED_11 = 31


def test_without_reordering_order_is_fifo_even_with_huge_jitter() -> None:
    model = ImpairmentModel(Impairment(rate=9600.0, latency=0.5, jitter=0.5), seed=2)
    times = [model.offer(i * 0.01, b"z" * (i % 50))[0].deliver_at for i in range(1000)]
    assert times == sorted(times)


# -- accounting invariant ------------------------------------------------------------

_impairments = st.builds(
    Impairment,
    rate=st.one_of(st.none(), st.floats(50.0, 1e6)),
    latency=st.floats(0.0, 2.0),
    jitter=st.floats(0.0, 1.0),
    loss=st.floats(0.0, 1.0),
    duplicate=st.floats(0.0, 1.0),
    reorder=st.floats(0.0, 1.0),
    queue_packets=st.one_of(st.none(), st.integers(1, 20)),
    queue_bytes=st.one_of(st.none(), st.integers(1, 5000)),
)


@settings(max_examples=150, deadline=None)
@given(
    imp=_impairments,
    seed=st.integers(0, 2**32),
    traffic=st.lists(st.tuples(st.floats(0.0, 3.0), st.integers(0, 1500)), max_size=60),
)
def test_every_datagram_is_accounted_for_exactly(
    imp: Impairment, seed: int, traffic: list[tuple[float, int]]
) -> None:
    model = ImpairmentModel(imp, seed=seed, overhead=28)
    now = 0.0
    delivered = 0
    for gap, size in traffic:
        now += gap
        out = model.offer(now, b"\0" * size)
        delivered += len(out)
        for d in out:
            assert d.deliver_at >= now
    s = model.stats
    assert s.offered_datagrams == len(traffic)
    assert s.offered_bytes == sum(size for _, size in traffic)
    assert s.offered_ip_bytes == s.offered_bytes + 28 * s.offered_datagrams
    assert s.delivered_datagrams == delivered
    assert (
        s.offered_datagrams == s.delivered_datagrams - s.duplicated_datagrams + s.dropped_datagrams
    )
    assert s.delivered_ip_bytes == s.delivered_bytes + 28 * s.delivered_datagrams
    sent = s.offered_datagrams - s.queue_dropped_datagrams
    assert s.transmitted_ip_bytes == s.offered_ip_bytes - s.queue_dropped_bytes - 28 * (
        s.queue_dropped_datagrams
    )
    assert sent >= s.lost_datagrams


# -- determinism -------------------------------------------------------------------------


def _run_link(seed: int, with_downlink_traffic: bool) -> list[tuple[float, bytes]]:
    profile = PROFILES["lossy"].with_changes(duplicate=0.1, reorder=0.1, jitter=0.05)
    link = LinkModel(profile, seed=seed, start=100.0)
    out: list[tuple[float, bytes]] = []
    for i in range(300):
        now = 100.0 + i * 0.05
        out += [(d.deliver_at, d.datagram) for d in link.uplink.offer(now, b"%d" % i)]
        if with_downlink_traffic:
            link.downlink.offer(now, b"reply")
    return out


def test_link_is_deterministic_and_directions_are_independent() -> None:
    a = _run_link(42, with_downlink_traffic=False)
    assert a == _run_link(42, with_downlink_traffic=False)
    assert a == _run_link(42, with_downlink_traffic=True)
    assert a != _run_link(43, with_downlink_traffic=False)


def test_link_stats_are_exact_for_a_seed() -> None:
    link = LinkModel(PROFILES["lossy"], seed=1)
    for i in range(100):
        link.uplink.offer(i * 1.0, b"m" * 50)
        link.downlink.offer(i * 1.0 + 0.5, b"r" * 20)
    up, down = link.stats.uplink, link.stats.downlink
    assert (up.offered_datagrams, up.lost_datagrams, up.delivered_ip_bytes) == UP_GOLDEN
    assert (down.offered_datagrams, down.lost_datagrams, down.delivered_ip_bytes) == DOWN_GOLDEN
    text = str(link.stats)
    assert f"delivered {up.delivered_datagrams} dgrams" in text
    assert f"loss {down.lost_datagrams}" in text


UP_GOLDEN = (100, 22, 78 * 78)
DOWN_GOLDEN = (100, 27, 73 * 48)


# -- NAT rebinding schedule ---------------------------------------------------------------


def test_rebind_schedule_times_and_period() -> None:
    sched = RebindSchedule(times=(5.0, 12.0), every=10.0)
    assert [sched.count_until(t) for t in (0, 4.99, 5, 9.99, 10, 12, 19.9, 20, 35)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
        4,
        5,
    ]
    assert sched.next_after(0.0) == 5.0
    assert sched.next_after(5.0) == 10.0
    assert sched.next_after(10.0) == 12.0
    assert sched.next_after(12.0) == 20.0
    assert RebindSchedule(times=(3.0,)).next_after(3.0) is None
    assert not RebindSchedule().enabled


def test_link_epoch_is_relative_to_start() -> None:
    profile = PROFILES["lan"].with_rebind(RebindSchedule(times=(2.0,), every=5.0))
    link = LinkModel(profile, start=1000.0)
    assert link.epoch_at(1000.0) == 0
    assert link.epoch_at(1001.9) == 0
    assert link.epoch_at(1002.0) == 1
    assert link.epoch_at(1005.0) == 2
    assert link.next_rebind_at(1000.0) == 1002.0
    assert link.next_rebind_at(1002.0) == 1005.0


def test_rebind_schedule_rejects_bad_values() -> None:
    with pytest.raises(ConfigValueError, match=r"rebind.times\[0\]"):
        RebindSchedule(times=(-1.0,))
    with pytest.raises(ConfigValueError, match="increasing"):
        RebindSchedule(times=(3.0, 2.0))
    with pytest.raises(ConfigValueError, match=r"rebind\.every"):
        RebindSchedule(every=0.0)


# -- profiles and configuration ------------------------------------------------------------


def test_named_profiles_match_the_documented_table() -> None:
    assert list(PROFILES) == ["lan", "100bps", "lossy", "satellite"]
    lan = get_profile("lan")
    assert lan.uplink == lan.downlink
    assert (lan.uplink.rate, lan.uplink.latency, lan.uplink.loss) == (None, 0.0, 0.0)
    p = get_profile("100bps").uplink
    assert (p.rate, p.latency, p.jitter_fraction, p.loss) == (100.0, 1.0, 0.4, 0.0)
    p = get_profile("lossy").downlink
    assert (p.rate, p.latency, p.jitter_seconds, p.loss) == (9600.0, 0.3, 0.0, 0.3)
    p = get_profile("satellite").uplink
    assert (p.rate, p.latency, p.jitter_seconds, p.loss) == (64000.0, 0.6, 0.0, 0.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        p.rate = 1.0  # type: ignore[misc]


def test_unknown_profile_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigValueError) as info:
        get_profile("dialup")
    assert info.value.path == "profile"
    assert "100bps" in str(info.value) and "satellite" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("loss", 1.5),
        ("loss", -0.1),
        ("rate", 0.0),
        ("latency", -1.0),
        ("latency", math.inf),
        ("queue_packets", 0),
        ("queue_packets", 2.5),
        ("reorder", "x"),
    ],
)
def test_bad_impairment_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigValueError) as info:
        Impairment(**{field: value})  # type: ignore[arg-type]
    assert info.value.path == f"impairment.{field}"
    with pytest.raises(ConfigValueError) as info:
        Impairment.from_config({field: value}, "lab.links.radio.uplink")
    assert info.value.path == f"lab.links.radio.uplink.{field}"


def test_impairment_from_config() -> None:
    imp = Impairment.from_config({"rate": 300, "latency": 2, "loss": 0.1}, "x")
    assert (imp.rate, imp.latency, imp.loss) == (300, 2, 0.1)
    with pytest.raises(ConfigValueError, match="allowed: "):
        Impairment.from_config({"bandwidth": 3}, "x")


def test_profile_with_changes_affects_both_directions() -> None:
    p = get_profile("100bps").with_changes(loss=0.2)
    assert p.uplink.loss == p.downlink.loss == 0.2
    assert p.uplink.rate == 100.0
    assert "loss 20%" in p.describe()


# -- relay configuration and command line -------------------------------------------------


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:6000") == ("127.0.0.1", 6000)
    assert parse_hostport("[::1]:5683") == ("::1", 5683)
    assert parse_hostport("localhost:0") == ("localhost", 0)
    for bad in ("127.0.0.1", "::1:5683", "host:port", "h:70000", "[::1]5683", ":5"):
        with pytest.raises(ConfigValueError):
            parse_hostport(bad, "listen")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_relay_parser(sub)
    return parser.parse_args(["relay", *argv])


def test_relay_command_line_builds_the_config() -> None:
    args = _args(
        "--listen=127.0.0.1:6000",
        "--upstream=[::1]:5683",
        "--profile=100bps",
        "--seed=1",
        "--jitter=10%",
        "--loss=0.05",
        "--rate=0",
        "--rebind-at=3,7.5",
        "--rebind-every=60",
    )
    config = config_from_args(args)
    assert config.listen == ("127.0.0.1", 6000)
    assert config.upstream == ("::1", 5683)
    assert config.seed == 1
    up = config.profile.uplink
    assert (up.rate, up.latency, up.jitter_seconds, up.loss) == (None, 1.0, 0.1, 0.05)
    assert config.profile.rebind == RebindSchedule(times=(3.0, 7.5), every=60.0)
    assert args.func.__name__ == "run_relay_command"


def test_relay_config_rejects_bad_addresses() -> None:
    with pytest.raises(ConfigValueError, match="upstream"):
        RelayConfig(listen=("127.0.0.1", 0), upstream=("127.0.0.1", 0))
    with pytest.raises(ConfigValueError, match="listen"):
        RelayConfig(listen=("127.0.0.1", 99999), upstream=("127.0.0.1", 1))


def test_relay_stats_print_and_flatten() -> None:
    link = LinkModel(LinkProfile.symmetric("t", "t", Impairment(loss=0.5)), seed=9)
    for i in range(10):
        link.uplink.offer(float(i), b"abc")
    s = link.stats
    stats = RelayStats(s.uplink, s.downlink, 5, 0, 0, 0, 1, 0, 2)
    flat = stats.as_dict()
    assert flat["up_offered_datagrams"] == 10
    assert flat["up_offered_ip_bytes"] == 10 * 31
    assert flat["rebinds"] == 2
    assert "rebinds 2" in str(stats)
    assert f"delivered {s.uplink.delivered_datagrams} dgrams" in str(stats)


def test_stats_are_a_frozen_snapshot_of_every_counter() -> None:
    model = ImpairmentModel(Impairment(rate=1000.0), overhead=IPV4_UDP_OVERHEAD)
    model.offer(0.0, b"x" * 72)
    before = model.stats
    model.offer(1.0, b"y" * 72)
    after = model.stats
    # the snapshot taken earlier does not follow the model
    assert (before.offered_datagrams, before.offered_ip_bytes) == (1, 100)
    assert (after.offered_datagrams, after.offered_ip_bytes) == (2, 200)
    assert after.busy_seconds == pytest.approx(1.6, abs=1e-12)  # 2 x 800 bits at 1000 bit/s
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        after.offered_datagrams = 0  # type: ignore[misc]
    flat = after.as_dict()
    assert len(flat) == 14 and flat["offered_bytes"] == 144 and flat["delivered_datagrams"] == 2
