"""Push of /sync (Observe) with an unmodified matrix-nio client, real processes, bytes at the relay.

Two stacks run side by side in one event loop (so the test takes the time of
one):

- module:  nio -> sidecar process -> lab relay -> Synapse loading the module;
- gateway: nio -> sidecar process -> lab relay -> gateway process -> stock Synapse.

Alice's sidecar reaches the homeserver through the relay (which counts every
datagram, IP and UDP headers included); Bob, who talks to her, uses his own
sidecar without the relay. The story, per stack:

1. Alice idles 150 s in nio's ``sync_forever(timeout=10000)``: her
   long-polls are answered by the sidecar from the push registration, so the
   relay sees only her sidecar's keep-alives (every 20 s here, to make the
   test find them; 110 s by default) and the notifications Synapse has for
   her, never a renewal; her presence stays ``online`` because the server
   keeps a /sync outstanding with her ``set_presence``.
2. Bob sends a message: it is pushed, and nio sees it exactly once.
3. The link drops for a minute (the relay loses everything) while Bob sends:
   the server parks the notification it could not deliver and sends it again
   when it hears Alice's sidecar after the link is back; the registration
   lives on (no renewal) and the message arrives exactly once.
4. The homeserver restarts while Alice idles (with the module, the CoAP
   listener restarts with it: all its Noise sessions are gone); Bob sends
   after the restart; Alice's next keep-alive gets the unknown-session hint,
   her sidecar re-handshakes and registers again at once, and she catches up
   with nothing lost and nothing repeated. (Behind the gateway only Synapse
   restarts: the gateway keeps the registration and retries its /sync.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from synapse_coap.lab.model import PROFILES
from synapse_coap.lab.relay import Relay, RelayConfig
from tests.harness.synapse_proc import SynapseProcess, free_port

nio = pytest.importorskip("nio")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SYNAPSE_COAP = str(Path(sys.executable).with_name("synapse-coap"))
IDLE_SECONDS = 150
LINK_DOWN_SECONDS = 60
#: Alice's sidecar sends a keep-alive after this long without sending (default 110).
KEEPALIVE = 20


class Proc:
    """A synapse-coap subprocess whose first stdout line is its status line."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.status_line = ""

    def start(self) -> str:
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
            self.proc.wait(20)
            raise AssertionError(f"{self.args[0]} exited: {self.log.read_text()[-3000:]}")
        self.status_line = line.strip()
        return self.status_line

    @property
    def url(self) -> str:
        return self.status_line.split("listening on ", 1)[1].split(",", 1)[0]

    def registrations(self) -> int:
        """How many times this sidecar registered /sync for push (from its log)."""
        return self.log.read_text().count("push: registering")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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


def sidecar(tmp: Path, name: str, port: int, key: str, *extra: str) -> Proc:
    return Proc(
        [
            "sidecar",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--homeserver",
            f"coap://127.0.0.1:{port}",
            "--server-key",
            key,
            "--state-dir",
            str(tmp / f"state-{name}"),
            "--server-name",
            "hs.test",
            *extra,
        ],
        tmp / f"{name}.log",
    )


@attrs.define
class Stack:
    name: str
    synapse: SynapseProcess
    relay: Relay
    alice_side: Proc
    bob_side: Proc
    procs: list[Proc]
    server_log: Callable[[], str]
    facts: dict[str, Any] = attrs.field(factory=dict)

    def link_bytes(self) -> tuple[int, int]:
        s = self.relay.stats
        return (
            s.uplink.offered_ip_bytes + s.downlink.offered_ip_bytes,
            s.uplink.offered_datagrams + s.downlink.offered_datagrams,
        )


@contextlib.asynccontextmanager
async def module_stack(tmp: Path) -> AsyncIterator[Stack]:
    coap_port = free_port("udp")
    key = make_key(tmp / "coap.key")
    syn = SynapseProcess(
        tmp / "hs",
        "hs.test",
        metrics_port=free_port(),
        modules=[
            {
                "module": "synapse_coap.CoapModule",
                "config": {
                    "listen": [f"127.0.0.1:{coap_port}"],
                    "private_key_path": str(tmp / "coap.key"),
                },
            }
        ],
    )
    async with stack("module", tmp, syn, coap_port, key, []) as s:
        yield s


@contextlib.asynccontextmanager
async def gateway_stack(tmp: Path) -> AsyncIterator[Stack]:
    coap_port = free_port("udp")
    key = make_key(tmp / "gateway.key")
    syn = SynapseProcess(tmp / "hs", "hs.test", http_port=free_port(), metrics_port=free_port())
    gateway = Proc(
        [
            "gateway",
            "--listen",
            f"127.0.0.1:{coap_port}",
            "--http-target",
            syn.base_url,
            "--key",
            str(tmp / "gateway.key"),
            "--server-name",
            "hs.test",
        ],
        tmp / "gateway.log",
    )
    async with stack("gateway", tmp, syn, coap_port, key, [gateway]) as s:
        yield s


@contextlib.asynccontextmanager
async def stack(
    name: str, tmp: Path, syn: SynapseProcess, coap_port: int, key: str, extra: list[Proc]
) -> AsyncIterator[Stack]:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, syn.start)
    relay = await Relay.start(
        RelayConfig(listen=("127.0.0.1", 0), upstream=("127.0.0.1", coap_port))
    )
    alice_side = sidecar(tmp, "alice", relay.address[1], key, "--keepalive", str(KEEPALIVE))
    bob_side = sidecar(tmp, "bob", coap_port, key)
    procs = [*extra, alice_side, bob_side]
    try:
        for p in procs:
            await loop.run_in_executor(None, p.start)
        # the gateway logs what happens on its side of the link; the module logs in Synapse
        logs = extra[0].log if extra else None
        server_log: Callable[[], str] = (
            syn.log_text if logs is None else functools.partial(logs.read_text, errors="replace")
        )
        yield Stack(name, syn, relay, alice_side, bob_side, procs, server_log)
    finally:
        for p in reversed(procs):
            await loop.run_in_executor(None, p.stop)
        await relay.close()
        await loop.run_in_executor(None, syn.stop)


class Inbox:
    """What nio's sync loop delivered to Alice."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.syncs = 0
        self.news = 0
        self.changed = asyncio.Event()

    def on_message(self, room: Any, event: Any) -> None:
        self.bodies.append(event.body)
        self.changed.set()

    def on_sync(self, response: Any) -> None:
        self.syncs += 1
        if (
            response.rooms.join
            or response.rooms.invite
            or response.rooms.leave
            or response.presence_events
            or response.to_device_events
            or response.account_data_events
        ):
            self.news += 1  # a pushed response (the local empty answers carry nothing)
        self.changed.set()

    async def until(self, cond: Callable[[], bool], what: str, deadline: float) -> None:
        end = time.monotonic() + deadline
        while not cond():
            self.changed.clear()
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def exactly_once(self, body: str, deadline: float) -> None:
        await self.until(lambda: body in self.bodies, repr(body), deadline)
        # one more sync round after it (answered from the push) shows nothing repeats
        seen = self.syncs
        await self.until(lambda: self.syncs > seen, "the next sync", 45)
        assert self.bodies.count(body) == 1, self.bodies


async def send(bob: Any, room_id: str, body: str, deadline: float = 90) -> None:
    """Bob sends (retrying while his side of the link or the homeserver comes back)."""
    end = time.monotonic() + deadline
    while True:
        r = await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        if isinstance(r, nio.RoomSendResponse):
            return
        if time.monotonic() > end:
            raise AssertionError(f"bob could not send {body!r}: {r}")
        await asyncio.sleep(2)


async def story(s: Stack) -> None:
    alice = nio.AsyncClient(s.alice_side.url, "alice")
    bob = nio.AsyncClient(s.bob_side.url, "bob")
    inbox = Inbox()
    forever: asyncio.Task[Any] | None = None
    try:
        assert isinstance(await alice.register("alice", "pw-alice-1"), nio.RegisterResponse)
        assert isinstance(await bob.register("bob", "pw-bob-1"), nio.RegisterResponse)
        r = await alice.room_create(invite=[bob.user_id])
        assert isinstance(r, nio.RoomCreateResponse), r
        room_id = r.room_id
        assert isinstance(await bob.join(room_id), nio.JoinResponse)
        # Bob does not sync: left "online" from his join, Synapse would time his
        # presence out during Alice's idle minutes and push her the change.
        await bob.set_presence("offline")
        alice.add_event_callback(inbox.on_message, nio.RoomMessageText)
        alice.add_response_callback(inbox.on_sync, nio.SyncResponse)
        # (nio's default is 30 s; 10 s polls make the test shorter and the idle harder)
        forever = asyncio.ensure_future(alice.sync_forever(timeout=10000, set_presence="online"))
        await inbox.until(lambda: inbox.syncs >= 1, "the initial sync", 60)
        await inbox.until(lambda: s.alice_side.registrations() >= 1, "a registration", 60)
        await asyncio.sleep(5)  # nio's follow-up requests after its first syncs

        # 1. idle
        before = s.link_bytes()
        registered = s.alice_side.registrations()
        news = inbox.news
        await asyncio.sleep(IDLE_SECONDS)
        after = s.link_bytes()
        s.facts["idle_renewals"] = s.alice_side.registrations() - registered
        s.facts["idle_pushes"] = inbox.news - news
        s.facts["idle_bytes"] = after[0] - before[0]
        s.facts["idle_datagrams"] = after[1] - before[1]
        presence = await bob.get_presence(alice.user_id)
        s.facts["presence_after_idle"] = getattr(presence, "presence", presence)

        # 2. a message pushed while idle
        before = s.link_bytes()
        await send(bob, room_id, "pushed while alice idles")
        await inbox.exactly_once("pushed while alice idles", 30)
        after = s.link_bytes()
        s.facts["push_bytes"] = after[0] - before[0]
        s.facts["push_datagrams"] = after[1] - before[1]

        # 3. the link drops for a minute
        registered = s.alice_side.registrations()
        s.relay.set_profile(PROFILES["lan"].with_changes(loss=1.0))
        await send(bob, room_id, "sent while the link is down")
        await asyncio.sleep(LINK_DOWN_SECONDS)
        s.relay.set_profile(PROFILES["lan"])
        await inbox.exactly_once("sent while the link is down", 180)
        s.facts["renewed"] = s.alice_side.registrations() - registered
        s.facts["unparked"] = s.server_log().count("push: parked notification delivered")

        # 4. the homeserver restarts while alice idles
        registered = s.alice_side.registrations()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, s.synapse.restart)
        await send(bob, room_id, "after the restart")
        await inbox.exactly_once("after the restart", 180)
        s.facts["restart_registrations"] = s.alice_side.registrations() - registered
        s.facts["registered_at_once"] = s.alice_side.log.read_text().count(
            "push: registering again at once"
        )
        s.facts["bodies"] = list(inbox.bodies)
    finally:
        if forever is not None:
            forever.cancel()
            with contextlib.suppress(BaseException):
                await forever
        await alice.close()
        await bob.close()


def test_push_with_nio_through_module_and_gateway(tmp_path: Path) -> None:
    async def main() -> list[Stack]:
        (tmp_path / "m").mkdir()
        (tmp_path / "g").mkdir()
        async with module_stack(tmp_path / "m") as m, gateway_stack(tmp_path / "g") as g:
            await asyncio.gather(story(m), story(g))
            return [m, g]

    started = time.monotonic()
    stacks = asyncio.run(main())
    print(f"\npush story took {time.monotonic() - started:.0f} s")
    for s in stacks:
        f = s.facts
        print(
            f"{s.name}: idle {IDLE_SECONDS} s: {f['idle_bytes']} B in {f['idle_datagrams']} datagrams "
            f"({f['idle_bytes'] * 60 / IDLE_SECONDS:.0f} B/min) at the relay, "
            f"{f['idle_renewals']} renewals, {f['idle_pushes']} pushes; one pushed message "
            f"{f['push_bytes']} B in {f['push_datagrams']} datagrams; presence after idle "
            f"{f['presence_after_idle']}; registrations after the link came back {f['renewed']} "
            f"(parked notifications delivered: {f['unparked']}); after the restart "
            f"{f['restart_registrations']} (at once: {f['registered_at_once']})"
        )
    for s in stacks:
        f = s.facts
        # nio long-polls every 10 s: without push each poll costs a request, its
        # ACK, the response and its ACK on the link. With push none of it crosses:
        # no renewal at all, a one-way keep-alive after KEEPALIVE s without sending,
        # and real news (presence changes Synapse reports) a notification and its ACK.
        # (+ 2: an exchange may straddle either edge of the window)
        assert f["idle_renewals"] == 0, (s.name, f)
        keepalives = IDLE_SECONDS // KEEPALIVE + 1
        allowed = 2 * f["idle_pushes"] + keepalives + 2
        assert f["idle_datagrams"] <= allowed, (s.name, f)
        assert f["presence_after_idle"] == "online", (s.name, f)
        assert f["push_datagrams"] <= 6, (s.name, f)
        # the outage: parked on the server, delivered when the link was back, no renewal
        assert f["renewed"] == 0, (s.name, f)
        assert f["unparked"] >= 1, (s.name, f)
        if s.name == "module":  # the listener restarted: found by a keep-alive, at once
            assert f["restart_registrations"] >= 1 and f["registered_at_once"] >= 1, (s.name, f)
        assert f["bodies"] == [
            "pushed while alice idles",
            "sent while the link is down",
            "after the restart",
        ], (s.name, f)
