"""Body codec speed against cbor2 on a real federation transaction.

    .venv/bin/python bench/codec.py [--rounds 15] [--loops 300] [--profile-out FILE]

Times, on the corpus's one-PDU ``m.room.message`` transaction (tests/corpus/federation.jsonl):

* ``decode_body`` of its encoded form against ``cbor2.loads`` of its generic CBOR;
* ``encode_body`` against ``cbor2.dumps`` + one raw DEFLATE (level 9, no dictionary) of it.

Each round times every operation over ``--loops`` calls, one after the other, so the
ratios of a round are measured side by side; the report gives median, min and max of
the per-call times and of the per-round ratios over ``--rounds`` rounds.  The targets
(issue 12): decode within 3x, encode within 5x.  ``--profile-out`` writes a cProfile
text profile of both directions (what bench/profiles/codec.txt holds).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synapse_coap.wire.body import decode_body, encode_body  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.profile import load_profile  # noqa: E402

NAME = "federation.send.m.room.message"


def transaction() -> dict[str, Any]:
    for line in (ROOT / "tests" / "corpus" / "federation.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["name"] == NAME:
            body: dict[str, Any] = entry["request"]["body"]
            return body
    raise SystemExit(f"{NAME} not in the corpus")


def per_call(fn: Callable[[], object], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - start) / loops * 1e6


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    return (
        f"{fmt.format(statistics.median(xs))} "
        f"(min {fmt.format(min(xs))}, max {fmt.format(max(xs))}, n={len(xs)})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--loops", type=int, default=300)
    ap.add_argument("--profile-out", type=Path, default=None)
    args = ap.parse_args(argv)

    profile = load_profile(1)
    body = transaction()
    ctx = WireContext(("remote.example.org", body["origin"]))
    encoded = encode_body(body, profile, ctx)
    generic = cbor2.dumps(body)
    assert decode_body(encoded, profile, ctx) == body

    ops: dict[str, Callable[[], object]] = {
        "decode_body": lambda: decode_body(encoded, profile, ctx),
        "cbor2.loads": lambda: cbor2.loads(generic),
        "encode_body": lambda: encode_body(body, profile, ctx),
        "cbor2.dumps + DEFLATE": lambda: zlib.compress(cbor2.dumps(body), 9, -15),
    }
    for fn in ops.values():  # warm up (primed DEFLATE objects, key tables)
        per_call(fn, 20)
    times: dict[str, list[float]] = {k: [] for k in ops}
    dec_ratio: list[float] = []
    enc_ratio: list[float] = []
    for _ in range(args.rounds):
        r = {k: per_call(fn, args.loops) for k, fn in ops.items()}
        for k, v in r.items():
            times[k].append(v)
        dec_ratio.append(r["decode_body"] / r["cbor2.loads"])
        enc_ratio.append(r["encode_body"] / r["cbor2.dumps + DEFLATE"])

    print(
        f"{NAME}: JSON {len(json.dumps(body, separators=(',', ':')))} B, "
        f"generic CBOR {len(generic)} B, encode_body {len(encoded)} B"
    )
    for k, v in times.items():
        print(f"  {k:24} {spread(v)} us per call")
    print(f"  decode_body / cbor2.loads            {spread(dec_ratio, '{:.2f}')}x (target <= 3x)")
    print(f"  encode_body / (cbor2.dumps + DEFLATE) {spread(enc_ratio, '{:.2f}')}x (target <= 5x)")

    if args.profile_out:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            decode_body(encoded, profile, ctx)
        for _ in range(2000):
            encode_body(body, profile, ctx)
        prof.disable()
        out = io.StringIO()
        out.write(f"# cProfile of 2000 decode_body + 2000 encode_body calls on {NAME}\n")
        out.write("# command: python bench/codec.py --profile-out " + str(args.profile_out) + "\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        text = out.getvalue().replace(str(ROOT) + "/", "")
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        args.profile_out.write_text(text)
        print(f"profile written to {args.profile_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
