"""Mixed federation: two module homeservers and a stock Synapse in one room (issue 5).

Three real Synapse processes on loopback:

* hs1 and hs2 load the module. Their ``federation.peers`` maps point at each
  other's CoAP port with the Noise key pinned; ``fallback: https`` and
  ``discovery: false``, so every other destination goes through Synapse's own
  HTTPS client. Their clients talk to them over CoAP (the transport's
  CoapClient); they have no plain HTTP listener.
* hs3 is stock Synapse (no module), with a client listener over plain HTTP.
* All three have a TLS federation listener (self-signed certificate, server
  name ``127.0.0.1:<that port>``) because hs3 only speaks HTTPS, to either of
  the others and they to it.

carol@hs3 creates a public room, alice@hs1 joins through hs3 (HTTPS), bob@hs2
joins through hs1 (CoAP). Each sends a message and each one's /sync returns
all three. Then the transports are checked per direction: the agents' route
counters (``synapse_coap_federation_requests_total{route,via,outcome}``, which
have no destination label: the only CoAP peer of each is the other module
server, the only HTTPS destination is hs3), the receivers' CoAP request
counters, and Synapse's access logs, which name the sending server and the
listener (``synapse.access.coap`` vs ``synapse.access.https.<port>``) of every
inbound federation request.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness.federation import (
    AGENT_INSTALLED,
    READY,
    CoapMatrix,
    Homeserver,
    HttpMatrix,
    MatrixCalls,
    new_coap_client,
    q,
)
from tests.harness.synapse_proc import SynapseProcess, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: The timeline filter for /sync: room for every event of the scenario.
SYNC_FILTER = json.dumps({"room": {"timeline": {"limit": 100}}})
MESSAGES = {
    "hs1": "hello from alice on hs1 (module)",
    "hs2": "hello from bob on hs2 (module)",
    "hs3": "hello from carol on hs3 (stock)",
}


def _missing_prerequisite() -> str | None:
    for mod in ("synapse_coap.transport.client", "synapse_coap.synapse.agent"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return f"{mod} is not importable yet ({e})"
    return None


# -- homeservers ----------------------------------------------------------------------------


class Server(Homeserver):
    """One homeserver: its server name ``127.0.0.1:<TLS federation port>`` and process."""

    def __init__(self, root: Path, label: str, *, module: bool) -> None:
        self.label = label
        self.fed_port = free_port()
        (root / label).mkdir(parents=True)
        super().__init__(root / label, f"127.0.0.1:{self.fed_port}", module=module)
        self.client_port = None if module else free_port()

    def configure(self, peer: Server | None) -> None:
        modules = []
        if self.module:
            assert peer is not None
            pinned = {self.server_name: self.public_b64, peer.server_name: peer.public_b64}
            federation = {
                "fallback": "https",
                "discovery": False,
                "peers": {
                    peer.server_name: {
                        "endpoints": [f"127.0.0.1:{peer.coap_port}"],
                        "public_key": peer.public_b64,
                    }
                },
            }
            modules.append(self.module_config(federation, pinned))
        self.proc = SynapseProcess(
            self.workdir,
            self.server_name,
            http_port=self.client_port,
            http_resources=("client",),
            tls_federation_port=self.fed_port,
            metrics_port=self.metrics_port,
            modules=modules,
        )

    def start(self) -> None:
        assert self.proc is not None
        self.proc.start(timeout=90, ready_log_pattern=READY if self.module else None)
        if self.module and not re.search(AGENT_INSTALLED, self.proc.log_text()):
            raise AssertionError(f"{self.label}: the federation agent was not installed")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    # -- what the test reads ----------------------------------------------------------

    def inbound(self, origin: Server) -> Counter[str]:
        """Federation requests ``origin`` made to this server, by access logger.

        The access log line of a request authenticated by X-Matrix names the
        origin server in braces; the logger is ``synapse.access.coap`` for the
        module's CoAP listener and ``synapse.access.https.<port>`` for TLS.
        """
        assert self.proc is not None
        rx = re.compile(
            r" - (synapse\.access\.\S+) - .* \{"
            + re.escape(origin.server_name)
            + r"\} Processed request: .*\"(?:GET|PUT|POST) /_matrix/federation/"
        )
        out: Counter[str] = Counter()
        for line in self.proc.log_text().splitlines():
            m = rx.search(line)
            if m:
                out["coap" if m.group(1) == "synapse.access.coap" else "https"] += 1
        return out


# -- Matrix clients -------------------------------------------------------------------------


async def sync_messages(
    user: MatrixCalls, room_id: str, since: str | None, want: set[str], timeout: float
) -> set[str]:
    """m.room.message bodies that incremental /sync delivers for the room after ``since``."""
    got: set[str] = set()
    deadline = time.monotonic() + timeout
    while not want <= got and time.monotonic() < deadline:
        query: dict[str, Any] = {"timeout": 2000, "filter": SYNC_FILTER}
        if since is not None:
            query["since"] = since
        out = await user.call("GET", "/sync", **query)
        since = out["next_batch"]
        room = out.get("rooms", {}).get("join", {}).get(room_id, {})
        for e in room.get("timeline", {}).get("events", []):
            if e.get("type") == "m.room.message":
                got.add(e["content"].get("body", ""))
    return got


# -- the scenario ---------------------------------------------------------------------------


def _run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float = 90) -> T:
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mixed")
    hs1 = Server(root, "hs1", module=True)
    hs2 = Server(root, "hs2", module=True)
    hs3 = Server(root, "hs3", module=False)
    hs1.configure(hs2)
    hs2.configure(hs1)
    hs3.configure(None)
    servers = (hs1, hs2, hs3)
    loop = asyncio.new_event_loop()
    coap_clients: list[Any] = []
    try:
        with ThreadPoolExecutor(3) as pool:  # the three start-ups overlap
            for f in [pool.submit(s.start) for s in servers]:
                f.result()

        async def scenario() -> dict[str, Any]:
            users: dict[str, MatrixCalls] = {}
            for label, server in (("hs1", hs1), ("hs2", hs2)):
                client = await new_coap_client()
                coap_clients.append(client)
                users[label] = CoapMatrix(client, server, timeout=60)
            assert hs3.proc is not None
            users["hs3"] = HttpMatrix(hs3.proc.base_url)
            alice, bob, carol = users["hs1"], users["hs2"], users["hs3"]
            await asyncio.gather(
                alice.register("alice"), bob.register("bob"), carol.register("carol")
            )
            room = await carol.call("POST", "/createRoom", {"preset": "public_chat"})
            room_id = room["room_id"]
            # alice joins through the stock server (HTTPS), bob through hs1 (CoAP)
            await alice.call("POST", f"/join/{q(room_id)}?server_name={q(hs3.server_name)}", {})
            for attempt in range(60):
                try:
                    await bob.call(
                        "POST", f"/join/{q(room_id)}?server_name={q(hs1.server_name)}", {}
                    )
                    break
                except AssertionError as e:
                    # hs1 has just joined with partial state (faster joins) and refuses
                    # make_join ("partial state room", a 404) until its state is complete
                    if "make_join" not in str(e) or attempt == 59:
                        raise
                    await asyncio.sleep(0.5)
            since = {}
            for label, user in users.items():
                out = await user.call("GET", "/sync", filter=SYNC_FILTER)
                since[label] = out["next_batch"]
            for label, user in users.items():
                await user.send(room_id, MESSAGES[label])
            want = set(MESSAGES.values())
            results = await asyncio.gather(
                *(
                    sync_messages(user, room_id, since[label], want, timeout=60)
                    for label, user in users.items()
                )
            )
            return {
                "room_id": room_id,
                "users": users,
                "synced": dict(zip(users, results, strict=True)),
            }

        state = _run(loop, scenario(), timeout=150)
        yield {"hs1": hs1, "hs2": hs2, "hs3": hs3, **state}
    finally:
        for c in coap_clients:
            with contextlib.suppress(Exception):  # best effort at tear-down
                _run(loop, c.close(), timeout=10)
        loop.close()
        for s in servers:
            s.stop()


class TestMixedFederation:
    def test_every_users_sync_returns_all_three_messages(self, mixed: dict[str, Any]) -> None:
        want = set(MESSAGES.values())
        for label, got in mixed["synced"].items():
            assert want <= got, f"{label}'s /sync is missing {want - got}"

    def test_module_servers_federate_with_each_other_over_coap(self, mixed: dict[str, Any]) -> None:
        hs1, hs2 = mixed["hs1"], mixed["hs2"]
        for me, other in ((hs1, hs2), (hs2, hs1)):
            # what the sender's agent did: its only CoAP destination is the other module
            # server, so CoAP sends that succeeded are sends to it
            m = me.agent_counts()
            print(f"{me.label} agent requests (route, via, outcome): {dict(m)}")
            print(f"{other.label} inbound from {me.label}: {dict(other.inbound(me))}")
            coap_ok: Counter[str] = Counter()
            for (route, via, outcome), v in m.items():
                if via == "coap" and outcome == "ok":
                    coap_ok[route] += int(v)
            assert coap_ok["federation.v1.send.1"] >= 1, m
            assert coap_ok["key.v2.server.0"] >= 1, m
            assert sum(v for (_, via, _), v in m.items() if via == "refused") == 0, m
            # what the receiver saw: transactions from the other module server arrived on
            # its CoAP listener, and not one of its requests came over HTTPS
            seen = other.inbound(me)
            assert seen["coap"] >= 1, (other.label, seen)
            assert seen["https"] == 0, (other.label, seen)
            inbound = other.samples("synapse_coap_requests_total")
            received = sum(
                v
                for labels, v in inbound
                if labels.get("route") == "federation.v1.send.1" and labels.get("status") == "200"
            )
            assert received >= 1, inbound
            # the two ends name a request alike: the receiver's listener counted every
            # route the sender's agent carried over CoAP, under the same label
            served = other.listener_routes()
            assert set(coap_ok) <= served, (me.label, set(coap_ok) - served, served)
        # bob's join went to hs1 over CoAP
        routes = {r for (r, via, o), v in hs2.agent_counts().items() if via == "coap" and v}
        assert "federation.v1.make_join" in routes, routes
        assert routes & {"federation.v1.send_join", "federation.v2.send_join"}, routes

    def test_stock_server_is_reached_over_https_both_ways(self, mixed: dict[str, Any]) -> None:
        hs1, hs2, hs3 = mixed["hs1"], mixed["hs2"], mixed["hs3"]
        for me in (hs1, hs2):
            m = me.agent_counts()
            https: Counter[str] = Counter()
            for (route, via, _outcome), v in m.items():
                if via == "https":
                    https[route] += int(v)
            # the fallback carried the transaction to hs3 (and the key fetch from it)
            assert https["federation.v1.send.1"] >= 1, m
            assert https["key.v2.server.0"] >= 1, m
            # and hs3's own requests reached this server on its TLS listener
            seen = me.inbound(hs3)
            assert seen["https"] >= 1 and seen["coap"] == 0, (me.label, seen)
        # alice's join went to the stock server through the fallback
        routes = {r for (r, via, o), v in hs1.agent_counts().items() if via == "https" and v}
        assert "federation.v1.make_join" in routes, routes

    def test_every_outbound_request_went_through_the_agent(self, mixed: dict[str, Any]) -> None:
        for me in (mixed["hs1"], mixed["hs2"]):
            for _ in range(10):  # rescrape if a request was in flight during the scrape
                text = me.metrics_text()
                sent = sum(
                    v
                    for _, v in me.samples(
                        "synapse_http_matrixfederationclient_requests_total", text
                    )
                )
                entered = sum(
                    v for _, v in me.samples("synapse_coap_federation_outbound_total", text)
                )
                if sent == entered:
                    break
                time.sleep(0.5)
            assert sent == entered > 0, (me.label, sent, entered)
