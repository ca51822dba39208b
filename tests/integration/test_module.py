"""The Synapse module end to end: a real Synapse with NO HTTP client listener, spoken to
over CoAP + Noise (and plain CoAP with libcoap's coap-client on loopback).

One Synapse per reactor mode: the default epoll reactor (the module's asyncio loop
driven from the reactor's thread) and Twisted's asyncio reactor via
SYNAPSE_ASYNC_IO_REACTOR=1; every test runs against both. The default reactor with
``asyncio_loop: thread`` (the loop in a thread of its own) serves the sessions gauge
test, on a Synapse of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest

from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from tests.harness.synapse_proc import (
    AUTHENTICATED_MEDIA,
    SynapseProcess,
    free_port,
    scrape_metrics,
    synapse_version,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")

SERVER_NAME = "coap.test"
READY = r"synapse-coap: CoAP listener ready"


class Homeserver:
    """A running Synapse with the module, plus what the tests need to reach it."""

    def __init__(
        self,
        proc: SynapseProcess,
        port: int,
        plain_port: int,
        key_path: Path,
        mode: str = "default",
    ) -> None:
        self.proc = proc
        self.mode = mode
        self.port = port
        self.plain_port = plain_port
        self.key_path = key_path
        from synapse_coap.noise.keys import public_key, read_key_file

        self.public_key = public_key(read_key_file(key_path))

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.proc.metrics_port}/_synapse/metrics"

    def metrics(self) -> str:
        return scrape_metrics(self.metrics_url)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="module", params=["default", "asyncio"])
def homeserver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Homeserver]:
    mode = request.param
    hs = start_homeserver(tmp_path_factory.mktemp(f"hs-{mode}"), mode)
    try:
        yield hs
    finally:
        hs.proc.stop()
    log = hs.proc.log_text()
    # shut down cleanly, in the mode asked for
    expected = {
        "asyncio": ["sharing the asyncio reactor's event loop"],
        "default": ["event loop on the reactor thread", "asyncio loop closed"],
    }[mode]
    for line in expected:
        assert line in log


def start_homeserver(workdir: Path, mode: str) -> Homeserver:
    """A running Synapse loading the module, with no HTTP client listener (caller stops it)."""
    port = free_port("udp")
    plain_port = free_port("udp")
    key_path = workdir / "keys" / "coap_noise.key"
    key_path.parent.mkdir()
    # default: Synapse's epoll reactor, the module's loop driven from its thread;
    # thread: the same reactor, the module's loop in a thread of its own
    env = {"SYNAPSE_ASYNC_IO_REACTOR": "1"} if mode == "asyncio" else {}
    loop_config = {"asyncio_loop": "thread"} if mode == "thread" else {}
    proc = SynapseProcess(
        workdir,
        SERVER_NAME,
        http_port=None,  # no HTTP client listener at all
        metrics_port=free_port(),
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [f"127.0.0.1:{port}"],
                    "plain_listen": [f"127.0.0.1:{plain_port}"],
                    "private_key_path": str(key_path),
                    **loop_config,
                },
            }
        ],
        extra_config={"max_upload_size": "10M"},
        env=env,
    )
    proc.start(ready_log_pattern=READY)
    try:
        return Homeserver(proc, port, plain_port, key_path, mode)
    except BaseException:
        proc.stop()
        raise


class Client:
    """A CoAP+Noise client session to the module (the transport's CoapClient)."""

    def __init__(self, hs: Homeserver, client: Any) -> None:
        self.hs = hs
        self.client = client
        from synapse_coap.transport.client import Endpoint

        self.endpoint = Endpoint(
            "127.0.0.1", hs.port, peer_name=SERVER_NAME, static_key=hs.public_key, secure=True
        )
        self.token: str | None = None

    async def request(
        self,
        method: str,
        target: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        token: str | None = None,
        timeout: float = 60.0,
    ) -> HttpResponse:
        headers: list[tuple[str, str]] = []
        data = b""
        if raw is not None:
            data = raw
            headers.append(("content-type", content_type))
        elif body is not None:
            data = json.dumps(body).encode()
            headers.append(("content-type", "application/json"))
        tok = token or self.token
        if tok:
            headers.append(("authorization", f"Bearer {tok}"))
        return await self.client.request(  # type: ignore[no-any-return]
            self.endpoint,
            HttpRequest(method, target.encode(), tuple(headers), data),
            timeout=timeout,
        )

    async def json(self, method: str, target: str, body: Any = None, **kw: Any) -> Any:
        resp = await self.request(method, target, body, **kw)
        assert resp.status == 200, (resp.status, resp.body[:500])
        return json.loads(resp.body)


def run(hs: Homeserver, fn: Callable[..., Awaitable[T]], n_clients: int = 1) -> T:
    """Run ``fn(*clients)`` in a fresh event loop with ``n_clients`` Noise sessions."""

    async def main() -> T:
        from synapse_coap.noise.keys import generate_private_key
        from synapse_coap.noise.trust import TrustPolicy
        from synapse_coap.transport.client import CoapClient

        clients = []
        try:
            for _ in range(n_clients):
                c = await CoapClient.create(
                    static_key=generate_private_key(),
                    trust=TrustPolicy(pinned={SERVER_NAME: hs.public_key}),
                    bind=("127.0.0.1", 0),
                )
                clients.append(Client(hs, c))
            return await fn(*clients)
        finally:
            for c in clients:
                await c.client.close()

    return asyncio.run(main())


_users = iter(range(10_000))


async def register(c: Client, prefix: str) -> str:
    """Register a fresh user (no email, no captcha), then log in; returns the user id."""
    name = f"{prefix}{next(_users)}"
    body = {
        "username": name,
        "password": "correct horse battery",
        "auth": {"type": "m.login.dummy"},
    }
    reg = await c.json("POST", "/_matrix/client/v3/register", body)
    assert reg["user_id"] == f"@{name}:{SERVER_NAME}"
    login = await c.json(
        "POST",
        "/_matrix/client/v3/login",
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": name},
            "password": "correct horse battery",
        },
    )
    assert login["user_id"] == reg["user_id"]
    c.token = login["access_token"]
    return str(login["user_id"])


def test_key_file_generated_private_and_logged(homeserver: Homeserver) -> None:
    from synapse_coap.noise.keys import encode_public

    mode = stat.S_IMODE(os.stat(homeserver.key_path).st_mode)
    assert mode == 0o600
    log = homeserver.proc.log_text()
    line = next(line for line in log.splitlines() if re.search(READY, line))
    assert encode_public(homeserver.public_key) in line
    # the private key never reaches the log
    private = homeserver.key_path.read_text().split("\n")
    secret = next(p for p in private if p and not p.startswith("#"))
    assert secret not in log


def test_the_reactor_reads_the_noise_socket_with_the_default_reactor(
    homeserver: Homeserver,
) -> None:
    line = next(line for line in homeserver.proc.log_text().splitlines() if re.search(READY, line))
    # the guest loop's driver reads the listener's socket itself (guestloop.py); with the
    # asyncio reactor the shared loop reads it
    assert ("guest reactor mode, Noise sockets read by the reactor" in line) == (
        homeserver.mode == "default"
    ), line


def test_client_scenario(homeserver: Homeserver) -> None:
    """Register, log in, create a room, send, /sync sees it; a long-poll wakes on a message."""

    async def scenario(alice: Client, bob: Client) -> None:
        alice_id = await register(alice, "alice")
        bob_id = await register(bob, "bob")
        room = await alice.json(
            "POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat", "name": "coap"}
        )
        room_id = room["room_id"]
        await bob.json("POST", f"/_matrix/client/v3/join/{quote(room_id)}", {})

        sent = await alice.json(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/t1",
            {"msgtype": "m.text", "body": "hello over CoAP"},
        )
        sync = await alice.json("GET", "/_matrix/client/v3/sync")
        timeline = sync["rooms"]["join"][room_id]["timeline"]["events"]
        assert any(
            e["event_id"] == sent["event_id"] and e["content"]["body"] == "hello over CoAP"
            for e in timeline
        )

        # Long-poll: alice waits; once Synapse holds her /sync, bob sends.
        since = sync["next_batch"]
        target = f"/_matrix/client/v3/sync?timeout=60000&since={quote(since)}"
        poll = asyncio.ensure_future(alice.json("GET", target, timeout=120))
        await wait_for_parked_sync(homeserver, poll)
        sent2 = await bob.json(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/t2",
            {"msgtype": "m.text", "body": "wake up"},
        )
        sent_at = time.monotonic()
        woke = await asyncio.wait_for(poll, 60)
        woke_after = time.monotonic() - sent_at
        print(f"long-poll /sync woke {woke_after * 1000:.1f} ms after the send completed")
        events = woke["rooms"]["join"][room_id]["timeline"]["events"]
        assert [e["event_id"] for e in events] == [sent2["event_id"]]
        assert events[0]["sender"] == bob_id and alice_id != bob_id
        # the wake-up relative to the send (not absolute speed): well within a second
        assert woke_after < 1.0, f"long-poll woke {woke_after:.3f} s after the send"

    run(homeserver, scenario, n_clients=2)


def test_abandoned_long_poll_loses_its_synapse_connection(homeserver: Homeserver) -> None:
    """A long-poll /sync whose CoAP exchange the client gives up loses its connection in
    Synapse (as a dropped TCP connection would: Synapse then cancels a cancellable
    servlet), instead of running on unseen. (Synapse 1.163 keeps a /sync parked after a
    lost connection over its own HTTP listener too, so the in-flight count is no test.)"""

    async def scenario(c: Client) -> None:
        await register(c, "quitter")
        since = (await c.json("GET", "/_matrix/client/v3/sync"))["next_batch"]
        target = f"/_matrix/client/v3/sync?timeout=60000&since={quote(since)}&quit=1"
        poll = asyncio.ensure_future(c.request("GET", target, timeout=120))
        await wait_for_parked_sync(homeserver, poll)
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
        deadline = time.monotonic() + 20
        while not re.search(
            r"CoAP exchange abandoned by .* GET /_matrix/client/v3/sync\?.*quit=1\n"
            r"(.*\n)*.* - (GET-\d+) - Connection from client lost before response was sent",
            homeserver.proc.log_text(),
        ):
            assert time.monotonic() < deadline, "the abandoned /sync kept its connection"
            await asyncio.sleep(0.05)

    run(homeserver, scenario)


async def wait_for_parked_sync(hs: Homeserver, poll: asyncio.Future[Any]) -> None:
    """Until Synapse reports an in-flight /sync (its own metric), without fixed sleeps."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if poll.done():
            raise AssertionError(f"/sync returned before anything was sent: {poll.result()}")
        text = await asyncio.to_thread(hs.metrics)
        if (
            metric_value(
                text, "synapse_http_server_in_flight_requests_count", servlet="SyncRestServlet"
            )
            >= 1
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the long-poll /sync never reached Synapse")


@AUTHENTICATED_MEDIA
def test_media_upload_download_256k(homeserver: Homeserver) -> None:
    data = os.urandom(256 * 1024)

    async def scenario(c: Client) -> None:
        await register(c, "media")
        up = await c.json(
            "POST",
            "/_matrix/media/v3/upload?filename=blob.bin",
            raw=data,
            content_type="application/octet-stream",
        )
        mxc = up["content_uri"]
        assert mxc.startswith(f"mxc://{SERVER_NAME}/")
        resp = await c.request("GET", f"/_matrix/client/v1/media/download/{mxc[len('mxc://') :]}")
        assert resp.status == 200
        assert resp.body == data
        assert (resp.header("content-type") or "").startswith("application/octet-stream")

    run(homeserver, scenario)


def test_federation_endpoints(homeserver: Homeserver) -> None:
    from signedjson.key import decode_verify_key_bytes, read_signing_keys
    from signedjson.sign import verify_signed_json

    async def scenario(c: Client) -> tuple[HttpResponse, HttpResponse, HttpResponse]:
        version = await c.request("GET", "/_matrix/federation/v1/version")
        keys = await c.request("GET", "/_matrix/key/v2/server")
        profile = await c.request(
            "GET", f"/_matrix/federation/v1/query/profile?user_id={quote('@x:' + SERVER_NAME)}"
        )
        return version, keys, profile

    version, keys, profile = run(homeserver, scenario)
    assert version.status == 200
    assert json.loads(version.body) == {"server": {"name": "Synapse", "version": synapse_version()}}

    assert keys.status == 200
    doc = json.loads(keys.body)
    assert doc["server_name"] == SERVER_NAME
    with open(homeserver.proc.signing_key_path) as f:
        signing_key = read_signing_keys(f)[0]
    key_id = f"ed25519:{signing_key.version}"
    published = base64.b64decode(doc["verify_keys"][key_id]["key"] + "==")
    verify_key = decode_verify_key_bytes(key_id, published)
    assert verify_key.encode() == signing_key.verify_key.encode()
    verify_signed_json(doc, SERVER_NAME, verify_key)  # raises if the signature is broken

    assert profile.status == 401
    assert json.loads(profile.body)["errcode"] == "M_UNAUTHORIZED"


COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin's coap-client-notls is not installed")
def test_libcoap_client_against_plain_listener(homeserver: Homeserver) -> None:
    assert COAP_CLIENT is not None
    base = f"coap://127.0.0.1:{homeserver.plain_port}"

    def coap_get(path: str, *extra: str) -> bytes:
        out = subprocess.run(
            [COAP_CLIENT, "-m", "get", "-B", "20", *extra, base + path],
            capture_output=True,
            timeout=30,
            check=True,
        )
        return out.stdout

    core = coap_get("/.well-known/core").decode()
    # RFC 6690 link format: the listener lists itself and what the module serves
    # (ServerConfig.resources; the module keeps the defaults).
    links = core.strip().split(",")
    assert "</.well-known/core>;ct=40" in links, core
    for path in (
        "/_matrix/client",
        "/_matrix/federation",
        "/_matrix/key",
        "/_matrix/media",
        "/.well-known/matrix",
    ):
        assert any(link.startswith(f"<{path}>;") for link in links), (path, core)
    versions_coap = json.loads(coap_get("/_matrix/client/versions", "-A", "50"))

    async def over_noise(c: Client) -> Any:
        return await c.json("GET", "/_matrix/client/versions")

    versions_noise = run(homeserver, over_noise)
    assert versions_coap == versions_noise
    assert "v1.1" in versions_coap["versions"]


def test_metrics_move(homeserver: Homeserver) -> None:
    before = homeserver.metrics()

    async def scenario(c: Client) -> None:
        for _ in range(3):
            await c.json("GET", "/_matrix/client/versions")

    run(homeserver, scenario)
    after = homeserver.metrics()
    labels = {"server_name": SERVER_NAME}
    for name, extra in [
        ("synapse_coap_requests_total", {"status": "200"}),
        ("synapse_coap_datagrams_total", {"direction": "in"}),
        ("synapse_coap_datagrams_total", {"direction": "out"}),
        ("synapse_coap_bytes_total", {"direction": "in"}),
        ("synapse_coap_handshakes_total", {}),
        ("synapse_coap_request_seconds_count", {}),
    ]:
        b = metric_value(before, name, **labels, **extra)
        a = metric_value(after, name, **labels, **extra)
        assert a > b, f"{name}{extra} did not move: {b} -> {a}"
    assert metric_value(after, "synapse_coap_requests_total", **labels) >= 3
    # Synapse's own per-servlet metrics see the CoAP requests too (tag "coap")
    assert "synapse_http_server_requests_received_total" in after


def test_client_ip_is_the_udp_peer(homeserver: Homeserver) -> None:
    """Synapse records the CoAP client's real UDP source address (user_ips), as for HTTP."""

    async def scenario(c: Client) -> str:
        user_id = await register(c, "ip")
        await c.json("GET", "/_matrix/client/v3/account/whoami")
        return user_id

    user_id = run(homeserver, scenario)
    db = sqlite3.connect(f"file:{homeserver.proc.database_path}?mode=ro", uri=True)
    try:
        deadline = time.monotonic() + 30  # Synapse writes client IPs in batches (every 5 s)
        rows: list[tuple[str]] = []
        while time.monotonic() < deadline and not rows:
            rows = db.execute("SELECT ip FROM user_ips WHERE user_id = ?", (user_id,)).fetchall()
            if not rows:
                time.sleep(0.25)
    finally:
        db.close()
    assert rows, "Synapse recorded no client IP for the CoAP user"
    assert {ip for (ip,) in rows} == {"127.0.0.1"}  # the client's socket is bound to 127.0.0.1


def test_body_over_synapse_limit_gets_413(homeserver: Homeserver) -> None:
    """max_upload_size 10M makes Synapse's max_request_body_size 10 MiB; one byte more is 413."""

    async def scenario(c: Client) -> HttpResponse:
        await register(c, "big")
        return await c.request(
            "POST",
            "/_matrix/media/v3/upload?filename=big.bin",
            raw=b"\0" * (10 * 1024 * 1024 + 1),
            content_type="application/octet-stream",
        )

    resp = run(homeserver, scenario)
    assert resp.status == 413, (resp.status, resp.body[:300])


def test_sessions_gauge_counts_the_live_session(tmp_path: Path) -> None:
    """On a fresh server (its own process: the gauge must not lean on earlier sessions),
    with the module's asyncio loop in a thread of its own (``asyncio_loop: thread``)."""
    labels = {"server_name": SERVER_NAME}
    homeserver = start_homeserver(tmp_path, "thread")

    async def scenario(c: Client) -> float:
        await register(c, "live")  # a pinned-key (IK) Noise session, alive until run() ends
        text = await asyncio.to_thread(homeserver.metrics)
        return metric_value(text, "synapse_coap_sessions", **labels)

    try:
        live = run(homeserver, scenario)
    finally:
        homeserver.proc.stop()
    assert live >= 1, "synapse_coap_sessions did not count the live session"
    log = homeserver.proc.log_text()
    assert "event loop in thread" in log and "asyncio thread joined" in log


def test_retransmissions_metric_moves(homeserver: Homeserver) -> None:
    """A confirmable response the link loses is retransmitted, and counted."""
    from synapse_coap.lab.model import PROFILES
    from synapse_coap.lab.relay import Relay, RelayConfig
    from synapse_coap.transport.client import Endpoint

    labels = {"server_name": SERVER_NAME}
    before = metric_value(homeserver.metrics(), "synapse_coap_retransmissions_total", **labels)

    async def scenario(c: Client) -> float:
        lan = PROFILES["lan"]
        async with await Relay.start(
            RelayConfig(listen=("127.0.0.1", 0), upstream=("127.0.0.1", homeserver.port))
        ) as relay:
            host, port = relay.address[:2]
            c.endpoint = Endpoint(
                host, port, peer_name=SERVER_NAME, static_key=homeserver.public_key, secure=True
            )
            await register(c, "rtx")
            since = (await c.json("GET", "/_matrix/client/v3/sync"))["next_batch"]
            # A long-poll is answered late, as a separate confirmable response; the
            # link then loses everything, so the server has to retransmit it.
            poll = asyncio.ensure_future(
                c.json(
                    "GET", f"/_matrix/client/v3/sync?timeout=2000&since={quote(since)}", timeout=60
                )
            )
            await wait_for_parked_sync(homeserver, poll)
            relay.set_profile(lan.with_changes(loss=1.0))
            deadline = time.monotonic() + 45
            after = before
            while time.monotonic() < deadline and after <= before:
                await asyncio.sleep(0.2)
                after = metric_value(
                    await asyncio.to_thread(homeserver.metrics),
                    "synapse_coap_retransmissions_total",
                    **labels,
                )
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
            return after

    after = run(homeserver, scenario)
    assert after > before, "synapse_coap_retransmissions_total did not move"
