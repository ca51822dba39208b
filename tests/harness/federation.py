"""What the federation integration tests share: module homeservers, their metrics, clients.

``tests/integration/test_federation.py`` and ``test_federation_mixed.py`` run
real Synapse processes (:class:`~synapse_coap_lab.homeserver.SynapseProcess`);
this module holds the pieces both need:

* :class:`Homeserver`: a homeserver's directory, its Noise key, CoAP and
  metrics ports, the module's configuration, and readers for its metrics;
* :class:`CoapMatrix`: a Matrix client over CoAP (the transport's CoapClient),
  :class:`HttpMatrix`: one over plain HTTP on loopback, and the calls both
  make (:class:`MatrixCalls`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from synapse_coap.mapping.messages import HttpRequest, HttpResponse
from synapse_coap.noise import keys as noise_keys
from tests.harness.synapse_proc import SynapseProcess, free_port, scrape_metrics

#: The module's log line once its CoAP listener is up.
READY = r"CoAP listener ready"
#: The module's log line once it has put its agent under Synapse's federation client.
AGENT_INSTALLED = r"federation over CoAP installed"
PASSWORD = "correct horse battery staple"


def q(s: str) -> str:
    """A path segment, percent-encoded (room ids, user ids)."""
    return urllib.parse.quote(s, safe="")


# -- homeservers ----------------------------------------------------------------------------


class Homeserver:
    """A homeserver's directory; with ``module``, its Noise key, CoAP and metrics ports.

    The key file is created once (a restarted process keeps its key).
    """

    def __init__(
        self, workdir: Path, server_name: str, *, module: bool = True, coap_port: int | None = None
    ) -> None:
        self.server_name = server_name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.module = module
        self.coap_port = (coap_port or free_port("udp")) if module else 0
        self.metrics_port = free_port() if module else None
        self.key_path = self.workdir / "coap.key"
        self.public_key = b""
        if module:
            if not self.key_path.exists():
                noise_keys.write_key_file(self.key_path, noise_keys.generate_private_key())
            self.public_key = noise_keys.public_key(noise_keys.read_key_file(self.key_path))
        self.proc: SynapseProcess | None = None

    @property
    def public_b64(self) -> str:
        return noise_keys.encode_public(self.public_key)

    def module_config(
        self,
        federation: dict[str, Any],
        pinned: dict[str, str],
        *,
        module: str = "synapse_coap.CoapModule",
    ) -> dict[str, Any]:
        """The ``modules:`` entry loading the module on this server's CoAP port."""
        return {
            "module": module,
            "config": {
                "listen": [f"127.0.0.1:{self.coap_port}"],
                "private_key_path": str(self.key_path),
                "trust": {"peers": pinned},
                "federation": federation,
            },
        }

    # -- metrics ------------------------------------------------------------------------

    def metrics_text(self) -> str:
        return scrape_metrics(f"http://127.0.0.1:{self.metrics_port}/_synapse/metrics")

    def samples(self, name: str, text: str | None = None) -> list[tuple[dict[str, str], float]]:
        """Every sample of the metric ``name`` as (labels, value)."""
        text = self.metrics_text() if text is None else text
        out = []
        for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")), float(m.group(2))))
        return out

    def metric_sum(self, name: str, text: str | None = None) -> float:
        """Sum of every sample of ``name`` (all labels)."""
        return sum(v for _, v in self.samples(name, text))

    def agent_counts(self, text: str | None = None) -> Counter[tuple[str, str, str]]:
        """synapse_coap_federation_requests_total by (route, via, outcome)."""
        out: Counter[tuple[str, str, str]] = Counter()
        for labels, v in self.samples("synapse_coap_federation_requests_total", text):
            out[(labels["route"], labels["via"], labels["outcome"])] += v
        return out

    def listener_routes(self, text: str | None = None) -> set[str]:
        """Route labels of the requests this server's CoAP listener served."""
        return {
            labels["route"]
            for labels, v in self.samples("synapse_coap_requests_total", text)
            if v and "route" in labels
        }


# -- Matrix clients -------------------------------------------------------------------------


class MatrixCalls:
    """Client-server calls made through ``await self.call(method, path, body, **query)``."""

    token: str | None
    user_id: str | None

    async def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        raise NotImplementedError

    async def register(self, username: str) -> None:
        out = await self.call(
            "POST",
            "/register",
            {"username": username, "password": PASSWORD, "auth": {"type": "m.login.dummy"}},
        )
        self.token, self.user_id = out["access_token"], out["user_id"]

    async def send(self, room_id: str, text: str) -> str:
        txn = f"t{time.monotonic_ns()}"
        out = await self.call(
            "PUT",
            f"/rooms/{q(room_id)}/send/m.room.message/{txn}",
            {"msgtype": "m.text", "body": text},
        )
        return str(out["event_id"])

    async def history(self, room_id: str) -> Counter[str]:
        """Every m.room.message body in the room as this server stores it (with counts)."""
        out = await self.call("GET", f"/rooms/{q(room_id)}/messages", dir="b", limit=500)
        return Counter(
            e["content"].get("body", "")
            for e in out.get("chunk", [])
            if e.get("type") == "m.room.message"
        )

    async def wait_for(self, room_id: str, bodies: set[str], timeout: float = 90) -> Counter[str]:
        """The room's history once it holds every one of ``bodies``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = await self.history(room_id)
            if bodies <= set(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.user_id} never saw {bodies - set(seen)}; saw {seen}")
            await asyncio.sleep(0.5)


async def new_coap_client() -> Any:
    """A CoapClient with a fresh static key that trusts what it is told to (pinned keys)."""
    client_mod = importlib.import_module("synapse_coap.transport.client")
    trust_mod = importlib.import_module("synapse_coap.noise.trust")
    return await client_mod.CoapClient.create(
        static_key=noise_keys.generate_private_key(),
        trust=trust_mod.TrustPolicy(),
        bind=("127.0.0.1", 0),
    )


class CoapMatrix(MatrixCalls):
    """Just enough of the client-server API, over the transport's CoapClient."""

    def __init__(self, client: Any, server: Homeserver, *, timeout: float = 90) -> None:
        endpoint_cls = importlib.import_module("synapse_coap.transport.client").Endpoint
        self.client = client
        self.node = server
        self.timeout = timeout
        self.endpoint = endpoint_cls(
            host="127.0.0.1",
            port=server.coap_port,
            peer_name=server.server_name,
            static_key=server.public_key,
            secure=True,
        )
        self.token = None
        self.user_id = None

    async def raw(
        self,
        method: str,
        target: str,
        body: Any = None,
        headers: tuple[tuple[str, str], ...] = (),
        body_bytes: bytes = b"",
    ) -> HttpResponse:
        hdrs = list(headers)
        data = body_bytes
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.append(("content-type", "application/json"))
        if self.token is not None:
            hdrs.append(("authorization", f"Bearer {self.token}"))
        resp: HttpResponse = await self.client.request(
            self.endpoint,
            HttpRequest(method=method, target=target.encode(), headers=tuple(hdrs), body=data),
            timeout=self.timeout,
        )
        return resp

    async def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        target = "/_matrix/client/v3" + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        resp = await self.raw(method, target, body)
        if resp.status != 200:
            raise AssertionError(f"{method} {target} -> {resp.status} {resp.body[:300]!r}")
        return json.loads(resp.body or b"{}")


class HttpMatrix(MatrixCalls):
    """A client of a stock server, over plain HTTP on loopback (each call in a thread)."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.token = None
        self.user_id = None

    async def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        return await asyncio.to_thread(self._call, method, path, body, query)

    def _call(self, method: str, path: str, body: Any, query: dict[str, Any]) -> Any:
        url = self.base + "/_matrix/client/v3" + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, method=method)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, data, timeout=60) as r:
            return json.loads(r.read() or b"{}")
