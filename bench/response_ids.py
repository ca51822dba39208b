"""What recording an answer's identifiers costs: the C scan against the Python reference.

Every 2xx JSON answer to a numbered request (``/sync``, a ``/send`` into a room, a
federation ``/send``: docs/wire-body.md) has its room and event ids recorded in the
session string table, by the server when it encodes the answer and by the client when it
decodes it. ``strings.python_response_identifiers`` does that with ``json.loads`` and a
walk over every string; with the native build ``strings.response_identifiers`` first
tries one pass over the JSON text in C (``wire/_cenc.c`` ``response_ids``).

For every response body of the held-out corpus (written as Synapse writes JSON), grouped
by size, this times both back to back, ``--rounds`` rounds of ``--calls`` calls per body:
microseconds per body (the group's median body), median (min-max) over the rounds, and
the ratio C / Python measured side by side. Needs the native build (``synapse-coap
build-native``); writes ``bench/results/response_ids.csv`` with the run's provenance.

    python bench/response_ids.py [--rounds 5] [--calls 200] [--out CSV]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_store import provenance, rounds_calls_args, spread, write_dict_rows  # noqa: E402

from synapse_coap.wire import body_encode, strings  # noqa: E402

#: (label, the largest body in bytes) of each size group
GROUPS = ((" up to 1 KB", 1024), ("1-4 KB", 4096), ("over 4 KB", 1 << 62))


def bodies() -> dict[str, list[bytes]]:
    """The held-out corpus's response bodies, compact as Synapse writes JSON, by size."""
    out: dict[str, list[bytes]] = {label: [] for label, _ in GROUPS}
    for path in sorted((ROOT / "tests" / "corpus" / "heldout").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            body = (json.loads(line).get("response") or {}).get("body")
            if not isinstance(body, (dict, list)):
                continue
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            label = next(label for label, top in GROUPS if len(text) <= top)
            out[label].append(text)
    return out


def per_body_us(fn: Callable[[bytes], object], texts: list[bytes], calls: int) -> float:
    """The median over ``texts`` of one body's time per call (microseconds)."""
    times = []
    for text in texts:
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn(text)
        times.append((time.perf_counter_ns() - t0) / calls / 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = rounds_calls_args(
        ap,
        argv,
        calls_help="calls per body, round and way",
        out=ROOT / "bench" / "results" / "response_ids.csv",
    )
    if body_encode._CENC is None:
        ap.error("needs the native build: synapse-coap build-native")
    meta = provenance(
        "python bench/response_ids.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    groups = {label: texts for label, texts in bodies().items() if texts}
    ways: dict[str, Callable[[bytes], object]] = {
        "python": strings.python_response_identifiers,
        "c": strings.response_identifiers,
    }
    for texts in groups.values():  # the C scan takes every one of them
        for text in texts:
            got = body_encode.response_ids_fast(text, strings.MAX_RESPONSE_IDS)
            if got != strings.python_response_identifiers(text):
                raise SystemExit(f"the C scan did not give the reference's tuple: {text[:200]!r}")
    got: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds}", file=sys.stderr)
        for label, texts in groups.items():
            for way, fn in ways.items():
                got.setdefault((label, way), []).append(per_body_us(fn, texts, args.calls))
    print(
        f"\nmicroseconds per body (the group's median), median (min-max) of {args.rounds} "
        "rounds; held-out response bodies"
    )
    print(f"{'size':12} {'bodies':>6} {'Python':>24} {'C':>24} {'C / Python':>24}")
    rows = []
    for label, texts in groups.items():
        py, c = got[(label, "python")], got[(label, "c")]
        ratio = [a / b for a, b in zip(c, py, strict=True)]
        print(
            f"{label.strip():12} {len(texts):6} {spread(py, '{:.1f}'):>24} "
            f"{spread(c, '{:.1f}'):>24} {spread(ratio, '{:.3f}'):>24}"
        )
        for i in range(args.rounds):
            rows.append(
                {
                    "size": label.strip(),
                    "bodies": len(texts),
                    "round": i,
                    "python_us": f"{py[i]:.2f}",
                    "c_us": f"{c[i]:.2f}",
                }
            )
    write_dict_rows(args.out, rows, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
