"""The demo (issue 5, "Demo"): CoAP+Noise federation beside stock HTTPS, bytes per transaction.

One run of :func:`synapse_coap_lab.demo.run_demo` with 2 messages each way
(four real Synapse processes) is shared by the tests below. The HTTPS half and
the CoAP half are checked separately, so a broken CoAP stack does not hide a
working HTTPS baseline (and the other way round). A second, HTTPS-only run
checks the no-tshark fallback (counting proxy + estimate) against the capture.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from synapse_coap_lab import demo
from synapse_coap_lab.capture import Packet

pytestmark = pytest.mark.integration

MESSAGES = 2


@pytest.fixture(scope="module")
def report_and_log(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[demo.DemoReport, list[str]]]:
    workdir = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    report = asyncio.run(demo.run_demo(workdir, messages=MESSAGES, progress=lines.append))
    print("\n".join(lines))
    print(report.format_table())
    yield report, lines


def _fail_with(result: demo.StackResult, lines: list[str]) -> str:
    return f"{result.stack} failed: {result.error}\n" + "\n".join(lines[-40:])


def test_https_baseline_delivers_and_is_counted(
    report_and_log: tuple[demo.DemoReport, list[str]],
) -> None:
    report, lines = report_and_log
    https = report.https
    assert https.error is None, _fail_with(https, lines)
    assert https.sent == https.delivered == 2 * MESSAGES
    assert len(https.traffic) == len(report.steps) == 2 + 2 * MESSAGES
    for step, t in zip(report.steps, https.traffic, strict=True):
        assert t.ip_bytes > 0 and t.packets > 0, (step, t)
        assert t.a_to_b_bytes > 0 and t.b_to_a_bytes > 0, (step, t)
    join = https.traffic[0]
    message = https.traffic[1]
    # first contact (TLS handshakes, key fetch, make/send_join) costs far more than a message
    assert join.ip_bytes > 5 * message.ip_bytes
    # a warm message over HTTPS: a request and a response, each with headers, over TLS
    assert 1000 < message.ip_bytes < 5000


def test_coap_pair_delivers_every_message(
    report_and_log: tuple[demo.DemoReport, list[str]],
) -> None:
    report, lines = report_and_log
    coap = report.coap
    assert coap.error is None, _fail_with(coap, lines)
    assert coap.sent == coap.delivered == 2 * MESSAGES
    for step, t in zip(report.steps, coap.traffic, strict=True):
        assert t.ip_bytes > 0 and t.packets > 0, (step, t)


def test_coap_costs_fewer_bytes_than_https(
    report_and_log: tuple[demo.DemoReport, list[str]],
) -> None:
    report, lines = report_and_log
    if not (report.coap.ok and report.https.ok):
        pytest.fail(_fail_with(report.coap if not report.coap.ok else report.https, lines))
    assert report.coap.total.ip_bytes < report.https.total.ip_bytes
    for i, step in enumerate(report.steps):
        assert report.coap.traffic[i].ip_bytes < report.https.traffic[i].ip_bytes, step
    ratio = report.ratio()
    assert ratio is not None and ratio > 1


def test_report_files_and_table(report_and_log: tuple[demo.DemoReport, list[str]]) -> None:
    report, _ = report_and_log
    with (report.workdir / "demo-bytes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == [s.key for s in report.steps]
    assert int(rows[1]["https_ip_bytes"]) == report.https.traffic[1].ip_bytes
    summary = json.loads((report.workdir / "demo-summary.json").read_text())
    assert summary["messages_each_way"] == MESSAGES
    assert summary["https"]["total_ip_bytes"] == report.https.total.ip_bytes
    table = report.format_table()
    for step in report.steps:
        assert step.title in table
    assert f"{report.https.traffic[1].ip_bytes:,}" in table
    # homeserver directories are removed after a successful run (no --keep)
    if report.ok:
        assert not (report.workdir / "coap").exists()
        assert not (report.workdir / "https").exists()


def test_estimate_without_tshark_is_close_to_the_capture(
    tmp_path: Path, report_and_log: tuple[demo.DemoReport, list[str]]
) -> None:
    """The fallback (counting proxy + estimate_tcp) lands near the capture's figures."""
    report, _ = report_and_log
    captured = report.https
    if captured.error is not None or "tshark capture" not in captured.method:
        pytest.skip("no capture to compare with")
    steps = demo.scenario_steps(1)
    lines: list[str] = []
    pair = demo.HttpsPair(tmp_path, lines.append, counting="estimate")
    estimated = asyncio.run(demo._run_pair(pair, steps, 1, lines.append))
    assert estimated.error is None, "\n".join(lines)
    assert estimated.method.startswith("ESTIMATE")
    for i in (0, 1):  # the join and a warm message
        est, cap = estimated.traffic[i].ip_bytes, captured.traffic[i].ip_bytes
        assert abs(est - cap) < 0.15 * cap, (steps[i], est, cap)


def test_markers_split_the_capture_into_steps() -> None:
    marker, fa, fb = 9999, 1000, 2000

    def tcp(src: int, dst: int, size: int) -> Packet:
        return Packet(0.0, size, "tcp", src, dst, size - 52)

    def mark() -> Packet:
        return Packet(0.0, 32, "udp", 40000, marker)

    packets = [
        tcp(5555, fb, 999),  # before the first mark: not part of any step
        mark(),
        tcp(5555, fb, 100),  # A -> B request
        tcp(fb, 5555, 200),  # B's response
        mark(),
        tcp(6666, fa, 300),  # B -> A request
        mark(),
        tcp(6666, fa, 1),  # after the last mark: not closed, not counted
    ]
    out = demo._split_at_markers(packets, marker, (fa, fb))
    assert out == [demo.Traffic(300, 2, 100, 200), demo.Traffic(300, 1, 0, 300)]
