#!/usr/bin/env python3
"""Head-of-line blocking: sends issued while the client's long-poll /sync is outstanding.

A real Synapse loading the module, the sidecar in front of it on loopback (no relay, no
impairment), a client speaking plain HTTP to the sidecar. For each of ``--sends`` rounds:

1. the client starts ``GET /sync?since=…&timeout=30000`` (it waits: nothing is new);
2. ``delay`` seconds later (spread evenly over 0 .. ``--max-delay``, the window in which
   the long-poll's ACK used to be held) it sends one message ``PUT …/send/…/{txn}``;
3. the long-poll returns that message (its echo: the module runs with
   ``push.echo_hold: 0``), and the next round starts from its ``next_batch``.

For every send it records the time the client waited for the answer and Synapse's own
time for it (``Processed request: …sec`` of Synapse's access log, matched by the
transaction id), and prints their distributions and the overhead (client − Synapse).
The target (issue 11): overhead within 20 ms for every send, no 0.45 s waits.

    .venv/bin/python bench/hol.py [--sends 100] [--max-delay 0.5] [--out DIR]
    .venv/bin/python bench/hol.py --save      # also bench/results/hol-<label>.json, .csv
    .venv/bin/python bench/hol.py --render    # docs/benchmarks.md from bench/results/hol-*.json

To compare with the code before the fix, run the same file against an older tree (its
``synapse_coap`` shadows the installed one, in the Synapse process too)::

    mkdir /tmp/old && git archive 2975f8c | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python bench/hol.py --label 2975f8c

Times are wall-clock on a shared machine: read the distribution, not one number.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# appended, not prepended: a PYTHONPATH tree (see above) must win over this checkout
sys.path.append(str(Path(__file__).resolve().parents[1]))

import aiohttp
import nio

from synapse_coap.noise.keys import generate_private_key, public_key, write_key_file
from synapse_coap.proxy.runner import HomeserverAddress, SidecarConfig, start_sidecar
from synapse_coap.proxy.sidecar import SidecarOptions
from tests.harness.synapse_proc import SynapseProcess, free_port

_ACCESS = re.compile(
    r"Processed request: (?P<secs>[0-9.]+)sec/.*\"PUT [^\"]*/send/m\.room\.message/(?P<txn>[^ /?\"]+)"
)


def _short(token: str, txn: str) -> str:
    """The id the sidecar puts on the link (unchanged if this tree does not shorten)."""
    try:
        from synapse_coap.proxy.txn import short_txn_id
    except ImportError:
        return txn
    return short_txn_id(token, txn)


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def _texts(sync_body: dict[str, Any]) -> list[str]:
    """The message texts of a /sync response, in order."""
    return [
        e.get("content", {}).get("body", "")
        for room in sync_body.get("rooms", {}).get("join", {}).values()
        for e in room.get("timeline", {}).get("events", [])
    ]


async def run(
    sends: int, max_delay: float, workdir: Path, poll_first: bool = True
) -> list[dict[str, Any]]:
    coap_port = free_port("udp")
    key_path = workdir / "server.key"
    private = generate_private_key()
    write_key_file(key_path, private)
    syn = SynapseProcess(
        workdir / "hs",
        "hs.test",
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                # each round's long-poll returns with the echo of its send, so echoes are
                # pushed at once (the module's default holds them for the next news)
                "config": {
                    "listen": [f"127.0.0.1:{coap_port}"],
                    "private_key_path": str(key_path),
                    "push": {"echo_hold": 0},
                },
            }
        ],
    )
    await asyncio.to_thread(syn.start, 120.0)
    rows: list[dict[str, Any]] = []
    try:
        sidecar = await start_sidecar(
            SidecarConfig(
                listen=("127.0.0.1", 0),
                homeserver=HomeserverAddress("127.0.0.1", coap_port, True),
                server_key=public_key(private),
                state_dir=workdir / "state",
                server_name="hs.test",
                options=SidecarOptions(cache=False),
            )
        )
        url = f"http://127.0.0.1:{sidecar.address[1]}"
        setup = nio.AsyncClient(url, "alice")
        reg = await setup.register("alice", "alice-password")
        token = getattr(reg, "access_token", None)
        if not token:
            raise SystemExit(f"register failed: {reg!r}")
        room = await setup.room_create()
        room_id = room.room_id
        await setup.close()
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=auth) as http:

            async def sync(since: str | None, timeout_ms: int) -> dict[str, Any]:
                q = f"?timeout={timeout_ms}" + (f"&since={since}" if since else "")
                async with http.get(f"{url}/_matrix/client/v3/sync{q}") as r:
                    body: dict[str, Any] = await r.json()
                    if r.status != 200:
                        raise SystemExit(f"sync: {r.status} {body}")
                    return body

            since = (await sync(None, 0))["next_batch"]
            # warm up: the first requests measure the link (RTT samples, NSTART)
            for i in range(5):
                txn = f"warm-{i}-{uuid.uuid4()}"
                async with http.put(
                    f"{url}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}",
                    json={"msgtype": "m.text", "body": f"warm {i}"},
                ) as r:
                    await r.read()
            # catch up past the warm-up's echoes (pushed: maybe over several answers)
            result = await sync(since, 0)
            since = result["next_batch"]
            while "warm 4" not in _texts(result):
                result = await asyncio.wait_for(sync(since, 30000), 60)
                since = result["next_batch"]
            for i in range(sends):
                delay = max_delay * i / max(1, sends - 1)
                poll = asyncio.ensure_future(sync(since, 30000 if poll_first else 0))
                if not poll_first:  # baseline: the same send with nothing outstanding
                    since = (await poll)["next_batch"]
                    poll = asyncio.ensure_future(asyncio.sleep(0))
                await asyncio.sleep(delay)
                if poll_first and poll.done():
                    raise SystemExit("the long-poll returned before the send: nothing to measure")
                txn = str(uuid.uuid4())
                t0 = time.monotonic()
                async with http.put(
                    f"{url}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}",
                    json={"msgtype": "m.text", "body": f"message {i}"},
                ) as r:
                    await r.read()
                    status = r.status
                waited = time.monotonic() - t0
                result = await asyncio.wait_for(poll, 60)
                if poll_first:
                    since = result["next_batch"]
                    while f"message {i}" not in _texts(result):
                        result = await asyncio.wait_for(sync(since, 30000), 60)
                        since = result["next_batch"]
                rows.append(
                    {
                        "i": i,
                        "delay": round(delay, 4),
                        "status": status,
                        "client_s": waited,
                        "txn": _short(token, txn),
                    }
                )
        await sidecar.close()
    finally:
        await asyncio.to_thread(syn.stop)
    own: dict[str, float] = {}
    for line in syn.log_path.read_text(errors="replace").splitlines():
        m = _ACCESS.search(line)
        if m:
            own[m.group("txn")] = float(m.group("secs"))
    for row in rows:
        row["synapse_s"] = own.get(row.pop("txn"))
    return rows


def report(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    client = [r["client_s"] for r in rows]
    paired = [r for r in rows if r["synapse_s"] is not None]
    synapse = [r["synapse_s"] for r in paired]
    over = [r["client_s"] - r["synapse_s"] for r in paired]

    def line(name: str, v: list[float]) -> str:
        if not v:
            return f"{name:<22} (no data)"
        return (
            f"{name:<22} min {min(v):6.3f}  median {statistics.median(v):6.3f}  "
            f"p90 {_pct(v, 90):6.3f}  p99 {_pct(v, 99):6.3f}  max {max(v):6.3f}"
        )

    print(f"\nSends ({label}), n={len(rows)}, seconds:")
    print(line("client waited", client))
    print(line("Synapse's own time", synapse))
    print(line("overhead (client-own)", over))
    late = sum(1 for o in over if o > 0.020)
    held = sum(1 for c in client if c >= 0.2)
    print(
        f"overhead > 20 ms: {late} of {len(over)}; waits >= 0.2 s: {held} of {len(client)}; "
        f"non-200: {sum(1 for r in rows if r['status'] != 200)}; "
        f"unmatched in Synapse's log: {len(rows) - len(paired)}"
    )
    return {
        "label": label,
        "n": len(rows),
        "client_median": statistics.median(client) if client else None,
        "synapse_median": statistics.median(synapse) if synapse else None,
        "client_max": max(client) if client else None,
        "overhead_median": statistics.median(over) if over else None,
        "overhead_p90": _pct(over, 90) if over else None,
        "overhead_max": max(over) if over else None,
        "overhead_over_20ms": late,
        "waits_over_0_2s": held,
    }


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
MARK_START = "<!-- hol-results:start (written by bench/hol.py --render; do not edit by hand) -->"
MARK_END = "<!-- hol-results:end -->"


def _provenance(command: str) -> dict[str, Any]:
    import datetime
    import os
    import subprocess

    try:
        import synapse_coap  # the tree that ran (PYTHONPATH may point at an older one)

        tree = Path(synapse_coap.__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "?",
        "command": command,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def render(results: Path = RESULTS, docs: Path = DOCS) -> str:
    """The docs block from every saved run (one row per run)."""
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("hol-*.json"))]
    lines = [
        "### Sends during an outstanding long-poll (head-of-line blocking)",
        "",
        "`bench/hol.py`: real Synapse with the module, the sidecar on loopback, n sends each "
        "issued 0-0.5 s after the client's long-poll `/sync` started (the baseline row: the "
        "same sends with no long-poll outstanding). Overhead = the client's wait minus "
        "Synapse's own time for that request (its access log). Seconds. The machine (2 cores) "
        "was shared with other work; the load average at the end of each run is given.",
        "",
        "| run | code | n | client median | Synapse median | overhead median | p90 | max "
        "| > 20 ms | waits >= 0.2 s | load | when |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in runs:

        def f(key: str, r: dict[str, Any] = r) -> str:
            v = r.get(key)
            return "—" if v is None else f"{v:.3f}"

        meta = r.get("meta", {})
        lines.append(
            f"| {r['label']} | `{meta.get('commit', '?')}` | {r['n']} | {f('client_median')} "
            f"| {f('synapse_median')} | {f('overhead_median')} | {f('overhead_p90')} "
            f"| {f('overhead_max')} | {r['overhead_over_20ms']} | {r['waits_over_0_2s']} "
            f"| {meta.get('load_average', '?')} | {meta.get('time', '?')} |"
        )
    block = "\n".join(lines)
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        text = f"{head}{MARK_START}\n\n{block}\n\n{MARK_END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{MARK_START}\n\n{block}\n\n{MARK_END}\n"
    docs.write_text(text)
    return block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=100, help="default: %(default)s")
    parser.add_argument(
        "--max-delay",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="sends start 0 .. this long after their long-poll (default: %(default)s)",
    )
    parser.add_argument("--label", default="this tree", help="name of the run in the output")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="the same sends with no long-poll outstanding (the stack's own overhead)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write hol-<label>.csv/.json here")
    parser.add_argument(
        "--save", action="store_true", help="write the run into bench/results/ (committed)"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite docs/benchmarks.md's block from bench/results/hol-*.json",
    )
    args = parser.parse_args()
    if args.render:
        print(render())
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-hol-") as tmp:
        rows = asyncio.run(run(args.sends, args.max_delay, Path(tmp), not args.baseline))
    label = args.label + (
        ", baseline: no long-poll outstanding"
        if args.baseline
        else ", each issued during an outstanding long-poll /sync"
    )
    summary = report(rows, label)
    summary["meta"] = _provenance("python bench/hol.py " + " ".join(sys.argv[1:]))
    out = RESULTS if args.save else args.out
    if out is not None:
        args.out = out
        args.out.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.label + ("-baseline" if args.baseline else ""))
        with (args.out / f"hol-{safe}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["i", "delay", "status", "client_s", "synapse_s"])
            w.writeheader()
            w.writerows(rows)
        (args.out / f"hol-{safe}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
