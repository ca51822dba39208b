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


def _request_samples(server: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.labels.get(SERVER_NAME_LABEL) != server:
                continue
            if sample.name == "synapse_coap_requests_total":
                out[(sample.name, sample.labels["route"], sample.labels["status"])] = sample.value
            elif sample.name.startswith("synapse_coap_request_seconds"):
                le = sample.labels.get("le", "")
                out[(sample.name, sample.labels["route"], le)] = sample.value
    return out


def test_requests_and_their_seconds_are_counted_per_route_status_and_server() -> None:
    a, b = f"a-{uuid.uuid4().hex}.test", f"b-{uuid.uuid4().hex}.test"
    ma, mb = SynapseCoapMetrics(a), SynapseCoapMetrics(b)
    # a bucket's bound is inclusive (Prometheus's "le"); past the last one is +Inf
    for seconds in (0.005, 0.0051, 0.2):
        ma.request("client.versions", 200, seconds)
    ma.request("client.versions", 404, 500.0)
    mb.request("federation.version", 200, 0.001)
    got = _request_samples(a)
    assert got[("synapse_coap_requests_total", "client.versions", "200")] == 3
    assert got[("synapse_coap_requests_total", "client.versions", "404")] == 1
    bucket = "synapse_coap_request_seconds_bucket"
    assert got[(bucket, "client.versions", "0.005")] == 1
    assert got[(bucket, "client.versions", "0.01")] == 2
    assert got[(bucket, "client.versions", "0.25")] == 3
    assert got[(bucket, "client.versions", "120.0")] == 3
    assert got[(bucket, "client.versions", "+Inf")] == 4
    assert got[("synapse_coap_request_seconds_count", "client.versions", "")] == 4
    assert abs(got[("synapse_coap_request_seconds_sum", "client.versions", "")] - 500.2101) < 1e-9
    assert not any(key[1] == "federation.version" for key in got)
    assert _request_samples(b)[("synapse_coap_requests_total", "federation.version", "200")] == 1
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE synapse_coap_requests_total counter" in text
    assert "# TYPE synapse_coap_request_seconds histogram" in text
