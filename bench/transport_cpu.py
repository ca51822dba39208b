"""CPU per request of the CoAP+Noise listener alone, without Synapse.

    .venv/bin/python bench/transport_cpu.py [--requests 4000] [--rounds 7]
        [--concurrency 4] [--client lean|aiocoap] [--cprofile-out FILE] [--docs] [--render]

Two child processes, each pinned to one core:

* CoAP+Noise: the module's listener (:class:`CoapServer`: Noise, the real wire codec,
  the fast path) on an asyncio loop, in front of a stub dispatcher that answers at
  once (``dispatch_now``, no task, as the in-process dispatcher does when Synapse
  answers at once) with what Synapse's ``/whoami`` answers (the headers the
  in-process dispatcher keeps, a distinct body per request);
* HTTP/1.1: Twisted's HTTP server (what Synapse's HTTP listener is built on) with a
  resource answering the same body and headers.

This process sends ``--requests`` distinct requests per round to each (CoAP:
``bench/leanclient.py``, the project's sans-I/O layers on a bare socket, or with
``--client aiocoap`` the transport's CoapClient; HTTP: aiohttp with keep-alive),
from the other core at nice 10, the two taking turns, and reads each child's own
CPU time (``results_store.cpu_seconds``: its process CPU-time clock) around its turn: microseconds of
listener CPU per request and the ratio, median (min-max) over ``--rounds``, and the
listener's utilisation in its turn (CPU seconds / wall seconds, ``busy``): a
listener that waits for its client pays more per request, and the aiocoap client
costs more CPU per request than the listener it drives.

With the native build there (``synapse-coap build-native``), a third child runs the same
CoAP+Noise listener on the plain-Python sources (``SYNAPSE_COAP_PURE=1``), taking its
turn with the other two: what the build saves, side by side.

So it measures what ``bench/inbound.py`` cannot separate from Synapse's own work:
the listener's cost per request against Twisted's HTTP/1.1 channel, neither doing
any Matrix work. ``--docs`` writes ``bench/results/transport_cpu.csv`` and the block
in docs/benchmarks.md (``--render`` re-renders the block from the committed CSV).
``--cprofile-out`` writes a cProfile text profile of the CoAP child (CPU time of its
thread, one extra round) sorted by internal time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from leanclient import load_client  # noqa: E402
from results_store import (  # noqa: E402
    Spinner,
    add_spin_argument,
    build_suffix,
    cpu_clock_source,
    cpu_seconds,
    provenance,
    read_cpu_clock,
    read_dict_rows,
    replace_block,
    settle,
    spread,
    steal_seconds,
    unstolen,
    write_dict_rows,
)

CSV = ROOT / "bench" / "results" / "transport_cpu.csv"
DOCS = ROOT / "docs" / "benchmarks.md"
WRITER = "bench/transport_cpu.py"
LISTENERS = ("CoAP+Noise", "HTTP/1.1")
#: the same CoAP+Noise listener on the plain-Python sources (SYNAPSE_COAP_PURE=1),
#: measured beside the others when the native build is there (synapse_coap.native)
PURE = "CoAP+Noise, plain Python"

SERVER_NAME = "bench.test"
TARGET = "/_matrix/client/v3/account/whoami"


def serve(port_file: Path, key_hex: str) -> None:
    """The child: a listener on 127.0.0.1 in front of the stub dispatcher."""
    from synapse_coap.mapping.dispatch import PeerInfo
    from synapse_coap.mapping.messages import HttpRequest, HttpResponse
    from synapse_coap.transport.link import LinkParameters
    from synapse_coap.transport.server import CoapServer, ServerConfig

    headers = (
        ("content-type", "application/json"),
        ("cache-control", "no-cache, no-store, must-revalidate"),
    )

    class Stub:
        """Answers as the module's in-process dispatcher does when Synapse answers at
        once: ``dispatch_now`` (no task), with ``dispatch`` for the rest."""

        def answer(self, request: HttpRequest) -> HttpResponse:
            n = request.target.rpartition(b"=")[2].decode()
            body = (
                '{"user_id":"@bench:bench.test","is_guest":false,"device_id":"D' + n + '"}'
            ).encode()
            return HttpResponse(200, headers, body)

        async def dispatch(self, request: HttpRequest, peer: PeerInfo) -> HttpResponse:
            return self.answer(request)

        def dispatch_now(
            self, request: HttpRequest, peer: PeerInfo, done: Callable[[Any], None]
        ) -> Callable[[], None]:
            done(self.answer(request))
            return lambda: None

    async def main() -> None:
        server = await CoapServer.start(
            ServerConfig(
                listen=(("127.0.0.1", 0),),
                static_key=bytes.fromhex(key_hex),
                link=LinkParameters(nstart=8, max_nstart=8),
                server_name=SERVER_NAME,
            ),
            Stub(),
        )
        port_file.write_text(str(server.addresses[0][1]))
        import signal

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.close()

    asyncio.run(main())


def serve_http(port_file: Path) -> None:
    """The HTTP baseline child: Twisted's HTTP/1.1 server (as Synapse's listener uses
    it) with a resource that answers what the stub dispatcher answers."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    class Whoami(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            n = (request.args.get(b"n") or [b""])[0].decode()
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
            return (
                '{"user_id":"@bench:bench.test","is_guest":false,"device_id":"D' + n + '"}'
            ).encode()

    port = reactor.listenTCP(0, Site(Whoami()), interface="127.0.0.1")  # type: ignore[attr-defined]
    port_file.write_text(str(port.getHost().port))
    reactor.run()  # type: ignore[attr-defined]


async def _start(
    cmd: list[str], port_file: Path, profile_prefix: Path | None = None, pure: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ, SYNAPSE_COAP_BODY_MEMO="0", PYTHONPATH=str(ROOT))
    env.pop("SYNAPSE_COAP_PURE", None)
    if pure:
        env["SYNAPSE_COAP_PURE"] = "1"
    if profile_prefix is not None:
        # the inbound bench's profiling hook (SIGUSR2 toggles a CPU-clock cProfile)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench" / "profiling"), str(ROOT)])
        env["SYNAPSE_COAP_CPROFILE"] = str(profile_prefix)
    child = subprocess.Popen(cmd, env=env)
    for _ in range(400):
        if port_file.exists() and port_file.read_text():
            return child, int(port_file.read_text())
        await asyncio.sleep(0.05)
    child.kill()
    raise SystemExit(f"{cmd[2]}: the child did not start")


async def drive(args: argparse.Namespace) -> None:
    import aiohttp

    from synapse_coap.mapping.messages import HttpRequest
    from synapse_coap.noise.keys import generate_private_key, public_key
    from synapse_coap.transport.client import Endpoint

    key = generate_private_key()
    workdir = Path(tempfile.mkdtemp(prefix="bench-transport-cpu-"))
    prof_prefix = workdir / "server.prof" if args.cprofile_out else None
    coap_cmd = [sys.executable, __file__, "--serve", str(workdir / "coap.port"), key.hex()]
    coap_child, coap_port = await _start(coap_cmd, workdir / "coap.port", prof_prefix)
    http_cmd = [sys.executable, __file__, "--serve-http", str(workdir / "http.port")]
    http_child, http_port = await _start(http_cmd, workdir / "http.port")
    children: tuple[subprocess.Popen[bytes], ...] = (coap_child, http_child)
    from synapse_coap.native import status

    pure_child: subprocess.Popen[bytes] | None = None
    if status().mode == "native":
        pure_cmd = [sys.executable, __file__, "--serve", str(workdir / "pure.port"), key.hex()]
        pure_child, pure_port = await _start(pure_cmd, workdir / "pure.port", pure=True)
        children += (pure_child,)
    # the client's loop never sleeps: no wake-up of it charged to a listener's sendto
    spinner = Spinner(asyncio.get_running_loop())
    try:
        cores = sorted(os.sched_getaffinity(0))
        listener_core = cores[0] if len(cores) >= 2 else None
        if len(cores) >= 2:
            for child in children:
                os.sched_setaffinity(child.pid, {cores[0]})
            os.sched_setaffinity(0, {cores[1]})
            print(f"listeners on core {cores[0]}, client on core {cores[1]} at nice 10")
        os.nice(10)
        if args.spin:
            spinner.start()
        # a lean client per listener; the aiocoap client serves both CoAP listeners
        coap_clients: dict[int, Any] = {}

        async def coap_client(port: int) -> Any:
            slot = port if args.client == "lean" else 0
            if slot not in coap_clients:
                coap_clients[slot] = await load_client(
                    args.client, "127.0.0.1", port, SERVER_NAME, public_key(key), args.concurrency
                )
            return coap_clients[slot]

        client = await coap_client(coap_port)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))
        ep = Endpoint("127.0.0.1", coap_port, SERVER_NAME, public_key(key), True)
        auth = (("authorization", "Bearer syt_YmVuY2g_abcdefghijklmnopqrst_0a1b2c"),)
        serial = 0

        async def one_coap(i: int) -> None:
            target = f"{TARGET}?n={i}".encode()
            r = await client.request(ep, HttpRequest("GET", target, auth))
            assert r.status == 200, r

        async def one_http(i: int) -> None:
            url = f"http://127.0.0.1:{http_port}{TARGET}?n={i}"
            async with http.get(url, headers=dict(auth)) as r:
                await r.read()
                assert r.status == 200, r

        async def run(one: Any, n: int) -> None:
            nonlocal serial
            sem = asyncio.Semaphore(args.concurrency)

            async def limited(i: int) -> None:
                async with sem:
                    await one(i)

            await asyncio.gather(*(limited(serial + i) for i in range(n)))
            serial += n

        listeners = {"CoAP+Noise": (one_coap, coap_child), "HTTP/1.1": (one_http, http_child)}
        if pure_child is not None:
            pure_ep = Endpoint("127.0.0.1", pure_port, SERVER_NAME, public_key(key), True)
            pure_client = await coap_client(pure_port)

            async def one_pure(i: int) -> None:
                target = f"{TARGET}?n={i}".encode()
                r = await pure_client.request(pure_ep, HttpRequest("GET", target, auth))
                assert r.status == 200, r

            listeners[PURE] = (one_pure, pure_child)
        for one, _child in listeners.values():
            await run(one, 200)  # handshake, connections, warm-up
        results: dict[str, list[float]] = {name: [] for name in listeners}
        busy: dict[str, list[float]] = {name: [] for name in listeners}
        ratios: list[float] = []
        for r in range(args.rounds):
            for name, (one, child) in listeners.items():
                # (readings with the listener asleep: see results_store.settle)
                settle(child.pid)
                stolen0 = steal_seconds(listener_core)
                before, wall0 = cpu_seconds(child.pid), time.monotonic()
                await run(one, args.requests)
                settle(child.pid)
                after, wall = cpu_seconds(child.pid), time.monotonic() - wall0
                # (busy: of the time the hypervisor left the listeners' core)
                wall = unstolen(wall, listener_core, stolen0)
                results[name].append((after - before) / args.requests * 1e6)
                busy[name].append((after - before) / wall)
            ratios.append(results["CoAP+Noise"][-1] / results["HTTP/1.1"][-1])
            print(
                f"  round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {v[-1]:.1f} (busy {busy[k][-1]:.2f})" for k, v in results.items())
                + f" us/request, ratio {ratios[-1]:.2f}x",
                flush=True,
            )
        if args.cprofile_out:
            await profile(
                args, coap_child, workdir / "server.prof.0", lambda: run(one_coap, args.requests)
            )
        for c in coap_clients.values():
            await c.close()
        await http.close()
        print(
            f"listener CPU per request, {args.requests} distinct requests per round, "
            f"concurrency {args.concurrency}, median (min-max) of {args.rounds} rounds "
            f"({cpu_clock_source(os.getpid())}):"
        )
        for name, values in results.items():
            print(f"  {name:12s} {spread(values, '{:.1f}')} us")
        print(f"  CoAP+Noise / HTTP/1.1 {spread(ratios, '{:.2f}')}x")
        rows = [
            {"round": i, "listener": name, "cpu_us": f"{v:.2f}", "busy": f"{busy[name][i]:.3f}"}
            for name, values in results.items()
            for i, v in enumerate(values)
        ]
        meta = provenance("python bench/transport_cpu.py " + " ".join(sys.argv[1:]))
        meta["requests"] = str(args.requests)
        meta["rounds"] = str(args.rounds)
        meta["concurrency"] = str(args.concurrency)
        meta["client"] = args.client
        meta["client_spins"] = "yes" if args.spin else "no"
        meta["cpu_clock"] = cpu_clock_source(os.getpid())
        meta["busy"] = "CPU s / wall s less the steal time of the listeners' core"
        meta["note"] = "machine shared with other work"
        # (the committed CSV only with --docs, which renders the docs from it)
        if args.docs or args.results:
            out = args.results / CSV.name if args.results else CSV
            write_dict_rows(out, rows, meta)
            print(f"wrote {out}")
            if args.docs:
                render(out)
    finally:
        spinner.stop()
        for child in children:
            child.terminate()
            child.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def docs_block(meta: dict[str, str], rows: list[dict[str, str]]) -> str:
    """The docs' block: rendered from the results CSV's provenance and rows only."""
    cells: dict[str, list[float]] = {name: [] for name in (*LISTENERS, PURE)}
    busy: dict[str, list[float]] = {name: [] for name in (*LISTENERS, PURE)}
    for r in sorted(rows, key=lambda r: int(r["round"])):
        cells[r["listener"]].append(float(r["cpu_us"]))
        busy[r["listener"]].append(float(r["busy"]))
    pure_rows = []
    if cells[PURE]:
        gains = [a / b for a, b in zip(cells["CoAP+Noise"], cells[PURE], strict=True) if b]
        pure_rows = [
            f"| CoAP+Noise on the plain-Python sources (`SYNAPSE_COAP_PURE=1`) | "
            f"{spread(cells[PURE], '{:.1f}')} | {busy_text(busy[PURE])} |",
            f"| ratio native build / plain Python (per round) | {spread(gains, '{:.2f}')}x | |",
        ]
    ratios = [a / b for a, b in zip(cells["CoAP+Noise"], cells["HTTP/1.1"], strict=True) if b]
    if read_cpu_clock(meta):
        how, resolution = "CPU time (its process CPU-time clock, nanoseconds)", ""
    else:
        tick = 1e6 / os.sysconf("SC_CLK_TCK") / int(meta["requests"])
        how, resolution = "CPU time (user + system)", f"; resolution {tick:.1f} us"
    client = CLIENTS.get(meta.get("client", ""), CLIENTS["aiocoap"])
    if meta.get("client_spins") == "yes":
        client += "; its event loop never sleeps, so no listener pays for waking it"
    lines = [
        f"The listener alone, without Synapse: {how} of the listening "
        f"process per request, {meta['requests']} distinct requests per round, concurrency "
        f"{meta['concurrency']}, median (min-max) of {meta['rounds']} rounds, the listeners taking "
        "turns; both answer the same stub `/whoami` body and headers; the client pinned to "
        f"the other core at lower priority ({client}; HTTP: aiohttp){resolution}. "
        "_Busy_: the listener's CPU seconds per wall second in its turns "
        "(median): near 1 when the client kept it busy.",
        "",
        "| listener | CPU per request (us) | busy |",
        "|---|--:|--:|",
        f"| CoAP+Noise (the module's listener, fast path, wire codec) | "
        f"{spread(cells['CoAP+Noise'], '{:.1f}')} | {busy_text(busy['CoAP+Noise'])} |",
        f"| HTTP/1.1 (Twisted's HTTP server, as under Synapse's listener) | "
        f"{spread(cells['HTTP/1.1'], '{:.1f}')} | {busy_text(busy['HTTP/1.1'])} |",
        f"| ratio CoAP+Noise / HTTP/1.1 (per round) | {spread(ratios, '{:.2f}')}x | |",
        *pure_rows,
        "",
        f"_`{meta['command']}`, commit `{meta['commit']}`, {meta['time']}, {meta['machine']}, "
        f"Python {meta['python']}{build_suffix(meta)} ({meta['note']}); rounds in "
        "`bench/results/transport_cpu.csv`._",
    ]
    return "\n".join(lines)


#: the CSV's ``client`` -> what the docs say of the CoAP client
CLIENTS = {
    "lean": "CoAP: bench/leanclient.py, the sans-I/O layers on a bare socket, one client "
    "per CoAP listener",
    "aiocoap": "CoAP: the product's aiocoap CoapClient",
}


def busy_text(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else ""


def render(path: Path) -> None:
    meta, rows = read_dict_rows(path)
    replace_block(DOCS, "transport-cpu", docs_block(meta, rows), WRITER)
    print(f"updated {DOCS.relative_to(ROOT)}")


async def profile(
    args: argparse.Namespace, child: subprocess.Popen[bytes], prof_file: Path, run: Any
) -> None:
    """One more round of CoAP requests with the child under cProfile (SIGUSR2 toggles:
    bench/profiling/sitecustomize.py, which writes ``prof_file``)."""
    import pstats
    import signal

    os.kill(child.pid, signal.SIGUSR2)
    await asyncio.sleep(0.2)
    await run()
    os.kill(child.pid, signal.SIGUSR2)
    for _ in range(100):
        await asyncio.sleep(0.1)
        if prof_file.exists():
            break
    await asyncio.sleep(0.3)
    with open(args.cprofile_out, "w") as out:
        out.write(
            f"# cProfile (thread CPU time) of the CoAP+Noise listener serving {args.requests} "
            f"requests: python bench/transport_cpu.py {' '.join(sys.argv[1:])}\n"
        )
        stats = pstats.Stats(str(prof_file), stream=out)
        stats.sort_stats("tottime").print_stats(60)
    print(f"wrote {args.cprofile_out}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-http":
        serve_http(Path(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (each listener once)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument(
        "--client",
        choices=("lean", "aiocoap"),
        default="lean",
        help="CoAP load client: lean (bench/leanclient.py: the sans-I/O layers on a bare "
        "socket, cheap enough to keep the listener busy) or aiocoap (the product's CoapClient)",
    )
    add_spin_argument(parser)
    parser.add_argument(
        "--cprofile-out", type=Path, default=None, help="write a cProfile of the CoAP child"
    )
    parser.add_argument(
        "--docs", action="store_true", help="rewrite docs/benchmarks.md's block from the results"
    )
    parser.add_argument(
        "--render", action="store_true", help="only re-render the block from the committed CSV"
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="write the CSV into this directory instead"
    )
    args = parser.parse_args()
    if args.render:
        render(CSV)
        return
    asyncio.run(drive(args))


if __name__ == "__main__":
    main()
