"""The listener's per-datagram counters (synapse/metrics.py DatagramCounters): exported in
Synapse's Prometheus registry under the documented names and labels, per server name."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY, generate_latest

from synapse_coap.synapse.metrics import SERVER_NAME_LABEL, SynapseCoapMetrics


def _samples(name: str, server: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels.get(SERVER_NAME_LABEL) == server:
                out[(sample.labels["direction"], sample.labels["kind"])] = sample.value
    return out


def test_datagrams_and_bytes_are_counted_per_direction_kind_and_server() -> None:
    a, b = f"a-{uuid.uuid4().hex}.test", f"b-{uuid.uuid4().hex}.test"
    ma, mb = SynapseCoapMetrics(a), SynapseCoapMetrics(b)
    for size in (100, 50, 7):
        ma.datagram("in", "record", size)
    ma.datagram("out", "record", 70)
    ma.datagram("in", "handshake", 96)
    mb.datagram("in", "record", 1)
    assert _samples("synapse_coap_datagrams_total", a) == {
        ("in", "record"): 3,
        ("out", "record"): 1,
        ("in", "handshake"): 1,
    }
    assert _samples("synapse_coap_bytes_total", a) == {
        ("in", "record"): 157,
        ("out", "record"): 70,
        ("in", "handshake"): 96,
    }
    assert _samples("synapse_coap_datagrams_total", b) == {("in", "record"): 1}
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE synapse_coap_datagrams_total counter" in text
    assert "# TYPE synapse_coap_bytes_total counter" in text
    assert (
        f'synapse_coap_bytes_total{{direction="out",kind="record",{SERVER_NAME_LABEL}="{a}"}} 70.0'
        in text
    )
