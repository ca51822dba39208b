"""Client-server scenarios: matrix-nio over CoAP+Noise (through the sidecar) and over HTTPS.

Two *stacks*, each a real Synapse process and an unmodified ``nio.AsyncClient``:

- ``coap``: nio -> the sidecar (HTTP on loopback, in this process) -> CoAP+Noise
  -> lab :class:`~synapse_coap.lab.relay.Relay` at the link profile -> the
  Synapse module's CoAP listener. Counted exactly at the relay (IP + UDP
  headers). The nio <-> sidecar hop is local and not on the constrained link:
  not counted.
- ``https``: nio -> Synapse's own client listener with ``tls: true`` (TLS 1.3,
  a self-signed certificate, nio's verification off). Counted with a tshark
  capture on loopback of the TLS port: every IP packet, TCP handshakes and
  ACK-only segments included. Runs unimpaired; at a profile other than ``lan``
  its completion time is modelled (see :class:`~lab_scenarios.common.ScenarioResult`).

Each stack's Synapse also has a plain HTTP client listener that is never
counted: the *helper* uses it to set the scene (register users, create the
room) and to play the other user (bob), who sends the message alice receives
and receives the messages alice sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import struct
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from lab_scenarios.common import (
    RelaySnapshot,
    ScenarioResult,
    limits_config,
    link_config,
    modelled_seconds,
    progress,
    relay_round_trips,
    relay_snapshot,
    scrape_retransmissions,
    split_at_markers,
    synapse_config,
    tcp_window,
)
from synapse_coap.lab.model import LinkProfile
from synapse_coap.lab.relay import Relay, RelayConfig
from synapse_coap.noise import keys as noise_keys
from synapse_coap_lab.capture import CaptureError, LoopbackCapture, tshark_path
from synapse_coap_lab.demo import PASSWORD as DEMO_PASSWORD
from synapse_coap_lab.demo import MatrixClient
from synapse_coap_lab.homeserver import SynapseProcess, free_port, self_signed_certificate
from synapse_coap_lab.names import NAMES

SERVER_NAME = "lab.test"
PASSWORD = DEMO_PASSWORD  # what MatrixClient.register sets
MODULE = "synapse_coap.CoapModule"
COAP_READY = r"CoAP listener ready"
CLIENT_SCENARIOS = ("login", "initial-sync", "send", "receive", "upload", "idle")
#: How long after the idle period an outstanding idle sync may still take before the
#: scenario fails (no scenario may hang: nio retries a timed-out sync for ever).
IDLE_GRACE = 120.0
#: Quiet time (no datagram crossing the relay) that closes a window.
QUIET = 1.0
SETTLE_MAX = 30.0


def catch_up_settle(profile: LinkProfile) -> float:
    """How long the catch-up before ``receive`` may wait for the link to settle: a
    registration, a notification of up to 1,500 B and their acknowledgements at the
    profile's slower rate (at least SETTLE_MAX)."""
    rates = [r for r in (profile.uplink.rate, profile.downlink.rate) if r]
    if not rates:
        return SETTLE_MAX
    return max(SETTLE_MAX, 2 * 8.0 * 1500 / min(rates))


_COMMON: dict[str, Any] = {"presence": {"enabled": False}}


def noisy_png(size: int = 10 * 1024, seed: int = 7) -> bytes:
    """A valid RGB PNG of about ``size`` bytes with pseudo-random pixels (incompressible,
    like a photo)."""
    import random

    rnd = random.Random(seed)
    side = max(4, int((size / 3) ** 0.5))
    raw = b"".join(b"\x00" + rnd.randbytes(side * 3) for _ in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def http_transport(session: aiohttp.ClientSession, base_url: str) -> Any:
    async def call(
        method: str, target: str, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> tuple[int, bytes]:
        async with session.request(
            method,
            base_url + target,
            data=body or None,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=600),
        ) as resp:
            return int(resp.status), bytes(await resp.read())

    return call


@attrs.frozen
class Window:
    """The counted traffic of one scenario."""

    ip_bytes: int
    packets: int
    up_bytes: int
    down_bytes: int
    round_trips: int
    retransmissions: int
    lost: int = 0


def nio_config(profile: LinkProfile) -> Any:
    """nio gives up on a request after 60 s by default: on an impaired link its timeout is
    raised above the sidecar's, as docs/clients.md advises (else nio gives up before the
    sidecar can say what happened)."""
    import nio

    from synapse_coap.transport.link import LinkParameters

    link = link_config(profile)
    if not link:
        return nio.AsyncClientConfig(request_timeout=60.0)
    sidecar = LinkParameters.from_config(link).request_timeout
    return nio.AsyncClientConfig(request_timeout=float(sidecar) + 60.0)


class Stack:
    """One stack: a Synapse, the counted path for alice, the uncounted helper path."""

    stack = ""
    method = ""
    server = ""

    def __init__(self, root: Path, profile: LinkProfile, seed: int) -> None:
        self.root = root
        self.profile = profile
        self.seed = seed
        self.syn: SynapseProcess | None = None
        self.session: aiohttp.ClientSession | None = None
        self.helper_port = 0
        self.metrics_port: int | None = None
        self.alice_helper: MatrixClient | None = None
        self.bob: MatrixClient | None = None
        self.room_id = ""
        self.alice_user = ""

    @property
    def tag(self) -> str:
        return f"[{self.stack:<5} {self.profile.name}]"

    async def start(self) -> None:
        raise NotImplementedError

    def alice_url(self) -> tuple[str, Any]:
        """(homeserver URL for nio, nio's ``ssl`` argument)."""
        raise NotImplementedError

    async def mark(self) -> None:
        raise NotImplementedError

    async def windows(self) -> list[Window]:
        raise NotImplementedError

    async def quiet(self, settle_max: float = SETTLE_MAX) -> None:
        await asyncio.sleep(0.3)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.syn is not None:
            await asyncio.to_thread(self.syn.stop)

    def kill(self) -> None:
        if self.syn is not None:
            with contextlib.suppress(Exception):
                self.syn.kill()

    # -- the scene, set through the uncounted helper listener ---------------------------

    async def set_scene(self) -> None:
        self.session = aiohttp.ClientSession()
        transport = http_transport(self.session, f"http://127.0.0.1:{self.helper_port}")
        alice = MatrixClient(transport, SERVER_NAME)
        bob = MatrixClient(transport, SERVER_NAME)
        await alice.register(NAMES.alice)
        await bob.register(NAMES.bob)
        room = await bob.call(
            "POST",
            "/createRoom",
            {"preset": "private_chat", "name": NAMES.room, "invite": [alice.user_id]},
        )
        self.room_id = str(room["room_id"])
        await alice.call("POST", f"/join/{urllib.parse.quote(self.room_id, safe='')}", {})
        for _ in range(3):
            await bob.send(self.room_id, NAMES.text(15))
        await bob.sync()
        self.alice_helper, self.bob, self.alice_user = alice, bob, alice.user_id

    def new_nio(self) -> Any:
        import nio

        url, ssl = self.alice_url()
        return nio.AsyncClient(url, self.alice_user, ssl=ssl, config=nio_config(self.profile))


# -- CoAP ---------------------------------------------------------------------------------


async def start_sidecar(
    address: tuple[str, int],
    server_name: str,
    public_key: bytes,
    profile: LinkProfile,
    metrics: Any,
    keepalive_scale: float = 1.0,
) -> tuple[web.AppRunner, Any, Any, int]:
    """An in-process sidecar (HTTP on 127.0.0.1, CoAP+Noise to ``address``) tuned for
    ``profile``, with the sidecar's default keep-alive (interval times ``keepalive_scale``);
    returns (runner, Sidecar, CoAP client, HTTP port)."""
    from synapse_coap.noise.endpoint import NoiseLimits
    from synapse_coap.noise.trust import TrustPolicy
    from synapse_coap.proxy.runner import DEFAULT_KEEPALIVE
    from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions
    from synapse_coap.transport.client import CoapClient, Endpoint
    from synapse_coap.transport.link import LinkParameters

    link = LinkParameters.from_config(link_config(profile))
    client = await CoapClient.create(
        static_key=noise_keys.generate_private_key(),
        trust=TrustPolicy(pinned={server_name: public_key}),
        link=link,
        limits=NoiseLimits.from_config(limits_config(profile), "limits"),
        metrics=metrics,
        bind=("127.0.0.1", 0),
        keepalive_interval=DEFAULT_KEEPALIVE * keepalive_scale,
    )
    endpoint = Endpoint(address[0], address[1], server_name, public_key)
    slow = profile.uplink.rate is not None and profile.uplink.rate < 20000
    options = SidecarOptions(
        # docs/clients.md ("504"): the slack recommended below 20 kbit/s
        request_timeout=link.request_timeout,
        long_poll_slack=600.0 if slow else 60.0,
    )
    sidecar = Sidecar(client, endpoint, options=options)
    runner = web.AppRunner(sidecar.make_app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, sidecar, client, int(runner.addresses[0][1])


class CoapStack(Stack):
    stack = "coap"
    method = "relay"
    server = "module"
    #: the sidecar's keep-alive interval is DEFAULT_KEEPALIVE times this (day --day-compress)
    keepalive_scale = 1.0
    #: the module's ``push.echo_hold`` (None: its default, 300 s). The client scenarios
    #: push each echo at once (0), so that the catch-up before ``receive`` takes alice's
    #: echo off the link unmeasured and ``receive`` / ``idle`` measure one message and
    #: idling alone; the ``day`` suite keeps the default and counts every byte.
    echo_hold: float | None = 0.0

    def __init__(self, root: Path, profile: LinkProfile, seed: int) -> None:
        super().__init__(root, profile, seed)
        self.relay: Relay | None = None
        self.coap_port = 0
        self.public_key = b""
        self.metrics: Any = None
        self._sidecar: Any = None
        self._runner: web.AppRunner | None = None
        self._client: Any = None
        self.sidecar_port = 0
        self.marks: list[tuple[RelaySnapshot, int]] = []
        self._link: dict[str, Any] = {}

    def _module(self, link: dict[str, Any]) -> dict[str, Any]:
        return {
            "module": MODULE,
            "config": {
                "listen": [f"127.0.0.1:{self.coap_port}"],
                "private_key_path": str(self.root / "coap.key"),
                "link": link,
                "limits": limits_config(self.profile),
                **({} if self.echo_hold is None else {"push": {"echo_hold": self.echo_hold}}),
            },
        }

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.coap_port = free_port("udp")
        self.helper_port = free_port()
        self.metrics_port = free_port()
        key_path = self.root / "coap.key"
        if not key_path.exists():
            noise_keys.write_key_file(key_path, noise_keys.generate_private_key())
        self.public_key = noise_keys.public_key(noise_keys.read_key_file(key_path))
        self._link = link_config(self.profile)
        self.syn = SynapseProcess(
            self.root / "hs",
            SERVER_NAME,
            http_port=self.helper_port,
            http_resources=("client",),
            metrics_port=self.metrics_port,
            modules=[self._module(self._link)],
            extra_config={**_COMMON, **synapse_config(self.profile)},
        )
        progress(f"{self.tag} starting Synapse with the module (CoAP on udp/{self.coap_port})")
        await asyncio.to_thread(self.syn.start, 120.0, COAP_READY)
        self.relay = await Relay.start(
            RelayConfig(
                listen=("127.0.0.1", 0),
                upstream=("127.0.0.1", self.coap_port),
                profile=self.profile,
                seed=self.seed,
                trace=True,
            )
        )
        await self.start_sidecar()
        await self.set_scene()

    async def start_sidecar(self) -> None:
        from synapse_coap.transport.metrics import CountingMetrics

        assert self.relay is not None
        self.metrics = CountingMetrics()
        self._runner, self._sidecar, self._client, self.sidecar_port = await start_sidecar(
            self.relay.address,
            SERVER_NAME,
            self.public_key,
            self.profile,
            self.metrics,
            keepalive_scale=self.keepalive_scale,
        )

    async def stop_sidecar(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._sidecar.drain()
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def reconfigure(self, profile: LinkProfile) -> None:
        """Move to another link profile: relay, module link tuning (restart) and a new sidecar
        (a fresh Noise session)."""
        assert self.relay is not None and self.syn is not None
        await self.stop_sidecar()
        self.profile = profile
        link = link_config(profile)
        if link != self._link:
            self._link = link
            self.syn.modules = [self._module(link)]
            self.syn.extra_config = {**_COMMON, **synapse_config(profile)}
            await asyncio.to_thread(self.syn.restart, 120.0, COAP_READY)
        self.relay.set_profile(profile)
        await self.start_sidecar()

    def alice_url(self) -> tuple[str, Any]:
        return f"http://127.0.0.1:{self.sidecar_port}", None

    def _retransmissions(self) -> int:
        server = scrape_retransmissions(self.metrics_port) or 0
        return int(self.metrics.retransmissions if self.metrics else 0) + server

    async def quiet(self, settle_max: float = SETTLE_MAX) -> None:
        """Wait until nothing has crossed the relay for QUIET seconds (at most ``settle_max``)."""
        assert self.relay is not None
        relay = self.relay
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + settle_max
        last = relay_snapshot([relay], 0.0)
        since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = relay_snapshot([relay], 0.0)
            if now != last or relay.stats.pending:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= QUIET:
                break
        del loop

    async def mark(self) -> None:
        assert self.relay is not None
        snap = relay_snapshot([self.relay], asyncio.get_running_loop().time())
        self.marks.append((snap, await asyncio.to_thread(self._retransmissions)))

    async def windows(self) -> list[Window]:
        assert self.relay is not None
        out = []
        for (a, ra), (b, rb) in zip(self.marks, self.marks[1:], strict=False):
            d = b - a
            out.append(
                Window(
                    d.up_bytes + d.down_bytes,
                    d.packets,
                    d.up_bytes,
                    d.down_bytes,
                    relay_round_trips([self.relay], a, b),
                    rb - ra,
                    d.lost,
                )
            )
        return out

    async def close(self) -> None:
        await self.stop_sidecar()
        if self.relay is not None:
            await self.relay.close()
        await super().close()


# -- HTTPS --------------------------------------------------------------------------------


class HttpsStack(Stack):
    stack = "https"
    method = "tshark"
    server = "stock Synapse, TLS listener"

    def __init__(self, root: Path, profile: LinkProfile, seed: int) -> None:
        super().__init__(root, profile, seed)
        self.tls_port = 0
        self.capture: LoopbackCapture | None = None
        self.marker: socket.socket | None = None
        self.marker_port = 0

    async def start(self) -> None:
        if tshark_path() is None:
            raise CaptureError("tshark is not installed: cannot count the HTTPS stack")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls_port = free_port()
        self.helper_port = free_port()
        hs_dir = self.root / "hs"
        cert, key = self_signed_certificate(hs_dir)
        listeners = [
            {
                "port": self.helper_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "resources": [{"names": ["client"], "compress": False}],
            },
            {
                "port": self.tls_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "resources": [{"names": ["client"], "compress": False}],
            },
        ]
        self.syn = SynapseProcess(
            hs_dir,
            SERVER_NAME,
            http_port=self.helper_port,
            extra_config={
                **_COMMON,
                "listeners": listeners,
                "tls_certificate_path": str(cert),
                "tls_private_key_path": str(key),
            },
        )
        progress(
            f"{self.tag} starting stock Synapse (HTTPS client listener on tcp/{self.tls_port})"
        )
        await asyncio.to_thread(self.syn.start, 120.0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.marker, self.marker_port = sock, sock.getsockname()[1]
        self.capture = LoopbackCapture(
            f"tcp port {self.tls_port} or udp dst port {self.marker_port}", directory=self.root
        )
        await asyncio.to_thread(self.capture.start)
        await self.set_scene()

    def alice_url(self) -> tuple[str, Any]:
        return f"https://127.0.0.1:{self.tls_port}", False

    async def mark(self) -> None:
        assert self.marker is not None
        await asyncio.sleep(0.2)  # trailing ACKs
        self.marker.sendto(b"mark", ("127.0.0.1", self.marker_port))
        await asyncio.sleep(0.05)

    async def windows(self) -> list[Window]:
        assert self.capture is not None
        await asyncio.to_thread(self.capture.stop)
        packets = await asyncio.to_thread(self.capture.packets)
        out = []
        for group in split_at_markers(packets, self.marker_port):
            ip, n, up, down, rts = tcp_window(group, self.tls_port)
            out.append(Window(ip, n, up, down, rts, 0))
        return out

    async def close(self) -> None:
        if self.capture is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.capture.stop)
        if self.marker is not None:
            self.marker.close()
        await super().close()


def nginx_path() -> str | None:
    """Debian's nginx (``scripts/setup`` installs nginx-light as root), or None."""
    import shutil

    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


NGINX_CONF = """worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    gzip on;
    gzip_comp_level 6;
    gzip_min_length 20;
    gzip_proxied any;
    gzip_vary off;
    gzip_types application/json text/plain;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:tls:1m;
        client_max_body_size 64m;
        location / {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout 300s;
            proxy_buffering off;
        }}
    }}
}}
"""


def launch_nginx(
    nginx: str, root: Path, *, port: int, cert: Path | str, key: Path | str, backend: int
) -> Any:
    """nginx with :data:`NGINX_CONF` (files in ``root``) serving TLS on ``port`` and
    proxying to ``backend``; returned (its ``subprocess.Popen``) once it accepts
    connections. CaptureError, with its error log's tail, if it does not start within
    10 seconds. Blocking (``asyncio.to_thread`` from a loop)."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port, cert=cert, key=key, backend=backend))
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(root), "-e", str(root / "nginx-error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = (root / "nginx-error.log").read_text()[-500:]
                raise CaptureError(f"nginx did not start: {err}") from None
            time.sleep(0.05)


class NginxStack(HttpsStack):
    """The tuned HTTPS baseline: Debian's nginx (TLS 1.3, HTTP/2, gzip) in front of stock
    Synapse's plain client listener; the lab starts and stops it; counted like HTTPS.

    matrix-nio (aiohttp) offers only HTTP/1.1 in ALPN, so its requests use TLS 1.3 and
    gzip'd responses; HTTP/2 is on for clients that speak it (browsers).
    """

    stack = "https-nginx"
    server = "nginx (TLS 1.3, HTTP/2, gzip) in front of stock Synapse"

    def __init__(self, root: Path, profile: LinkProfile, seed: int) -> None:
        super().__init__(root, profile, seed)
        self.nginx: Any = None

    async def start(self) -> None:
        if tshark_path() is None:
            raise CaptureError("tshark is not installed: cannot count the HTTPS stack")
        nginx = nginx_path()
        if nginx is None:
            raise CaptureError("nginx is not installed (scripts/setup installs it as root)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls_port = free_port()
        self.helper_port = free_port()
        backend = free_port()
        hs_dir = self.root / "hs"
        cert, key = self_signed_certificate(hs_dir)
        plain = {"type": "http", "tls": False, "bind_addresses": ["127.0.0.1"]}
        listeners = [
            {**plain, "port": self.helper_port, "resources": [{"names": ["client"]}]},
            {
                **plain,
                "port": backend,
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            },
        ]
        self.syn = SynapseProcess(
            hs_dir,
            SERVER_NAME,
            http_port=self.helper_port,
            extra_config={**_COMMON, "listeners": listeners},
        )
        progress(f"{self.tag} starting stock Synapse behind nginx (HTTPS on tcp/{self.tls_port})")
        await asyncio.to_thread(self.syn.start, 120.0)
        self.nginx = await asyncio.to_thread(
            launch_nginx,
            nginx,
            self.root / "nginx",
            port=self.tls_port,
            cert=cert,
            key=key,
            backend=backend,
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.marker, self.marker_port = sock, sock.getsockname()[1]
        self.capture = LoopbackCapture(
            f"tcp port {self.tls_port} or udp dst port {self.marker_port}", directory=self.root
        )
        await asyncio.to_thread(self.capture.start)
        await self.set_scene()

    async def close(self) -> None:
        await super().close()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            try:
                await asyncio.to_thread(self.nginx.wait, 10)
            except Exception:
                self.nginx.kill()


def make_stack(stack: str, root: Path, profile: LinkProfile, seed: int) -> Stack:
    if stack == "coap":
        return CoapStack(root / "coap", profile, seed)
    if stack == "https":
        return HttpsStack(root / "https", profile, seed)
    if stack == "https-nginx":
        return NginxStack(root / "https-nginx", profile, seed)
    raise ValueError(f"unknown stack {stack!r}")


# -- the scenarios ---------------------------------------------------------------------------


class ScenarioFailed(RuntimeError):
    pass


async def _expect(what: str, coro: Awaitable[Any], cls_name: str) -> Any:
    import nio

    r = await coro
    if not isinstance(r, getattr(nio, cls_name)):
        raise ScenarioFailed(f"{what}: {r!r}")
    return r


def _has_body(resp: Any, room_id: str, body: str) -> bool:
    room = resp.rooms.join.get(room_id)
    return room is not None and any(
        getattr(ev, "body", None) == body for ev in room.timeline.events
    )


async def run_client_suite(
    stack: Stack, scenarios: tuple[str, ...], idle_seconds: float
) -> list[ScenarioResult]:
    """Run the client scenarios in order on a started stack; one result per scenario."""
    alice = stack.new_nio()
    assert stack.bob is not None
    bob = stack.bob
    names: list[str] = []
    seconds: list[float] = []
    oks: list[bool] = []
    notes: list[str] = []
    room_id = stack.room_id
    logged_in = False
    try:
        await stack.quiet()
        await stack.mark()
        plan: list[str] = []
        for name in scenarios:
            if name == "receive" and plan:
                plan.append("_catch-up")  # not reported: brings alice's sync token up to date
            plan.append(name)
        for name in plan:
            t0 = time.monotonic()
            note = ""
            ok = True
            try:
                if name != "login" and not logged_in:
                    raise ScenarioFailed("needs the login scenario first")
                if name == "login":
                    await _expect(
                        "login", alice.login(PASSWORD, device_name="lab"), "LoginResponse"
                    )
                    logged_in = True
                elif name == "_catch-up":
                    # receive measures an idle client that is up to date: what alice's own
                    # send left for her (its echo) must be delivered first. With push it
                    # comes as a notification after the sync (at 100 bit/s: a registration
                    # and a notification, about 45 s): let the link settle, then take it
                    # from the sidecar (no link bytes).
                    await _expect("catch-up sync", alice.sync(timeout=0), "SyncResponse")
                    await stack.quiet(catch_up_settle(stack.profile))
                    await _expect("catch-up sync", alice.sync(timeout=0), "SyncResponse")
                elif name == "initial-sync":
                    r = await _expect(
                        "initial sync", alice.sync(timeout=0, full_state=True), "SyncResponse"
                    )
                    note = f"{len(r.rooms.join)} room(s)"
                elif name == "send":
                    hello = NAMES.text(14)
                    r = await _expect(
                        "send",
                        alice.room_send(
                            room_id,
                            "m.room.message",
                            {"msgtype": "m.text", "body": hello},
                        ),
                        "RoomSendResponse",
                    )
                    note = f"event id {r.event_id}"
                    await bob.wait_for_message(room_id, hello, 600)
                elif name == "receive":
                    text = NAMES.text(19)
                    task = asyncio.ensure_future(alice.sync(timeout=30000))
                    await asyncio.sleep(0.2)
                    t0 = time.monotonic()  # time from bob's send to alice's sync returning it
                    await bob.send(room_id, text)
                    r = await task
                    tries = 0
                    while not _has_body(r, room_id, text):
                        tries += 1
                        if tries > 5:
                            raise ScenarioFailed("alice's sync did not return bob's message")
                        r = await alice.sync(timeout=30000)
                elif name == "upload":
                    png = noisy_png()
                    up, _ = await alice.upload(
                        io.BytesIO(png),
                        content_type="image/png",
                        filename="noise.png",
                        filesize=len(png),
                    )
                    import nio

                    if not isinstance(up, nio.UploadResponse):
                        raise ScenarioFailed(f"upload: {up!r}")
                    note = f"{len(png)} B PNG, {up.content_uri}"
                elif name == "idle":
                    polls = 0
                    while time.monotonic() - t0 < idle_seconds - 1.0:
                        left = idle_seconds - (time.monotonic() - t0)
                        try:
                            # nio retries a timed-out sync on its own, for ever: bound it
                            await asyncio.wait_for(
                                _expect(
                                    "idle sync",
                                    alice.sync(timeout=int(min(30.0, max(1.0, left)) * 1000)),
                                    "SyncResponse",
                                ),
                                left + IDLE_GRACE,
                            )
                        except asyncio.TimeoutError:
                            raise ScenarioFailed(
                                f"idle: a sync did not return within {IDLE_GRACE:g} s after "
                                f"the {idle_seconds:g} s idle period ({polls} returned)"
                            ) from None
                        polls += 1
                    note = f"{idle_seconds:g} s, {polls} long-poll /sync of <= 30 s"
                else:
                    raise ScenarioFailed(f"unknown client scenario {name!r}")
            except (ScenarioFailed, asyncio.TimeoutError, OSError) as exc:
                ok, note = False, f"FAILED: {exc}"[:300]
            elapsed = time.monotonic() - t0
            await stack.quiet()
            await stack.mark()
            if not name.startswith("_"):
                progress(f"{stack.tag} {name}: {'ok' if ok else note} in {elapsed:.2f} s")
            names.append(name)
            seconds.append(elapsed)
            oks.append(ok)
            notes.append(note)
            if not ok and name == "login":
                break
    finally:
        await alice.close()
    windows = await stack.windows()
    out = []
    for i, name in enumerate(names):
        if name.startswith("_"):
            continue
        w = windows[i] if i < len(windows) else Window(0, 0, 0, 0, 0, 0)
        secs, time_method = seconds[i], "measured"
        if stack.stack.startswith("https") and stack.profile.name != "lan":
            secs, time_method = (
                modelled_seconds(stack.profile, w.up_bytes, w.down_bytes, w.round_trips),
                "model",
            )
            if name == "idle":
                secs = seconds[i]
        out.append(
            ScenarioResult(
                scenario=name,
                stack=stack.stack,
                profile=stack.profile.name,
                ip_bytes=w.ip_bytes,
                packets=w.packets,
                round_trips=w.round_trips,
                seconds=round(secs, 3),
                retransmissions=w.retransmissions,
                method=stack.method,
                # an idle minute may cost nothing at all (no keep-alive due yet): that is
                # success, not a scenario that never reached the link
                ok=oks[i] and (w.ip_bytes > 0 or name == "idle"),
                note=notes[i],
                up_bytes=w.up_bytes,
                down_bytes=w.down_bytes,
                time_method=time_method,
                server=stack.server,
            )
        )
    return out


async def client_suite(
    root: Path,
    profile: LinkProfile,
    seed: int,
    stacks: tuple[str, ...],
    scenarios: tuple[str, ...],
    idle_seconds: float,
) -> list[ScenarioResult]:
    """Both stacks side by side (concurrently: they share nothing but the CPU)."""

    async def one(name: str) -> list[ScenarioResult]:
        stack = make_stack(name, root, profile, seed)
        try:
            await stack.start()
            return await run_client_suite(stack, scenarios, idle_seconds)
        except Exception as exc:
            progress(f"[{name}] client scenarios FAILED: {type(exc).__name__}: {exc}")
            return [
                ScenarioResult(
                    s, name, profile.name, 0, 0, 0, 0.0, ok=False, note=f"FAILED: {exc}"[:300]
                )
                for s in scenarios
            ]
        finally:
            await stack.close()
            stack.kill()

    results = await asyncio.gather(*(one(s) for s in stacks))
    return [r for rs in results for r in rs]


# -- message delivery through the sidecar (sweeps, must-show runs) ---------------------------


@attrs.frozen
class Delivery:
    """Messages sent by alice (nio, through the sidecar) and received by bob (helper)."""

    profile: str
    sent: int
    event_ids: tuple[str, ...]
    seconds: tuple[float, ...]
    ip_bytes: int
    packets: int
    round_trips: int
    retransmissions: int
    lost: int
    in_order_exactly_once: bool
    #: sends the client repeated (same transaction id) after a 502/504 from the sidecar
    client_retries: int = 0


async def history(stack: Stack, prefix: str) -> list[str]:
    """Bodies starting with ``prefix`` in the room's history as bob's server has it, oldest
    first (read over the uncounted helper listener)."""
    assert stack.bob is not None
    out: list[str] = []
    token: str | None = None
    for _ in range(50):
        query: dict[str, Any] = {"dir": "f", "limit": 500}
        if token:
            query["from"] = token
        page = await stack.bob.call(
            "GET", f"/rooms/{urllib.parse.quote(stack.room_id, safe='')}/messages", **query
        )
        for ev in page.get("chunk", []):
            body = ev.get("content", {}).get("body")
            if (
                ev.get("type") == "m.room.message"
                and isinstance(body, str)
                and body.startswith(prefix)
            ):
                out.append(body)
        token = page.get("end")
        if not page.get("chunk") or not token:
            break
    return out


#: what a Matrix client does when a send fails with a gateway error: matrix-js-sdk (Element)
#: retries an event send on 502/503/504 and network errors, with backoff, keeping the
#: transaction id, so the homeserver deduplicates it.
CLIENT_SEND_ATTEMPTS = 4
RETRIED_STATUSES = (502, 503, 504)


async def send_like_a_client(alice: Any, room_id: str, text: str, what: str) -> tuple[Any, int]:
    """Send one message as a real client would: on 502/503/504 from the sidecar (the CoAP
    link gave up or timed out), try again with the *same* transaction id, up to
    CLIENT_SEND_ATTEMPTS in all. Returns the response and how many retries it took."""
    import nio

    tx_id = str(uuid.uuid4())
    content = {"msgtype": "m.text", "body": text}
    for attempt in range(CLIENT_SEND_ATTEMPTS):
        r = await alice.room_send(room_id, "m.room.message", content, tx_id=tx_id)
        if isinstance(r, nio.RoomSendResponse):
            return r, attempt
        status = getattr(getattr(r, "transport_response", None), "status", None)
        if status not in RETRIED_STATUSES or attempt + 1 == CLIENT_SEND_ATTEMPTS:
            raise ScenarioFailed(f"{what}: {r!r}")
        progress(f"{what}: the sidecar answered {status}; retrying with the same transaction id")
        await asyncio.sleep(2.0 * 2**attempt)
    raise AssertionError("unreachable")


async def deliver_messages(
    stack: CoapStack,
    count: int,
    prefix: str,
    *,
    warm: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> Delivery:
    """Alice sends ``count`` messages one after the other through the sidecar; each is awaited
    until bob's sync sees it. Counts what crossed the relay during the sends."""
    assert stack.bob is not None and stack.alice_helper is not None
    alice = stack.new_nio()
    alice.restore_login(stack.alice_user, "LAB", stack.alice_helper.token or "")
    bob = stack.bob
    try:
        if warm:  # the handshake and the first RTT samples, not measured
            r = await _expect(
                "warm-up send",
                alice.room_send(
                    stack.room_id, "m.room.message", {"msgtype": "m.text", "body": f"{prefix}warm"}
                ),
                "RoomSendResponse",
            )
            await bob.wait_for_message(stack.room_id, f"{prefix}warm", 1800)
            await stack.quiet()
        await bob.sync()
        loop = asyncio.get_running_loop()
        assert stack.relay is not None
        start = relay_snapshot([stack.relay], loop.time())
        retrans0 = await asyncio.to_thread(stack._retransmissions)
        seconds: list[float] = []
        ids: list[str] = []
        client_retries = 0
        for i in range(count):
            text = f"{prefix}{i:04d}"
            t0 = time.monotonic()
            r, retried = await send_like_a_client(alice, stack.room_id, text, f"send {i}")
            client_retries += retried
            ids.append(str(r.event_id))
            await bob.wait_for_message(stack.room_id, text, 1800)
            seconds.append(time.monotonic() - t0)
            if on_progress is not None:
                on_progress(i + 1)
        await stack.quiet()
        end = relay_snapshot([stack.relay], loop.time())
        retrans = await asyncio.to_thread(stack._retransmissions) - retrans0
        d = end - start
        got = await history(stack, prefix)
        expected = [f"{prefix}{i:04d}" for i in range(count)]
        return Delivery(
            profile=stack.profile.name,
            sent=count,
            event_ids=tuple(ids),
            seconds=tuple(seconds),
            ip_bytes=d.up_bytes + d.down_bytes,
            packets=d.packets,
            round_trips=relay_round_trips([stack.relay], start, end),
            retransmissions=retrans,
            lost=d.lost,
            in_order_exactly_once=[b for b in got if b != f"{prefix}warm"] == expected,
            client_retries=client_retries,
        )
    finally:
        await alice.close()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
