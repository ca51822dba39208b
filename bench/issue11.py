#!/usr/bin/env python3
"""Render issue 11's figures (a client's day on the link) into docs/benchmarks.md.

Reads the ``results.csv`` of the lab runs kept under ``bench/results/issue11/<run>/``
(each written by ``bench/lab.py ... --no-docs --out bench/results/issue11/<run>``; the
commands are in the block) and rewrites the block between the issue-11 markers of
docs/benchmarks.md: the idle cost per minute and airtime, the bytes of a send and of a
pushed message, the receive latency, and the day's HTTPS/CoAP ratio.

    .venv/bin/python bench/issue11.py
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synapse_coap.lab.model import PROFILES  # noqa: E402

RUNS = REPO / "bench" / "results" / "issue11"
DOCS = REPO / "docs" / "benchmarks.md"
MARK_START = "<!-- issue11:start (written by bench/issue11.py; do not edit by hand) -->"
MARK_END = "<!-- issue11:end -->"


def _rows() -> list[dict[str, str]]:
    out = []
    for path in sorted(RUNS.glob("*/results.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                row["run"] = path.parent.name
                out.append(row)
    return out


def _airtime(nbytes: int, rate: float | None, seconds: float) -> str:
    if not rate or seconds <= 0:
        return "—"
    return f"{100.0 * 8.0 * nbytes / (rate * seconds):.2f} %"


def render() -> str:
    rows = _rows()
    lines = [
        "### A client's day on the link (issue 11)",
        "",
        "Lab runs kept in `bench/results/issue11/<run>/results.csv`, each with its "
        "`provenance.json` (listed below the table). IP-level bytes; the CoAP client is "
        "matrix-nio through the sidecar with push and its default keep-alive (after 110 s "
        "without sending; at 100 bit/s raised to 800 s, at most 0.5 % of the link). "
        "The machine was shared: times are noisy, bytes are exact.",
        "",
        "| run | scenario | stack | bytes | dgrams/pkts | s | B/min | up airtime | down airtime "
        "| ok | note |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        ip, secs = int(r["ip_bytes"] or 0), float(r["seconds"] or 0)
        prof = PROFILES.get(r["profile"])
        per_min = f"{ip * 60.0 / secs:,.1f}" if r["scenario"] == "idle" and secs > 0 else ""
        up = down = ""
        if r["scenario"] == "idle" and prof is not None:
            up = _airtime(int(r["up_bytes"] or 0), prof.uplink.rate, secs)
            down = _airtime(int(r["down_bytes"] or 0), prof.downlink.rate, secs)
        lines.append(
            f"| {r['run']} | {r['scenario']} | {r['stack']} | {ip:,} | {r['packets']} "
            f"| {secs:.2f} | {per_min} | {up} | {down} | {r['ok']} | {r['note']} |"
        )
    # the day's ratio, per run that has the day over CoAP and an HTTPS baseline
    days: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["scenario"] == "day" and r["ok"] == "True":
            days.setdefault(r["run"], {})[r["stack"]] = int(r["ip_bytes"] or 0)
    for run, by_stack in sorted(days.items()):
        coap = by_stack.get("coap")
        if not coap:
            continue
        ratios = [
            f"{by_stack[stack]:,} B over HTTPS {label} = **{by_stack[stack] / coap:.1f}x** "
            f"the {coap:,} B of CoAP+Noise"
            for stack, label in (("https", "to stock Synapse"), ("https-nginx", "behind nginx"))
            if by_stack.get(stack)
        ]
        if ratios:
            lines += ["", f"The day (`{run}`): " + "; ".join(ratios) + "."]
    lines += ["", "Runs:", ""]
    for path in sorted(RUNS.glob("*/results.csv")):
        meta_path = path.parent / "provenance.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        lines.append(
            f"- `{path.parent.name}`: `{meta.get('command', '?')}`; commit "
            f"`{meta.get('commit', '?')}`, Synapse {meta.get('synapse', '?')}, "
            f"{meta.get('time', 'time not recorded')}"
        )
    return "\n".join(lines)


def main() -> int:
    import argparse

    argparse.ArgumentParser(
        description="Render issue 11's lab runs (bench/results/issue11/*/results.csv) into "
        "the issue-11 block of docs/benchmarks.md; runs nothing itself.",
    ).parse_args()
    block = render()
    text = DOCS.read_text()
    if MARK_START in text and MARK_END in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = f"{head}{MARK_START}\n\n{block}\n\n{MARK_END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{MARK_START}\n\n{block}\n\n{MARK_END}\n"
    DOCS.write_text(text)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
