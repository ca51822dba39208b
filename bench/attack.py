"""The attack suite (issue 14): the module's listener inside a real Synapse, under attack.

Starts Synapse with the module (SQLite, its own directory), then:

1. **fuzz**: random and mutated datagrams (random bytes, bit flips, truncations,
   header-valid records, real handshake messages mutated) at the listener, while
   an honest client keeps sending requests;
2. **in-session fuzz**: mutated CoAP messages inside an authenticated session;
3. **handshake floods**: first handshake messages from many source ports of one
   address, and from 256 addresses of a /24 (loopback aliases 127.0.x.y work
   without setup on Linux), answering retry cookies; a client connected before
   and a new client are timed meanwhile;
4. **valid-session attacks**: a DEFLATE bomb, CBOR nested 10,000 deep, a 2^32
   length prefix; issue 14's cheap bodies (2,000,000 items in 1.9 KB, 61 KB
   inflating to 60 MiB) and the costliest 61 KB bodies the request caps accept,
   next to an ordinary body sent the same way (the control); abandoned Block1
   uploads and Block2 fetches (memory, then again after the transfer timeout),
   more requests in flight than the per-session limit.

Every case reports what was sent, what the listener answered and what its
Prometheus metrics counted, the Synapse process's memory (RSS) before, at its
peak and after, tracebacks in Synapse's log, the worst stall of the listener's
event loop (``synapse_coap_loop_lag_seconds``), and the honest client's median
latency quiet (measured just before the case) and under attack (n >= 5 each,
with min and max). The honest client runs in a process of its own, so that the
attack traffic this process generates does not slow it. The figures go to
``bench/results/attack.csv`` and the generated section of docs/benchmarks.md
(``--write``); ``--render`` re-renders the section from the committed CSV.

    python bench/attack.py --quick            # a few seconds per case, prints only
    python bench/attack.py --write            # 1,000,000 datagrams; writes the results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.results_store import RESULTS, provenance, read_rows, write_rows  # noqa: E402
from synapse_coap.mapping.codec import WireCodec  # noqa: E402
from synapse_coap.mapping.messages import HttpRequest  # noqa: E402
from synapse_coap.wire.body import REQUEST_BODY_LIMITS  # noqa: E402
from synapse_coap.wire.context import WireContext  # noqa: E402
from synapse_coap.wire.profile import load_profile  # noqa: E402
from synapse_coap_lab.attack import (  # noqa: E402
    Flood,
    HandshakeFlood,
    RawPeer,
    blast,
    coap_message,
    handshake_seeds,
    mutations,
    process_rss,
    record_seeds,
)
from synapse_coap_lab.homeserver import SynapseProcess, free_port  # noqa: E402

SERVER_NAME = "attack.test"
READY = r"synapse-coap: CoAP listener ready"
CSV = RESULTS / "attack.csv"
DOC = REPO / "docs" / "benchmarks.md"
START = "<!-- attack-results:start (written by bench/attack.py; do not edit by hand) -->"
END = "<!-- attack-results:end -->"
MB = 1024 * 1024
TRANSFER_TIMEOUT = 10.0


@attrs.frozen
class AttackRow:
    case: str
    sent: int
    answered: str
    counted: str
    crashed: bool
    tracebacks: int
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    honest_quiet_ms: float
    honest_attack_ms: float
    honest_ratio: float
    honest_max_ms: float
    amplification: float
    honest_quiet_min_ms: float = 0.0
    honest_quiet_max_ms: float = 0.0
    honest_min_ms: float = 0.0
    honest_n: int = 0
    loop_lag_worst_ms: float = 0.0
    loop_lag_over_50ms: int = 0
    loop_lag_samples: int = 0


# --------------------------------------------------------------------------- the server


class Target:
    """Synapse with the module, an honest client, and what the cases need."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port("udp")
        self.key_path = workdir / "keys" / "coap.key"
        self.key_path.parent.mkdir(parents=True)
        self.proc = SynapseProcess(
            workdir,
            SERVER_NAME,
            http_port=None,
            metrics_port=free_port(),
            modules=[
                {
                    "module": "synapse_coap.CoapModule",
                    "config": {
                        "listen": [f"127.0.0.1:{self.port}"],
                        "private_key_path": str(self.key_path),
                        "transfers": {"timeout": TRANSFER_TIMEOUT},
                    },
                }
            ],
            extra_config={
                "enable_registration": True,
                "enable_registration_without_verification": True,
                "rc_registration": {"per_second": 1000, "burst_count": 1000},
                "rc_login": {"address": {"per_second": 1000, "burst_count": 1000}},
                "rc_message": {"per_second": 1000, "burst_count": 1000},
            },
        )
        self.public_key = b""
        self.client: Any = None
        self.endpoint: Any = None
        self.token = ""
        self.media_path = b""
        self.honest: HonestClient | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def start(self) -> None:
        from synapse_coap.noise.keys import public_key, read_key_file

        await asyncio.to_thread(self.proc.start, 90.0, READY)
        self.public_key = public_key(read_key_file(self.key_path))
        self.client, self.endpoint = await self.new_client()
        self.token = await self.register(self.client, self.endpoint, "honest")
        resp = await self.client.request(
            self.endpoint,
            HttpRequest(
                "POST",
                b"/_matrix/media/v3/upload?filename=blob",
                (
                    ("authorization", f"Bearer {self.token}"),
                    ("content-type", "application/octet-stream"),
                ),
                random.randbytes(8192),
            ),
            timeout=60,
        )
        if resp.status != 200:
            raise RuntimeError(f"media upload: {resp.status}")
        mxc = json.loads(resp.body)["content_uri"][len("mxc://") :]
        self.media_path = f"/_matrix/client/v1/media/download/{mxc}".encode()
        self.honest = HonestClient(self)
        await self.honest.start()

    async def new_client(self) -> tuple[Any, Any]:
        from synapse_coap.noise.keys import generate_private_key
        from synapse_coap.noise.trust import TrustPolicy
        from synapse_coap.transport.client import CoapClient, Endpoint

        client = await CoapClient.create(
            static_key=generate_private_key(),
            trust=TrustPolicy(pinned={SERVER_NAME: self.public_key}),
            bind=("127.0.0.1", 0),
        )
        ep = Endpoint(
            "127.0.0.1", self.port, peer_name=SERVER_NAME, static_key=self.public_key, secure=True
        )
        return client, ep

    async def register(self, client: Any, ep: Any, prefix: str) -> str:
        name = f"{prefix}{random.randrange(10**9)}"
        body = {"username": name, "password": "pw-" + name, "auth": {"type": "m.login.dummy"}}
        resp = await client.request(
            ep,
            HttpRequest(
                "POST",
                b"/_matrix/client/v3/register",
                (("content-type", "application/json"),),
                json.dumps(body).encode(),
            ),
            timeout=60,
        )
        if resp.status != 200:
            raise RuntimeError(f"register: {resp.status} {resp.body[:200]!r}")
        return str(json.loads(resp.body)["access_token"])

    async def honest_request(self, client: Any = None, ep: Any = None) -> float:
        """One authenticated request (GET /account/whoami); seconds."""
        return await _whoami(client or self.client, ep or self.endpoint, self.token)

    async def quiet_latency(self, n: int) -> list[float]:
        return await self.honest_client().quiet(n)

    def honest_client(self) -> HonestClient:
        if self.honest is None:
            raise RuntimeError("the honest client is not running")
        return self.honest

    def rss(self) -> int:
        pid = self.proc.pid
        if pid is None:
            raise RuntimeError("Synapse is not running")
        return process_rss(pid)

    def alive(self) -> bool:
        return self.proc.is_running

    def tracebacks(self) -> int:
        return self.proc.log_text().count("Traceback")

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.proc.metrics_port}/_synapse/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith("synapse_coap_"):
                continue
            head, _, value = line.rpartition(" ")
            m = re.match(r"(\w+)\{(.*)\}", head)
            if m is None:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            labels.pop("server_name", None)
            key = m.group(1) + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
            out[key] = out.get(key, 0.0) + float(value)
        return out

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------- the honest client


async def _whoami(client: Any, ep: Any, token: str) -> float:
    """One authenticated request (GET /account/whoami); seconds."""
    started = time.perf_counter()
    resp = await client.request(
        ep,
        HttpRequest(
            "GET",
            b"/_matrix/client/v3/account/whoami",
            (("authorization", f"Bearer {token}"),),
            b"",
        ),
        timeout=30,
    )
    if resp.status != 200:
        raise RuntimeError(f"honest request: {resp.status}")
    return time.perf_counter() - started


async def _honest_loop(conn: Any, port: int, public_key: bytes, token: str) -> None:
    from synapse_coap.noise.keys import generate_private_key
    from synapse_coap.noise.trust import TrustPolicy
    from synapse_coap.transport.client import CoapClient, Endpoint

    client = await CoapClient.create(
        static_key=generate_private_key(),
        trust=TrustPolicy(pinned={SERVER_NAME: public_key}),
        bind=("127.0.0.1", 0),
    )
    ep = Endpoint("127.0.0.1", port, peer_name=SERVER_NAME, static_key=public_key, secure=True)
    loop = asyncio.get_running_loop()
    try:
        await _whoami(client, ep, token)  # the handshake, before any timing
        conn.send(("ready", None))
        while True:
            cmd, arg = await loop.run_in_executor(None, conn.recv)
            if cmd == "quiet":
                conn.send(("ok", [await _whoami(client, ep, token) for _ in range(arg)]))
            elif cmd == "one":
                conn.send(("ok", await _whoami(client, ep, token)))
            elif cmd == "run":  # requests 50 ms apart until "stop"
                stop = loop.run_in_executor(None, conn.recv)
                times: list[float] = []
                while not stop.done():
                    times.append(await _whoami(client, ep, token))
                    await asyncio.wait([stop], timeout=0.05)
                conn.send(("ok", times))
            else:
                return
    finally:
        await client.close()


def _honest_main(conn: Any, port: int, public_key: bytes, token: str) -> None:
    asyncio.run(_honest_loop(conn, port, public_key, token))


class HonestClient:
    """The honest client in a process of its own: timed by itself, so the attack
    traffic this process generates (key generation for floods, mutation, encryption)
    does not slow its event loop and inflate its latencies."""

    def __init__(self, target: Target) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_honest_main,
            args=(child, target.port, target.public_key, target.token),
            daemon=True,
        )
        self._lock = asyncio.Lock()

    async def _call(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        _status, value = await asyncio.to_thread(self.conn.recv)
        return value

    async def start(self) -> None:
        self.proc.start()
        status, _ = await asyncio.to_thread(self.conn.recv)
        if status != "ready":
            raise RuntimeError("honest client did not start")

    async def quiet(self, n: int) -> list[float]:
        async with self._lock:
            return list(await self._call("quiet", n))

    async def one(self) -> float:
        async with self._lock:
            return float(await self._call("one"))

    async def run_until(self, done: asyncio.Event) -> list[float]:
        """Requests 50 ms apart until ``done`` is set; their latencies."""
        async with self._lock:
            self.conn.send(("run", None))
            await done.wait()
            self.conn.send(("stop", None))
            _status, value = await asyncio.to_thread(self.conn.recv)
            return list(value)

    def close(self) -> None:
        try:
            self.conn.send(("exit", None))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def counted_delta(before: dict[str, float], after: dict[str, float], *prefixes: str) -> str:
    """The metric samples that moved (dropped reasons, handshake outcomes, statuses)."""
    moved = []
    for key, value in sorted(after.items()):
        d = value - before.get(key, 0.0)
        if d >= 1 and key.startswith(prefixes) and "_bucket" not in key:
            moved.append(f"{key.split('{', 1)[1].rstrip('}').split('=', 1)[1]}: {d:.0f}")
    return "; ".join(moved) or "-"


LAG = "synapse_coap_loop_lag_seconds"


def loop_lag(before: dict[str, float], after: dict[str, float]) -> tuple[float, int, int]:
    """From the module's loop-lag histogram between two scrapes: (the upper bound of the
    worst lag seen, in ms: the smallest bucket holding every sample; the samples over
    50 ms; the samples)."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    total = int(delta(LAG + "_count{}"))
    buckets = sorted(
        (float(key.split("le=", 1)[1].rstrip("}")), key)
        for key in after
        if key.startswith(LAG + "_bucket{") and "+Inf" not in key
    )
    worst = float("inf")
    over = total
    for le, key in buckets:
        if le <= 0.05:
            over = total - int(delta(key))
        if delta(key) >= total and worst == float("inf"):
            worst = le
    return (round(worst * 1000, 1) if total else 0.0), over, total


# --------------------------------------------------------------------------- measuring


class Observer:
    """While a case runs: the honest client's latency and the server's peak RSS.

    ``honest=False``: the case times the honest client itself (requests sent while
    a crafted body is being decoded) and returns those latencies."""

    def __init__(self, target: Target, *, honest: bool = True) -> None:
        self.target = target
        self.honest = honest
        self.latencies: list[float] = []
        self.peak = 0
        self._stop = asyncio.Event()

    async def _honest(self) -> None:
        self.latencies = await self.target.honest_client().run_until(self._stop)

    async def _memory(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.target.rss())
            await asyncio.sleep(0.2)

    async def run(self, attack: Awaitable[Any]) -> Any:
        tasks = [asyncio.ensure_future(self._memory())]
        if self.honest:
            tasks.append(asyncio.ensure_future(self._honest()))
        try:
            return await attack
        finally:
            self._stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


#: The attack's result: datagrams or messages sent, what was answered, amplification,
#: and (cases that time the honest client themselves) the honest latencies.
Outcome = tuple[int, str, float] | tuple[int, str, float, list[float]]

#: Honest requests timed on a quiet server just before each case (its baseline).
QUIET_N = 10


async def case(
    target: Target,
    name: str,
    attack: Callable[[], Awaitable[Outcome]],
    *,
    settle: float = 3.0,
    honest: bool = True,
    prefixes: tuple[str, ...] = (
        "synapse_coap_dropped_total",
        "synapse_coap_handshakes_total",
        "synapse_coap_requests_total",
    ),
) -> AttackRow:
    # the baseline side by side with the case: the machine is shared, its load drifts
    quiet = await target.quiet_latency(QUIET_N)
    before_metrics = target.metrics()
    before_tb = target.tracebacks()
    rss_before = target.rss()
    obs = Observer(target, honest=honest)
    obs.peak = rss_before
    outcome = await obs.run(attack())
    sent, answered, amplification = outcome[:3]
    latencies = obs.latencies if honest else list(outcome[3])
    during = target.metrics()
    await asyncio.sleep(settle)
    alive = target.alive()
    rss_after = target.rss() if alive else 0
    q = statistics.median(quiet)
    a = statistics.median(latencies) if latencies else float("nan")
    worst, over, samples = loop_lag(before_metrics, during)
    row = AttackRow(
        case=name,
        sent=sent,
        answered=answered,
        counted=counted_delta(before_metrics, target.metrics(), *prefixes) if alive else "-",
        crashed=not alive,
        tracebacks=target.tracebacks() - before_tb,
        rss_before_mb=round(rss_before / MB, 1),
        rss_peak_mb=round(obs.peak / MB, 1),
        rss_after_mb=round(rss_after / MB, 1),
        honest_quiet_ms=round(q * 1000, 1),
        honest_attack_ms=round(a * 1000, 1),
        honest_ratio=round(a / q, 2),
        honest_max_ms=round(max(latencies, default=0.0) * 1000, 1),
        amplification=round(amplification, 2),
        honest_quiet_min_ms=round(min(quiet) * 1000, 1),
        honest_quiet_max_ms=round(max(quiet) * 1000, 1),
        honest_min_ms=round(min(latencies, default=0.0) * 1000, 1),
        honest_n=len(latencies),
        loop_lag_worst_ms=worst,
        loop_lag_over_50ms=over,
        loop_lag_samples=samples,
    )
    print(format_row(row), flush=True)
    return row


def format_row(r: AttackRow) -> str:
    return (
        f"{r.case}: sent {r.sent:,}; answered {r.answered}; counted {r.counted}; "
        f"crashed {r.crashed}; tracebacks {r.tracebacks}; RSS {r.rss_before_mb} -> peak "
        f"{r.rss_peak_mb} -> {r.rss_after_mb} MB; honest median {r.honest_quiet_ms} ms quiet "
        f"(min {r.honest_quiet_min_ms}, max {r.honest_quiet_max_ms}), {r.honest_attack_ms} ms "
        f"under attack ({r.honest_ratio}x, min {r.honest_min_ms}, max {r.honest_max_ms} ms, "
        f"n={r.honest_n}); loop lag worst <= {r.loop_lag_worst_ms} ms, "
        f"{r.loop_lag_over_50ms} of {r.loop_lag_samples} samples over 50 ms; "
        f"amplification {r.amplification}x"
    )


# --------------------------------------------------------------------------- the cases


def _codec() -> WireCodec:
    return WireCodec(load_profile(0), WireContext())


def request_bytes(
    method: str, target: bytes, mid: int, *, token: str = "", body: bytes = b"", ctype: str = ""
) -> bytes:
    """A request as the client codec puts it on the wire (profile 0), CON, token = mid."""
    from aiocoap.numbers.types import CON

    from synapse_coap.transport.convert import to_aiocoap

    headers = []
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    if ctype:
        headers.append(("content-type", ctype))
    m = to_aiocoap(_codec().encode_request(HttpRequest(method, target, tuple(headers), body)))
    m.mid, m.token, m.mtype = mid & 0xFFFF, mid.to_bytes(4, "big"), CON
    return bytes(m.encode())


def with_body(message: bytes, payload: bytes, content_format: int | None = None) -> bytes:
    from aiocoap.message import Direction, Message

    m = Message.decode(message)
    m.payload = payload
    if content_format is not None:
        m.opt.content_format = content_format
    m.direction = Direction.OUTGOING
    return bytes(m.encode())


def with_block(message: bytes, option: int, num: int, more: bool, payload: bytes) -> bytes:
    from aiocoap.message import Direction, Message
    from aiocoap.optiontypes import BlockOption

    m = Message.decode(message)
    value = BlockOption.BlockwiseTuple(num, more, 6)
    if option == 27:
        m.opt.block1 = value
    else:
        m.opt.block2 = value
    m.payload = payload
    m.direction = Direction.OUTGOING
    return bytes(m.encode())


async def exchange(peer: RawPeer, messages: list[bytes], timeout: float = 30.0) -> list[int]:
    """Send CON requests; the response codes, in order (matched by token). Requests
    not answered within 2 s are sent again (as a CoAP client retransmits)."""
    loop = asyncio.get_running_loop()
    want = {m[4 : 4 + (m[0] & 0x0F)]: i for i, m in enumerate(messages)}
    out = [0] * len(messages)
    for m in messages:
        peer.send(m)
    left = len(messages)
    deadline = loop.time() + timeout
    resend_at = loop.time() + 2.0
    while left:
        now = loop.time()
        if now >= deadline:
            raise TimeoutError(f"{left} of {len(messages)} requests unanswered")
        if now >= resend_at:
            for i, m in enumerate(messages):
                if out[i] == 0:
                    peer.send(m)
            resend_at = now + 2.0
        try:
            got = await asyncio.wait_for(peer.received.get(), min(resend_at, deadline) - now)
        except TimeoutError:
            continue
        i = want.get(got[4 : 4 + (got[0] & 0x0F)])
        if i is not None and out[i] == 0 and got[1] != 0:
            out[i] = got[1]
            left -= 1
    return out


async def send_blockwise(peer: RawPeer, message: bytes, mid: int) -> int:
    """Send a request with Block1 when it does not fit one datagram; the final code."""
    from aiocoap.message import Message

    if len(message) <= peer.endpoint.max_plaintext():
        return (await exchange(peer, [message]))[0]
    payload = Message.decode(message).payload
    head = with_body(message, b"")
    code = 0
    for num in range(0, (len(payload) + 1023) // 1024):
        chunk = payload[num * 1024 : (num + 1) * 1024]
        more = (num + 1) * 1024 < len(payload)
        m = with_block(head, 27, num, more, chunk)
        m = m[:2] + ((mid + num) & 0xFFFF).to_bytes(2, "big") + m[4:]
        code = (await exchange(peer, [m]))[0]
        if code != 95:  # not 2.31 Continue: the answer
            return code
    return code


def code_str(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


def codes(values: list[int]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[code_str(v)] = counts.get(code_str(v), 0) + 1
    return ", ".join(f"{k} x{v:,}" for k, v in sorted(counts.items()))


def datagram_mix(target: Target, count: int, seed: int) -> Iterator[bytes]:
    rnd = random.Random(seed)
    plain = [coap_message(1, i, b"\x01", [(11, b"_matrix"), (11, b"client")]) for i in range(4)]
    seeds = handshake_seeds(target.public_key) + record_seeds() + plain
    return mutations(seeds, count, rnd)


async def fuzz(target: Target, count: int, rate: float) -> tuple[int, str, float]:
    sent, _bytes = await blast(target.address, datagram_mix(target, count, 14), rate=rate)
    return sent, f"at {rate:,.0f}/s: dropped, or a stateless retry", 0.0


async def in_session(target: Target, count: int) -> tuple[int, str, float]:
    peer = await RawPeer(target.address).open()
    try:
        await peer.connect(peer_name=SERVER_NAME, peer_static=target.public_key)
        seeds = [
            request_bytes("GET", b"/_matrix/client/versions", 1),
            request_bytes("PUT", b"/_matrix/client/v3/rooms/!r:x/send/m.room.message/t", 2),
            coap_message(1, 5, b"\x07", [(11, b"\xff\xfe"), (15, b"\xc3\x28")]),
        ]
        rnd = random.Random(15)
        n = stalled = 0
        replies: list[int] = []
        batch: list[bytes] = []
        #: Message IDs the fuzz used in this session: a ping with one of them is, by RFC
        #: 7252 4.5, a duplicate of that message (answered with its answer, or not at
        #: all), not a new request; a real client never reuses a MID that soon.
        used: set[int] = set()
        for pt in mutations(seeds, count, rnd):
            if len(pt) > peer.endpoint.max_plaintext():
                continue
            peer.send(pt)
            n += 1
            batch.append(pt)
            if len(pt) >= 4:
                used.add(int.from_bytes(pt[2:4], "big"))
            if n % 200 == 0:
                mid = 900_000 + n
                while mid & 0xFFFF in used:
                    mid += 1
                used.add(mid & 0xFFFF)
                ping = request_bytes("GET", b"/_matrix/client/versions", mid)
                try:
                    replies += await exchange(peer, [ping], timeout=10.0)
                except TimeoutError:
                    # this session stopped answering: note it, go on in a new one
                    stalled += 1
                    peer.close()
                    peer = await RawPeer(target.address).open()
                    await peer.connect(peer_name=SERVER_NAME, peer_static=target.public_key)
                    used.clear()
                await asyncio.sleep(0)
        verdict = "answered every ping" if not stalled else f"{stalled} sessions stopped answering"
        return n, f"{verdict} ({codes(replies)})", 0.0
    finally:
        peer.close()


async def handshake_flood(
    target: Target, hosts: list[str], ports: int, rounds: int
) -> tuple[int, str, float]:
    flood = Flood(hosts, ports)
    hf = HandshakeFlood(target.address, flood)
    try:
        attack = asyncio.ensure_future(hf.run(rounds, rate=4000))
        await asyncio.sleep(1.0)
        # a client connected before the flood, and a new one, while it runs
        old = await target.honest_request()
        client, ep = await target.new_client()
        started = time.perf_counter()
        try:
            await target.honest_request(client, ep)
        finally:
            await client.close()
        new = time.perf_counter() - started
        await attack
        return (
            hf.messages,
            f"connected client {old * 1000:.0f} ms, new client {new * 1000:.0f} ms "
            "(handshake + request)",
            hf.amplification(),
        )
    finally:
        flood.close()


async def session_attacks(target: Target, repeat: int = 2) -> Outcome:
    """The bomb, the nesting and the length prefix, ``repeat`` times each; an honest
    request goes out with each one's last datagram and is timed."""
    peer = await RawPeer(target.address).open()
    try:
        await peer.connect(peer_name=SERVER_NAME, peer_static=target.public_key)
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = b"\xfc" + z.compress(b"\x00" * MB) + z.flush()  # 1 MiB in about 1 KB
        deep = b"\x81" * 10_000 + b"\x00"
        huge = b"\x5b" + (1 << 32).to_bytes(8, "big") + b"x"
        results: list[list[int]] = [[], [], []]
        latencies: list[float] = []
        for rep in range(repeat):
            put = request_bytes(
                "PUT",
                b"/_matrix/client/v3/rooms/!r:x/send/m.room.message/bomb%d" % rep,
                1,
                token=target.token,
                body=b"{}",
                ctype="application/json",
            )
            for i, body in enumerate((bomb, deep, huge)):
                n = 10 + 3 * rep + i
                m = with_body(put, body)
                m = m[:2] + n.to_bytes(2, "big") + n.to_bytes(4, "big") + m[8:]
                code, honest = await send_blockwise_timed(peer, m, 100 + 20 * n, target)
                results[i].append(code)
                latencies.append(honest)
        answered = (
            f"bomb ({len(bomb):,} B -> 1 MiB) {codes(results[0])}, nested "
            f"{codes(results[1])}, 2^32 prefix {codes(results[2])}"
        )
        return 3 * repeat, answered, 0.0, latencies
    finally:
        peer.close()


def _deflate(cbor: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return b"\xfc" + z.compress(cbor) + z.flush()


def _head(major: int, n: int) -> bytes:
    """A CBOR head (RFC 8949 3.1)."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes([major << 5 | info]) + n.to_bytes(width, "big")
    raise ValueError(n)


def two_million_items() -> bytes:
    """An array of 2,000,000 zeros, DEFLATEd: about 1.9 KB on the wire (issue 14)."""
    return _deflate(_head(4, 2_000_000) + b"\x00" * 2_000_000)


def sixty_mib_string() -> bytes:
    """A 60 MiB text string, DEFLATEd: about 61 KB on the wire (issue 14's finding:
    before the expansion cap it was forwarded upstream as a 60 MiB request)."""
    n = 60 * MB
    return _deflate(_head(3, n) + b"a" * n)


#: The listener's expansion cap for request bodies (the "at the cap" bodies use it).
EXPANSION = REQUEST_BODY_LIMITS.max_expansion


def _at_cap(size: int, expansion: int, tail: Callable[[int], bytes]) -> bytes:
    """A DEFLATEd map {"pad": random text, "x": tail(n)} of about ``size`` bytes on the
    wire whose CBOR is just under ``expansion`` times that: the random text keeps the
    body from compressing better, ``tail(n)`` is the crafted part of about n bytes."""
    rnd = random.Random(61)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    lo, hi = 0, 4 * size
    while True:
        n = (lo + hi) // 2
        pad = "".join(rnd.choices(alphabet, k=n)).encode()
        head = _head(5, 2) + _head(3, 3) + b"pad" + _head(3, n) + pad + _head(3, 1) + b"x"
        room = expansion * size - len(head)
        while True:
            cbor = head + tail(room)
            body = _deflate(cbor)
            over = len(cbor) - expansion * len(body)
            if over <= 0:
                break
            room -= over + 64
        if size - 200 <= len(body) <= size or hi - lo < 2:
            return body
        if len(body) < size:
            lo = n
        else:
            hi = n


def widest_accepted(size: int = 61_000, expansion: int = EXPANSION) -> bytes:
    """About ``size`` bytes on the wire that inflate to just under the expansion cap
    (``expansion`` x) and decode to the most output per byte the decoder has: an
    event-id list tag (one JSON string per 32 bytes of CBOR)."""
    ident = random.Random(63).randbytes(32)

    def ids(room: int) -> bytes:
        k = (room - 16) // 32
        return _head(6, 19) + _head(2, 32 * k) + ident * k

    return _at_cap(size, expansion, ids)


def escapes_accepted(size: int = 61_000, expansion: int = EXPANSION) -> bytes:
    """About ``size`` bytes on the wire that inflate to just under the expansion cap
    into one text string of control characters: each byte becomes 6 bytes of JSON
    (``\\u0001``) when the listener turns the body into JSON for Synapse."""

    def ctl(room: int) -> bytes:
        k = room - 16
        return _head(3, k) + b"\x01" * k

    return _at_cap(size, expansion, ctl)


def ordinary_body(size: int = 61_000) -> bytes:
    """The control: about ``size`` bytes of random text in one JSON string, which
    DEFLATE cannot shrink much, sent and timed the same way as the crafted bodies."""
    rnd = random.Random(64)
    text = "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=size)).encode()
    return _deflate(_head(5, 1) + _head(3, 1) + b"x" + _head(3, len(text)) + text)


async def crafted_body(target: Target, which: str, repeat: int = 5) -> Outcome:
    """A crafted request body from a peer with a valid session, sent ``repeat`` times;
    each time an honest request is sent right after the body's last block (while the
    listener decodes it) and timed."""
    body = {
        "2m": two_million_items,
        "60mib": sixty_mib_string,
        "widest": widest_accepted,
        "escapes": escapes_accepted,
        "ordinary": ordinary_body,
    }[which]()
    peer = await RawPeer(target.address).open()
    try:
        await peer.connect(peer_name=SERVER_NAME, peer_static=target.public_key)
        results: list[int] = []
        latencies: list[float] = []
        for rep in range(repeat):
            put = request_bytes(
                "PUT",
                b"/_matrix/client/v3/rooms/!r:x/send/m.room.message/crafted%d" % rep,
                1,
                token=target.token,
                body=b"{}",
                ctype="application/json",
            )
            m = with_body(put, body)
            token = 1000 + rep
            m = m[:4] + token.to_bytes(4, "big") + m[8:]
            code, honest = await send_blockwise_timed(peer, m, 1000 * (rep + 1), target)
            results.append(code)
            latencies.append(honest)
        answered = f"{len(body):,} B: {codes(results)}"
        return repeat, answered, 0.0, latencies
    finally:
        peer.close()


async def send_blockwise_timed(
    peer: RawPeer, message: bytes, mid: int, target: Target
) -> tuple[int, float]:
    """Send ``message`` with Block1; an honest request goes out together with the last
    block. (the final code, the honest request's seconds)."""
    from aiocoap.message import Message

    if len(message) <= peer.endpoint.max_plaintext():
        answer, honest = await asyncio.gather(
            exchange(peer, [message]), target.honest_client().one()
        )
        return answer[0], honest
    payload = Message.decode(message).payload
    head = with_body(message, b"")
    blocks = (len(payload) + 1023) // 1024
    for num in range(blocks):
        chunk = payload[num * 1024 : (num + 1) * 1024]
        more = num + 1 < blocks
        m = with_block(head, 27, num, more, chunk)
        m = m[:2] + ((mid + num) & 0xFFFF).to_bytes(2, "big") + m[4:]
        if more:
            code = (await exchange(peer, [m]))[0]
            if code != 95:  # not 2.31 Continue: refused early
                return code, await target.honest_client().one()
            continue
        answer, honest = await asyncio.gather(exchange(peer, [m]), target.honest_client().one())
        return answer[0], honest
    raise ValueError("empty body")


async def abandoned_transfers(target: Target, count: int) -> tuple[int, str, float]:
    peers = [await RawPeer(target.address, bind=f"127.15.{i}.1").open() for i in range(20)]
    try:
        await asyncio.gather(
            *(p.connect(peer_name=SERVER_NAME, peer_static=target.public_key) for p in peers)
        )
        answers: list[int] = []
        for i in range(count):
            peer = peers[i % len(peers)]
            put = request_bytes(
                "POST",
                b"/_matrix/media/v3/upload?filename=f%d" % i,
                2 * i + 1,
                token=target.token,
                body=b"x",
                ctype="application/octet-stream",
            )
            get = request_bytes("GET", target.media_path, 2 * i + 2, token=target.token)
            answers += await exchange(
                peer,
                [
                    with_block(put, 27, 0, True, b"x" * 1024),
                    with_block(get, 23, 0, False, b""),
                ],
            )
        return 2 * count, f"{codes(answers)}; held until the transfer timeout", 0.0
    finally:
        for p in peers:
            p.close()


async def over_limit(target: Target, count: int, repeat: int = 3) -> tuple[int, str, float]:
    """``count`` requests at once on one session, ``repeat`` bursts one after another
    (a burst lasts about as long as Synapse takes to answer them)."""
    peer = await RawPeer(target.address).open()
    try:
        await peer.connect(peer_name=SERVER_NAME, peer_static=target.public_key)
        got: list[int] = []
        for rep in range(repeat):
            base = 50 + rep * count
            msgs = [
                request_bytes(
                    "GET",
                    b"/_matrix/client/v3/sync?timeout=2000&set_presence=offline&x=%d" % (base + i),
                    base + i,
                    token=target.token,
                )
                for i in range(count)
            ]
            got += await exchange(peer, msgs, timeout=60)
        return count * repeat, codes(got), 0.0
    finally:
        peer.close()


# --------------------------------------------------------------------------- running


async def campaign(
    workdir: Path, *, datagrams: int, quick: bool, only: str = "", rate: float = 3000.0
) -> list[AttackRow]:
    target = Target(workdir)
    await target.start()
    rows: list[AttackRow] = []
    n = 2_000 if quick else 20_000
    ports = 200 if quick else 2_000
    hosts = [f"127.0.2.{i}" for i in range(1, 33 if quick else 256)] + (
        [] if quick else ["127.0.2.0"]
    )
    k = 100 if quick else 1_000
    #: (name, attack, settle seconds, the honest client timed by the observer)
    cases: list[tuple[str, Callable[[], Awaitable[Outcome]], float, bool]] = [
        (
            f"{datagrams:,} random/mutated datagrams",
            lambda: fuzz(target, datagrams, rate),
            10.0,
            True,
        ),
        (f"{n:,} mutated CoAP messages in a session", lambda: in_session(target, n), 3.0, True),
        (
            f"handshake flood: {ports:,} ports of one address",
            lambda: handshake_flood(target, ["127.0.3.1"], ports, 2),
            3.0,
            True,
        ),
        (
            f"handshake flood: {len(hosts)} addresses of a /24, 4 ports each",
            lambda: handshake_flood(target, hosts, 4, 2),
            3.0,
            True,
        ),
        (
            "DEFLATE bomb, CBOR 10,000 deep, 2^32 length (x2)",
            lambda: session_attacks(target),
            3.0,
            False,
        ),
        (
            "control: 61 KB ordinary body, sent the same way (x5)",
            lambda: crafted_body(target, "ordinary"),
            3.0,
            False,
        ),
        ("2,000,000-item body (x5)", lambda: crafted_body(target, "2m"), 3.0, False),
        ("61 KB body inflating to 60 MiB (x5)", lambda: crafted_body(target, "60mib"), 3.0, False),
        (
            f"61 KB body inflating {EXPANSION}x to event-id lists (x5)",
            lambda: crafted_body(target, "widest"),
            3.0,
            False,
        ),
        (
            f"61 KB body inflating {EXPANSION}x to control characters (x5)",
            lambda: crafted_body(target, "escapes"),
            3.0,
            False,
        ),
        (
            f"{k:,} abandoned Block1 uploads + {k:,} Block2 fetches",
            lambda: abandoned_transfers(target, k),
            TRANSFER_TIMEOUT * 1.5,
            True,
        ),
        (
            "40 requests in flight on one session (limit 32), 3 bursts",
            lambda: over_limit(target, 40),
            3.0,
            True,
        ),
    ]
    try:
        for name, attack, settle, honest in cases:
            if only and only not in name:
                continue
            try:
                rows.append(await case(target, name, attack, settle=settle, honest=honest))
            except Exception as e:  # a failed case is a result too
                print(f"{name}: failed: {e!r}", flush=True)
                rows.append(
                    AttackRow(
                        name,
                        0,
                        f"case failed: {type(e).__name__}: {e}",
                        "-",
                        not target.alive(),
                        target.tracebacks(),
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                    )
                )
    finally:
        await target.client.close()
        if target.honest is not None:
            target.honest.close()
        target.stop()
    return rows


def _load_note(meta: dict[str, str]) -> str:
    """What the run's provenance says of the machine's load (the ratios are noisy on a
    busy machine)."""
    if "load" in meta:
        return (
            f"Load average (1 min) at the start and the end of the run: {meta['load']}; "
            "the machine may have been shared with other work."
        )
    return "The machine may have been shared with other work (load not recorded)."


def render(rows: list[AttackRow], meta: dict[str, str]) -> str:
    lines = [
        START,
        "",
        f"`{meta.get('command', '')}` at {meta.get('commit', '?')}, {meta.get('time', '')}; "
        f"{meta.get('machine', '')}; Synapse {meta.get('synapse', '?')}. {_load_note(meta)} "
        "The honest client runs in a process of its own. Its quiet latency "
        f"is measured just before each case (n={QUIET_N}); under attack it sends a request "
        "every 50 ms for the length of the case, or, in the cases marked (xN), one request "
        "together with the last datagram of each crafted body (n = the bodies sent). "
        "Latencies: median (min-max). Loop lag: how late the listener's 10 ms probe timer "
        "fired (synapse_coap_loop_lag_seconds), the smallest histogram bucket holding "
        "every sample of the case, and the samples over 50 ms.",
        "",
        "| case | sent | answered | counted (metrics) | crashed | tracebacks "
        "| RSS before / peak / after (MB) | honest quiet (ms) | honest under attack (ms) "
        "| ratio | loop lag | amplification |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.sent:,} | {r.answered} | {r.counted} | {'yes' if r.crashed else 'no'} "
            f"| {r.tracebacks} | {r.rss_before_mb} / {r.rss_peak_mb} / {r.rss_after_mb} "
            f"| {r.honest_quiet_ms} ({r.honest_quiet_min_ms}-{r.honest_quiet_max_ms}) "
            f"| {r.honest_attack_ms} ({r.honest_min_ms}-{r.honest_max_ms}), n={r.honest_n} "
            f"| {r.honest_ratio}x "
            f"| <= {r.loop_lag_worst_ms:g} ms, {r.loop_lag_over_50ms} of {r.loop_lag_samples} "
            "over 50 ms "
            f"| {r.amplification if r.amplification else '-'} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def write_doc(rows: list[AttackRow], meta: dict[str, str]) -> None:
    text = DOC.read_text()
    block = render(rows, meta)
    if START in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Under attack (bench/attack.py)\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datagrams", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="small numbers; prints only")
    parser.add_argument("--only", default="", help="run only the cases whose name has this text")
    parser.add_argument(
        "--rate", type=float, default=2500.0, help="datagrams per second of the fuzz case"
    )
    parser.add_argument(
        "--write", action="store_true", help="write bench/results/attack.csv and docs"
    )
    parser.add_argument(
        "--render", action="store_true", help="re-render docs from the committed CSV"
    )
    args = parser.parse_args(argv)
    if args.render:
        meta, rows = read_rows(CSV, AttackRow)
        write_doc(rows, meta)
        return 0
    load_at_start = os.getloadavg()[0]
    datagrams = 20_000 if args.quick and args.datagrams == 1_000_000 else args.datagrams
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    with tempfile.TemporaryDirectory(prefix="attack-") as tmp:
        rows = asyncio.run(
            campaign(
                Path(tmp), datagrams=datagrams, quick=args.quick, only=args.only, rate=args.rate
            )
        )
    if args.write:
        meta = provenance("python bench/attack.py " + " ".join(argv or sys.argv[1:]))
        meta["load"] = f"{load_at_start:.2f} / {os.getloadavg()[0]:.2f}"
        write_rows(CSV, rows, meta)
        write_doc(rows, meta)
    bad = [r for r in rows if r.crashed or r.tracebacks]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
