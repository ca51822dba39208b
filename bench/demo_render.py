#!/usr/bin/env python3
"""Render the demo's table in docs/demo.md from a committed demo run.

A run of ``scripts/demo --workdir DIR`` writes ``demo-summary.json`` (every step's
bytes and packets on both stacks, deliveries, how the bytes were counted).
Copy it with its ``provenance.json`` into ``bench/results/demo/`` and run::

    .venv/bin/python bench/demo_render.py            # rewrite the block in docs/demo.md
    .venv/bin/python bench/demo_render.py --record DIR   # copy DIR's summary first,
                                                      # with this checkout's provenance

The block between the ``demo-table`` markers is written only from those files,
with the demo's own table formatter (``DemoReport.format_table``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results_store import provenance, replace_block  # noqa: E402

from synapse_coap_lab.demo import DemoReport, StackResult, Step, Traffic  # noqa: E402

RESULTS = REPO / "bench" / "results" / "demo"
DOCS = REPO / "docs" / "demo.md"
WRITER = "bench/demo_render.py from bench/results/demo/"


def _stack(name: str, summary: dict[str, Any]) -> StackResult:
    info = summary[name]
    steps = summary["steps"]
    traffic = tuple(
        Traffic(
            int(row[f"{name}_ip_bytes"]),
            int(row[f"{name}_packets"]),
            int(row[f"{name}_a_to_b_bytes"] or 0),
            int(row[f"{name}_b_to_a_bytes"] or 0),
        )
        for row in steps
        if row[f"{name}_ip_bytes"] != ""
    )
    seconds = tuple(float(row[f"{name}_seconds"] or 0) for row in steps[: len(traffic)])
    return StackResult(
        stack=name,
        description=info["description"],
        method=info["counted_by"],
        traffic=traffic,
        sent=int(info["sent"]),
        delivered=int(info["delivered"]),
        seconds=seconds,
        error=info["error"],
    )


def render(directory: Path = RESULTS) -> str:
    summary = json.loads((directory / "demo-summary.json").read_text())
    meta = json.loads((directory / "provenance.json").read_text())
    report = DemoReport(
        messages=int(summary["messages_each_way"]),
        steps=tuple(Step(r["step"], r["title"], r["kind"]) for r in summary["steps"]),
        coap=_stack("coap", summary),
        https=_stack("https", summary),
        workdir=directory,
        synapse_version=summary["synapse_version"],
    )
    return "\n".join(
        [
            f"The table below is from one run of `{meta.get('command', 'scripts/demo')}` "
            f"({meta.get('time', '?')}, commit `{meta.get('commit', '?')}`, Synapse "
            f"{summary['synapse_version']}, Python {meta.get('python', '?')}; "
            f"{meta.get('machine', '?')}), kept in `bench/results/demo/`. "
            "User names, room names and message texts are drawn fresh for each run.",
            "",
            "```",
            report.format_table(),
            "```",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--record", type=Path, metavar="DIR", help="a demo's --workdir to record")
    ap.add_argument(
        "--command", default="scripts/demo", help="the command that made the run (with --record)"
    )
    args = ap.parse_args(argv)
    if args.record is not None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in ("demo-summary.json", "demo-bytes.csv"):
            shutil.copy(args.record / name, RESULTS / name)
        (RESULTS / "provenance.json").write_text(
            json.dumps(provenance(args.command), indent=1) + "\n"
        )
    block = render()
    replace_block(DOCS, "demo-table", block, WRITER)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
