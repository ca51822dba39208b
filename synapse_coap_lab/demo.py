"""The demo: two homeservers federating over CoAP+Noise, beside two over stock HTTPS.

``scripts/demo`` (``python -m synapse_coap_lab``) runs this on loopback. Four real
Synapse processes, in two pairs, play the same scenario:

- **CoAP pair** (hs1, hs2): Synapse with the synapse-coap module, with *no*
  HTTP listener at all (neither federation nor client). Each one's
  ``federation.peers`` map points the other's server name at a lab
  :class:`~synapse_coap.lab.relay.Relay` (profile ``lan``) in front of the
  other's CoAP port, with the Noise keys generated up front and pinned. So
  every datagram between the two crosses a relay and is counted there,
  exactly, at the IP level (IP + UDP headers). The demo's Matrix clients
  talk to their homeserver over CoAP+Noise directly (not through a relay:
  client traffic is not counted).
- **HTTPS pair** (hs3, hs4): stock Synapse, no module; TLS federation
  listeners with self-signed certificates, server names ``127.0.0.1:PORT``
  (Synapse resolves those straight to the port, no ``.well-known``), plain
  HTTP client listeners for the demo's clients. The federation traffic is
  counted with a tshark capture on loopback (every IP packet of the two
  federation ports: TLS handshakes, TCP SYN/FIN and ACK-only segments
  included). Without tshark (or without capture rights), a counting TCP
  proxy sits in front of each federation listener and the IP-level traffic
  is estimated from its socket accounting with
  :func:`~synapse_coap_lab.capture.estimate_tcp`; the report says so.

The scenario, the same on both pairs: register @alice on server A and @bob
on server B; bob sets a display name and creates a public room; alice joins
it over federation (first contact: key fetch, make_join, send_join); then N
messages alice -> bob and N bob -> alice, each awaited until it arrives in
the other side's ``/sync``; then alice looks up bob's profile across servers.
Presence is off on all four servers (its periodic updates would otherwise be
mixed into the per-step numbers).

Each step is delimited by *marks*: a snapshot of the relay counters (CoAP)
and a marker datagram injected into the capture (HTTPS); after each step the
demo waits for the traffic to settle before marking, so a step's trailing
acknowledgements are counted with it.

    report = await run_demo(Path("/tmp/demo"), messages=5)
    print(report.format_table())
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.metadata
import json
import logging
import shutil
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from synapse_coap.lab.model import get_profile
from synapse_coap.lab.relay import Relay, RelayConfig
from synapse_coap.mapping.messages import HttpRequest
from synapse_coap.noise import keys as noise_keys
from synapse_coap_lab.capture import (
    CaptureCounts,
    CaptureError,
    LoopbackCapture,
    Packet,
    estimate_tcp,
    summarize,
    tshark_path,
)
from synapse_coap_lab.homeserver import SynapseProcess, free_port
from synapse_coap_lab.names import NAMES

logger = logging.getLogger(__name__)

__all__ = [
    "DemoError",
    "DemoReport",
    "StackResult",
    "Step",
    "Traffic",
    "run_demo",
]

#: The module as homeserver.yaml names it.
MODULE = "synapse_coap.CoapModule"
#: Logged by the module when its CoAP listener is up (the CoAP servers' readiness).
COAP_READY = r"CoAP listener ready"
PASSWORD = "demo password, loopback only"
#: How long the traffic must be quiet before a step is closed (CoAP: relay counters).
QUIET = 0.5
#: The least time between the end of a step and its mark (both stacks).
SETTLE = 1.0
#: The join starts background work (device list resync, ...): give it longer.
SETTLE_JOIN = 3.0
#: Upper bound on waiting for quiet.
SETTLE_MAX = 10.0
#: How long a message may take to arrive before the demo gives up.
DELIVERY_TIMEOUT = 90.0
START_TIMEOUT = 120.0

Progress = Callable[[str], None]


class DemoError(RuntimeError):
    """A step of the demo failed (the message says which, with the relevant log lines)."""


# ---------------------------------------------------------------------------------------
# results


@attrs.frozen
class Traffic:
    """What crossed between the two homeservers of a pair during one step.

    ``ip_bytes``: IP packets including IP and UDP/TCP headers; ``packets``:
    UDP datagrams or TCP segments (ACK-only ones included); ``a_to_b_bytes``
    / ``b_to_a_bytes``: the same split by the direction of the packets
    (server A is alice's, B bob's).
    """

    ip_bytes: int
    packets: int
    a_to_b_bytes: int = 0
    b_to_a_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.ip_bytes + other.ip_bytes,
            self.packets + other.packets,
            self.a_to_b_bytes + other.a_to_b_bytes,
            self.b_to_a_bytes + other.b_to_a_bytes,
        )

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.ip_bytes - other.ip_bytes,
            self.packets - other.packets,
            self.a_to_b_bytes - other.a_to_b_bytes,
            self.b_to_a_bytes - other.b_to_a_bytes,
        )


ZERO = Traffic(0, 0)


@attrs.frozen
class Step:
    """One transaction of the scenario: ``key`` is stable ("join", "a2b-1", "b2a-1", "profile")."""

    key: str
    title: str
    kind: str  # "join", "message" or "profile"


@attrs.frozen
class StackResult:
    """One pair's run: the traffic per step (same order as the steps), deliveries, errors."""

    stack: str  # "coap" or "https"
    description: str
    method: str  # how the bytes were counted
    traffic: tuple[Traffic, ...]
    sent: int
    delivered: int
    seconds: tuple[float, ...]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.delivered == self.sent
            and self.sent > 0
            and len(self.traffic) == len(self.seconds)
        )

    @property
    def total(self) -> Traffic:
        out = ZERO
        for t in self.traffic:
            out = out + t
        return out


@attrs.frozen
class DemoReport:
    """Everything the demo measured; :meth:`format_table` prints it, :meth:`write` saves it."""

    messages: int
    steps: tuple[Step, ...]
    coap: StackResult
    https: StackResult
    workdir: Path
    synapse_version: str

    @property
    def ok(self) -> bool:
        return self.coap.ok and self.https.ok

    def ratio(self, index: int | None = None) -> float | None:
        """HTTPS bytes / CoAP bytes for a step (``None`` index: the totals)."""
        if index is None:
            c, h = self.coap.total, self.https.total
        else:
            if index >= len(self.coap.traffic) or index >= len(self.https.traffic):
                return None
            c, h = self.coap.traffic[index], self.https.traffic[index]
        if c.ip_bytes <= 0 or h.ip_bytes <= 0:
            return None
        return h.ip_bytes / c.ip_bytes

    def _message_means(self) -> tuple[Traffic | None, Traffic | None]:
        out: list[Traffic | None] = []
        for res in (self.coap, self.https):
            picked = [
                t for s, t in zip(self.steps, res.traffic, strict=False) if s.kind == "message"
            ]
            if not picked:
                out.append(None)
                continue
            total = ZERO
            for t in picked:
                total = total + t
            out.append(
                Traffic(round(total.ip_bytes / len(picked)), round(total.packets / len(picked)))
            )
        return out[0], out[1]

    def format_table(self) -> str:
        """The report as text: a table of bytes per transaction, then how they were counted."""

        def cell(t: Traffic | None, width: int) -> str:
            if t is None:
                return "-".rjust(width)
            return f"{t.ip_bytes:>{width - 6},} {t.packets:>5}"

        def ratio(c: Traffic | None, h: Traffic | None) -> str:
            if c is None or h is None or c.ip_bytes <= 0 or h.ip_bytes <= 0:
                return "-"
            return f"{h.ip_bytes / c.ip_bytes:.1f}x"

        w_step, w_col = 30, 18
        lines = [
            "Bytes exchanged between the two homeservers, per transaction (IP level):",
            "",
            f"{'transaction':<{w_step}} {'CoAP+Noise':>{w_col}} {'HTTPS':>{w_col}}  HTTPS/CoAP",
            f"{'':<{w_step}} {'bytes  dgrams':>{w_col}} {'bytes packets':>{w_col}}",
            "-" * (w_step + 2 * w_col + 14),
        ]
        for i, step in enumerate(self.steps):
            c = self.coap.traffic[i] if i < len(self.coap.traffic) else None
            h = self.https.traffic[i] if i < len(self.https.traffic) else None
            lines.append(
                f"{step.title:<{w_step}} {cell(c, w_col)} {cell(h, w_col)}  {ratio(c, h):>10}"
            )
        lines.append("-" * (w_step + 2 * w_col + 14))
        mc, mh = self._message_means()
        if mc is not None or mh is not None:
            lines.append(
                f"{'one message (mean)':<{w_step}} {cell(mc, w_col)} {cell(mh, w_col)}"
                f"  {ratio(mc, mh):>10}"
            )
        ct = self.coap.total if self.coap.traffic else None
        ht = self.https.total if self.https.traffic else None
        lines.append(
            f"{'total':<{w_step}} {cell(ct, w_col)} {cell(ht, w_col)}  {ratio(ct, ht):>10}"
        )
        lines.append("")
        for res in (self.coap, self.https):
            state = (
                f"{res.delivered}/{res.sent} messages delivered"
                if res.error is None
                else f"FAILED: {res.error}"
            )
            lines.append(f"{res.description}: {state}")
            lines.append(f"  counted by: {res.method}")
        lines.append(f"Synapse {self.synapse_version}; {self.messages} messages each way.")
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per step (the CSV rows)."""
        out: list[dict[str, Any]] = []
        for i, step in enumerate(self.steps):
            row: dict[str, Any] = {"step": step.key, "title": step.title, "kind": step.kind}
            for res in (self.coap, self.https):
                t = res.traffic[i] if i < len(res.traffic) else None
                sec = res.seconds[i] if i < len(res.seconds) else None
                row[f"{res.stack}_ip_bytes"] = "" if t is None else t.ip_bytes
                row[f"{res.stack}_packets"] = "" if t is None else t.packets
                row[f"{res.stack}_a_to_b_bytes"] = "" if t is None else t.a_to_b_bytes
                row[f"{res.stack}_b_to_a_bytes"] = "" if t is None else t.b_to_a_bytes
                row[f"{res.stack}_seconds"] = "" if sec is None else round(sec, 3)
            r = self.ratio(i)
            row["ratio_https_over_coap"] = "" if r is None else round(r, 2)
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """The JSON summary."""

        def stack(res: StackResult) -> dict[str, Any]:
            return {
                "description": res.description,
                "counted_by": res.method,
                "sent": res.sent,
                "delivered": res.delivered,
                "error": res.error,
                "total_ip_bytes": res.total.ip_bytes,
                "total_packets": res.total.packets,
            }

        mc, mh = self._message_means()
        mean_ratio = (
            round(mh.ip_bytes / mc.ip_bytes, 2)
            if mc is not None and mh is not None and mc.ip_bytes > 0 and mh.ip_bytes > 0
            else None
        )
        total_ratio = self.ratio()
        return {
            "messages_each_way": self.messages,
            "synapse_version": self.synapse_version,
            "ok": self.ok,
            "coap": stack(self.coap),
            "https": stack(self.https),
            "ratio_total": None if total_ratio is None else round(total_ratio, 2),
            "ratio_message_mean": mean_ratio,
            "message_mean_ip_bytes": {
                "coap": None if mc is None else mc.ip_bytes,
                "https": None if mh is None else mh.ip_bytes,
            },
            "steps": self.rows(),
        }

    def write(self, directory: Path | None = None) -> tuple[Path, Path]:
        """Write ``demo-bytes.csv`` and ``demo-summary.json``; returns their paths."""
        directory = Path(directory or self.workdir)
        directory.mkdir(parents=True, exist_ok=True)
        csv_path = directory / "demo-bytes.csv"
        rows = self.rows()
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["step"])
            writer.writeheader()
            writer.writerows(rows)
        json_path = directory / "demo-summary.json"
        json_path.write_text(json.dumps(self.summary(), indent=2) + "\n")
        return csv_path, json_path


def scenario_steps(messages: int) -> tuple[Step, ...]:
    steps = [Step("join", "first contact + remote join", "join")]
    steps += [
        Step(f"a2b-{i}", f"message {i} alice -> bob", "message") for i in range(1, messages + 1)
    ]
    steps += [
        Step(f"b2a-{i}", f"message {i} bob -> alice", "message") for i in range(1, messages + 1)
    ]
    steps.append(Step("profile", "profile lookup alice -> bob", "profile"))
    return tuple(steps)


# ---------------------------------------------------------------------------------------
# Matrix clients (just enough of the client-server API)


class _Transport(Protocol):
    async def __call__(
        self, method: str, target: str, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> tuple[int, bytes]: ...


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class MatrixClient:
    """A Matrix user on one homeserver, over any transport (CoAP or plain HTTP)."""

    def __init__(self, transport: _Transport, server_name: str) -> None:
        self._transport = transport
        self.server_name = server_name
        self.token: str | None = None
        self.user_id = ""
        self.since: str | None = None
        self._txn = 0

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout_ok: bool = False, **query: Any
    ) -> Any:
        target = "/_matrix/client/v3" + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers: list[tuple[str, str]] = []
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            headers.append(("content-type", "application/json"))
        if self.token is not None:
            headers.append(("authorization", f"Bearer {self.token}"))
        status, raw = await self._transport(method, target, data, tuple(headers))
        if status != 200:
            text = raw[:400].decode("utf-8", "replace")
            raise DemoError(f"{method} {path} on {self.server_name} answered {status}: {text}")
        return json.loads(raw or b"{}")

    async def register(self, username: str) -> None:
        out = await self.call(
            "POST",
            "/register",
            {"username": username, "password": PASSWORD, "auth": {"type": "m.login.dummy"}},
        )
        self.token, self.user_id = out["access_token"], out["user_id"]

    async def sync(self, timeout_ms: int = 0) -> dict[str, Any]:
        query: dict[str, Any] = {"timeout": timeout_ms}
        if self.since:
            query["since"] = self.since
        out: dict[str, Any] = await self.call("GET", "/sync", **query)
        self.since = out.get("next_batch", self.since)
        return out

    async def send(self, room_id: str, text: str) -> str:
        self._txn += 1
        out = await self.call(
            "PUT",
            f"/rooms/{_q(room_id)}/send/m.room.message/demo{self._txn}",
            {"msgtype": "m.text", "body": text},
        )
        return str(out["event_id"])

    async def wait_for_message(self, room_id: str, text: str, timeout: float) -> None:
        """Long-poll /sync until ``text`` arrives in the room's timeline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"{self.user_id} did not receive {text!r} within {timeout:.0f} s")
            out = await self.sync(timeout_ms=int(min(remaining, 10.0) * 1000))
            room = out.get("rooms", {}).get("join", {}).get(room_id, {})
            for event in room.get("timeline", {}).get("events", []):
                if event.get("type") == "m.room.message" and (
                    event.get("content", {}).get("body") == text
                ):
                    return


def _coap_transport(client: Any, endpoint: Any) -> _Transport:
    async def call(
        method: str, target: str, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> tuple[int, bytes]:
        req = HttpRequest(method=method, target=target.encode(), headers=headers, body=body)
        resp = await client.request(endpoint, req, timeout=DELIVERY_TIMEOUT)
        return int(resp.status), bytes(resp.body)

    return call


def _http_transport(session: Any, base_url: str) -> _Transport:
    import aiohttp

    async def call(
        method: str, target: str, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
        async with session.request(
            method, base_url + target, data=body or None, headers=dict(headers), timeout=timeout
        ) as resp:
            return int(resp.status), bytes(await resp.read())

    return call


# ---------------------------------------------------------------------------------------
# the two pairs


class _Pair:
    """A pair of homeservers, A (alice's) and B (bob's), and how their traffic is counted."""

    stack = ""
    description = ""
    method = ""

    def __init__(self, root: Path, progress: Progress) -> None:
        self.root = root
        self.progress = progress
        self.procs: list[SynapseProcess] = []
        self.name_a = ""
        self.name_b = ""

    async def start(self) -> None:
        raise NotImplementedError

    async def clients(self) -> tuple[MatrixClient, MatrixClient]:
        raise NotImplementedError

    async def mark(self) -> None:
        """Close the current interval (the next step's traffic starts now)."""
        raise NotImplementedError

    async def quiet(self) -> None:
        """Wait until the traffic between the servers has settled."""
        await asyncio.sleep(SETTLE)

    async def intervals(self) -> list[Traffic]:
        """The traffic between consecutive marks."""
        raise NotImplementedError

    async def close(self) -> None:
        await asyncio.gather(
            *(asyncio.to_thread(p.stop) for p in self.procs), return_exceptions=True
        )

    def kill_all(self) -> None:
        """Synchronous last resort (also safe while a start is still waiting)."""
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.kill()

    def log_tails(self, n: int = 15) -> str:
        out = []
        for p in self.procs:
            lines = [
                line
                for line in p.log_text().splitlines()
                if (" - ERROR - " in line or " - CRITICAL - " in line or "Traceback" in line)
                or (" - WARNING - " in line and "synapse_coap" in line)
            ][-n:]
            if lines:
                out.append(f"--- {p.server_name} ({p.log_path}) ---")
                out.extend(lines)
        return "\n".join(out)


async def _start_all(procs: Sequence[SynapseProcess], pattern: str | None) -> None:
    results = await asyncio.gather(
        *(
            asyncio.to_thread(p.start, timeout=START_TIMEOUT, ready_log_pattern=pattern)
            for p in procs
        ),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, BaseException):
            raise r


_COMMON_CONFIG: dict[str, Any] = {
    # Presence sends periodic EDUs between servers; off, so each step counts only itself.
    "presence": {"enabled": False},
}


class CoapPair(_Pair):
    stack = "coap"
    description = "CoAP+Noise (synapse-coap module, no HTTP listener)"
    method = "relay accounting (every datagram between the servers crosses a lab relay)"

    def __init__(self, root: Path, progress: Progress) -> None:
        super().__init__(root, progress)
        self.relays: list[Relay] = []
        self.marks: list[Traffic] = []
        self.coap_ports: dict[str, int] = {}
        self.keys: dict[str, bytes] = {}
        self._client: Any = None

    def _relay_traffic(self) -> Traffic:
        # relays[0]: A -> B's CoAP port (A's requests are its uplink); relays[1]: B -> A.
        a_to_b = b_to_a = packets = 0
        for i, relay in enumerate(self.relays):
            st = relay.stats
            up, down = st.uplink, st.downlink
            packets += up.offered_datagrams + down.offered_datagrams
            if i == 0:
                a_to_b += up.offered_ip_bytes
                b_to_a += down.offered_ip_bytes
            else:
                b_to_a += up.offered_ip_bytes
                a_to_b += down.offered_ip_bytes
        return Traffic(a_to_b + b_to_a, packets, a_to_b, b_to_a)

    async def start(self) -> None:
        port_a, port_b = free_port("udp"), free_port("udp")
        while port_b == port_a:
            port_b = free_port("udp")
        # Same-shaped server names as the HTTPS pair ("127.0.0.1:PORT"), for a fair count.
        self.name_a, self.name_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
        self.coap_ports = {self.name_a: port_a, self.name_b: port_b}
        key_paths: dict[str, Path] = {}
        for name, label in ((self.name_a, "hs1"), (self.name_b, "hs2")):
            d = self.root / label
            d.mkdir(parents=True, exist_ok=True)
            key_paths[name] = d / "coap.key"
            if not key_paths[name].exists():
                noise_keys.write_key_file(key_paths[name], noise_keys.generate_private_key())
            self.keys[name] = noise_keys.public_key(noise_keys.read_key_file(key_paths[name]))
        lan = get_profile("lan")
        for target in (self.name_b, self.name_a):
            relay = await Relay.start(
                RelayConfig(
                    listen=("127.0.0.1", 0),
                    upstream=("127.0.0.1", self.coap_ports[target]),
                    profile=lan,
                )
            )
            self.relays.append(relay)
        relay_to = {self.name_b: self.relays[0].address, self.name_a: self.relays[1].address}
        pins = {n: noise_keys.encode_public(k) for n, k in self.keys.items()}
        for me, other, label in (
            (self.name_a, self.name_b, "hs1"),
            (self.name_b, self.name_a, "hs2"),
        ):
            rhost, rport = relay_to[other]
            module = {
                "module": MODULE,
                "config": {
                    "listen": [f"127.0.0.1:{self.coap_ports[me]}"],
                    "private_key_path": str(key_paths[me]),
                    "trust": {"peers": pins},
                    "federation": {
                        "fallback": "never",
                        "discovery": False,
                        "peers": {
                            other: {
                                "endpoints": [f"{rhost}:{rport}"],
                                "public_key": pins[other],
                            }
                        },
                    },
                },
            }
            self.procs.append(
                SynapseProcess(self.root / label, me, modules=[module], extra_config=_COMMON_CONFIG)
            )
        self.progress(
            f"[coap ] starting hs1 ({self.name_a}) and hs2 ({self.name_b}) with the module, "
            f"relays {_fmt(self.relays[0].address)} -> hs2, {_fmt(self.relays[1].address)} -> hs1"
        )
        await _start_all(self.procs, COAP_READY)

    async def clients(self) -> tuple[MatrixClient, MatrixClient]:
        from synapse_coap.noise.trust import TrustPolicy
        from synapse_coap.transport.client import CoapClient, Endpoint

        self._client = await CoapClient.create(
            static_key=noise_keys.generate_private_key(),
            trust=TrustPolicy(),
            bind=("127.0.0.1", 0),
        )
        out = []
        for name in (self.name_a, self.name_b):
            endpoint = Endpoint(
                host="127.0.0.1",
                port=self.coap_ports[name],
                peer_name=name,
                static_key=self.keys[name],
            )
            out.append(MatrixClient(_coap_transport(self._client, endpoint), name))
        return out[0], out[1]

    async def mark(self) -> None:
        self.marks.append(self._relay_traffic())

    async def quiet(self) -> None:
        await asyncio.sleep(SETTLE / 2)
        deadline = time.monotonic() + SETTLE_MAX
        last = self._relay_traffic()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            now = self._relay_traffic()
            if now != last or any(r.stats.pending for r in self.relays):
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET:
                return

    async def intervals(self) -> list[Traffic]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        await super().close()
        for relay in self.relays:
            await relay.close()


class HttpsPair(_Pair):
    stack = "https"
    description = "HTTPS (stock Synapse federation, TLS)"

    def __init__(self, root: Path, progress: Progress, counting: str = "auto") -> None:
        super().__init__(root, progress)
        if counting not in ("auto", "tshark", "estimate"):
            raise ValueError(f"counting must be auto, tshark or estimate, not {counting!r}")
        self.counting = counting
        self.capture: LoopbackCapture | None = None
        self.marker_sock: socket.socket | None = None
        self.marker_port = 0
        self.marks_sent = 0
        self.fed_ports: tuple[int, int] = (0, 0)
        self.proxies: list[_CountingProxy] = []
        self.proxy_marks: list[list[_ProxyCounts]] = []
        self._session: Any = None
        self.client_ports: dict[str, int] = {}

    async def _try_capture(self, ports: tuple[int, int]) -> str | None:
        if self.counting == "estimate":
            return "estimation was asked for (--count estimate)"
        if tshark_path() is None:
            return "tshark is not installed"
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.marker_sock, self.marker_port = sock, sock.getsockname()[1]
        filt = f"tcp port {ports[0]} or tcp port {ports[1]} or udp dst port {self.marker_port}"
        cap = LoopbackCapture(filt, directory=self.root)
        try:
            await asyncio.to_thread(cap.start)
        except CaptureError as exc:
            cap.cleanup()
            return f"tshark cannot capture on loopback here ({exc})"
        self.capture = cap
        return None

    async def start(self) -> None:
        fed_a, fed_b = free_port(), free_port()
        while fed_b == fed_a:
            fed_b = free_port()
        self.fed_ports = (fed_a, fed_b)
        self.root.mkdir(parents=True, exist_ok=True)
        why_not = await self._try_capture(self.fed_ports)
        if why_not is None:
            self.method = (
                "tshark capture on loopback (every IP packet on the two federation ports, "
                "TCP handshakes and ACK-only segments included)"
            )
            listen_ports = self.fed_ports
        else:
            if self.counting == "tshark":
                raise DemoError(f"cannot count with tshark: {why_not}")
            self.method = (
                f"ESTIMATE: {why_not}; TCP bytes counted by a proxy in front of each "
                "federation listener and turned into IP bytes with estimate_tcp() "
                "(headers, handshakes and ACKs estimated, not captured)"
            )
            listen_ports = (free_port(), free_port())
            for fed, listen in zip(self.fed_ports, listen_ports, strict=True):
                self.proxies.append(await _CountingProxy.start(fed, listen))
        self.name_a, self.name_b = f"127.0.0.1:{fed_a}", f"127.0.0.1:{fed_b}"
        for name, listen, label in (
            (self.name_a, listen_ports[0], "hs3"),
            (self.name_b, listen_ports[1], "hs4"),
        ):
            port = free_port()
            self.client_ports[name] = port
            self.procs.append(
                SynapseProcess(
                    self.root / label,
                    name,
                    http_port=port,
                    http_resources=("client",),
                    tls_federation_port=listen,
                    extra_config=_COMMON_CONFIG,
                )
            )
        self.progress(
            f"[https] starting hs3 ({self.name_a}) and hs4 ({self.name_b}): stock Synapse, "
            "TLS federation listeners"
        )
        if why_not is not None:
            self.progress(f"[https] note: {self.method}")
        await _start_all(self.procs, None)

    async def clients(self) -> tuple[MatrixClient, MatrixClient]:
        import aiohttp

        self._session = aiohttp.ClientSession()
        out = []
        for name in (self.name_a, self.name_b):
            base = f"http://127.0.0.1:{self.client_ports[name]}"
            out.append(MatrixClient(_http_transport(self._session, base), name))
        return out[0], out[1]

    async def mark(self) -> None:
        if self.capture is not None and self.marker_sock is not None:
            await asyncio.sleep(0.05)
            self.marker_sock.sendto(b"mark", ("127.0.0.1", self.marker_port))
            self.marks_sent += 1
        else:
            self.proxy_marks.append([p.counts() for p in self.proxies])

    async def intervals(self) -> list[Traffic]:
        if self.capture is not None:
            # A sentinel after the last mark, and time for the capture to take both in
            # (libpcap hands packets over in blocks, the last one on a timer).
            await asyncio.sleep(1.0)
            if self.marker_sock is not None:
                self.marker_sock.sendto(b"end", ("127.0.0.1", self.marker_port))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(self.capture.stop)
            packets = await asyncio.to_thread(self.capture.packets)
            markers = sum(1 for p in packets if p.proto == "udp" and p.dst_port == self.marker_port)
            if markers < self.marks_sent:
                raise DemoError(
                    f"the capture holds {markers} of the {self.marks_sent} step markers sent; "
                    "the per-step HTTPS counts would be wrong"
                )
            return _split_at_markers(packets, self.marker_port, self.fed_ports)[
                : self.marks_sent - 1
            ]
        out = []
        for before, after in zip(self.proxy_marks, self.proxy_marks[1:], strict=False):
            # proxies[0] sits in front of A's listener: B is its client.
            a_to_b = b_to_a = n_packets = 0
            for i, (x, y) in enumerate(zip(before, after, strict=True)):
                est = (y - x).estimate()
                n_packets += est.packets
                if i == 0:
                    b_to_a += est.to_server_ip_bytes
                    a_to_b += est.from_server_ip_bytes
                else:
                    a_to_b += est.to_server_ip_bytes
                    b_to_a += est.from_server_ip_bytes
            out.append(Traffic(a_to_b + b_to_a, n_packets, a_to_b, b_to_a))
        return out

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
        await super().close()
        for proxy in self.proxies:
            await proxy.close()
        if self.capture is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.capture.stop)
            self.capture.cleanup()
        if self.marker_sock is not None:
            self.marker_sock.close()


def _split_at_markers(
    packets: Sequence[Packet], marker_port: int, fed_ports: tuple[int, int]
) -> list[Traffic]:
    """Traffic between consecutive marker datagrams (the packets before the first are dropped)."""
    out: list[Traffic] = []
    current: list[Packet] | None = None
    fed_a, fed_b = fed_ports

    def close(group: list[Packet]) -> Traffic:
        counts: CaptureCounts = summarize(group)
        # A -> B: segments to B's federation port (A's requests) or from A's port (A's responses).
        a_to_b = sum(p.ip_bytes for p in group if p.dst_port == fed_b or p.src_port == fed_a)
        return Traffic(counts.ip_bytes, counts.packets, a_to_b, counts.ip_bytes - a_to_b)

    for p in packets:
        if p.proto == "udp" and p.dst_port == marker_port:
            if current is not None:
                out.append(close(current))
            current = []
        elif current is not None and p.proto == "tcp":
            current.append(p)
    return out


# ---------------------------------------------------------------------------------------
# the counting TCP proxy (only without tshark)


@attrs.frozen
class _ProxyCounts:
    to_server_bytes: int = 0
    from_server_bytes: int = 0
    to_server_writes: int = 0
    from_server_writes: int = 0
    connections: int = 0

    def __sub__(self, other: _ProxyCounts) -> _ProxyCounts:
        return _ProxyCounts(
            *(getattr(self, f.name) - getattr(other, f.name) for f in attrs.fields(_ProxyCounts))
        )

    def estimate(self) -> CaptureCounts:
        return estimate_tcp(
            to_server_bytes=self.to_server_bytes,
            from_server_bytes=self.from_server_bytes,
            to_server_writes=max(1, self.to_server_writes),
            from_server_writes=max(1, self.from_server_writes),
            connections=self.connections,
        )


class _CountingProxy:
    """A TCP forwarder counting bytes, reads (as the peer's writes) and connections."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.c = {f.name: 0 for f in attrs.fields(_ProxyCounts)}
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, port: int, upstream_port: int) -> _CountingProxy:
        self = cls(upstream_port)
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return self

    def counts(self) -> _ProxyCounts:
        return _ProxyCounts(**self.c)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.c["connections"] += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await r.read(65536):
                    key = "to_server" if up else "from_server"
                    self.c[f"{key}_bytes"] += len(data)
                    self.c[f"{key}_writes"] += 1
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


# ---------------------------------------------------------------------------------------
# the scenario


async def _timed(what: Awaitable[Any]) -> float:
    t0 = time.monotonic()
    await what
    return time.monotonic() - t0


async def _run_scenario(
    pair: _Pair, steps: Sequence[Step], messages: int, progress: Progress
) -> tuple[int, int, list[float]]:
    """Run the scenario on a started pair; returns (sent, delivered, seconds per step)."""
    tag = f"[{pair.stack:<5}]"
    alice, bob = await pair.clients()
    await alice.register(NAMES.alice)
    await bob.register(NAMES.bob)
    await bob.call(
        "PUT", f"/profile/{_q(bob.user_id)}/displayname", {"displayname": NAMES.bob_display}
    )
    room = await bob.call("POST", "/createRoom", {"preset": "public_chat", "name": NAMES.room_demo})
    room_id = str(room["room_id"])
    await alice.sync()
    await bob.sync()
    progress(f"{tag} registered {alice.user_id} and {bob.user_id}; bob created {room_id}")
    seconds: list[float] = []
    sent = delivered = 0
    await pair.quiet()
    await pair.mark()
    t = await _timed(alice.call("POST", f"/join/{_q(room_id)}", {}, server_name=pair.name_b))
    seconds.append(t)
    await asyncio.sleep(SETTLE_JOIN - SETTLE)
    await pair.quiet()
    await pair.mark()
    progress(f"{tag} {steps[0].title}: done in {t:.2f} s")
    index = 1
    for sender, receiver, label in ((alice, bob, "alice -> bob"), (bob, alice, "bob -> alice")):
        for i in range(1, messages + 1):
            text = NAMES.text(len(f"demo message {i} {label}"))
            t0 = time.monotonic()
            await sender.send(room_id, text)
            sent += 1
            await receiver.wait_for_message(room_id, text, DELIVERY_TIMEOUT)
            delivered += 1
            t = time.monotonic() - t0
            seconds.append(t)
            await pair.quiet()
            await pair.mark()
            progress(f"{tag} {steps[index].title}: arrived in /sync after {t:.2f} s")
            index += 1
    t0 = time.monotonic()
    profile = await alice.call("GET", f"/profile/{_q(bob.user_id)}")
    t = time.monotonic() - t0
    if profile.get("displayname") != NAMES.bob_display:
        raise DemoError(f"the profile lookup returned {profile!r}")
    seconds.append(t)
    await pair.quiet()
    await pair.mark()
    progress(f"{tag} {steps[index].title}: {profile.get('displayname')!r} in {t:.2f} s")
    return sent, delivered, seconds


async def _run_pair(
    pair: _Pair, steps: Sequence[Step], messages: int, progress: Progress
) -> StackResult:
    sent = delivered = 0
    seconds: list[float] = []
    error: str | None = None
    traffic: list[Traffic] = []
    try:
        await pair.start()
        sent, delivered, seconds = await _run_scenario(pair, steps, messages, progress)
    except Exception as exc:  # reported, and the other pair still runs
        tails = pair.log_tails()
        error = f"{type(exc).__name__}: {exc}"
        logger.debug("the %s pair failed", pair.stack, exc_info=True)
        progress(f"[{pair.stack:<5}] FAILED: {error}")
        if tails:
            progress(tails)
    finally:
        try:
            traffic = await pair.intervals()
        except Exception as exc:
            logger.debug("counting the %s pair failed", pair.stack, exc_info=True)
            if error is None:
                error = f"counting failed: {exc}"
                progress(f"[{pair.stack:<5}] FAILED: {error}")
        await pair.close()
    return StackResult(
        stack=pair.stack,
        description=pair.description,
        method=pair.method,
        traffic=tuple(traffic[: len(steps)]),
        sent=sent,
        delivered=delivered,
        seconds=tuple(seconds),
        error=error,
    )


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def synapse_version() -> str:
    try:
        return importlib.metadata.version("matrix-synapse")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


async def run_demo(
    workdir: Path,
    messages: int = 5,
    keep: bool = False,
    progress: Progress = print,
    *,
    counting: str = "auto",
) -> DemoReport:
    """Run the demo in ``workdir``; returns the report (also written there as CSV and JSON).

    ``keep``: leave the homeservers' directories (configs, logs, databases)
    in ``workdir``; they are kept anyway when a pair fails. ``counting``
    (HTTPS side): "auto" (tshark if it can capture, else the estimate),
    "tshark" or "estimate".
    """
    if messages < 1:
        raise ValueError("messages must be >= 1")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = scenario_steps(messages)
    progress(
        f"demo: 2 homeservers over CoAP+Noise and 2 over stock HTTPS, {messages} messages "
        f"each way; working in {workdir}"
    )
    pairs: list[_Pair] = [
        CoapPair(workdir / "coap", progress),
        HttpsPair(workdir / "https", progress, counting),
    ]
    results: list[StackResult] = []
    try:
        for pair in pairs:
            results.append(await _run_pair(pair, steps, messages, progress))
    finally:
        for pair in pairs:
            pair.kill_all()
    report = DemoReport(
        messages=messages,
        steps=steps,
        coap=results[0],
        https=results[1],
        workdir=workdir,
        synapse_version=synapse_version(),
    )
    csv_path, json_path = report.write(workdir)
    if not keep and report.ok:
        for sub in ("coap", "https"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    progress(f"demo: wrote {csv_path} and {json_path}")
    return report
