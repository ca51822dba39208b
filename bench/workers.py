#!/usr/bin/env python3
"""Inbound throughput with one and with two CoAP listener workers, side by side in one run.

Starts a real worker deployment on PostgreSQL and Redis (its new database's one-off
background updates run back to back and are done before the warm-up; the module's ``workers:``
config, as docs/examples/workers/ and tests/integration/test_workers_topology.py
have it, kept minimal): the main process (no CoAP listener) and two generic
workers, generic1 and generic2, each binding its own CoAP listener. Both workers
claim the benchmarked paths in ``workers.routes`` (a pool of generic workers: the
same regexes), so each request runs in-process on the worker that received it;
nothing is forwarded. One user is registered over HTTP at the main process.

Then, for ``--rounds`` rounds, the two configurations take turns (their order
alternating round by round):

* ``1 listener``: ``--requests`` requests sent to generic1's listener only,
* ``2 listeners``: the same number of requests spread evenly over generic1's and
  generic2's listeners,

each with ``--concurrency`` requests in flight in total, from one CoapClient (one
Noise session per listener) in this process. The requests are distinct and
authenticated: ``GET /_matrix/client/v3/account/whoami?n=I`` and
``GET /_matrix/client/v3/profile/@user?n=I`` alternately, ``I`` never repeating;
the module's body memo is off in every instance (``SYNAPSE_COAP_BODY_MEMO=0``).

Per round and configuration: requests per second (wall clock of the round) and the
server CPU per request, i.e. the CPU time (``results_store.cpu_seconds``: the process CPU-time clock) of
every Synapse process of the deployment (main, generic1, generic2) over the round,
divided by the requests. Also recorded: this client's own CPU per request and the
CPU of the PostgreSQL backends serving the deployment's database (best effort),
which are not in the server figure. Reported: median, min and max over rounds, and
the ratio 2 listeners / 1 listener (per round, then median/min/max).

The client is not pinned (pinning Synapse to one core would cap two workers at
that core) and runs at lower priority (``--client-nice``, default 10). The machine
has few cores shared by the client and every Synapse process: with C cores the
throughput ratio cannot exceed C, and the client's own CPU per request lowers the
bound further (the output states it).

Every round goes to ``bench/results/workers.csv`` (with command, commit, machine,
Synapse version and time as ``# key: value`` lines); the block of
docs/benchmarks.md is rendered from that file only.

Usage::

    python bench/workers.py [--rounds 5] [--requests 400] [--concurrency 8]
    python bench/workers.py --render      # re-render docs/benchmarks.md from the CSV
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from results_store import (  # noqa: E402
    BACKGROUND_UPDATES_AT_ONCE,
    cpu_seconds,
    provenance,
    read_dict_rows,
    replace_block,
    settle_all,
    settle_background_updates,
    write_dict_rows,
)

from synapse_coap.mapping.messages import HttpRequest  # noqa: E402
from synapse_coap_lab.homeserver import SynapseProcess, free_port  # noqa: E402
from synapse_coap_lab.services import (  # noqa: E402
    PG_HOST,
    PG_PORT,
    PG_USER,
    REDIS_HOST,
    REDIS_PORT,
    fresh_pg_database,
    pg_connect,
    redis_unavailable,
)

SERVER_NAME = "workers-bench.test"  # also the Redis channel prefix
READY = r"synapse-coap: CoAP listener ready"
REDIS = (REDIS_HOST, REDIS_PORT)
PG = {"host": PG_HOST, "port": PG_PORT, "user": PG_USER}
RESULTS_CSV = ROOT / "bench" / "results" / "workers.csv"
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = "workers"
WRITER = "bench/workers.py"
MIN_ROUNDS = 5
CONFIGS = ("1 listener", "2 listeners")
#: the benchmarked paths, claimed by both generic workers (served in-process where received)
ROUTES = [
    r"^/_matrix/client/(r0|v3|unstable)/account/whoami$",
    r"^/_matrix/client/(r0|v3|unstable)/profile/",
]


def log(msg: str) -> None:
    print(f"[workers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_of(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # (a database backend that went away)
    return total


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the deployment -----------------------------------------------------------------


def db_backends(dbname: str) -> list[int]:
    """The PostgreSQL backend pids connected to ``dbname`` (whose CPU /proc shows)."""
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))
            pids = [int(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()
    return [p for p in pids if os.path.exists(f"/proc/{p}/stat")]


def server_public_key(dbname: str) -> bytes:
    """The one Noise key of the deployment (private_key_store: database), public half."""
    from synapse_coap.noise.keys import public_key

    conn = pg_connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT private_key FROM synapse_coap_keys WHERE key_name = 'noise_static'")
            (text,) = cur.fetchone()
    finally:
        conn.close()
    return bytes(public_key(base64.b64decode(text + "=" * (-len(text) % 4))))


class Deployment:
    def __init__(self, root: Path, dbname: str) -> None:
        self.dbname = dbname
        main_http, replication, g1_http, g2_http = (free_port() for _ in range(4))
        self.coap = {"generic1": free_port("udp"), "generic2": free_port("udp")}
        env = {"SYNAPSE_COAP_BODY_MEMO": "0"}
        module = {
            "module": "synapse_coap.CoapModule",
            "config": {
                "private_key_store": "database",
                "workers": {
                    "instances": {
                        "main": {"http": f"http://127.0.0.1:{main_http}"},
                        "generic1": {
                            "listen": [f"127.0.0.1:{self.coap['generic1']}"],
                            "http": f"http://127.0.0.1:{g1_http}",
                        },
                        "generic2": {
                            "listen": [f"127.0.0.1:{self.coap['generic2']}"],
                            "http": f"http://127.0.0.1:{g2_http}",
                        },
                    },
                    "routes": {"generic1": ROUTES, "generic2": ROUTES},
                    "default": "main",
                },
            },
        }
        self.main = SynapseProcess(
            root / "main",
            SERVER_NAME,
            http_port=main_http,
            http_resources=("client",),
            modules=[module],
            env=env,
            extra_config={
                "database": {
                    "name": "psycopg2",
                    "args": {"database": dbname, **PG, "cp_min": 1, "cp_max": 5},
                },
                "redis": {"enabled": True, "host": REDIS[0], "port": REDIS[1]},
                **BACKGROUND_UPDATES_AT_ONCE,
                "instance_map": {"main": {"host": "127.0.0.1", "port": replication}},
            },
        )
        self.main.extra_config["listeners"] = [
            *self.main.build_config()["listeners"],
            {
                "port": replication,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            },
        ]
        self.workers = {
            name: SynapseProcess(
                root / name,
                SERVER_NAME,
                http_port=port,
                worker_of=self.main,
                env=env,
                worker={
                    "worker_app": "synapse.app.generic_worker",
                    "worker_name": name,
                    "worker_listeners": [
                        {
                            "type": "http",
                            "port": port,
                            "bind_addresses": ["127.0.0.1"],
                            "x_forwarded": True,
                            "resources": [{"names": ["client"]}],
                        }
                    ],
                },
            )
            for name, port in (("generic1", g1_http), ("generic2", g2_http))
        }

    def start(self) -> None:
        log("starting main (PostgreSQL + Redis, no CoAP listener)")
        self.main.start()
        waited = settle_background_updates({"dbname": self.dbname, **PG})
        log(f"main's background updates done ({waited:.1f} s)")
        for name, proc in self.workers.items():
            log(f"starting {name} (CoAP listener on 127.0.0.1:{self.coap[name]})")
            proc.start(ready_log_pattern=READY)

    def stop(self) -> None:
        for proc in self.workers.values():
            proc.stop()
        self.main.stop()

    def pids(self) -> dict[str, int]:
        out = {"main": self.main.pid}
        out.update({n: p.pid for n, p in self.workers.items()})
        assert all(pid is not None for pid in out.values())
        return {k: int(v) for k, v in out.items() if v is not None}


# -- the load ------------------------------------------------------------------------


async def run_n(
    client: Any,
    endpoints: Sequence[Any],
    token: str,
    user: str,
    n: int,
    concurrency: int,
    base: int,
) -> int:
    """``n`` distinct requests, ``concurrency`` in flight, spread evenly over
    ``endpoints`` (in-flight slot k always uses endpoint k mod len); the number of
    non-200 answers."""
    headers = (("authorization", f"Bearer {token}"),)
    nxt = 0
    errors = 0

    async def slot(k: int) -> None:
        nonlocal nxt, errors
        ep = endpoints[k % len(endpoints)]
        while nxt < n:
            i = base + nxt
            nxt += 1
            if i % 2:
                target = f"/_matrix/client/v3/profile/{user}?n={i}"
            else:
                target = f"/_matrix/client/v3/account/whoami?n={i}"
            try:
                r = await client.request(ep, HttpRequest("GET", target.encode(), headers))
                ok = int(r.status) == 200
            except Exception as e:  # (a timeout under load counts as an error)
                log(f"  request failed: {e!r}")
                ok = False
            if not ok:
                errors += 1

    await asyncio.gather(*(slot(k) for k in range(concurrency)))
    return errors


def register(base_url: str) -> tuple[str, str]:
    body = json.dumps(
        {
            "username": "bench",
            "password": "bench-password-1",
            "auth": {"type": "m.login.dummy"},
        }
    ).encode()
    req = urllib.request.Request(
        f"{base_url}/_matrix/client/v3/register",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        data = json.loads(r.read())
    return str(data["access_token"]), str(data["user_id"])


async def measure(args: argparse.Namespace, dep: Deployment) -> list[dict[str, Any]]:
    from synapse_coap.noise.keys import generate_private_key
    from synapse_coap.noise.trust import TrustPolicy
    from synapse_coap.transport.client import CoapClient, Endpoint
    from synapse_coap.transport.link import LinkParameters

    token, user = register(dep.main.base_url)
    log(f"registered {user} at the main process (HTTP)")
    key = server_public_key(dep.dbname)
    eps = {
        name: Endpoint("127.0.0.1", port, SERVER_NAME, key, True) for name, port in dep.coap.items()
    }
    configs = {"1 listener": [eps["generic1"]], "2 listeners": [eps["generic1"], eps["generic2"]]}
    link = LinkParameters(nstart=args.concurrency, max_nstart=args.concurrency)
    client = await CoapClient.create(
        link=link,
        static_key=generate_private_key(),
        trust=TrustPolicy(pinned={SERVER_NAME: key}),
        bind=("127.0.0.1", 0),
    )
    pids = dep.pids()
    rows: list[dict[str, Any]] = []
    serial = 0
    try:
        # warm-up: both sessions, Synapse's caches (token, profile), the DB connections
        for name, ep in eps.items():
            serial += args.warmup
            errors = await run_n(client, [ep], token, user, args.warmup, args.concurrency, serial)
            log(f"warm-up on {name}: {args.warmup} requests, {errors} errors")
        for rnd in range(args.rounds):
            order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
            for config in order:
                db = db_backends(dep.dbname)
                settle_all(pids.values())  # (readings with them asleep: results_store.settle)
                before = {n: cpu_seconds(p) for n, p in pids.items()}
                db_before, me_before = cpu_of(db), own_cpu()
                serial += args.requests
                t0 = time.perf_counter()
                errors = await run_n(
                    client, configs[config], token, user, args.requests, args.concurrency, serial
                )
                wall = time.perf_counter() - t0
                settle_all(pids.values())
                after = {n: cpu_seconds(p) for n, p in pids.items()}
                db_after, me_after = cpu_of(db), own_cpu()
                proc_cpu = {n: after[n] - before[n] for n in pids}
                server = sum(proc_cpu.values())
                row = {
                    "round": rnd,
                    "config": config,
                    "requests": args.requests,
                    "errors": errors,
                    "concurrency": args.concurrency,
                    "seconds": round(wall, 4),
                    "rps": round(args.requests / wall, 2),
                    "server_cpu_ms_per_request": round(server * 1000 / args.requests, 4),
                    "main_cpu_s": round(proc_cpu["main"], 3),
                    "generic1_cpu_s": round(proc_cpu["generic1"], 3),
                    "generic2_cpu_s": round(proc_cpu["generic2"], 3),
                    "client_cpu_ms_per_request": round(
                        (me_after - me_before) * 1000 / args.requests, 4
                    ),
                    "db_cpu_ms_per_request": round(
                        (db_after - db_before) * 1000 / args.requests, 4
                    ),
                }
                rows.append(row)
                log(
                    f"round {rnd + 1}/{args.rounds} {config:<11}: {row['rps']:8.1f} req/s, "
                    f"server {row['server_cpu_ms_per_request']:.3f} ms CPU/request "
                    f"(main {proc_cpu['main']:.2f} s, generic1 {proc_cpu['generic1']:.2f} s, "
                    f"generic2 {proc_cpu['generic2']:.2f} s), client "
                    f"{row['client_cpu_ms_per_request']:.3f} ms/request, {errors} errors"
                )
    finally:
        await client.close()
    return rows


def check_in_process(dep: Deployment) -> None:
    """Every benchmarked request ran on the worker that received it (none forwarded)."""
    pattern = re.compile(
        r"synapse\.access\.(\w+)\..*GET /_matrix/client/v3/(account/whoami|profile/)"
    )
    main_hits = sum(1 for line in dep.main.log_text().splitlines() if pattern.search(line))
    g2_http = sum(
        1
        for line in dep.workers["generic2"].log_text().splitlines()
        if (m := pattern.search(line)) and m.group(1) != "coap"
    )
    if main_hits or g2_http:
        raise SystemExit(
            f"requests were forwarded (main served {main_hits}, generic2 over HTTP {g2_http}): "
            "the workers' routes do not claim the benchmarked paths"
        )


# -- the report ------------------------------------------------------------------------


def _spread(xs: list[float], fmt: str) -> tuple[str, str, str]:
    return (format(statistics.median(xs), fmt), format(min(xs), fmt), format(max(xs), fmt))


def figures(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """config -> measure -> values over rounds (in round order), plus the per-round ratios."""
    out: dict[str, dict[str, list[float]]] = {c: {} for c in CONFIGS}
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        cfg = str(r["config"])
        for k in ("rps", "server_cpu_ms_per_request", "client_cpu_ms_per_request"):
            out[cfg].setdefault(k, []).append(float(r[k]))
        out[cfg].setdefault("db_cpu_ms_per_request", []).append(float(r["db_cpu_ms_per_request"]))
        out[cfg].setdefault("errors", []).append(float(r["errors"]))
        by_round.setdefault(int(r["round"]), {})[cfg] = r
    ratio: dict[str, list[float]] = {}
    for rnd in sorted(by_round):
        pair = by_round[rnd]
        if set(pair) != set(CONFIGS):
            continue
        one, two = pair["1 listener"], pair["2 listeners"]
        for k in ("rps", "server_cpu_ms_per_request"):
            ratio.setdefault(k, []).append(float(two[k]) / float(one[k]))
    out["ratio"] = ratio
    return out


def cores_of(meta: dict[str, str]) -> str:
    m = re.search(r"(\d+) cores", meta.get("machine", ""))
    return m.group(1) if m else "?"


def bound_text(meta: dict[str, str], f: dict[str, dict[str, list[float]]]) -> str:
    """What the machine allows: its cores are shared by the client and every process."""
    cores = cores_of(meta)
    two = f["2 listeners"]
    total = sum(
        statistics.median(two[k])
        for k in ("server_cpu_ms_per_request", "client_cpu_ms_per_request", "db_cpu_ms_per_request")
    )
    bound = f"{int(cores) * 1000 / total:,.0f}" if cores.isdigit() and total > 0 else "?"
    return (
        f"The machine has {cores} cores, shared by the client and every Synapse process "
        "(and PostgreSQL, Redis and any other work on it): the throughput ratio cannot "
        f"exceed {cores}x here. With 2 listeners a request costs "
        f"{statistics.median(two['server_cpu_ms_per_request']):.3f} ms of server CPU + "
        f"{statistics.median(two['client_cpu_ms_per_request']):.3f} ms of client CPU + "
        f"{statistics.median(two['db_cpu_ms_per_request']):.3f} ms of PostgreSQL CPU "
        f"(medians), so {cores} fully busy cores would carry at most about {bound} requests/s. "
        "The ratio shows what a second listener worker adds on this machine, not how the "
        "deployment scales on hardware with a core per worker. CPU times come in "
        f"1/{os.sysconf('SC_CLK_TCK')} s ticks."
    )


def block(meta: dict[str, str], rows: Sequence[dict[str, Any]], source: str) -> str:
    """The docs/benchmarks.md block, from the rows and provenance of one run only."""
    f = figures(rows)
    n = len(f["ratio"].get("rps", []))
    if n < MIN_ROUNDS:
        raise SystemExit(f"{n} complete rounds, fewer than {MIN_ROUNDS}")
    first = rows[0]
    lines = [
        "### Inbound throughput: one and two CoAP listener workers",
        "",
        "A worker deployment on PostgreSQL and Redis: the main process and two generic "
        "workers, each worker with its own CoAP listener; both claim the benchmarked paths, "
        "so a request runs in-process on the worker that received it (nothing forwarded). "
        f"Per round and configuration {first['requests']} distinct authenticated requests "
        "(`GET .../account/whoami?n=I` and `GET .../profile/@user?n=I` alternately; body memo "
        f"off), {first['concurrency']} in flight in total, from one client over one Noise "
        "session per listener; **1 listener**: all to generic1; **2 listeners**: spread evenly "
        "over generic1 and generic2. The two take turns, in alternating order. Server CPU = "
        "user + system CPU of every Synapse process (main, generic1, generic2) over the round, "
        "per request. Median (min-max) of n rounds; the ratios are taken round by round.",
        "",
        "| configuration | requests/s | server CPU ms/request | client CPU ms/request "
        "| PostgreSQL CPU ms/request | errors | n |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for cfg in CONFIGS:
        v = f[cfg]
        rps, cpu, cl, db = (
            _spread(v["rps"], ",.0f"),
            _spread(v["server_cpu_ms_per_request"], ".3f"),
            _spread(v["client_cpu_ms_per_request"], ".3f"),
            _spread(v["db_cpu_ms_per_request"], ".3f"),
        )
        lines.append(
            f"| {cfg} | {rps[0]} ({rps[1]}-{rps[2]}) | {cpu[0]} ({cpu[1]}-{cpu[2]}) | "
            f"{cl[0]} ({cl[1]}-{cl[2]}) | {db[0]} ({db[1]}-{db[2]}) | "
            f"{int(sum(v['errors']))} | {len(v['rps'])} |"
        )
    r_rps = _spread(f["ratio"]["rps"], ".2f")
    r_cpu = _spread(f["ratio"]["server_cpu_ms_per_request"], ".2f")
    lines += [
        f"| **2 / 1 listeners** | **{r_rps[0]}x** ({r_rps[1]}-{r_rps[2]}) | "
        f"**{r_cpu[0]}x** ({r_cpu[1]}-{r_cpu[2]}) | | | | {n} |",
        "",
        bound_text(meta, f),
        "",
        f"_`{meta.get('command', '?')}`, commit `{meta.get('commit', '?')}`, "
        f"{meta.get('time', '?')}, {meta.get('machine', '?')}, Synapse "
        f"{meta.get('synapse', '?')}, Python {meta.get('python', '?')}"
        + (f" ({meta['note']})" if meta.get("note") else "")
        + f"; every round in `{source}`._",
    ]
    return "\n".join(lines)


def print_report(meta: dict[str, str], rows: Sequence[dict[str, Any]]) -> None:
    f = figures(rows)
    print(f"\n{'configuration':<16}{'requests/s':>26}{'server CPU ms/request':>30}{'n':>4}")
    for cfg in CONFIGS:
        rps = _spread(f[cfg]["rps"], ".1f")
        cpu = _spread(f[cfg]["server_cpu_ms_per_request"], ".3f")
        print(
            f"{cfg:<16}{f'{rps[0]} ({rps[1]}-{rps[2]})':>26}"
            f"{f'{cpu[0]} ({cpu[1]}-{cpu[2]})':>30}{len(f[cfg]['rps']):>4}"
        )
    rr = _spread(f["ratio"]["rps"], ".2f")
    rc = _spread(f["ratio"]["server_cpu_ms_per_request"], ".2f")
    print(
        f"{'2 / 1 listeners':<16}{f'{rr[0]}x ({rr[1]}-{rr[2]})':>26}"
        f"{f'{rc[0]}x ({rc[1]}-{rc[2]})':>30}{len(f['ratio']['rps']):>4}"
    )
    print("\n" + bound_text(meta, f))


def render(path: Path) -> None:
    meta, rows = read_dict_rows(path)
    source = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    replace_block(DOC, BLOCK, block(meta, rows, str(source)), WRITER)
    print(f"updated {DOC} from {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help=f"rounds, each configuration once (>= {MIN_ROUNDS})"
    )
    parser.add_argument(
        "--requests", type=int, default=400, help="requests per configuration and round"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight in total")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per listener")
    parser.add_argument("--client-nice", type=int, default=10, help="the client's nice increment")
    parser.add_argument("--results", type=Path, default=RESULTS_CSV, help="the results CSV")
    parser.add_argument(
        "--keep", action="store_true", help="keep the deployment's directory (configs, logs)"
    )
    parser.add_argument(
        "--no-doc", action="store_true", help="do not re-render docs/benchmarks.md after the run"
    )
    parser.add_argument(
        "--render", action="store_true", help="only re-render docs/benchmarks.md from --results"
    )
    args = parser.parse_args(argv)
    results: Path = args.results.resolve()
    if args.render:
        render(results)
        return 0
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    why = redis_unavailable()
    if why:
        raise SystemExit(f"Redis is not reachable on {REDIS[0]}:{REDIS[1]}: {why}")
    command = "python bench/workers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = provenance(command.strip())
    meta["note"] = f"machine shared with other work; client not pinned, at nice +{args.client_nice}"
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    log(f"work directory {root}")
    with fresh_pg_database("synapse_coap_bench") as dbname:
        dep = Deployment(root, dbname)
        try:
            dep.start()
            os.nice(args.client_nice)
            rows = asyncio.run(measure(args, dep))
            check_in_process(dep)
        finally:
            log("stopping the deployment")
            dep.stop()
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    write_dict_rows(results, rows, meta)
    print(f"wrote {results}")
    print_report(meta, rows)
    if not args.no_doc:
        render(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
