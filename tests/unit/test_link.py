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
