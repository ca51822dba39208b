"""LinkParameters and the RTT estimator (sans-I/O, injected clock, no sleeps)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_coap.errors import ConfigValueError
from synapse_coap.transport.link import LinkParameters, RttEstimator


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_defaults_are_rfc7252() -> None:
    p = LinkParameters()
    assert (p.ack_timeout, p.ack_random_factor, p.max_retransmit, p.nstart) == (2.0, 1.5, 4, 1)
    # RFC 7252 MAX_TRANSMIT_SPAN with the default parameters is 45 s
    assert p.max_transmit_span == pytest.approx(45.0)


def test_from_config_accepts_ints_and_names_bad_fields() -> None:
    p = LinkParameters.from_config({"ack_timeout": 15, "max_rto": 300, "bandwidth_bps": 100}, "x")
    assert p.ack_timeout == 15.0 and p.max_rto == 300.0 and p.bandwidth_bps == 100.0
    with pytest.raises(ConfigValueError) as e:
        LinkParameters.from_config({"ack_timeout": -1}, "coap.link")
    assert e.value.path == "coap.link.ack_timeout"
    with pytest.raises(ConfigValueError) as e:
        LinkParameters.from_config({"ack_timout": 3}, "coap.link")
    assert e.value.path == "coap.link.ack_timout" and "allowed" in str(e.value)
    with pytest.raises(ConfigValueError) as e:
        LinkParameters.from_config({"nstart": 0}, "link")
    assert e.value.path == "link.nstart"
    with pytest.raises(ConfigValueError):
        LinkParameters.from_config({"min_rto": 50, "max_rto": 10}, "link")
    with pytest.raises(ConfigValueError):
        LinkParameters.from_config({"ack_random_factor": 0.5}, "link")
    with pytest.raises(ConfigValueError):
        LinkParameters.from_config(["nope"], "link")  # type: ignore[arg-type]


def test_initial_rto_is_rfc_until_first_sample() -> None:
    est = RttEstimator(LinkParameters(), clock=Clock(), rand=lambda: 1.0)
    # uniform(ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR): upper end with rand=1
    assert est.first_timeout() == pytest.approx(3.0)
    est2 = RttEstimator(LinkParameters(), clock=Clock(), rand=lambda: 0.0)
    assert est2.first_timeout() == pytest.approx(2.0)


def test_rto_follows_measured_rtt() -> None:
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock, rand=lambda: 0.0)
    est.started("a")
    clock.now += 0.2
    assert est.acknowledged("a") == pytest.approx(0.2)
    # srtt 0.2, rttvar 0.1 -> 0.6, floored by min_rto 1 s
    assert est.rto == pytest.approx(1.0)
    for _ in range(20):
        est.started("b")
        clock.now += 3.0
        est.acknowledged("b")
    assert est.srtt == pytest.approx(3.0, rel=0.1)
    assert est.rto > 3.0 * 1.4


def test_karn_rule_no_sample_from_retransmitted_exchange() -> None:
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock)
    est.started("a")
    clock.now += 2.5
    assert est.retransmitted("a") is True
    assert est.retransmitted("a") is False
    clock.now += 1
    assert est.acknowledged("a") is None
    assert est.samples == 0
    # backed-off RTO is kept for the next exchange (RFC 6298 5.5)
    assert est.rto == pytest.approx(8.0)


def test_backoff_is_bounded() -> None:
    est = RttEstimator(LinkParameters(max_rto=30.0), clock=Clock(), rand=lambda: 1.0)
    t = est.first_timeout()
    waits = [t]
    for _ in range(10):
        t = est.next_timeout(t)
        waits.append(t)
    assert max(waits) == 30.0
    assert waits[:4] == [3.0, 6.0, 12.0, 24.0]
    for _ in range(10):
        est.backoff()
    assert est.rto == 30.0


def _simulate(params: LinkParameters, rtts: list[float]) -> list[int]:
    """Run exchanges with the given RTTs; return the retransmissions of each."""
    clock = Clock()
    est = RttEstimator(params, clock=clock, rand=lambda: 0.0)
    result = []
    for i, rtt in enumerate(rtts):
        key = i
        est.started(key, size=100)
        wait = est.first_timeout(size=100)
        elapsed = 0.0
        retransmissions = 0
        while elapsed + wait < rtt:
            elapsed += wait
            est.retransmitted(key)
            retransmissions += 1
            wait = est.next_timeout(wait)
        clock.now += rtt
        est.acknowledged(key)
        result.append(retransmissions)
    return result


def test_ten_second_rtt_converges_and_stops_retransmitting() -> None:
    # 100 bit/s: a 100-byte datagram serializes in 8 s; RTT ~10 s.
    rtts = [10.0, 9.5, 10.5, 10.0, 11.0, 9.0] * 10
    retrans = _simulate(LinkParameters(), rtts)
    # the RFC default (2 s) retransmits spuriously on the very first exchange only
    assert retrans[0] > 0
    assert sum(retrans[2:]) == 0


def test_ten_second_rtt_with_known_bandwidth_never_retransmits() -> None:
    params = LinkParameters(bandwidth_bps=100.0)
    assert sum(_simulate(params, [10.0, 10.5, 9.5, 10.0] * 10)) == 0


def test_steady_rtt_does_not_collapse_rto_onto_rtt() -> None:
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock)
    for i in range(200):
        est.started(i)
        clock.now += 10.0
        est.acknowledged(i)
    assert est.rto >= 15.0 - 1e-9


def test_empty_ack_delay_stays_inside_peer_timer() -> None:
    clock = Clock()
    p = LinkParameters()
    est = RttEstimator(p, clock=clock)
    # before any sample: half of the smallest RTO the peer could be using
    assert est.empty_ack_delay() == pytest.approx(0.5)
    for i in range(10):
        est.started(i)
        clock.now += 4.0
        est.acknowledged(i)
    d = est.empty_ack_delay()
    assert d > 0 and d + est.srtt < est.rto  # type: ignore[operator]
    assert RttEstimator(LinkParameters(empty_ack_delay=0.0)).empty_ack_delay() == 0.0


@given(st.lists(st.floats(min_value=0.0, max_value=500.0), min_size=1, max_size=50))
def test_rto_always_within_bounds(samples: list[float]) -> None:
    p = LinkParameters()
    est = RttEstimator(p, clock=Clock())
    for s in samples:
        est.sample(s)
        assert p.min_rto <= est.rto <= p.max_rto
        assert est.empty_ack_delay() >= 0


def test_known_bandwidth_alone_avoids_spurious_retransmission_of_the_first_exchange() -> None:
    # 100 bit/s, 10 s RTT, no hand-set ack_timeout: even the first exchange (before any
    # sample), small or a full block, waits long enough.
    params = LinkParameters(bandwidth_bps=100.0)
    assert params.initial_rto == pytest.approx(36.0)
    assert _simulate(params, [10.0, 12.0, 10.0, 11.0]) == [0, 0, 0, 0]
    # fast links keep the RFC's 2 s
    assert LinkParameters(bandwidth_bps=9600.0).initial_rto == 2.0
    assert LinkParameters().initial_rto == 2.0


def test_loss_does_not_keep_inflating_the_rto() -> None:
    # 1 s RTT, measured; then exchanges whose first datagram is lost (ACK 1 s after the
    # retransmission): the RTO kept for the next exchange stays within one doubling.
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock, rand=lambda: 0.0)
    for i in range(5):
        est.started(i)
        clock.now += 1.0
        est.acknowledged(i)
    base = est.rto
    for i in range(5, 15):
        est.started(i)
        wait = est.first_timeout()
        clock.now += wait
        est.retransmitted(i)
        wait = est.next_timeout(wait)
        clock.now += wait  # lost again
        est.retransmitted(i)
        clock.now += 1.0  # this one is answered
        est.acknowledged(i)
        assert est.rto <= 2 * base + 1e-9
    assert est.loss_recoveries == 10


# -- adaptive NSTART ---------------------------------------------------------------------


def _exchanges(
    est: RttEstimator,
    clock: Clock,
    n: int,
    rtt: float,
    *,
    size: int = 100,
    reply: int = 100,
    first_key: int = 0,
) -> None:
    """``n`` clean exchanges in a row, each taking ``rtt`` and ``size + reply`` bytes."""
    for i in range(first_key, first_key + n):
        est.started(("x", i), size)
        clock.now += rtt
        assert est.acknowledged(("x", i), reply) is not None


def test_nstart_defaults_and_fresh_peer_is_at_the_floor() -> None:
    p = LinkParameters()
    assert (p.nstart, p.max_nstart, p.nstart_samples, p.nstart_clean_exchanges) == (1, 4, 4, 16)
    assert p.max_datagram_bytes == 1024 + 128
    assert RttEstimator(p, clock=Clock()).allowed_outstanding() == 1


def test_fast_link_grows_to_max_nstart_after_enough_samples() -> None:
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock)
    # loopback-like: 2 ms round trips of 200 bytes
    _exchanges(est, clock, 3, 0.002)
    assert est.allowed_outstanding() == 1  # three samples are not enough
    _exchanges(est, clock, 1, 0.002, first_key=3)
    assert est.delivery_rate_bps == pytest.approx(800_000)
    assert est.allowed_outstanding() == 4
    # a larger ceiling is reached too
    clock2 = Clock()
    est2 = RttEstimator(LinkParameters(max_nstart=8), clock=clock2)
    _exchanges(est2, clock2, 4, 0.002)
    assert est2.allowed_outstanding() == 8


@pytest.mark.parametrize("bandwidth", [None, 100.0])
def test_ten_second_rtt_stays_at_one(bandwidth: float | None) -> None:
    clock = Clock()
    est = RttEstimator(LinkParameters(bandwidth_bps=bandwidth), clock=clock)
    for i in range(60):
        _exchanges(est, clock, 1, 10.0 + (i % 3) * 0.5, first_key=i)
        assert est.allowed_outstanding() == 1


def test_slow_radio_stays_at_one() -> None:
    # 9.6 kbit/s, 50 ms each way, 300-byte requests and replies: 0.6 s round trips
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock)
    _exchanges(est, clock, 40, 0.6, size=300, reply=300)
    assert est.delivery_rate_bps == pytest.approx(8000)
    assert est.allowed_outstanding() == 1
    # even tiny messages with no propagation delay (the link's full 9.6 kbit/s measured):
    # one queued 1 KiB block (~1 s) would not fit in the RTO's margin
    clock = Clock()
    est = RttEstimator(LinkParameters(), clock=clock)
    _exchanges(est, clock, 40, 0.1, size=60, reply=60)
    assert est.delivery_rate_bps == pytest.approx(9600)
    assert est.allowed_outstanding() == 1
    # the same link with its bit rate configured
    clock = Clock()
    p = LinkParameters(bandwidth_bps=9600.0)
    est = RttEstimator(p, clock=clock)
    _exchanges(est, clock, 40, 0.6, size=300, reply=300)
    assert est.allowed_outstanding() == 1


def test_configured_bandwidth_uses_queue_margin_and_bandwidth_delay_product() -> None:
    # 64 kbit/s, 1.2 s RTT (serialization of the 100-byte request on top): a queued
    # 1152-byte datagram costs 0.144 s, a quarter of the margin (RTO 1.8 s - SRTT 1.2 s)
    # is 0.15 s: one more exchange may be outstanding.
    p = LinkParameters(bandwidth_bps=64_000.0)
    clock = Clock()
    est = RttEstimator(p, clock=clock)
    for i in range(50):
        _exchanges(est, clock, 1, 1.2 + p.serialization_time(100), first_key=i)
    assert est.srtt == pytest.approx(1.2)
    assert est.allowed_outstanding() == 2
    # 100 bit/s with the same RTT: never
    p = LinkParameters(bandwidth_bps=100.0)
    clock = Clock()
    est = RttEstimator(p, clock=clock)
    for i in range(50):
        _exchanges(est, clock, 1, 1.2 + p.serialization_time(100), first_key=i)
    assert est.allowed_outstanding() == 1
    # a fast LAN whose pipe holds two exchanges: the bandwidth-delay product bounds it
    # (1 Mbit/s * 10 ms / (8 * 600 bytes) = 2.08), though queueing alone would allow 4
    p = LinkParameters(bandwidth_bps=1_000_000.0)
    clock = Clock()
    est = RttEstimator(p, clock=clock)
    for i in range(50):
        _exchanges(
            est, clock, 1, 0.01 + p.serialization_time(300), size=300, reply=300, first_key=i
        )
    assert est.allowed_outstanding() == 2


def test_retransmission_drops_to_floor_until_clean_run() -> None:
    clock = Clock()
    p = LinkParameters()
    est = RttEstimator(p, clock=clock)
    _exchanges(est, clock, 10, 0.002)
    assert est.allowed_outstanding() == 4
    # one lost datagram: the floor at once, even before the exchange ends
    est.started("lost", 100)
    clock.now += 1.5
    est.retransmitted("lost")
    assert est.allowed_outstanding() == 1
    clock.now += 0.002
    assert est.acknowledged("lost", 100) is None  # Karn: no sample, not a clean exchange
    assert est.allowed_outstanding() == 1
    _exchanges(est, clock, p.nstart_clean_exchanges - 1, 0.002, first_key=100)
    assert est.allowed_outstanding() == 1
    _exchanges(est, clock, 1, 0.002, first_key=200)
    assert est.allowed_outstanding() == 4
    # a retransmission in the middle of the run starts it again
    est.started("lost2", 100)
    est.retransmitted("lost2")
    est.acknowledged("lost2")
    _exchanges(est, clock, 10, 0.002, first_key=300)
    est.started("lost3", 100)
    est.retransmitted("lost3")
    est.acknowledged("lost3")
    _exchanges(est, clock, p.nstart_clean_exchanges - 1, 0.002, first_key=400)
    assert est.allowed_outstanding() == 1
    _exchanges(est, clock, 1, 0.002, first_key=500)
    assert est.allowed_outstanding() == 4
    # an exchange given up on (retransmissions exhausted) counts as a loss too
    est.started("gone", 100)
    est.gave_up("gone")
    assert est.allowed_outstanding() == 1


def test_max_nstart_equal_to_nstart_never_grows() -> None:
    for n in (1, 3):
        clock = Clock()
        est = RttEstimator(LinkParameters(nstart=n, max_nstart=n), clock=clock)
        assert est.allowed_outstanding() == n
        _exchanges(est, clock, 50, 0.001, size=1000, reply=1000)
        assert est.allowed_outstanding() == n
        est.started("r", 10)
        est.retransmitted("r")
        assert est.allowed_outstanding() == n


def test_floor_above_one_holds_on_slow_links() -> None:
    clock = Clock()
    est = RttEstimator(LinkParameters(nstart=2, max_nstart=6), clock=clock)
    _exchanges(est, clock, 20, 10.0)
    assert est.allowed_outstanding() == 2


def test_nstart_config_validation_names_the_field() -> None:
    p = LinkParameters.from_config({"nstart": 2, "max_nstart": 8, "nstart_samples": 2}, "link")
    assert (p.nstart, p.max_nstart, p.nstart_samples) == (2, 8, 2)
    # an nstart above the default ceiling raises the ceiling with it (a fixed NSTART)
    assert LinkParameters.from_config({"nstart": 8}, "coap.link").max_nstart == 8
    with pytest.raises(ConfigValueError) as e:
        LinkParameters.from_config({"nstart": 8, "max_nstart": 4}, "coap.link")
    assert e.value.path == "coap.link.max_nstart" and "8..64" in str(e.value)
    with pytest.raises(ConfigValueError) as e:
        LinkParameters.from_config({"nstart": 3, "max_nstart": 2}, "link")
    assert e.value.path == "link.max_nstart"
    for field, bad in (
        ("max_nstart", 0),
        ("max_nstart", 65),
        ("max_nstart", "4"),
        ("nstart_samples", 0),
        ("nstart_clean_exchanges", -1),
        ("nstart_clean_exchanges", 1.5),
    ):
        with pytest.raises(ConfigValueError) as e:
            LinkParameters.from_config({field: bad}, "link")
        assert e.value.path == f"link.{field}", (field, bad)
        assert "must be an integer in" in str(e.value)


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=30.0),
            st.integers(min_value=0, max_value=2000),
            st.booleans(),
        ),
        max_size=60,
    ),
    st.sampled_from([None, 100.0, 9600.0, 1e6]),
)
def test_allowed_outstanding_stays_within_floor_and_ceiling(
    events: list[tuple[float, int, bool]], bandwidth: float | None
) -> None:
    clock = Clock()
    p = LinkParameters(nstart=2, max_nstart=5, bandwidth_bps=bandwidth)
    est = RttEstimator(p, clock=clock)
    for i, (rtt, size, lost) in enumerate(events):
        est.started(i, size)
        if lost:
            est.retransmitted(i)
            assert est.allowed_outstanding() == 2
        clock.now += rtt
        est.acknowledged(i, size)
        assert 2 <= est.allowed_outstanding() <= 5
