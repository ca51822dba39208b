"""Many listeners, one address book: the sidecar finds a homeserver's listeners by DNS
SRV, moves to another when its own stops answering, and learns again there.

Real processes and real UDP: a tiny DNS responder in this process (127.0.0.1, a free
port) publishes ``_matrix-coap._udp.hs.test`` with two targets; three
``synapse-coap gateway`` processes (one key, one server name: three listeners of
one homeserver) forward to an HTTP backend in this process that says which
listener a request came through and serves ``/.well-known/matrix/client``; a
``synapse-coap sidecar`` process is given only ``coap://hs.test``.

- the sidecar uses the SRV targets in priority order, and the traffic goes through
  the first; the DNS responder saw the SRV query and the targets' A queries;
- the first listener is killed: the sidecar moves to the second (one handshake)
  and asks it for /.well-known again, where a third listener was published since;
- the second is killed: the sidecar moves to the third, which it knows only from
  that second lookup.

(Stock Synapse is left out to keep this under ~20 s: the worker topology test runs
the address book against real Synapse listeners.)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from synapse_coap.proxy.resolver import DnsResolver
from synapse_coap.wire import dns
from synapse_coap.wire.dns import Record, SrvRecord
from tests.harness.dns_server import DnsServer
from tests.harness.synapse_proc import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SRV_NAME = "_matrix-coap._udp.hs.test"


class Backend:
    """One aiohttp app on several ports (one per gateway): what came through which."""

    def __init__(self, count: int) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.seen: list[tuple[int, str]] = []
        self.listeners: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        for port in self.ports:
            self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _handle(self, request: web.Request) -> web.Response:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        self.seen.append((port, request.path))
        if request.path == "/.well-known/matrix/client":
            body: Any = {
                "m.homeserver": {"base_url": "https://hs.test"},
                "io.synapse_coap": {"listeners": list(self.listeners)},
            }
        else:
            body = {"versions": ["v1.11"], "via": port}
        return web.json_response(body)

    def via(self, port: int, path: str) -> int:
        return sum(1 for p, q in self.seen if p == port and q == path)

    def __enter__(self) -> Backend:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def wait_for(predicate: Any, what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def versions_via(url: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/_matrix/client/versions", timeout=aiohttp.ClientTimeout(30)) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return int(json.loads(await resp.text())["via"])


def test_sidecar_finds_listeners_by_srv_fails_over_and_learns_again(tmp_path: Path) -> None:
    from tests.integration.test_sidecar_nio import Proc, make_key, sidecar_url

    coap = [free_port("udp") for _ in range(3)]
    pub = make_key(tmp_path / "hs.key")
    zone = {
        (SRV_NAME, dns.TYPE_SRV): [
            Record(SRV_NAME, dns.TYPE_SRV, 300, SrvRecord(20, 0, coap[1], "l2.hs.test")),
            Record(SRV_NAME, dns.TYPE_SRV, 300, SrvRecord(10, 0, coap[0], "l1.hs.test")),
        ],
        ("l1.hs.test", dns.TYPE_A): [Record("l1.hs.test", dns.TYPE_A, 300, "127.0.0.1")],
        ("l2.hs.test", dns.TYPE_A): [Record("l2.hs.test", dns.TYPE_A, 300, "127.0.0.1")],
    }
    with DnsServer(zone) as nameserver, Backend(3) as backend:
        backend.listeners = [f"coap://127.0.0.1:{p}" for p in coap[:2]]
        gateways = []
        for i in range(3):
            key = tmp_path / f"gw{i}.key"  # the same key: one homeserver, three listeners
            shutil.copy(tmp_path / "hs.key", key)
            gateways.append(
                Proc(
                    [
                        "gateway",
                        "--listen",
                        f"127.0.0.1:{coap[i]}",
                        "--http-target",
                        f"http://127.0.0.1:{backend.ports[i]}",
                        "--key",
                        str(key),
                        "--server-name",
                        "hs.test",
                    ],
                    tmp_path / f"gw{i}.log",
                )
            )
        sidecar = Proc(
            [
                "sidecar",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--homeserver",
                "coap://hs.test",
                "--dns-server",
                nameserver.flag,
                "--server-key",
                pub,
                "--server-name",
                "hs.test",
                "--state-dir",
                str(tmp_path / "state"),
                "--learn-listeners",
                "--failover-after",
                "2",
                "--no-cache",
                "--debug-log",
            ],
            tmp_path / "sidecar.log",
        )
        log = tmp_path / "sidecar.log"
        try:
            for gateway in gateways:
                gateway.start()
            status = sidecar.start()
            # both SRV targets, in priority order, by their A records
            assert f"at coap://127.0.0.1:{coap[0]}, coap://127.0.0.1:{coap[1]} " in status
            assert (SRV_NAME, dns.TYPE_SRV) in nameserver.queries
            assert ("l1.hs.test", dns.TYPE_A) in nameserver.queries
            url = sidecar_url(sidecar)
            assert asyncio.run(versions_via(url)) == backend.ports[0]
            wait_for(
                lambda: backend.via(backend.ports[0], "/.well-known/matrix/client") == 1,
                "the well-known lookup at start",
            )
            # a third listener is published later; then the first one dies
            backend.listeners.append(f"coap://127.0.0.1:{coap[2]}")
            gateways[0].kill()
            assert asyncio.run(versions_via(url)) == backend.ports[1]
            wait_for(
                lambda: backend.via(backend.ports[1], "/.well-known/matrix/client") == 1,
                "the well-known lookup again at the second listener",
            )
            wait_for(
                lambda: (
                    f"learned from /.well-known/matrix/client: coap://127.0.0.1:{coap[2]}"
                    in log.read_text()
                ),
                "the sidecar to learn the third listener",
            )
            gateways[1].kill()
            assert asyncio.run(versions_via(url)) == backend.ports[2]
        finally:
            rc = sidecar.stop()
            for gateway in gateways:
                gateway.stop()
        assert rc == 0
    assert "stopped answering" in log.read_text()


def test_resolver_retries_a_lost_query_and_drops_what_does_not_answer_it() -> None:
    zone = {
        (SRV_NAME, dns.TYPE_SRV): [
            Record(SRV_NAME, dns.TYPE_SRV, 60, SrvRecord(0, 0, 5683, "l1.hs.test"))
        ],
        ("l1.hs.test", dns.TYPE_A): [Record("l1.hs.test", dns.TYPE_A, 60, "127.0.0.1")],
    }
    with DnsServer(zone, glue=True) as nameserver:
        resolver = DnsResolver([nameserver.address], timeout=0.5, attempts=2)
        nameserver.drop = 1
        got = asyncio.run(resolver.query(SRV_NAME, dns.TYPE_SRV))
        assert got is not None and got.records(dns.TYPE_SRV, SRV_NAME)
        assert [rr.data for rr in got.additional] == ["127.0.0.1"]
        assert nameserver.queries == [(SRV_NAME, dns.TYPE_SRV)] * 2
        missing = asyncio.run(resolver.query("_matrix-coap._udp.other.test", dns.TYPE_SRV))
        assert missing is not None and missing.rcode == dns.RCODE_NXDOMAIN
        nameserver.drop = 10
        assert asyncio.run(resolver.query(SRV_NAME, dns.TYPE_SRV)) is None  # two tries, then none
