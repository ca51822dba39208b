"""An unmodified matrix-nio client through the sidecar, end to end, with real processes.

- (loopback) sidecar -> HttpDispatcher in-process -> stock Synapse: the two HTTP
  halves compose, without the CoAP transport in between;
- (gateway) sidecar process -> CoAP+Noise -> gateway process -> stock Synapse
  (HTTP listener, no module);
- (module) sidecar process -> CoAP+Noise -> Synapse loading the module;
- (outage) the gateway/homeserver dies while the client syncs: the client gets
  502/504, and carries on after it returns without the sidecar being restarted.

The Matrix scenario (both users' clients are nio.AsyncClient, unmodified):
register, log in, create a room, invite a second user who joins through a
second sidecar, messages both ways via sync, image upload + byte-identical
download, display name, log out.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from synapse_coap.mapping.dispatch import PeerInfo
from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.proxy.gateway import HttpDispatcher
from synapse_coap.proxy.sidecar import Sidecar, SidecarOptions
from tests.harness.synapse_proc import SynapseProcess, free_port, scrape_metrics

nio = pytest.importorskip("nio")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SYNAPSE_COAP = str(Path(sys.executable).with_name("synapse-coap"))


def tiny_png(width: int = 32, height: int = 32) -> bytes:
    """A valid RGB PNG with a gradient (so thumbnailers accept it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(
        b"\x00" + b"".join(bytes((x * 8 % 256, y * 8 % 256, (x + y) % 256)) for x in range(width))
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# -- the Matrix scenario -----------------------------------------------------------------------


async def sync_until(
    client: Any, predicate: Callable[[Any], bool], what: str, deadline: float = 30.0
) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        resp = await client.sync(timeout=1000)
        if isinstance(resp, nio.SyncResponse) and predicate(resp):
            return resp
    raise AssertionError(f"timed out waiting for {what}")


def has_message(room_id: str, body: str) -> Callable[[Any], bool]:
    def check(resp: Any) -> bool:
        room = resp.rooms.join.get(room_id)
        if room is None:
            return False
        return any(getattr(ev, "body", None) == body for ev in room.timeline.events)

    return check


async def matrix_scenario(url_a: str, url_b: str, tag: str) -> dict[str, Any]:
    """Everything issue 6 asks a client to do. Returns facts for the caller to check."""
    facts: dict[str, Any] = {}
    alice_reg = nio.AsyncClient(url_a, f"alice{tag}")
    bob = nio.AsyncClient(url_b, f"bob{tag}")
    alice = nio.AsyncClient(url_a, f"alice{tag}")
    try:
        r = await alice_reg.register(f"alice{tag}", "alice-password-1")
        assert isinstance(r, nio.RegisterResponse), r
        r = await bob.register(f"bob{tag}", "bob-password-1")
        assert isinstance(r, nio.RegisterResponse), r
        # A second device logs in with the password (the login flow over the link).
        r = await alice.login("alice-password-1", device_name="through the sidecar")
        assert isinstance(r, nio.LoginResponse), r
        await alice_reg.close()

        await alice.sync(timeout=0, full_state=True)
        await bob.sync(timeout=0, full_state=True)

        r = await alice.room_create(name="over coap", invite=[])
        assert isinstance(r, nio.RoomCreateResponse), r
        room_id = r.room_id
        r = await alice.room_invite(room_id, bob.user_id)
        assert isinstance(r, nio.RoomInviteResponse), r

        await sync_until(bob, lambda s: room_id in s.rooms.invite, "bob's invite")
        r = await bob.join(room_id)
        assert isinstance(r, nio.JoinResponse), r

        r = await alice.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": "hello bob, over CoAP"}
        )
        assert isinstance(r, nio.RoomSendResponse), r
        await sync_until(bob, has_message(room_id, "hello bob, over CoAP"), "alice's message")

        r = await bob.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": "hi alice ✓ ünïcode"}
        )
        assert isinstance(r, nio.RoomSendResponse), r
        await sync_until(alice, has_message(room_id, "hi alice ✓ ünïcode"), "bob's message")

        png = tiny_png()
        up, _ = await alice.upload(
            io.BytesIO(png), content_type="image/png", filename="gradient.png", filesize=len(png)
        )
        assert isinstance(up, nio.UploadResponse), up
        r = await alice.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.image", "body": "gradient.png", "url": up.content_uri},
        )
        assert isinstance(r, nio.RoomSendResponse), r
        dl = await bob.download(mxc=up.content_uri)
        assert isinstance(dl, nio.DownloadResponse), dl
        facts["download_identical"] = dl.body == png
        facts["download_type"] = dl.content_type

        r = await alice.set_displayname(f"Alice {tag} (CoAP)")
        assert isinstance(r, nio.ProfileSetDisplayNameResponse), r
        name = await bob.get_displayname(alice.user_id)
        assert isinstance(name, nio.ProfileGetDisplayNameResponse), name
        facts["displayname"] = name.displayname

        token = alice.access_token
        for c in (alice, bob):
            r = await c.logout()
            assert isinstance(r, nio.LogoutResponse), r
        # The old token is dead now (the request still crosses the link).
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                url_a + "/_matrix/client/v3/account/whoami",
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            facts["after_logout"] = (resp.status, (await resp.json())["errcode"])
        facts["room_id"] = room_id
        return facts
    finally:
        for c in (alice_reg, alice, bob):
            await c.close()


def check_facts(facts: dict[str, Any], tag: str) -> None:
    assert facts["download_identical"] is True
    assert facts["download_type"] == "image/png"
    assert facts["displayname"] == f"Alice {tag} (CoAP)"
    assert facts["after_logout"] == (401, "M_UNKNOWN_TOKEN")


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseProcess]:
    syn = SynapseProcess(
        tmp_path_factory.mktemp("hs"),
        "hs.test",
        http_port=free_port(),
        metrics_port=free_port(),
        extra_config={},
    )
    syn.start()
    try:
        yield syn
    finally:
        syn.stop()


class LoopbackLink:
    """Stands in for the CoAP client: hands requests straight to a Dispatcher."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    async def request(
        self, endpoint: Any, request: HttpRequest, *, timeout: float | None = None
    ) -> HttpResponse:
        resp: HttpResponse = await asyncio.wait_for(
            self.dispatcher.dispatch(request, PeerInfo("127.0.0.1", 1)), timeout
        )
        return resp


@asynccontextmanager
async def inprocess_sidecar(client: Any, options: SidecarOptions) -> AsyncIterator[str]:
    sidecar = Sidecar(client, None, options=options)
    runner = web.AppRunner(sidecar.make_app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await sidecar.drain()
        await runner.cleanup()


# -- tests ------------------------------------------------------------------------------------


def test_nio_through_sidecar_and_http_dispatcher_loopback(stock_synapse: SynapseProcess) -> None:
    async def scenario() -> dict[str, Any]:
        dispatcher = HttpDispatcher(stock_synapse.base_url)
        link = LoopbackLink(dispatcher)
        try:
            async with (
                inprocess_sidecar(link, SidecarOptions()) as url_a,
                inprocess_sidecar(link, SidecarOptions()) as url_b,
            ):
                return await matrix_scenario(url_a, url_b, "lo")
        finally:
            await dispatcher.close()

    check_facts(asyncio.run(scenario()), "lo")


# -- real processes over CoAP+Noise ------------------------------------------------------------


class Proc:
    """A synapse-coap subprocess whose first stdout line is its status line."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.status_line = ""

    def start(self, timeout: float = 20.0) -> str:
        self._log = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [SYNAPSE_COAP, *self.args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line:
            self.proc.wait(timeout)
            raise AssertionError(
                f"{self.args[0]} exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}"
            )
        self.status_line = line.strip()
        return self.status_line

    def stop(self, sig: int = 15) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self._log.close()
        return rc

    def kill(self) -> None:
        self.stop(9)


def make_key(path: Path) -> str:
    from synapse_coap.noise.keys import (
        encode_public,
        generate_private_key,
        public_key,
        write_key_file,
    )

    private = generate_private_key()
    write_key_file(path, private)
    return encode_public(public_key(private))


def sidecar_proc(tmp: Path, name: str, coap_port: int, server_key: str | None, *extra: str) -> Proc:
    port = free_port()
    trust = ["--server-key", server_key] if server_key else ["--trust-on-first-use"]
    return Proc(
        [
            "sidecar",
            "--listen",
            f"127.0.0.1:{port}",
            "--homeserver",
            f"coap://127.0.0.1:{coap_port}",
            *trust,
            "--state-dir",
            str(tmp / f"state-{name}"),
            "--server-name",
            "hs.test",
            *extra,
        ],
        tmp / f"{name}.log",
    )


def sidecar_url(p: Proc) -> str:
    # "synapse-coap sidecar: listening on http://127.0.0.1:PORT, homeserver ..."
    return p.status_line.split("listening on ", 1)[1].split(",", 1)[0]


def test_nio_through_sidecar_and_gateway_processes(
    stock_synapse: SynapseProcess, tmp_path: Path
) -> None:
    coap_port = free_port("udp")
    pub = make_key(tmp_path / "gateway.key")
    gateway = Proc(
        [
            "gateway",
            "--listen",
            f"127.0.0.1:{coap_port}",
            "--http-target",
            stock_synapse.base_url,
            "--key",
            str(tmp_path / "gateway.key"),
            "--server-name",
            "hs.test",
        ],
        tmp_path / "gateway.log",
    )
    side_a = sidecar_proc(tmp_path, "a", coap_port, pub)
    side_b = sidecar_proc(tmp_path, "b", coap_port, None)  # TOFU
    try:
        status = gateway.start()
        assert pub in status
        assert "TOFU" not in side_a.start()
        assert "TOFU" in side_b.start()
        facts = asyncio.run(matrix_scenario(sidecar_url(side_a), sidecar_url(side_b), "gw"))
        check_facts(facts, "gw")
    finally:
        rcs = [side_a.stop(), side_b.stop(), gateway.stop()]
    assert rcs == [0, 0, 0]  # graceful shutdown on SIGTERM
    # The TOFU sidecar remembered the gateway's key.
    assert (tmp_path / "state-b" / "trusted_servers.json").exists()
    for name in ("a", "b"):
        key = tmp_path / f"state-{name}" / "sidecar.key"
        assert key.stat().st_mode & 0o777 == 0o600
    # No tokens in any log (the scenario logged in and out, so tokens crossed).
    for log in ("a.log", "b.log", "gateway.log"):
        text = (tmp_path / log).read_text()
        assert "syt_" not in text, log


# -- the module ---------------------------------------------------------------------------------


def module_synapse(tmp: Path, coap_port: int) -> tuple[SynapseProcess, str]:
    """A Synapse with no HTTP listener that loads the module on 127.0.0.1:coap_port (UDP).

    It has a loopback metrics listener (read by the outage test).
    """
    workdir = tmp / "hs-module"
    workdir.mkdir()
    pub = make_key(workdir / "coap.key")
    syn = SynapseProcess(
        workdir,
        "hs.test",
        metrics_port=free_port(),
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [f"127.0.0.1:{coap_port}"],
                    "private_key_path": str(workdir / "coap.key"),
                },
            }
        ],
    )
    return syn, pub


def test_nio_through_sidecar_and_module(tmp_path: Path) -> None:
    coap_port = free_port("udp")
    syn, pub = module_synapse(tmp_path, coap_port)
    syn.start()
    side_a = sidecar_proc(tmp_path, "a", coap_port, pub)
    side_b = sidecar_proc(tmp_path, "b", coap_port, pub)
    try:
        side_a.start()
        side_b.start()
        facts = asyncio.run(matrix_scenario(sidecar_url(side_a), sidecar_url(side_b), "mod"))
        check_facts(facts, "mod")
    finally:
        rcs = [side_a.stop(), side_b.stop()]
        syn.stop()
    assert rcs == [0, 0]


# -- outage -------------------------------------------------------------------------------------


def metrics_url(syn: SynapseProcess) -> str:
    assert syn.metrics_port is not None
    return f"http://127.0.0.1:{syn.metrics_port}/_synapse/metrics"


async def syncs_in_flight(metrics_url: str) -> float:
    """Synapse's own count of /sync requests it is processing (its metrics listener)."""

    text = await asyncio.to_thread(scrape_metrics, metrics_url)
    total = 0.0
    for line in text.splitlines():
        if line.startswith("synapse_http_server_in_flight_requests_count{") and (
            'servlet="SyncRestServlet"' in line
        ):
            total += float(line.rpartition(" ")[2])
    return total


async def wait_for_sync_in_flight(
    metrics_url: str, before: float, poll: asyncio.Future[Any]
) -> None:
    """Until Synapse reports one more in-flight /sync than ``before`` (no fixed sleep)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if poll.done():
            raise AssertionError(f"/sync returned before the far side was killed: {poll.result()}")
        if await syncs_in_flight(metrics_url) > before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("alice's long-poll /sync never reached Synapse")


async def outage_scenario(
    url_a: str,
    url_b: str,
    kill: Callable[[], None],
    revive: Callable[[], None],
    metrics_url: str,
) -> dict[str, Any]:
    """Alice syncs through the sidecar while the far side dies and comes back.

    ``metrics_url``: the homeserver's metrics listener, read to know when alice's
    long-poll is parked in Synapse before the far side is killed.
    Returns the HTTP statuses alice's syncs saw and whether bob's later message arrived.
    """
    alice = nio.AsyncClient(url_a, "alice-out")
    bob = nio.AsyncClient(url_b, "bob-out")
    statuses: list[int] = []
    errcodes: list[str | None] = []
    try:
        assert isinstance(await alice.register("alice-out", "pw-alice-out"), nio.RegisterResponse)
        assert isinstance(await bob.register("bob-out", "pw-bob-out"), nio.RegisterResponse)
        r = await alice.room_create(invite=[bob.user_id])
        assert isinstance(r, nio.RoomCreateResponse), r
        room_id = r.room_id
        assert isinstance(await bob.join(room_id), nio.JoinResponse)
        await alice.sync(timeout=0, full_state=True)

        loop = asyncio.get_running_loop()
        parked = await syncs_in_flight(metrics_url)
        sync_task: asyncio.Task[Any] = asyncio.ensure_future(alice.sync(timeout=3000))
        await wait_for_sync_in_flight(metrics_url, parked, sync_task)
        await loop.run_in_executor(None, kill)
        # The client keeps syncing (as sync_forever would) and sees HTTP errors, not hangs.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            resp = await sync_task
            if isinstance(resp, nio.SyncError):
                statuses.append(resp.transport_response.status)
                errcodes.append(resp.status_code)
                if len(statuses) >= 2:
                    break
            sync_task = asyncio.ensure_future(alice.sync(timeout=3000))
        else:
            raise AssertionError("the client saw no HTTP error while the far side was down")
        await loop.run_in_executor(None, revive)
        # Bob speaks after the far side is back; alice (same sidecar, same nio client) hears it.
        deadline = time.monotonic() + 60
        sent = False
        received = False
        while time.monotonic() < deadline and not received:
            if not sent:
                r = await bob.room_send(
                    room_id, "m.room.message", {"msgtype": "m.text", "body": "back again"}
                )
                sent = isinstance(r, nio.RoomSendResponse)
            resp = await alice.sync(timeout=2000)
            if isinstance(resp, nio.SyncResponse):
                received = has_message(room_id, "back again")(resp)
            else:
                statuses.append(resp.transport_response.status)
                errcodes.append(resp.status_code)
        return {"statuses": statuses, "errcodes": errcodes, "received": received}
    finally:
        await alice.close()
        await bob.close()


def check_outage(facts: dict[str, Any]) -> None:
    assert facts["received"], facts
    assert facts["statuses"], facts
    assert set(facts["statuses"]) <= {502, 503, 504}, facts
    assert set(facts["errcodes"]) <= {"M_UNKNOWN"}, facts


def test_outage_of_homeserver_behind_loopback_sidecar(tmp_path: Path) -> None:
    """No CoAP: the homeserver behind sidecar + HttpDispatcher dies and returns."""
    syn = SynapseProcess(
        tmp_path / "hs", "hs.test", http_port=free_port(), metrics_port=free_port()
    )
    syn.start()
    try:

        async def scenario() -> dict[str, Any]:
            dispatcher = HttpDispatcher(syn.base_url, request_timeout=10)
            link = LoopbackLink(dispatcher)
            try:
                async with (
                    inprocess_sidecar(link, SidecarOptions(long_poll_slack=2)) as url_a,
                    inprocess_sidecar(link, SidecarOptions()) as url_b,
                ):
                    return await outage_scenario(
                        url_a, url_b, syn.kill, syn.start, metrics_url(syn)
                    )
            finally:
                await dispatcher.close()

        check_outage(asyncio.run(scenario()))
    finally:
        syn.stop()


def test_outage_of_gateway_while_client_syncs(
    stock_synapse: SynapseProcess, tmp_path: Path
) -> None:
    """The gateway process is SIGKILLed mid-sync and restarted; the sidecar process is not."""
    coap_port = free_port("udp")
    pub = make_key(tmp_path / "gateway.key")
    gateway_args = [
        "gateway",
        "--listen",
        f"127.0.0.1:{coap_port}",
        "--http-target",
        stock_synapse.base_url,
        "--key",
        str(tmp_path / "gateway.key"),
    ]
    gateway = Proc(gateway_args, tmp_path / "gateway.log")
    # the long-poll path (push off): its errors must reach the client (test_push_nio.py
    # covers outages with push)
    fast = ("--request-timeout", "8", "--long-poll-slack", "3", "--no-push")
    side_a = sidecar_proc(tmp_path, "a", coap_port, pub, *fast)
    side_b = sidecar_proc(tmp_path, "b", coap_port, pub, *fast)
    try:
        gateway.start()
        side_a.start()
        side_b.start()
        assert side_a.proc is not None
        pid = side_a.proc.pid
        facts = asyncio.run(
            outage_scenario(
                sidecar_url(side_a),
                sidecar_url(side_b),
                gateway.kill,
                gateway.start,
                metrics_url(stock_synapse),
            )
        )
        check_outage(facts)
        assert side_a.proc is not None and side_a.proc.pid == pid and side_a.proc.poll() is None
    finally:
        side_a.stop()
        side_b.stop()
        gateway.stop()


def test_outage_of_module_homeserver_while_client_syncs(tmp_path: Path) -> None:
    """The homeserver that loads the module is SIGKILLed mid-sync and restarted."""
    coap_port = free_port("udp")
    syn, pub = module_synapse(tmp_path, coap_port)
    syn.start()
    # the long-poll path (push off): its errors must reach the client (test_push_nio.py
    # covers outages with push)
    fast = ("--request-timeout", "8", "--long-poll-slack", "3", "--no-push")
    side_a = sidecar_proc(tmp_path, "a", coap_port, pub, *fast)
    side_b = sidecar_proc(tmp_path, "b", coap_port, pub, *fast)
    try:
        side_a.start()
        side_b.start()
        facts = asyncio.run(
            outage_scenario(
                sidecar_url(side_a), sidecar_url(side_b), syn.kill, syn.start, metrics_url(syn)
            )
        )
        check_outage(facts)
        assert side_a.proc is not None and side_a.proc.poll() is None
    finally:
        side_a.stop()
        side_b.stop()
        syn.stop()
