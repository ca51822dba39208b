#!/usr/bin/env python3
"""Inbound cost: Synapse's own CPU time per request, CoAP listener vs HTTP listener.

Starts one real Synapse (SQLite, temp dir, loopback only) that has both an
HTTP listener and the CoAP module, registers a user, then for each endpoint
sends ``--requests`` *distinct* requests (a varying query parameter, so no two
are alike) through

* CoAP + Noise: one Noise session, multiplexed,
* plain CoAP (the module's loopback plain listener),
* HTTP/1.1: aiohttp with keep-alive,
* HTTPS/1.1: the same through Synapse's own TLS listener (TLS 1.3, a self-signed
  certificate the client does not verify): the baseline that, like CoAP+Noise,
  encrypts every request and answer,
* via nginx: the same HTTPS/1.1 requests to Debian's nginx with the lab's tuned front
  configuration (TLS 1.3, HTTP/2, gzip: ``bench/lab_scenarios/client.py``
  ``NGINX_CONF``), which proxies each to a plain listener of the same Synapse
  (``x_forwarded``) as Synapse's reverse-proxy documentation configures it: no
  upstream keep-alive, so a new connection to Synapse per request. nginx runs on the
  client's core; its own CPU in those cells is the ``nginx's own`` column, and the
  CoAP+Noise ratio is against the sum (the server machine's CPU). Skipped, with a line
  saying so, where nginx is not installed,

and reads the Synapse process's own CPU time (all its threads: its process CPU-time
clock, in nanoseconds, ``results_store.cpu_seconds``) before and after: CPU milliseconds per request, and the
CoAP+Noise / HTTP ratio. It also records Synapse's utilisation in each cell (CPU
seconds / wall seconds, the ``busy`` column): a server that waits for its client
between requests pays more per request (a wake-up per datagram, colder caches), so
a ratio means most where both listeners ran busy. The ``main_cpu_ms`` and
``main_switches`` columns split it: the part in Synapse's main (reactor) thread
(``results_store.main_thread``; the rest is its thread pool's, where HTTP/1.1's JSON
answers are encoded, and its Rust runtime's) and that thread's context switches per
request (how often it waited). The CoAP client is
``bench/leanclient.py`` (``--client lean``, the default): the project's sans-I/O
codec, CoAP and Noise layers on a bare asyncio socket, which puts on the wire what
the product's client does at a fraction of its CPU; ``--client aiocoap`` uses the
product's aiocoap-based ``CoapClient`` instead (which could not keep Synapse busy
on this bench's two-core machine). The module's body memo is switched off in that Synapse
(``SYNAPSE_COAP_BODY_MEMO=0``), so every response pays for the codec as
distinct bodies would (``--body-memo`` leaves it on: these endpoints answer the same
body every time, so the CoAP cells then leave out the answers' encoding, which bounds
what a cheaper encoder could save; not for the README). The listeners take turns,
``--rounds`` times, and within a round in turns of ``--turn`` requests (100 by
default; a shared machine's state then changes little between the cells of a ratio,
which a turn of 1000 requests per listener left to chance); each cell reports median
(min-max) over the rounds.
Nothing is measured before the new database's one-off background updates are done
(run back to back, not one a second: they would otherwise land in the first minute's
cells).

The client (this process) is pinned to the other core than Synapse where the
machine has two or more, and runs at lower priority (nice 10), so it does not
take Synapse's CPU; its own CPU does not enter the figures either way. Its event
loop never sleeps (``results_store.Spinner``; ``--no-spin`` lets it): on loopback, waking a
sleeping client is work done in the server's ``sendto``.

Endpoints: client versions, federation version, server keys, whoami
(authenticated), ``/health`` (Synapse's health check: a plain resource, no servlet
and no JSON, so what is left is Synapse's request handling and the listener: the
row where the listener's own cost weighs most), and a federation ``/send`` of one
PDU: a second Synapse
(``origin.test``, federating with the measured one over CoAP) creates a public
room that the measured Synapse joins; the bench then signs, as ``origin.test``
(its signing key, X-Matrix authorization over the body), transactions of one
``m.room.message`` PDU each, at concurrency 1, every PDU checked as accepted.
Each PDU's ``prev_events`` is the last accepted PDU (a linear chain), and the
next one goes :data:`SEND_PAUSE` seconds after an answer (idle time, not CPU):
Synapse answers a ``/send`` once the PDU is staged and persists it just after,
and a PDU whose parent is still being persisted would have Synapse fetch
"missing" events from the origin over federation (work that is not the
listener's; the bench counts such fetches in the measured Synapse's log and
records them in the CSV's header). ``--no-send`` leaves it out.
``--send-requests`` sets its transactions per cell (fewer: each costs Synapse
about twenty times a small request); they too are measured in turns, of
``--send-turn`` transactions (10 by default: every PDU grows the room and Synapse's
database, and one turn per cell left a ratio's two cells up to minutes apart:
``bench/results/inbound-send-turns/``). The listeners take turns in an order
rotated every round. ``--modes default,asyncio`` runs both reactor modes (the asyncio reactor with
``SYNAPSE_ASYNC_IO_REACTOR=1``, aiocoap sharing its loop).

``--readme`` rewrites the README's block, rendered from the results CSV just
written (:func:`readme_block`; ``--render`` re-renders it from the committed CSV
without running anything; ``tests/unit/test_bench_inbound_render.py`` checks the
block is that render).

Usage::

    python bench/inbound.py [--requests 400] [--send-requests 100] [--rounds 5]
                            [--concurrency 4] [--client lean|aiocoap]
                            [--modes default,asyncio] [--no-send] [--readme] [--keep]
                            [--turn 100] [--send-turn 10]
                            [--profile-out FILE] [--cprofile-out FILE]
    python bench/inbound.py --render
    python bench/inbound.py --only "client versions" --listeners none ...

``--only LABELS`` (the endpoints' labels, comma-separated) and ``--listeners``
(which of plain CoAP, HTTPS/1.1 and via nginx to measure besides CoAP+Noise and
HTTP/1.1; ``none`` for neither) make a quick A/B run; neither writes the README.

``--cprofile-out FILE`` (asyncio mode, one thread) runs Synapse under cProfile
(``bench/profiling/sitecustomize.py``) and writes the internal-time and
cumulative tables of one more pass per listener next to FILE (the small
requests, not the ``/send``, whose cost is Synapse's event persistence).
``--profile-out FILE`` additionally samples Synapse with py-spy (every thread)
during one more pass of every endpoint per listener and writes a text profile
per mode and listener next to FILE (``FILE-MODE-LISTENER.txt``: self and inclusive
sample counts per function), with the raw collapsed stacks beside it
(``.collapsed``, for a flame-graph tool); the five listeners, the via-nginx pass
included (needs ``pip install py-spy`` and ptrace rights). py-spy reads stacks
without stopping the process (``--nonblocking``), so some come out truncated, and
the mypyc-compiled functions do not appear (their time is their caller's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

import perfsplit  # noqa: E402
from lab_scenarios.client import launch_nginx, nginx_path  # noqa: E402
from leanclient import load_client  # noqa: E402
from results_store import (  # noqa: E402
    BACKGROUND_UPDATES_AT_ONCE,
    SETTLE_TIMEOUT,
    Spinner,
    add_spin_argument,
    build_suffix,
    cpu_clock_source,
    cpu_clock_words,
    cpu_seconds,
    main_thread,
    provenance,
    read_dict_rows,
    replace_block,
    settle_all,
    settle_background_updates,
    source_commit,
    steal_seconds,
    unstolen,
    write_dict_rows,
)

from synapse_coap.mapping.messages import HttpRequest  # noqa: E402
from tests.harness.synapse_proc import SynapseProcess, free_port  # noqa: E402

SERVER_NAME = "bench.test"
ORIGIN = "origin.test"
#: ``via nginx``: Synapse's own CPU for HTTPS/1.1 requests that Debian's nginx (the
#: lab's tuned front) terminates and proxies to a plain listener of the same Synapse;
#: ``nginx's own``: nginx's CPU in those cells (not Synapse's: a column of its own)
VIA_NGINX = "via nginx"
NGINX_OWN = "nginx's own"
LISTENERS = ("CoAP+Noise", "plain CoAP", "HTTP/1.1", "HTTPS/1.1", VIA_NGINX, NGINX_OWN)
#: the two listeners every run measures and compares (--listeners leaves only the others
#: out; the per-thread split and the perf pass are of these)
COMPARED = ("CoAP+Noise", "HTTP/1.1")
SEND_LABEL = "federation send (1 PDU)"
#: Idle seconds after each /send answer, so that Synapse has persisted the PDU the
#: next one follows (see the module docstring).
SEND_PAUSE = 0.03
RESULTS_CSV = ROOT / "bench" / "results" / "inbound.csv"
WRITER = "bench/inbound.py"

ENDPOINTS: list[tuple[str, str, bool]] = [
    # (label, target, needs the access token)
    ("client versions", "/_matrix/client/versions", False),
    ("federation version", "/_matrix/federation/v1/version", False),
    ("server keys", "/_matrix/key/v2/server", False),
    ("whoami (auth)", "/_matrix/client/v3/account/whoami", True),
    # a plain resource (no servlet, no JSON): Synapse's request handling and the
    # listener, nearly nothing else; the listener's own share shows most here
    ("/health (no servlet)", "/health", False),
]
#: the rows of the README's tables, in order: the endpoints, then the federation /send
ROW_LABELS = [e[0] for e in ENDPOINTS] + [SEND_LABEL]


#: The cores this process may use at start (pin() narrows its own affinity; a second
#: reactor mode must still see them all).
CORES = sorted(os.sched_getaffinity(0))
#: the core Synapse is pinned to (None: one core, not pinned)
SYNAPSE_CORE = CORES[0] if len(CORES) >= 2 else None


#: CPU readings taken, and of those the ones taken while a process read still ran
#: (after :data:`results_store.SETTLE_TIMEOUT`): see :func:`settle_counted`.
SETTLED = {"readings": 0, "running": 0}


def settle_counted(pids: tuple[int, ...]) -> None:
    """Wait until none of ``pids`` runs before their CPU is read (results_store.settle_all);
    a reading that had to be taken while one still ran is counted."""
    SETTLED["readings"] += len(pids)
    SETTLED["running"] += settle_all(pids)


#: Missing-event fetches of the measured Synapse per mode (see :class:`PduChain`).
MISSING: dict[str, int] = {}
#: Non-200 answers (or PDUs not accepted) per (mode, endpoint, listener), per round.
ERRORS: dict[tuple[str, str, str], list[int]] = {}
#: Synapse's utilisation (its CPU seconds / wall seconds) per (mode, endpoint, listener),
#: per round: about 1 when the client kept it busy, lower when it waited for requests.
BUSY: dict[tuple[str, str, str], list[float]] = {}
#: Synapse's main thread per (mode, endpoint, listener), per round: (its CPU ms per
#: request, its context switches per request). HTTP/1.1 hands each JSON answer's encoding
#: to Synapse's thread pool and waits for it; the CoAP listener encodes it in line.
MAIN: dict[tuple[str, str, str], list[tuple[float, float]]] = {}


def pin(synapse_pid: int, others: tuple[int, ...] = ()) -> str:
    """Synapse's threads on the first core, this process (and the processes ``others``:
    the origin Synapse of the ``/send`` cells, nginx) on the last core; this process at
    nice 10, the servers at 0."""
    if os.getpriority(os.PRIO_PROCESS, 0) < 10:
        os.setpriority(os.PRIO_PROCESS, 0, 10)
    # (a server started after the first mode reniced this process inherited nice 10)
    for pid in (synapse_pid, *others):
        renice_threads(pid, 0)
    cores = CORES
    if len(cores) < 2:
        return "one core: client at nice 10, not pinned"
    pin_threads(synapse_pid, cores[0])
    os.sched_setaffinity(0, {cores[-1]})
    for pid in others:
        pin_threads(pid, cores[-1])
    return f"Synapse on core {cores[0]}, client on core {cores[-1]} at nice 10" + (
        " (the origin Synapse and nginx too)" if others else ""
    )


def nginx_processes(master: int) -> tuple[int, ...]:
    """nginx's master and its worker(s) (``worker_processes 1``)."""
    for _ in range(100):
        with open(f"/proc/{master}/task/{master}/children", encoding="ascii") as f:
            workers = tuple(int(p) for p in f.read().split())
        if workers:
            return (master, *workers)
        time.sleep(0.05)
    raise RuntimeError("nginx started no worker")


def stop_nginx(front: subprocess.Popen[bytes]) -> None:
    front.terminate()
    try:
        front.wait(10)
    except subprocess.TimeoutExpired:
        front.kill()


def renice_threads(pid: int, nice: int) -> None:
    """Every thread process ``pid`` has now at ``nice`` (on Linux a niceness is a
    thread's; lowering it needs root, and without it the threads keep theirs)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError:
            pass


def pin_threads(pid: int, core: int) -> None:
    """Every thread process ``pid`` has now on ``core`` (one that ended meanwhile is skipped)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass


async def run_n(n: int, concurrency: int, one: Callable[[int], Awaitable[int]], base: int) -> int:
    """``n`` calls ``one(base + i)`` with ``concurrency`` in flight; the number of non-200s."""
    nxt = 0
    errors = 0

    async def worker() -> None:
        nonlocal nxt, errors
        while nxt < n:
            i = nxt
            nxt += 1
            if await one(base + i) != 200:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


class CellSum:
    """One listener's turns in one round's cell, summed: Synapse's CPU seconds (all its
    threads, and its main thread's alone), its main thread's context switches, the wall
    seconds its core was not stolen, non-200 answers, nginx's CPU seconds (via nginx)."""

    __slots__ = ("cpu", "errors", "main", "nginx", "switches", "wall")

    def __init__(self) -> None:
        self.cpu = 0.0
        self.main = 0.0
        self.switches = 0
        self.wall = 0.0
        self.errors = 0
        self.nginx = 0.0


class PduChain:
    """One-PDU ``/send`` transactions from :data:`ORIGIN` into a room both servers are in.

    Each PDU is an ``m.room.message`` of the room's creator on :data:`ORIGIN`, signed
    with :data:`ORIGIN`'s key, whose parent is the last accepted PDU (see the module
    docstring); the transaction is authorized with X-Matrix over method, target and body.
    """

    def __init__(
        self, signing_key_path: Path, room_id: str, state: list[dict[str, Any]], joined: str
    ) -> None:
        from signedjson.key import read_signing_keys
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

        with signing_key_path.open() as fh:
            self.key = read_signing_keys(fh)[0]
        self.room_id = room_id
        by = {(e["type"], e.get("state_key")): e for e in state}
        create = by[("m.room.create", "")]
        self.sender = str(create["sender"])
        self.room_version = KNOWN_ROOM_VERSIONS[create["content"].get("room_version", "1")]
        self.auth = [
            by[("m.room.power_levels", "")]["event_id"],
            by[("m.room.member", self.sender)]["event_id"],
        ]
        if not getattr(self.room_version, "msc4291_room_ids_as_hashes", False):
            # before room version 12 the create event is an auth event too
            self.auth.insert(0, create["event_id"])
        self.recent = [by[("m.room.member", joined)]["event_id"]]
        self.depth = 100

    def request(self, i: int) -> tuple[str, bytes, str, str]:
        """(target, body, authorization, event id) of transaction ``i``."""
        import json

        from signedjson.sign import sign_json
        from synapse.crypto.event_signing import add_hashes_and_signatures
        from synapse.events import make_event_from_dict

        now = int(time.time() * 1000)
        pdu: dict[str, Any] = {
            "room_id": self.room_id,
            "type": "m.room.message",
            "sender": self.sender,
            "content": {"msgtype": "m.text", "body": f"bench message {i}"},
            "prev_events": [self.recent[-1]],
            "auth_events": self.auth,
            "depth": self.depth,
            "origin_server_ts": now,
        }
        add_hashes_and_signatures(self.room_version, pdu, ORIGIN, self.key)
        event_id = make_event_from_dict(pdu, self.room_version).event_id
        txn = {"origin": ORIGIN, "origin_server_ts": now, "pdus": [pdu]}
        target = f"/_matrix/federation/v1/send/bench{i}"
        signed = sign_json(
            {
                "method": "PUT",
                "uri": target,
                "origin": ORIGIN,
                "destination": SERVER_NAME,
                "content": txn,
            },
            ORIGIN,
            self.key,
        )
        key_id = f"{self.key.alg}:{self.key.version}"
        sig = signed["signatures"][ORIGIN][key_id]
        auth = f'X-Matrix origin="{ORIGIN}",destination="{SERVER_NAME}",key="{key_id}",sig="{sig}"'
        return target, json.dumps(txn).encode(), auth, event_id

    def accepted(self, event_id: str, body: bytes, via: str) -> bool:
        """Whether the answer ``body`` accepted the PDU; then the next one follows it."""
        import json

        result = json.loads(body).get("pdus", {}).get(event_id)
        if result is None or "error" in result:
            print(f"  warning: {via}: PDU {event_id} not accepted: {body[:300]!r}", file=sys.stderr)
            return False
        self.recent = [event_id]
        self.depth += 1
        return True


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


async def run_mode(args: argparse.Namespace, mode: str) -> dict[tuple[str, str], list[float]]:
    """One reactor mode's cells, in a working directory of its own (Synapse's config,
    database and logs), removed after it unless ``--keep`` (kept, and named, when the
    run fails)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-inbound-"))
    try:
        cells = await _run_mode(args, mode, workdir)
    except BaseException:
        print(f"  [{mode}] working directory kept: {workdir}", file=sys.stderr)
        raise
    if args.keep:
        print(f"  [{mode}] working directory kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return cells


async def _run_mode(
    args: argparse.Namespace, mode: str, workdir: Path
) -> dict[tuple[str, str], list[float]]:
    import aiohttp

    from synapse_coap.noise.keys import (
        encode_public,
        generate_private_key,
        public_key,
        read_key_file,
        write_key_file,
    )
    from synapse_coap.transport.client import Endpoint

    http_port, coap_port, plain_port = free_port(), free_port("udp"), free_port("udp")
    https_port = free_port()
    nginx = nginx_path()
    nginx_backend, nginx_port = free_port(), free_port()
    key_path = workdir / "coap.key"
    write_key_file(key_path, generate_private_key())
    origin: SynapseProcess | None = None
    federation: dict[str, Any] = {}
    trust: dict[str, Any] = {}
    if args.send:
        origin_dir = workdir / "origin"
        origin_dir.mkdir()
        origin_key = origin_dir / "coap.key"
        write_key_file(origin_key, generate_private_key())
        origin_coap, origin_http = free_port("udp"), free_port()
        pins = {
            SERVER_NAME: encode_public(public_key(read_key_file(key_path))),
            ORIGIN: encode_public(public_key(read_key_file(origin_key))),
        }

        def fed(peer: str, port: int) -> dict[str, Any]:
            return {
                "fallback": "never",
                "discovery": False,
                "peers": {peer: {"endpoints": [f"127.0.0.1:{port}"], "public_key": pins[peer]}},
            }

        federation = fed(ORIGIN, origin_coap)
        trust = {"peers": pins}
        origin = SynapseProcess(
            origin_dir,
            ORIGIN,
            http_port=origin_http,
            modules=[
                {
                    "module": "synapse_coap.CoapModule",
                    "config": {
                        "listen": [f"127.0.0.1:{origin_coap}"],
                        "private_key_path": str(origin_key),
                        "trust": trust,
                        "federation": fed(SERVER_NAME, coap_port),
                    },
                }
            ],
            extra_config=BACKGROUND_UPDATES_AT_ONCE,
            env={"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
        )
    # (--body-memo: the module's memo on, so that an answer repeated (every answer of
    # these endpoints) is encoded once: what the CoAP cells cost without the answers'
    # encoding, a bound on what a cheaper encoder could save)
    env = {"SYNAPSE_COAP_BODY_MEMO": "1" if args.body_memo else "0"}
    cprofile_parts: dict[str, list[Path]] = {}
    if args.stages_out:
        env["SYNAPSE_COAP_STAGES"] = str(workdir / "synapse.stages")
    if args.cprofile_out and mode == "asyncio":
        env["SYNAPSE_COAP_CPROFILE"] = str(workdir / "synapse.prof")
    if args.stages_out or (args.cprofile_out and mode == "asyncio"):
        # the profiling hook first, then this tree (so Synapse imports this tree's module)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "profiling"), str(ROOT), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
    if mode == "asyncio":
        env["SYNAPSE_ASYNC_IO_REACTOR"] = "1"
    proc = SynapseProcess(
        workdir,
        SERVER_NAME,
        http_port=http_port,
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [f"127.0.0.1:{coap_port}"],
                    "plain_listen": [f"127.0.0.1:{plain_port}"],
                    "private_key_path": str(key_path),
                    **({"trust": trust, "federation": federation} if args.send else {}),
                },
            }
        ],
        tls_federation_port=https_port,
        extra_config=BACKGROUND_UPDATES_AT_ONCE,
        env=env,
    )
    # the HTTPS listener serves what the HTTP one does (Synapse's own TLS, a self-signed
    # certificate): an encrypted baseline beside the plaintext one
    listeners = proc.build_config()["listeners"]
    plain_http = next(x for x in listeners if x["port"] == http_port)
    proc.extra_config["listeners"] = [
        {**x, "resources": plain_http["resources"]} if x["port"] == https_port else x
        for x in listeners
    ]
    if nginx is not None:
        # what nginx proxies to: a plain listener with the same resources, trusting
        # nginx's X-Forwarded-For (as Synapse's reverse-proxy docs configure it)
        proc.extra_config["listeners"].append(
            {**plain_http, "port": nginx_backend, "x_forwarded": True}
        )
    if origin is not None:
        origin.start(ready_log_pattern=r"CoAP listener ready")
    proc.start(ready_log_pattern=r"CoAP listener ready")
    # (the lab's tuned front, lab_scenarios.client.NGINX_CONF: as Synapse's reverse-proxy
    # docs configure nginx, no upstream keep-alive; Synapse's certificate)
    front: subprocess.Popen[bytes] | None = (
        launch_nginx(
            nginx,
            workdir / "nginx",
            port=nginx_port,
            cert=proc.tls_certificate_path,
            key=proc.tls_private_key_path,
            backend=nginx_backend,
        )
        if nginx is not None
        else None
    )
    if front is None:
        print(
            f"  [{mode}] the {VIA_NGINX} baseline SKIPPED: nginx is not installed "
            "(scripts/setup installs Debian's nginx-light when run as root)",
            file=sys.stderr,
        )
    waited = max(
        settle_background_updates(p.database_path) for p in (proc, origin) if p is not None
    )
    print(f"  [{mode}] Synapse's background updates done ({waited:.1f} s)", file=sys.stderr)
    cells: dict[tuple[str, str], list[float]] = {}
    spinner = Spinner(asyncio.get_running_loop())
    if args.spin:
        spinner.start()
    pid = proc.pid
    assert pid is not None
    try:
        others = (origin.pid,) if origin is not None and origin.pid else ()
        nginx_pids = nginx_processes(front.pid) if front is not None else ()
        placement = pin(pid, (*others, *nginx_pids))
        server_key = public_key(read_key_file(key_path))
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # (the bench's own self-signed certificate)
        https_base = f"https://127.0.0.1:{https_port}"
        nginx_base = f"https://127.0.0.1:{nginx_port}"
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as http,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.concurrency, ssl=tls)
            ) as https,
        ):
            reg = await http.post(
                f"{proc.base_url}/_matrix/client/v3/register",
                json={
                    "username": "bench",
                    "password": "bench-password",
                    "auth": {"type": "m.login.dummy"},
                },
            )
            token = (await reg.json())["access_token"]
            chain = await join_origin_room(http, proc, origin, token) if origin else None
            secure_ep = Endpoint("127.0.0.1", coap_port, SERVER_NAME, server_key, True)
            plain_ep = Endpoint("127.0.0.1", plain_port, SERVER_NAME, None, False)
            coap = await load_client(
                args.client, "127.0.0.1", coap_port, SERVER_NAME, server_key, args.concurrency
            )
            plain = await load_client(
                args.client, "127.0.0.1", plain_port, SERVER_NAME, None, args.concurrency
            )
            serial = 0
            try:
                endpoints = list(ENDPOINTS)
                if chain is not None:
                    endpoints.append((SEND_LABEL, "", False))
                if args.only:
                    endpoints = [e for e in endpoints if e[0] in args.only]
                for label, target, auth in endpoints:
                    headers: tuple[tuple[str, str], ...] = (
                        (("authorization", f"Bearer {token}"),) if auth else ()
                    )
                    concurrency = args.concurrency
                    n = args.requests

                    def via(
                        client: Any, ep: Any, target: str = target, headers: Any = headers
                    ) -> Callable[[int], Awaitable[int]]:
                        async def call(i: int) -> int:
                            req = HttpRequest("GET", f"{target}?n={i}".encode(), headers)
                            r = await client.request(ep, req)
                            return int(r.status)

                        return call

                    def via_web(
                        session: Any, base: str, target: str = target, headers: Any = headers
                    ) -> Callable[[int], Awaitable[int]]:
                        async def call(i: int) -> int:
                            async with session.get(
                                f"{base}{target}?n={i}", headers=dict(headers)
                            ) as r:
                                await r.read()
                                return int(r.status)

                        return call

                    runners = {
                        "CoAP+Noise": via(coap, secure_ep),
                        "plain CoAP": via(plain, plain_ep),
                        "HTTP/1.1": via_web(http, proc.base_url),
                        "HTTPS/1.1": via_web(https, https_base),
                    }
                    if front is not None:
                        runners[VIA_NGINX] = via_web(https, nginx_base)
                    if label == SEND_LABEL:
                        assert chain is not None
                        concurrency = 1  # each PDU follows an accepted one
                        n = args.send_requests
                        web = {"HTTP/1.1": (http, proc.base_url), "HTTPS/1.1": (https, https_base)}
                        if front is not None:
                            web[VIA_NGINX] = (https, nginx_base)
                        runners = send_runners(
                            chain,
                            web,
                            coap,
                            secure_ep,
                            plain,
                            plain_ep,
                        )
                    if args.listeners:
                        runners = {k: v for k, v in runners.items() if k in args.listeners}
                    for one in runners.values():  # warm-up: sessions, caches, connections
                        await run_n(20, concurrency, one, serial)
                        serial += 20
                    # a round's cell of each listener is measured in turns of --turn
                    # requests, the listeners alternating, so that the two cells of a
                    # ratio share the machine's state (the /send: --send-turn)
                    size = args.send_turn if label == SEND_LABEL else args.turn
                    turn = min(size, n) if size else n
                    for r in range(args.rounds):
                        # the listeners take turns, in an order rotated every round (no
                        # listener always first or last, e.g. in a room that grows)
                        order = list(runners.items())
                        order = order[r % len(order) :] + order[: r % len(order)]
                        used = {name: CellSum() for name in runners}
                        for start in range(0, n, turn):
                            k = min(turn, n - start)
                            for name, one in order:
                                acc = used[name]
                                # (every reading with the processes read asleep: see
                                # results_store.settle)
                                measured = (pid, *(nginx_pids if name == VIA_NGINX else ()))
                                settle_counted(measured)
                                front0 = (
                                    sum(map(cpu_seconds, nginx_pids)) if name == VIA_NGINX else 0
                                )
                                stolen0 = steal_seconds(SYNAPSE_CORE)
                                main0, switches0 = main_thread(pid)
                                before, wall0 = cpu_seconds(pid), time.monotonic()
                                acc.errors += await run_n(k, concurrency, one, serial)
                                settle_counted(measured)
                                acc.cpu += cpu_seconds(pid) - before
                                main1, switches1 = main_thread(pid)
                                acc.main += main1 - main0
                                acc.switches += switches1 - switches0
                                # (busy: of the time Synapse's core was not taken by the
                                # hypervisor, which here comes in bursts)
                                acc.wall += unstolen(
                                    time.monotonic() - wall0, SYNAPSE_CORE, stolen0
                                )
                                if name == VIA_NGINX:
                                    acc.nginx += sum(map(cpu_seconds, nginx_pids)) - front0
                                serial += k  # (every request of the run is distinct)
                        for name, acc in used.items():
                            if name == VIA_NGINX:
                                key = (label, NGINX_OWN)
                                cells.setdefault(key, []).append(acc.nginx * 1000 / n)
                                BUSY.setdefault((mode, *key), []).append(acc.nginx / acc.wall)
                                ERRORS.setdefault((mode, *key), []).append(0)
                            if acc.errors:
                                print(
                                    f"  warning: {label} {name}: {acc.errors} non-200",
                                    file=sys.stderr,
                                )
                            cells.setdefault((label, name), []).append(acc.cpu * 1000 / n)
                            BUSY.setdefault((mode, label, name), []).append(acc.cpu / acc.wall)
                            MAIN.setdefault((mode, label, name), []).append(
                                (acc.main * 1000 / n, acc.switches / n)
                            )
                            ERRORS.setdefault((mode, label, name), []).append(acc.errors)
                    if args.cprofile_out and mode == "asyncio" and label != SEND_LABEL:
                        # (the small requests: where the listener's own cost shows)
                        for name, one in runners.items():
                            os.kill(pid, signal.SIGUSR2)  # start profiling
                            await asyncio.sleep(0.2)
                            await run_n(args.profile_requests, concurrency, one, serial)
                            serial += args.profile_requests
                            cprofile_parts.setdefault(name, []).append(cut(pid, workdir))
                    if args.stages_out and label == args.stages_endpoint:
                        for name, one in runners.items():
                            STAGES[(mode, name)] = await stage_pass(
                                pid, workdir, args.profile_requests, concurrency, one, serial
                            )
                            serial += args.profile_requests
                    if args.perf_out:
                        PERF.setdefault(mode, {}).update(
                            await perf_pass(pid, workdir, label, runners, args, concurrency, serial)
                        )
                        serial += 2 * args.perf_requests
                    if args.profile_out and label != SEND_LABEL:
                        for name, one in runners.items():
                            spy = start_spy(pid, workdir / f"spy-{listener_slug(name)}.txt")
                            await run_n(args.profile_requests, concurrency, one, serial)
                            serial += args.profile_requests
                            stop_spy(spy)
                    print(
                        f"  [{mode}] {label}: "
                        + ", ".join(
                            f"{n} {statistics.median(cells[(label, n)]):.3f}"
                            for n in LISTENERS
                            if (label, n) in cells
                        )
                        + " ms/request; busy "
                        + ", ".join(
                            f"{statistics.median(BUSY[(mode, label, n)]):.2f}"
                            for n in LISTENERS
                            if (label, n) in cells
                        ),
                        file=sys.stderr,
                    )
            finally:
                await coap.close()
                await plain.close()
        MISSING[mode] = len(re.findall(r"Requesting missing events", proc.log_text()))
    finally:
        spinner.stop()
        if front is not None:
            stop_nginx(front)
        proc.stop()
        if origin is not None:
            origin.stop()
    print(f"  [{mode}] {placement}", file=sys.stderr)
    if args.cprofile_out and mode == "asyncio":
        for name, parts in cprofile_parts.items():
            write_cprofile(parts, args.cprofile_out, name, args)
    if args.profile_out:
        for name in LISTENERS[:5]:  # (not nginx's own: not a listener)
            write_profile(workdir / f"spy-{listener_slug(name)}.txt", args.profile_out, mode, name)
    return cells


async def join_origin_room(
    http: Any, proc: SynapseProcess, origin: SynapseProcess, token: str
) -> PduChain:
    """A public room on :data:`ORIGIN` that the measured server's user joins (over CoAP
    federation); the chain of PDUs starts after that join."""
    reg = await http.post(
        f"{origin.base_url}/_matrix/client/v3/register",
        json={
            "username": "origin",
            "password": "bench-password",
            "auth": {"type": "m.login.dummy"},
        },
    )
    origin_token = (await reg.json())["access_token"]
    made = await http.post(
        f"{origin.base_url}/_matrix/client/v3/createRoom",
        json={"preset": "public_chat", "name": "bench"},
        headers={"authorization": f"Bearer {origin_token}"},
    )
    room_id = (await made.json())["room_id"]
    auth = {"authorization": f"Bearer {token}"}
    joined = await http.post(
        f"{proc.base_url}/_matrix/client/v3/join/{room_id}?server_name={ORIGIN}",
        json={},
        headers=auth,
    )
    if joined.status != 200:
        raise SystemExit(f"joining the origin's room failed: {await joined.text()}")
    state = await http.get(f"{proc.base_url}/_matrix/client/v3/rooms/{room_id}/state", headers=auth)
    return PduChain(origin.signing_key_path, room_id, await state.json(), f"@bench:{SERVER_NAME}")


def send_runners(
    chain: PduChain,
    web: dict[str, tuple[Any, str]],
    coap: Any,
    secure: Any,
    plain: Any,
    ep: Any,
) -> dict[str, Callable[[int], Awaitable[int]]]:
    """The listeners' ``/send`` calls (``web``: listener -> (aiohttp session, base URL));
    a PDU not accepted counts as an error."""

    def via(client: Any, endpoint: Any, name: str) -> Callable[[int], Awaitable[int]]:
        async def call(i: int) -> int:
            target, body, auth, event_id = chain.request(i)
            headers = (("authorization", auth), ("content-type", "application/json"))
            r = await client.request(endpoint, HttpRequest("PUT", target.encode(), headers, body))
            ok = r.status == 200 and chain.accepted(event_id, r.body, name)
            await asyncio.sleep(SEND_PAUSE)
            return 200 if ok else int(r.status) or 599

        return call

    def via_web(session: Any, base: str, name: str) -> Callable[[int], Awaitable[int]]:
        async def call(i: int) -> int:
            target, body, auth, event_id = chain.request(i)
            async with session.put(
                f"{base}{target}",
                data=body,
                headers={"authorization": auth, "content-type": "application/json"},
            ) as r:
                got = await r.read()
                ok = r.status == 200 and chain.accepted(event_id, got, name)
                status = 200 if ok else r.status or 599
            await asyncio.sleep(SEND_PAUSE)
            return int(status)

        return call

    return {
        "CoAP+Noise": via(coap, secure, "CoAP+Noise"),
        "plain CoAP": via(plain, ep, "plain CoAP"),
        **{name: via_web(session, base, name) for name, (session, base) in web.items()},
    }


_CUTS: dict[int, int] = {}


#: the endpoint of the stage-timing pass (--stages-out) unless --stages-endpoint names
#: another: no servlet, the listener weighs most
STAGES_LABEL = "/health (no servlet)"
#: (mode, listener) -> {stage label: (calls, ns, own ns)} of the stage-timing pass
STAGES: dict[tuple[str, str], dict[str, tuple[int, int, int]]] = {}
#: mode -> {(endpoint, listener): samples} of the perf passes (--perf-out)
PERF: dict[str, dict[tuple[str, str], perfsplit.Cell]] = {}


async def perf_pass(
    pid: int,
    workdir: Path,
    label: str,
    runners: dict[str, Callable[[int], Awaitable[int]]],
    args: argparse.Namespace,
    concurrency: int,
    base: int,
) -> dict[tuple[str, str], perfsplit.Cell]:
    """One more pass of ``--perf-requests`` requests per listener (CoAP+Noise, HTTP/1.1,
    alternating turns of 100, the /send's of 10, the first of a pair swapped every turn) with ``perf
    record`` sampling every thread of Synapse; the samples split per turn
    (bench/perfsplit.py). Nothing (and a warning) if perf cannot record."""
    perf = shutil.which("perf")
    assert perf is not None  # (checked with the arguments)
    data = workdir / f"perf-{time.monotonic_ns()}.data"
    record = subprocess.Popen(
        [
            *(perf, "record", "-k", "CLOCK_MONOTONIC", "-F", str(args.perf_frequency)),
            *("-p", str(pid), "-o", str(data)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    await asyncio.sleep(0.5)  # (perf attaches to every thread)
    turns: list[perfsplit.Turn] = []
    pair = [(name, runners[name]) for name in COMPARED]
    serial = base
    done = 0
    # (turns of 100 requests; the /send's transactions, one at a time, in turns of 10)
    size = 10 if label == SEND_LABEL else 100
    while done < args.perf_requests:
        k = min(size, args.perf_requests - done)
        for name, one in pair:
            t0 = time.monotonic()
            await run_n(k, concurrency, one, serial)
            turns.append(perfsplit.Turn(label, name, t0, time.monotonic(), k))
            serial += k
        pair.reverse()
        done += k
    record.send_signal(signal.SIGINT)
    try:
        _, err = record.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        record.kill()
        _, err = record.communicate()
    if not data.exists():
        print(
            f"  warning: perf record failed: {err.decode(errors='replace')[-300:]}", file=sys.stderr
        )
        return {}
    script = subprocess.run(
        [perf, "script", "-i", str(data), "-F", "tid,time,ip,sym,dso"],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    data.unlink()
    return perfsplit.split(perfsplit.parse_script(script.stdout.splitlines()), turns)


def perf_report(args: argparse.Namespace) -> str:
    """The perf passes as text (bench/perfsplit.py's tables, one section per mode)."""
    lines = [
        "# Where Synapse's CPU goes by library, per request: perf samples of every thread",
        f"# ({args.perf_frequency} Hz, cpu-clock) taken during one more pass per endpoint, the",
        "# CoAP+Noise and HTTP/1.1 listeners alternating turns of 100 requests (the /send's:",
        "# 10 transactions, one at a time); microseconds",
        "# per request. Sampling costs the process CPU of its own: the figures are larger than",
        "# the table's, and perf's per-thread events add a cost to every context switch, which",
        "# HTTP/1.1 makes three to four times a request on the JSON endpoints (its thread pool;",
        "# see the README's second table) and CoAP+Noise almost never: read the groups only",
        "# CoAP+Noise has (compiled, our C, zlib, the AEAD) and /health (no hop either way),",
        "# not the JSON endpoints' totals. bench/perfsplit.py groups the shared objects.",
        f"# {args.perf_requests} distinct requests per listener, endpoint and mode",
        "# command: python bench/inbound.py " + " ".join(sys.argv[1:]),
        f"# commit {source_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ]
    for mode, cells in PERF.items():
        lines += perfsplit.render(cells, args.perf_frequency, title=f"{mode} reactor")
    return "\n".join(lines)


async def stage_pass(
    pid: int,
    workdir: Path,
    n: int,
    concurrency: int,
    one: Callable[[int], Awaitable[int]],
    base: int,
) -> dict[str, tuple[int, int, int]]:
    """One more pass of ``n`` requests with Synapse timing the stages of its request path
    (bench/profiling/sitecustomize.py, SIGUSR1 toggles); {label: (calls, ns, own ns)}."""
    done = sorted(workdir.glob("synapse.stages.*"))
    os.kill(pid, signal.SIGUSR1)
    await asyncio.sleep(0.2)
    await run_n(n, concurrency, one, base)
    os.kill(pid, signal.SIGUSR1)
    path = workdir / f"synapse.stages.{len(done)}"
    for _ in range(100):
        await asyncio.sleep(0.05)
        if path.exists():
            break
    await asyncio.sleep(0.2)
    out: dict[str, tuple[int, int, int]] = {}
    for line in path.read_text().splitlines():
        label, calls, ns, own = line.split("\t")
        out[label] = (int(calls), int(ns), int(own))
    return out


#: (title, timed functions) per listener: what each part of the path costs on its own,
#: in microseconds per request: the functions' own time (the timed calls made inside
#: them left out, wherever they are made: an answer is encoded inside Synapse's finish,
#: or once its batch's requests have started, or from a timed call of the reactor)
STAGE_PARTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "CoAP+Noise": (
        (
            # (the default reactor's read, BatchReader.readable, is bound when the socket
            # is added, before the timers wrap it: its recvmmsg call is not in this row)
            "datagrams read; Noise record opened, session bookkeeping",
            ("coap.read", "coap.handle_batch", "coap.next"),
        ),
        ("fast path: CoAP decode, duplicate store, held ACK", ("coap.message",)),
        # (a request of a batch is handed to Synapse when the batch is read:
        # BatchHold.release, inside coap.read; a lone one from respond_now)
        ("exchange opened (Accept, route name, session)", ("coap.open",)),
        ("request decode, exchange", ("coap.respond_now", "coap.release")),
        ("request handed to the dispatcher", ("coap.start",)),
        ("SynapseRequest set-up (channel, headers, body)", ("coap.dispatch_now",)),
        ("Synapse: requestReceived (its own work)", ("synapse.request_received",)),
        (
            "the channel: headers and body kept, completion",
            ("coap.channel_headers", "coap.channel_write", "coap.channel_done"),
        ),
        ("response taken from the channel", ("coap.channel_response",)),
        ("the answer's exchange bookkeeping", ("coap.complete", "coap.answer")),
        ("answer encoded (metrics, wire codec)", ("coap.conclude",)),
        ("answer sealed (Noise)", ("coap.send_datagram",)),
        ("sendto (counters, system call)", ("coap.sendto",)),
    ),
    "HTTP/1.1": (
        ("HTTP parsing, request set-up", ("http.data_received",)),
        ("request hand-over", ("http.all_content",)),
        ("Synapse: requestReceived (its own work)", ("synapse.request_received",)),
        ("write (headers, socket send)", ("http.write",)),
    ),
}


def stage_report(args: argparse.Namespace) -> str:
    """The stage-timing passes as text: microseconds per request in each part of the path."""
    lines = [
        "# Where the CPU of one request goes, per listener: Synapse's main-thread CPU time",
        "# (thread_time) inside functions of the request path, each function's own (the",
        "# timed functions it calls left out); microseconds per request. Each timed function",
        "# costs its caller about a microsecond of clock reads. The event loop's and the",
        "# reactor's own work outside the timed functions is not in these (compare the",
        "# totals with the table's).",
        f"# {args.profile_requests} distinct {args.stages_endpoint} requests per listener and mode",
        "# command: python bench/inbound.py " + " ".join(sys.argv[1:]),
        f"# commit {source_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ]
    for (mode, listener), sums in sorted(STAGES.items()):
        parts = STAGE_PARTS.get(listener)
        if parts is None:
            continue
        requests = max(1, args.profile_requests)
        lines.append(f"## {mode} reactor, {listener}")
        total = 0.0
        for title, labels in parts:
            us = sum(sums.get(label, (0, 0, 0))[2] for label in labels) / 1000 / requests
            total += us
            lines.append(f"  {us:7.1f}  {title}")
        lines.append(f"  {total:7.1f}  total in the timed functions")
        lines.append("")
    return "\n".join(lines)


def cut(pid: int, workdir: Path) -> Path:
    """Ask the profiled Synapse to write and stop its profile (bench/profiling/sitecustomize.py)."""
    n = _CUTS.get(pid, 0)
    _CUTS[pid] = n + 1
    os.kill(pid, signal.SIGUSR2)
    path = workdir / f"synapse.prof.{n}"
    for _ in range(100):
        if path.exists():
            time.sleep(0.1)
            break
        time.sleep(0.05)
    return path


def write_cprofile(parts: list[Path], out: Path, listener: str, args: argparse.Namespace) -> None:
    """cProfile text (internal time and cumulative) over one listener's requests."""
    import io
    import pstats

    parts = [p for p in parts if p.exists()]
    if not parts:
        return
    stats = pstats.Stats(str(parts[0]))
    for p in parts[1:]:
        stats.add(str(p))
    buf = io.StringIO()
    buf.write(
        f"# cProfile (CPU time of the main thread) of Synapse with the asyncio reactor serving "
        f"{args.profile_requests} distinct {listener} requests of each of the small endpoints\n"
        "# command: python bench/inbound.py " + " ".join(sys.argv[1:]) + "\n"
        "# (the profiler's own clock reads inflate small functions: compare proportions)\n\n"
    )
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(70)
    target = out.with_name(f"{out.stem}-asyncio-{listener_slug(listener)}{out.suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    text = buf.getvalue().replace(str(ROOT) + "/", "")
    text = text.replace(str(Path(sys.executable).resolve().parents[1]) + "/", "")
    target.write_text(text)
    print(f"  cProfile written to {target}", file=sys.stderr)


def listener_slug(listener: str) -> str:
    """A listener's name for file names: ``CoAP+Noise`` -> ``coap-noise``."""
    return listener.lower().replace("/", "").replace("+", "-").replace(" ", "-").replace(".", "")


def start_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling every thread of ``pid`` (collapsed stacks, appended per endpoint)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    part = out.with_suffix(f".{time.monotonic_ns()}")
    proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "500",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(part),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    proc.part = part  # type: ignore[attr-defined]
    proc.out = out  # type: ignore[attr-defined]
    return proc


def stop_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    part: Path = proc.part  # type: ignore[attr-defined]
    out: Path = proc.out  # type: ignore[attr-defined]
    if part.exists():
        with out.open("a") as f:
            f.write(part.read_text())


def write_profile(raw: Path, out: Path, mode: str, listener: str) -> None:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    if not raw.exists():
        print(f"  no profile at {raw}", file=sys.stderr)
        return
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.replace(str(ROOT) + "/", "") for f in stack.split(";")]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [
        f"# py-spy samples (500/s, every thread) of the Synapse process while it served "
        f"{listener} requests of the small endpoints; reactor {mode}",
        "# command: python bench/inbound.py " + " ".join(sys.argv[1:]),
        f"# {total} samples (idle threads included: epoll/select waits)",
        "",
        "## top 40 by self samples",
    ]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"{n:>7} {100 * n / total:5.1f}%  {f}")
    lines += ["", "## top 60 by inclusive samples"]
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:60]:
        lines.append(f"{n:>7} {100 * n / total:5.1f}%  {f}")
    target = out.with_name(f"{out.stem}-{mode}-{listener_slug(listener)}{out.suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    shutil.copyfile(raw, target.with_suffix(".collapsed"))  # for flame-graph tools
    print(
        f"  profile written to {target} (stacks: {target.with_suffix('.collapsed')})",
        file=sys.stderr,
    )


def cells_of(
    rows: list[dict[str, str]], column: str = "cpu_ms"
) -> dict[str, dict[tuple[str, str], list[float]]]:
    """The CSV's rows as mode -> (endpoint, listener) -> ``column`` per round (in round
    order): CPU ms per request, or Synapse's utilisation (``busy``)."""
    out: dict[str, dict[tuple[str, str], list[float]]] = {}
    for r in sorted(rows, key=lambda r: int(r["round"])):
        cell = out.setdefault(r["mode"], {}).setdefault((r["endpoint"], r["listener"]), [])
        cell.append(float(r[column]))
    return out


def busy_text(busy: dict[tuple[str, str], list[float]], label: str) -> str:
    """Median utilisation of Synapse in the CoAP+Noise and the baselines' cells of
    ``label``."""
    return " / ".join(
        f"{statistics.median(busy[(label, listener)]):.2f}"
        for listener in ("CoAP+Noise", *BASELINES)
        if (label, listener) in busy
    )


#: the baselines a CoAP+Noise ratio is given against, where the run has them
BASELINES = ("HTTP/1.1", "HTTPS/1.1", VIA_NGINX)

#: the ratio's name for each baseline (against nginx: the server's CPU, Synapse's behind
#: nginx plus nginx's own, as CoAP+Noise's includes its encryption and compression)
RATIO_NAMES = {
    "HTTP/1.1": "HTTP",
    "HTTPS/1.1": "HTTPS",
    VIA_NGINX: "(nginx + Synapse)",
}


def present(cells: dict[tuple[str, str], list[float]]) -> list[str]:
    """The listeners a run measured, in :data:`LISTENERS` order (runs before the HTTPS
    listener have three)."""
    names = {listener for _label, listener in cells}
    return [n for n in LISTENERS if n in names]


def ratio_text(per_round: list[float]) -> str:
    """A ratio with its spread over the rounds: ``1.02x (0.97-1.08)``; ``nan`` without
    rounds."""
    if not per_round:
        return "nan"
    median = statistics.median(per_round)
    if len(per_round) == 1:
        return f"{median:.2f}x"
    return f"{median:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def table(
    cells: dict[tuple[str, str], list[float]],
) -> list[tuple[str, list[str], list[list[float]]]]:
    """(endpoint, the listeners' spreads, for each baseline the run has the
    CoAP+Noise / baseline ratio of every round: the two listeners' cells of one round
    taken side by side, so a drift of the machine between rounds cancels)."""
    out = []
    listeners = present(cells)
    for label in ROW_LABELS:
        if (label, "HTTP/1.1") not in cells:
            continue
        noise = cells[(label, "CoAP+Noise")]
        ratios = []
        for base in BASELINES:
            if base in listeners:
                against = cells[(label, base)]
                if base == VIA_NGINX and (label, NGINX_OWN) in cells:
                    own = cells[(label, NGINX_OWN)]
                    against = [a + b for a, b in zip(against, own, strict=True)]
                # (a baseline under a clock tick has no ratio)
                ratios.append([a / b for a, b in zip(noise, against, strict=True) if b > 0])
        out.append((label, [spread(cells[(label, n)]) for n in listeners], ratios))
    return out


def report(mode: str, cells: dict[tuple[str, str], list[float]], args: argparse.Namespace) -> None:
    print(
        f"\nSynapse CPU ms per request, reactor {mode}: {args.requests} distinct requests per "
        f"cell, concurrency {args.concurrency} (/send: {args.send_requests}, concurrency 1), "
        f"median (min-max) of {args.rounds} rounds; busy: Synapse's CPU s / wall s, "
        "CoAP+Noise / HTTP/1.1 / HTTPS/1.1 / via nginx"
    )
    busy = {(label, listener): v for (m, label, listener), v in BUSY.items() if m == mode}
    listeners = present(cells)
    bases = [b for b in BASELINES if b in listeners]
    print(
        f"{'endpoint':<24}"
        + "".join(f"{n:>24}" for n in listeners)
        + "".join(f"{'Noise/' + RATIO_NAMES[b]:>26}" for b in bases)
        + f"{'busy':>20}"
    )
    for label, spreads, ratios in table(cells):
        print(
            f"{label:<24}"
            + "".join(f"{x:>24}" for x in spreads)
            + "".join(f"{ratio_text(r):>26}" for r in ratios)
            + f"{busy_text(busy, label):>26}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per cell and round")
    parser.add_argument(
        "--send-requests", type=int, default=100, help="/send transactions per cell and round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (n of each figure)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--turn",
        type=int,
        default=100,
        help="requests per listener turn: a round's cells are measured in turns of this "
        "many requests, the listeners alternating (0: one turn of --requests per cell, "
        "as before); the /send's turns are --send-turn",
    )
    parser.add_argument(
        "--send-turn",
        type=int,
        default=10,
        help="/send transactions per listener turn, as --turn (0: one turn per cell); the "
        "room and Synapse's database grow with every PDU, so that a listener measured "
        "later in a round would otherwise find more of both",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "aiocoap"),
        default="lean",
        help="CoAP load client: lean (bench/leanclient.py: the sans-I/O layers on a bare "
        "socket, cheap enough to keep Synapse busy) or aiocoap (the product's CoapClient)",
    )
    add_spin_argument(parser)
    parser.add_argument(
        "--modes", default="default,asyncio", help="reactor modes: default, asyncio or both"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep each mode's working directory (Synapse's config, database and logs; "
        "its path is printed): removed after a run otherwise, kept when the run fails",
    )
    parser.add_argument(
        "--no-send",
        dest="send",
        action="store_false",
        help="leave out the federation /send cell (and its second Synapse)",
    )
    parser.add_argument(
        "--perf-out",
        type=Path,
        default=None,
        help="after each endpoint's rounds (the /send's too), one more pass per listener "
        "with Linux perf sampling Synapse; write where its CPU went, by library, to FILE "
        "(bench/perfsplit.py; needs perf on PATH and the right to attach)",
    )
    parser.add_argument(
        "--perf-requests", type=int, default=3000, help="requests per listener in a perf pass"
    )
    parser.add_argument(
        "--perf-frequency", type=int, default=999, help="perf samples per second (Hz)"
    )
    parser.add_argument(
        "--listeners",
        default="",
        help="comma-separated listeners to measure besides CoAP+Noise and HTTP/1.1 (of "
        "'plain CoAP', 'HTTPS/1.1', 'via nginx', or 'none' for just those two; default: "
        "all); not with --readme",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated endpoint labels to measure (e.g. 'federation send (1 PDU)' "
        "or 'client versions'; default: all); not with --readme",
    )
    parser.add_argument(
        "--profile-out", type=Path, default=None, help="write py-spy text profiles here"
    )
    parser.add_argument(
        "--profile-requests", type=int, default=2000, help="requests per endpoint when profiling"
    )
    parser.add_argument(
        "--readme", action="store_true", help="rewrite the README's block from the results"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only re-render the README's block from the committed results CSV",
    )
    parser.add_argument(
        "--stages-out",
        type=Path,
        default=None,
        help="time the stages of each listener's request path during one more pass of "
        "/health (or --stages-endpoint) per mode and write them to FILE "
        "(bench/profiling/sitecustomize.py)",
    )
    parser.add_argument(
        "--stages-endpoint",
        default=STAGES_LABEL,
        choices=ROW_LABELS,
        help=f"the endpoint of the --stages-out pass (default: {STAGES_LABEL!r}; the "
        f"{SEND_LABEL!r} times its transactions, one at a time)",
    )
    parser.add_argument(
        "--cprofile-out",
        type=Path,
        default=None,
        help="asyncio mode: profile Synapse with cProfile during one more pass per listener "
        "and write FILE-asyncio-LISTENER.txt (bench/profiling/sitecustomize.py)",
    )
    parser.add_argument(
        "--body-memo",
        action="store_true",
        help="leave the module's body memo on (every endpoint here answers the same body "
        "each time, so the answers' encoding is left out: a bound on what the encoding "
        "costs in situ); not with --readme",
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results", help="results directory"
    )
    args = parser.parse_args()
    csv_path = args.results / "inbound.csv"
    if args.render:
        render_readme(csv_path)
        return
    if args.body_memo and args.readme:
        parser.error("--body-memo: not with --readme (the README's figures are of distinct bodies)")
    only = {o.strip() for o in args.only.split(",") if o.strip()}
    known = set(ROW_LABELS)
    if only - known:
        parser.error(f"--only: unknown {sorted(only - known)} (allowed: {sorted(known)})")
    if only and args.readme:
        parser.error("--only: not with --readme (the README's table has every endpoint)")
    args.only = only
    listeners = {x.strip() for x in args.listeners.split(",") if x.strip()}
    filtered = bool(listeners)
    listeners.discard("none")
    optional = {"plain CoAP", "HTTPS/1.1", VIA_NGINX}
    if listeners - optional:
        parser.error(
            f"--listeners: unknown {sorted(listeners - optional)} (allowed: {sorted(optional)})"
        )
    if filtered and args.readme:
        parser.error("--listeners: not with --readme (the README's table has every listener)")
    args.listeners = listeners | set(COMPARED) if filtered else set()
    if only and SEND_LABEL not in only:
        args.send = False  # no second Synapse to start
    if args.perf_out and shutil.which("perf") is None:
        parser.error("--perf-out: needs Linux perf on PATH (Debian: linux-perf)")
    if args.perf_requests < 100 or args.perf_frequency < 1:
        parser.error("--perf-requests: at least 100; --perf-frequency: at least 1 Hz")
    if args.turn < 0:
        parser.error(f"--turn: {args.turn} (allowed: 0, one turn per cell, or more)")
    if args.send_turn < 0:
        parser.error(f"--send-turn: {args.send_turn} (allowed: 0, one turn per cell, or more)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("default", "asyncio"):
            parser.error(f"--modes: unknown mode {m!r} (allowed: default, asyncio)")
    results = {m: asyncio.run(run_mode(args, m)) for m in modes}
    if args.stages_out:
        args.stages_out.parent.mkdir(parents=True, exist_ok=True)
        args.stages_out.write_text(stage_report(args) + "\n")
        print(f"stage timing written to {args.stages_out}")
    if args.perf_out and PERF:
        args.perf_out.parent.mkdir(parents=True, exist_ok=True)
        args.perf_out.write_text(perf_report(args) + "\n")
        print(f"perf split written to {args.perf_out}")
    for m, cells in results.items():
        report(m, cells, args)
    print(
        "\nThe machine may be shared with other work; the ratio comes from the same rounds, "
        "the listeners taking turns."
    )
    if SETTLED["running"]:
        print(
            f"warning: {SETTLED['running']} of {SETTLED['readings']} CPU readings were taken "
            f"with a thread still running after {SETTLE_TIMEOUT} s (each may miss up to a "
            "scheduler tick of CPU)",
            file=sys.stderr,
        )
    rows = []
    for m, cells in results.items():
        for (label, listener), values in cells.items():
            main = [(round(c, 4), round(w, 3)) for c, w in MAIN.get((m, label, listener), [])]
            for i, v in enumerate(values):
                rows.append(
                    {
                        "mode": m,
                        "endpoint": label,
                        "listener": listener,
                        "round": i,
                        "cpu_ms": v,
                        "errors": ERRORS[(m, label, listener)][i],
                        "busy": round(BUSY[(m, label, listener)][i], 3),
                        # (nginx's own cells: not Synapse's, no main-thread figures)
                        "main_cpu_ms": main[i][0] if main else "",
                        "main_switches": main[i][1] if main else "",
                    }
                )
    meta = provenance("python bench/inbound.py " + " ".join(sys.argv[1:]))
    meta["note"] = "machine shared with other work"
    meta["requests"] = str(args.requests)
    meta["send_requests"] = str(args.send_requests)
    meta["rounds"] = str(args.rounds)
    meta["concurrency"] = str(args.concurrency)
    meta["turn"] = str(args.turn)
    meta["send_turn"] = str(args.send_turn)
    meta["client"] = args.client
    meta["missing_event_fetches"] = ", ".join(f"{m} {n}" for m, n in MISSING.items())
    meta["background_updates"] = "settled before the first cell"
    meta["client_spins"] = "yes" if args.spin else "no"
    meta["body_memo"] = (
        "on (answers repeated: encoded once)" if args.body_memo else "off (every answer encoded)"
    )
    meta["cpu_clock"] = cpu_clock_source(os.getpid())
    meta["busy"] = "CPU s / wall s less the steal time of Synapse's core"
    meta["cpu_readings"] = (
        f"{SETTLED['readings']} taken with every thread of the process read asleep "
        f"(results_store.settle), {SETTLED['running']} of them after waiting "
        f"{SETTLE_TIMEOUT} s with one still running"
    )
    meta["main_thread"] = (
        "main_cpu_ms: the part of cpu_ms in Synapse's main (reactor) thread (the rest is "
        "its pool threads' and its Rust runtime's); main_switches: that thread's context "
        "switches per request (/proc/PID/task/PID schedstat, read with every thread "
        "asleep, as cpu_ms)"
    )
    write_dict_rows(csv_path, rows, meta)
    print(f"wrote {csv_path}")
    if args.readme:
        render_readme(csv_path)


def thread_split(
    rows: list[dict[str, str]],
) -> dict[str, list[tuple[str, list[tuple[float, float, float]]]]]:
    """mode -> [(endpoint, per :data:`COMPARED`: (main-thread us, other threads'
    us, the main thread's context switches) per request, medians of the rounds)], from the
    CSV's ``main_cpu_ms`` and ``main_switches``; empty for a run from before those columns.
    The other threads' share is ``cpu_ms - main_cpu_ms`` per round, at least 0 (the main
    thread's schedstat may lag a running thread by a tick)."""
    rows = [r for r in rows if r["listener"] in COMPARED]
    if not rows or not all(r.get("main_cpu_ms") and r.get("main_switches") for r in rows):
        return {}
    cpu, main = cells_of(rows), cells_of(rows, "main_cpu_ms")
    switches = cells_of(rows, "main_switches")
    out: dict[str, list[tuple[str, list[tuple[float, float, float]]]]] = {}
    for mode, cells in cpu.items():
        for label in ROW_LABELS:
            keys = [(label, listener) for listener in COMPARED]
            if not all(k in cells for k in keys):
                continue
            per = []
            for k in keys:
                mains = main[mode][k]
                others = [max(0.0, c - m) for c, m in zip(cells[k], mains, strict=True)]
                per.append(
                    (
                        statistics.median(mains) * 1000,
                        statistics.median(others) * 1000,
                        statistics.median(switches[mode][k]),
                    )
                )
            out.setdefault(mode, []).append((label, per))
    return out


def thread_split_lines(rows: list[dict[str, str]]) -> list[str]:
    """The README's per-thread split of the CoAP+Noise and HTTP/1.1 cells (nothing for a
    run from before the columns)."""
    split = thread_split(rows)
    if not split:
        return []
    lines = [
        "",
        "Where that CPU ran, in the same cells: Synapse's main (reactor) thread and its "
        "other threads (its thread pool, where Synapse encodes an HTTP answer's JSON; the "
        "CoAP listener has Synapse encode it on the main thread, where the answer is then "
        "encoded for the wire; and its Rust runtime, which answers `client versions`), "
        "microseconds per request, and how often per request the main thread waited "
        "(context switches); medians of the rounds.",
        "",
        "| reactor | endpoint | "
        + " | ".join(f"{n} main us | {n} other us" for n in COMPARED)
        + " | main-thread waits, "
        + " / ".join(COMPARED)
        + " |",
        "|---|---|" + "--:|" * (2 * len(COMPARED) + 1),
    ]
    for mode, entries in split.items():
        for label, per in entries:
            lines.append(
                f"| {mode} | {label} | "
                + " | ".join(f"{m:.0f} | {o:.0f}" for m, o, _ in per)
                + " | "
                + " / ".join(f"{w:.2f}" for _, _, w in per)
                + " |"
            )
    return lines


def render_readme(csv_path: Path) -> None:
    meta, rows = read_dict_rows(csv_path)
    replace_block(ROOT / "README.md", "inbound", readme_block(meta, rows), WRITER)
    print("updated README.md")


def readme_block(meta: dict[str, str], rows: list[dict[str, str]]) -> str:
    """The README's block: rendered from the results CSV's provenance and rows only."""
    results = cells_of(rows)
    listeners = present(next(iter(results.values()), {}))
    https = "HTTPS/1.1" in listeners
    bases = [b for b in BASELINES if b in listeners]
    lines = [
        f"Synapse's own CPU time ({cpu_clock_words(meta)}) per request into one "
        "Synapse through the module's CoAP listener and through Synapse's own HTTP listener"
        + (
            " and, encrypted as CoAP+Noise is, its HTTPS listener (Synapse's own TLS, 1.3, "
            "a self-signed certificate; the CoAP+Noise ratio to each in its column)"
            if https
            else ""
        )
        + ", "
        f"same servlets, same run: {meta['requests']} distinct requests per cell (no body "
        f"memo hit), median (min-max) of {meta['rounds']} rounds, the listeners taking turns "
        + (
            f"of {meta['turn']} requests within each round's cells (so that the cells of a "
            "ratio share the machine's state; the `/send` "
            + (
                f"in turns of {meta['send_turn']} transactions) "
                if meta.get("send_turn", "0") != "0"
                else "one turn per cell) "
            )
            if meta.get("turn", "0") != "0"
            else ""
        )
        + "(in an order rotated every round; a ratio is the median (min-max) of the rounds' "
        "ratios, each of two cells measured side by side); "
        f"concurrency {meta['concurrency']} (the federation `/send`: "
        f"{meta['send_requests']} transactions per cell at concurrency 1, each PDU, signed "
        "with a second Synapse's key in its room, following the last accepted one, 30 ms "
        "after its answer; "
        f"Synapse fetched missing events {meta['missing_event_fetches']} times); the client "
        "pinned to the other core at lower priority"
        + (
            "; measured once Synapse's start-up background updates were done"
            if meta.get("background_updates")
            else ""
        )
        + (
            "; the client's event loop never sleeps (on loopback the server's answer would "
            "otherwise pay for waking it on the other core, which on a real link the "
            "client's machine pays)"
            if meta.get("client_spins") == "yes"
            else ""
        )
        + (
            ". _via nginx_: the same HTTPS/1.1 requests to Debian's nginx, the lab's tuned "
            "front (TLS 1.3, HTTP/2, gzip), which proxies each to a plain listener of the "
            "same Synapse as Synapse's reverse-proxy documentation configures it "
            "(`proxy_pass` to the listener, X-Forwarded-For, `proxy_http_version 1.1`, no "
            "upstream keep-alive: a new connection to Synapse per request; the listener "
            "has `x_forwarded`); the column is Synapse's CPU, _nginx's own_ is nginx's in "
            "the same cells (on the client's core), and the ratio is against their sum: "
            "the CPU the server machine spends, as CoAP+Noise's includes its encryption "
            "and compression. nginx keeping its connections to Synapse open (an `upstream` "
            "block with `keepalive`) would bring Synapse's part towards the HTTP/1.1 column"
            if VIA_NGINX in listeners
            else ""
        )
        + (
            " (CoAP: bench/leanclient.py, the sans-I/O layers on a bare socket; HTTP: "
            "aiohttp). _Synapse busy_ is its CPU seconds per wall second in the cells (median"
            + (
                ", the wall time its core was taken by the hypervisor left out"
                if meta.get("busy", "").endswith("steal time of Synapse's core")
                else ""
            )
            + "): near 1 when the client kept it busy; the `/send` cells idle by design."
            if meta.get("client") == "lean"
            else " (CoAP: the product's aiocoap CoapClient; HTTP: aiohttp). _Synapse busy_ is "
            "its CPU seconds per wall second in the cells (median)."
        ),
        "",
        "| reactor | endpoint | "
        + " | ".join(f"{n} ms" for n in listeners)
        + "".join(f" | CoAP+Noise / {RATIO_NAMES[b]}" for b in bases)
        + " | Synapse busy, CoAP+Noise / "
        + " / ".join(b.split("/")[0] if b != VIA_NGINX else b for b in bases)
        + " |",
        "|---|---|" + "--:|" * (len(listeners) + len(bases) + 1),
    ]
    busy = cells_of(rows, "busy")
    for m, cells in results.items():
        for label, spreads, ratios in table(cells):
            lines.append(
                f"| {m} | {label} | "
                + " | ".join(spreads)
                + "".join(f" | {ratio_text(r)}" for r in ratios)
                + f" | {busy_text(busy[m], label)} |"
            )
    lines += thread_split_lines(rows)
    lines += [
        "",
        f"_`{meta['command']}`, commit `{meta['commit']}`, {meta['time']}, {meta['machine']}, "
        f"Synapse {meta['synapse']}{build_suffix(meta)} (shared with other work); rounds in "
        "`bench/results/inbound.csv`._",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
