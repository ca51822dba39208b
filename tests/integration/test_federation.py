"""Federation over CoAP between real Synapse processes (issue 5, "Must show").

* ``TestCoapOnly``: hs1.test and hs2.test load the module; neither has any
  HTTP listener (only a loopback metrics listener the test reads); their
  ``federation.peers`` maps point at each other's CoAP ports with pinned Noise
  keys, ``fallback: never``. Clients talk to each homeserver over CoAP with the
  transport's CoapClient. Checked: remote join, messages both ways, profile
  lookups, signing keys fetched over CoAP, no TCP connection between the two,
  a tampered X-Matrix signature answered 401 over CoAP, hs2 restarted
  mid-conversation with nothing lost, and every outbound request counted over
  CoAP by route with zero fallbacks.
* ``TestMixed``: hs1 (module, ``fallback: https``) and a stock Synapse hs3
  reached over HTTPS in one room; messages flow both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness.federation import (
    AGENT_INSTALLED,
    READY,
    CoapMatrix,
    Homeserver,
    HttpMatrix,
    new_coap_client,
    q,
)
from tests.harness.synapse_proc import AUTHENTICATED_MEDIA, SynapseProcess, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: The module under test (overridable to try a development build).
MODULE = os.environ.get("SYNAPSE_COAP_FED_MODULE", "synapse_coap.CoapModule")


# -- helpers: processes ---------------------------------------------------------------------


class Node(Homeserver):
    """One homeserver with the module: its CoAP port, Noise key pair and metrics port."""

    def __init__(self, root: Path, server_name: str, *, coap_port: int | None = None) -> None:
        super().__init__(root / server_name.replace(":", "_"), server_name, coap_port=coap_port)

    def make(
        self,
        federation: dict[str, Any],
        pinned: dict[str, str],
        *,
        http_port: int | None = None,
        tls_federation_port: int | None = None,
    ) -> SynapseProcess:
        self.proc = SynapseProcess(
            self.workdir,
            self.server_name,
            http_port=http_port,
            metrics_port=self.metrics_port,
            modules=[self.module_config(federation, pinned, module=MODULE)],
            tls_federation_port=tls_federation_port,
        )
        return self.proc

    def start(self) -> None:
        assert self.proc is not None
        self.proc.start(timeout=90)
        wait_for_log(self.proc, READY, 60, "the CoAP listener did not start")
        wait_for_log(
            self.proc, AGENT_INSTALLED, 10, "the module did not install federation over CoAP"
        )


def wait_for_log(proc: SynapseProcess, pattern: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        if rx.search(proc.log_text()):
            return
        if not proc.is_running():
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}\n{proc.log_text()[-4000:]}")


def tcp_sockets(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    states = {"01": "ESTABLISHED", "02": "SYN_SENT", "0A": "LISTEN"}
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                lport = int(f[1].rsplit(":", 1)[1], 16)
                rport = int(f[2].rsplit(":", 1)[1], 16)
                out.append((lport, rport, states.get(f[3], f[3])))
    return out


# -- helpers: a Matrix client over CoAP ----------------------------------------------------


class Loop:
    """One asyncio loop for the whole module's CoAP clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def new_client(self) -> Any:
        """A CoapClient on this loop, closed by :meth:`close`."""
        client = self.run(new_coap_client())
        self.clients.append(client)
        return client

    def close(self) -> None:
        """Close the clients made here (their UDP sockets), then the loop."""
        try:
            for client in self.clients:
                self.run(client.close(), timeout=10)
        finally:
            self.loop.close()


class CoapUser(CoapMatrix):
    """A CoAP client that also follows /sync incrementally."""

    since: str | None = None

    async def sync_bodies(
        self, room_id: str, timeout: float = 90, want: set[str] | None = None
    ) -> set[str]:
        """m.room.message bodies /sync delivers for the room (incremental, accumulated)."""
        got: set[str] = set()
        deadline = time.monotonic() + timeout
        while True:
            query: dict[str, Any] = {"timeout": 1000}
            if self.since:
                query["since"] = self.since
            out = await self.call("GET", "/sync", **query)
            self.since = out["next_batch"]
            room = out.get("rooms", {}).get("join", {}).get(room_id, {})
            for e in room.get("timeline", {}).get("events", []):
                if e.get("type") == "m.room.message":
                    got.add(e["content"].get("body", ""))
            if want is None or want <= got or time.monotonic() > deadline:
                return got


def x_matrix(signing_key_path: Path, origin: str, destination: str, method: str, uri: str) -> str:
    from signedjson.key import read_signing_keys
    from signedjson.sign import sign_json

    with open(signing_key_path) as f:
        key = read_signing_keys(f)[0]
    signed = sign_json(
        {"method": method, "uri": uri, "origin": origin, "destination": destination}, origin, key
    )
    key_id = f"{key.alg}:{key.version}"
    sig = signed["signatures"][origin][key_id]
    return f'X-Matrix origin="{origin}",destination="{destination}",key="{key_id}",sig="{sig}"'


# -- CoAP only -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coap_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fed")
    hs1 = Node(root, "hs1.test")
    hs2 = Node(root, "hs2.test")
    pins = {hs1.server_name: hs1.public_b64, hs2.server_name: hs2.public_b64}
    for me, other in ((hs1, hs2), (hs2, hs1)):
        me.make(
            {
                "fallback": "never",
                "discovery": False,
                "peers": {
                    other.server_name: {
                        "endpoints": [f"127.0.0.1:{other.coap_port}"],
                        "public_key": other.public_b64,
                    }
                },
            },
            pins,
        )
    loop = Loop()
    started: list[Node] = []
    try:
        for n in (hs1, hs2):
            n.start()
            started.append(n)
        c1 = loop.new_client()
        c2 = loop.new_client()
        alice, bob = CoapUser(c1, hs1), CoapUser(c2, hs2)
        loop.run(alice.register("alice"))
        loop.run(bob.register("bob"))
        room = loop.run(bob.call("POST", "/createRoom", {"preset": "public_chat", "name": "coap"}))
        room_id = room["room_id"]
        loop.run(alice.call("POST", f"/join/{q(room_id)}?server_name=hs2.test", {}))
        yield {
            "hs1": hs1,
            "hs2": hs2,
            "loop": loop,
            "alice": alice,
            "bob": bob,
            "room_id": room_id,
            "clients": (c1, c2),
            # what a node's metrics said just before a test restarted it (see counts())
            "before_restart": {},
        }
    finally:
        for n in started:
            if n.proc is not None:
                n.proc.stop()
        loop.close()


def counts(coap_pair: dict[str, Any], n: Node) -> Counter[tuple[str, str, str]]:
    """The node's agent counts since the fixture started it, across a restart by a test
    (so every test passes in any order)."""
    before: Counter[tuple[str, str, str]] = coap_pair["before_restart"].get(
        n.server_name, (Counter(), set())
    )[0]
    return before + n.agent_counts()


def served(coap_pair: dict[str, Any], n: Node) -> set[str]:
    """Routes the node's listener served since the fixture started it, across a restart."""
    before: set[str] = coap_pair["before_restart"].get(n.server_name, (Counter(), set()))[1]
    return before | n.listener_routes()


class TestCoapOnly:
    def test_messages_flow_both_ways_and_sync_returns_them(self, coap_pair: dict[str, Any]) -> None:
        loop, alice, bob, room_id = (coap_pair[k] for k in ("loop", "alice", "bob", "room_id"))
        loop.run(bob.send(room_id, "hello from bob"))
        loop.run(alice.send(room_id, "hello from alice"))
        got_a = loop.run(alice.sync_bodies(room_id, want={"hello from bob"}))
        got_b = loop.run(bob.sync_bodies(room_id, want={"hello from alice"}))
        assert "hello from bob" in got_a
        assert "hello from alice" in got_b

    def test_profile_lookups_over_federation(self, coap_pair: dict[str, Any]) -> None:
        loop, alice, bob = (coap_pair[k] for k in ("loop", "alice", "bob"))
        loop.run(
            bob.call("PUT", f"/profile/{q(bob.user_id)}/displayname", {"displayname": "Bob B"})
        )
        loop.run(
            alice.call(
                "PUT", f"/profile/{q(alice.user_id)}/displayname", {"displayname": "Alice A"}
            )
        )
        out = loop.run(alice.call("GET", f"/profile/{q(bob.user_id)}"))
        assert out.get("displayname") == "Bob B"
        out = loop.run(bob.call("GET", f"/profile/{q(alice.user_id)}"))
        assert out.get("displayname") == "Alice A"

    def test_signing_keys_were_fetched_over_coap(self, coap_pair: dict[str, Any]) -> None:
        for n in (coap_pair["hs1"], coap_pair["hs2"]):
            m = counts(coap_pair, n)
            fetched = sum(
                v
                for (r, via, o), v in m.items()
                if r == "key.v2.server.0" and via == "coap" and o == "ok"
            )
            assert fetched >= 1, f"{n.server_name} did not fetch keys over CoAP: {m}"

    def test_no_tcp_between_the_homeservers(self, coap_pair: dict[str, Any]) -> None:
        hs1, hs2 = coap_pair["hs1"], coap_pair["hs2"]
        s1 = tcp_sockets(hs1.proc.pid)
        s2 = tcp_sockets(hs2.proc.pid)
        # the only TCP listener of each is its loopback metrics port (read by this test)
        assert {lp for lp, _, st in s1 if st == "LISTEN"} <= {hs1.metrics_port}
        assert {lp for lp, _, st in s2 if st == "LISTEN"} <= {hs2.metrics_port}
        ports1 = {lp for lp, _, _ in s1}
        ports2 = {lp for lp, _, _ in s2}
        assert not [s for s in s1 if s[1] in ports2], s1
        assert not [s for s in s2 if s[1] in ports1], s2
        # and no outgoing TCP connection at all (HTTPS fallback would show up here)
        for n, socks in ((hs1, s1), (hs2, s2)):
            active = [s for s in socks if s[2] in ("ESTABLISHED", "SYN_SENT")]
            assert all(lp == n.metrics_port for lp, _, _ in active), (n.server_name, active)

    def test_tampered_x_matrix_signature_is_401_over_coap(self, coap_pair: dict[str, Any]) -> None:
        loop, hs1, hs2, alice = (coap_pair[k] for k in ("loop", "hs1", "hs2", "alice"))
        uri = "/_matrix/federation/v1/query/profile?" + urllib.parse.urlencode(
            {"user_id": alice.user_id, "field": "displayname"}
        )
        raw = CoapMatrix(loop.new_client(), hs1)  # no access token: a "server" request
        auth = x_matrix(hs2.proc.signing_key_path, "hs2.test", "hs1.test", "GET", uri)
        ok = loop.run(raw.raw("GET", uri, headers=(("authorization", auth),)))
        assert ok.status == 200, ok.body
        sig = re.search(r'sig="([^"]+)"', auth).group(1)
        bad_sig = ("A" if sig[0] != "A" else "B") + sig[1:]
        tampered = auth.replace(sig, bad_sig)
        resp = loop.run(raw.raw("GET", uri, headers=(("authorization", tampered),)))
        assert resp.status == 401, resp.body
        # the target is covered too: the valid signature on another target is refused
        other = uri.replace("displayname", "avatar_url")
        resp = loop.run(raw.raw("GET", other, headers=(("authorization", auth),)))
        assert resp.status == 401, resp.body

    @AUTHENTICATED_MEDIA
    def test_remote_media_download_over_coap(self, coap_pair: dict[str, Any]) -> None:
        """Non-JSON, multipart and blockwise: hs1 fetches bob's upload from hs2 over CoAP."""
        loop, alice, bob = (coap_pair[k] for k in ("loop", "alice", "bob"))
        blob = os.urandom(5000)  # several CoAP blocks, incompressible
        up = loop.run(
            bob.raw(
                "POST",
                "/_matrix/media/v3/upload?filename=noise.bin",
                headers=(("content-type", "application/octet-stream"),),
                body_bytes=blob,
            )
        )
        assert up.status == 200, up.body
        mxc = json.loads(up.body)["content_uri"]
        server, media_id = mxc[len("mxc://") :].split("/", 1)
        assert server == "hs2.test"
        got = loop.run(alice.raw("GET", f"/_matrix/client/v1/media/download/{server}/{media_id}"))
        assert got.status == 200, got.body[:300]
        assert got.body == blob
        routes = {r for (r, via, o), v in coap_pair["hs1"].agent_counts().items() if o == "ok"}
        assert "federation.v1.media.download" in routes, routes

    def test_every_outbound_request_went_over_coap(self, coap_pair: dict[str, Any]) -> None:
        loop, alice, bob, room_id = (coap_pair[k] for k in ("loop", "alice", "bob", "room_id"))
        # a message each way, so that both ends sent a transaction whatever ran before
        loop.run(alice.send(room_id, "outbound check a"))
        loop.run(bob.send(room_id, "outbound check b"))
        loop.run(bob.wait_for(room_id, {"outbound check a"}))
        loop.run(alice.wait_for(room_id, {"outbound check b"}))
        for n in (coap_pair["hs1"], coap_pair["hs2"]):
            # Synapse's own count of federation requests it sent == what the agent received
            # (scraped again if a request happened to start during the scrape)
            for _ in range(5):
                text = n.metrics_text()
                synapse_sent = n.metric_sum(
                    "synapse_http_matrixfederationclient_requests_total", text
                )
                agent_got = n.metric_sum("synapse_coap_federation_outbound_total", text)
                if synapse_sent == agent_got:
                    break
                time.sleep(0.5)
            assert synapse_sent == agent_got > 0, (synapse_sent, agent_got)
            m = counts(coap_pair, n)
            by_via: Counter[str] = Counter()
            by_route: Counter[str] = Counter()
            for (route, via, _outcome), v in m.items():
                by_via[via] += v
                if via == "coap":
                    by_route[route] += v
            print(f"{n.server_name} outbound federation requests by route: {dict(by_route)}")
            assert by_via["https"] == 0 and by_via["refused"] == 0, m
            assert by_route["federation.v1.send.1"] >= 1
            assert by_route["key.v2.server.0"] >= 1
        # The two ends' metrics join on the route label: every route an agent sent over
        # CoAP (its only CoAP destination is the other server) is a route that the other
        # server's listener counted under the same name.
        for me, other in (
            (coap_pair["hs1"], coap_pair["hs2"]),
            (coap_pair["hs2"], coap_pair["hs1"]),
        ):
            sent = {
                r for (r, via, o), v in counts(coap_pair, me).items() if via == "coap" and o == "ok"
            }
            by_other = served(coap_pair, other)
            assert sent and sent <= by_other, (me.server_name, sent - by_other, by_other)
        hs1_routes = {r for (r, via, _), v in counts(coap_pair, coap_pair["hs1"]).items() if v}
        # the remote join went over CoAP too
        assert {"federation.v1.make_join"} <= hs1_routes
        assert hs1_routes & {"federation.v1.send_join", "federation.v2.send_join"}

    def test_restart_mid_conversation_loses_nothing(self, coap_pair: dict[str, Any]) -> None:
        loop, hs2, alice, bob, room_id = (
            coap_pair[k] for k in ("loop", "hs2", "alice", "bob", "room_id")
        )
        loop.run(alice.send(room_id, "before restart"))
        loop.run(bob.wait_for(room_id, {"before restart"}))
        # the counters restart with hs2: keep what they said for the other tests
        before_c, before_r = coap_pair["before_restart"].get(hs2.server_name, (Counter(), set()))
        coap_pair["before_restart"][hs2.server_name] = (
            before_c + hs2.agent_counts(),
            before_r | hs2.listener_routes(),
        )
        hs2.proc.stop()
        offline = {f"while hs2 was down #{i}" for i in range(3)}
        for text in sorted(offline):
            loop.run(alice.send(room_id, text))
        hs2.proc.start(timeout=90)
        wait_for_log(
            hs2.proc, READY + r"[\s\S]*" + READY, 60, "hs2's CoAP listener did not restart"
        )
        loop.run(bob.send(room_id, "bob is back"))  # an inbound request also wakes hs1's sender
        seen = loop.run(bob.wait_for(room_id, offline, timeout=150), timeout=180)
        for text in offline:
            assert seen[text] == 1, f"{text!r} arrived {seen[text]} times"
        seen_a = loop.run(alice.wait_for(room_id, {"bob is back"}))
        assert seen_a["bob is back"] == 1
        # the restarted hs2 (fresh counters) also sent only over CoAP
        m = hs2.agent_counts()
        assert sum(v for (_, via, _), v in m.items() if via != "coap") == 0, m
        assert (
            sum(v for (r, via, o), v in m.items() if r == "federation.v1.send.1" and o == "ok") >= 1
        )


# -- mixed: module + stock Synapse over HTTPS --------------------------------------------------


class TestMixed:
    def test_module_and_stock_synapse_share_a_room(self, tmp_path: Path) -> None:
        fed1, fed3, client3 = free_port(), free_port(), free_port()
        hs1 = Node(tmp_path, f"127.0.0.1:{fed1}")
        hs1.make(
            {
                "fallback": "https",
                "discovery": True,
                "probe_port": free_port("udp"),  # nothing there: the probe fails -> HTTPS
                "probe_timeout": 3,
            },
            {},
            tls_federation_port=fed1,
        )
        name3 = f"127.0.0.1:{fed3}"
        hs3 = SynapseProcess(
            tmp_path / "hs3",
            name3,
            http_port=client3,
            http_resources=("client",),
            tls_federation_port=fed3,
        )
        loop = Loop()
        try:
            hs1.start()
            hs3.start(timeout=90)
            alice = CoapMatrix(loop.new_client(), hs1)
            loop.run(alice.register("alice"))
            carol = HttpMatrix(hs3.base_url)
            loop.run(carol.register("carol"))
            room = loop.run(carol.call("POST", "/createRoom", {"preset": "public_chat"}))
            room_id = room["room_id"]
            loop.run(alice.call("POST", f"/join/{q(room_id)}?server_name={q(name3)}", {}))
            loop.run(
                carol.call(
                    "PUT",
                    f"/rooms/{q(room_id)}/send/m.room.message/c1",
                    {"msgtype": "m.text", "body": "from stock hs3"},
                )
            )
            loop.run(alice.send(room_id, "from coap hs1"))
            loop.run(alice.wait_for(room_id, {"from stock hs3", "from coap hs1"}))
            deadline = time.monotonic() + 60
            while "from coap hs1" not in loop.run(carol.history(room_id)):
                assert time.monotonic() < deadline, "hs3 never got hs1's message"
                time.sleep(0.5)
            m = hs1.agent_counts()
            https = sum(v for (_, via, _), v in m.items() if via == "https")
            coap = sum(v for (_, via, _), v in m.items() if via == "coap")
            assert https >= 2, m  # at least the key fetch and the join went through the fallback
            assert coap == 0, m  # hs3 does not speak CoAP: nothing was sent that way
        finally:
            if hs1.proc is not None:
                hs1.proc.stop()
            hs3.stop()
            loop.close()
